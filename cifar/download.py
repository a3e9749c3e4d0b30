"""Getting a dataset archive onto disk so that a later run can trust what it finds there.

The archive is fetched with urllib (http, https, and file:// for clusters without internet) to `<archive>.part`
beside the target: every read has a timeout (CIFAR_DOWNLOAD_TIMEOUT seconds, default 30) so a stalled server
cannot hang a job, a failure is retried a few times (CIFAR_DOWNLOAD_TRIES, default 3), the size is bounded, and the
MD5 is computed on the way. Only an archive whose MD5 matches is renamed to its final name, so a partial or foreign
download is never found there later. A failure leaves nothing behind but the message.
"""
from __future__ import annotations

import hashlib
import http.client
import os
import re
import time
import urllib.error
import urllib.request

from .errors import UserError

TIMEOUT_ENV, TRIES_ENV = "CIFAR_DOWNLOAD_TIMEOUT", "CIFAR_DOWNLOAD_TRIES"
MAX_BYTES = 1024 * 2**20     # CIFAR-100's archive is 161 MiB; a mirror sending more is not sending CIFAR
CHUNK = 2**20


class DownloadFailed(Exception):
    """The archive could not be fetched; the message says why in a few words."""


def expected_md5(official: str, variable: str) -> str | None:
    """The MD5 an archive must have: the official one, or $variable (32 hex digits, or `none`: not checked)."""
    value = os.environ.get(variable, "").strip().lower()
    if not value:
        return official
    if value == "none":
        return None
    if not re.fullmatch(r"[0-9a-f]{32}", value):
        raise UserError(f"{variable}={value!r} is neither an MD5 (32 hex digits) nor 'none'; set it to the archive's "
                        f"MD5, or unset it to check the official one")
    return value


def md5_of(path: str) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _setting(name: str, default: float, kind=float) -> float:
    try:
        value = kind(os.environ.get(name, default))
    except ValueError:
        value = 0
    if value <= 0:
        raise UserError(f"{name}={os.environ[name]!r} must be a positive number; unset it for {default}")
    return value


def fetch(url: str, archive: str) -> str:
    """Download `url` to `archive` + ".part" and return the MD5 of what arrived (the caller decides whether to
    keep it). Transient failures (timeouts, resets, server errors) are retried with a short backoff; a missing
    file or a refusal (4xx) is not. The part file is removed on any failure, signals included."""
    timeout, tries = _setting(TIMEOUT_ENV, 30.0), int(_setting(TRIES_ENV, 3, int))
    part = archive + ".part"
    for attempt in range(1, tries + 1):
        try:
            return _copy(url, part, timeout)
        except BaseException as e:
            _remove(part)
            if isinstance(e, DownloadFailed) or not isinstance(e, _RETRIED) or _permanent(e):
                raise
            if attempt == tries:
                raise DownloadFailed(_reason(e) + (f", {tries} tries" if tries > 1 else "")) from None
            time.sleep(min(2 ** (attempt - 1), timeout))


# Failures worth another try; an HTTPError or a missing file is answered the same way each time.
_RETRIED = (OSError, http.client.HTTPException)
# Everything fetch raises for a download that did not work (ValueError: a URL urllib cannot use).
FETCH_ERRORS = (DownloadFailed, ValueError) + _RETRIED


def _permanent(e: BaseException) -> bool:
    if isinstance(e, urllib.error.HTTPError):
        return e.code < 500 and e.code != 429
    reason = getattr(e, "reason", e)
    return isinstance(reason, (FileNotFoundError, PermissionError, IsADirectoryError))


def _reason(e: BaseException) -> str:
    if isinstance(e, urllib.error.HTTPError):
        return f"HTTP {e.code} {e.reason}"
    reason = getattr(e, "reason", e)
    if isinstance(reason, TimeoutError) or "timed out" in str(reason):
        return f"no answer within {_setting(TIMEOUT_ENV, 30.0)} s (${TIMEOUT_ENV})"
    text = getattr(reason, "strerror", None) or str(reason)
    return (text.splitlines() or [type(reason).__name__])[0]


def _copy(url: str, part: str, timeout: float) -> str:
    digest, received = hashlib.md5(), 0
    with urllib.request.urlopen(url, timeout=timeout) as response, open(part, "wb") as out:
        length = response.headers.get("Content-Length")
        if length and length.isdigit() and int(length) > MAX_BYTES:
            raise DownloadFailed(f"it announces {int(length) / 2**20:.0f} MiB, more than any CIFAR archive")
        while chunk := response.read(CHUNK):
            received += len(chunk)
            if received > MAX_BYTES:
                raise DownloadFailed(f"it sent more than {MAX_BYTES // 2**20} MiB, more than any CIFAR archive")
            digest.update(chunk)
            out.write(chunk)
        if length and length.isdigit() and received < int(length):
            raise http.client.IncompleteRead(b"", int(length) - received)
    return digest.hexdigest()


def _remove(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


def describe(e: BaseException) -> str:
    """A few words on why a fetch failed, for the one error line."""
    return str(e) if isinstance(e, DownloadFailed) else _reason(e)
