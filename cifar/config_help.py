"""Every config key for `--help`: its type, default and comment, read from the dataclasses in cifar/config.py (their
source comments included), so the list cannot drift from the code."""
from __future__ import annotations

import dataclasses
import functools
import inspect
import re
import textwrap
import types
import typing
from typing import Literal

from . import config as C


@dataclasses.dataclass
class Key:
    name: str          # dotted: optim.lr
    type: str          # float, int or null, sgd | adamw | muon, ...
    default: str       # as YAML writes it
    comment: str       # the dataclass's comment for the field, one line


def type_name(tp) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        inner = [type_name(a) for a in args if a is not type(None)]
        return " or ".join(inner) + (" or null" if type(None) in args else "")
    if origin is Literal:
        return " | ".join(map(str, args))
    if origin is list:
        return f"list of {type_name(args[0])}"
    return getattr(tp, "__name__", str(tp))


def yaml_value(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return "[" + ", ".join(map(yaml_value, value)) + "]"
    return str(value)


@functools.cache   # every entry point call builds its --help epilog; inspect parses the whole module per class
def field_comments(cls) -> dict[str, str]:
    """A field's comment: the comment lines just above it (at its indentation), then the one at the end of its line
    and the lines continuing it (comment-only lines indented deeper)."""
    comments: dict[str, list[str]] = {}
    above: list[str] = []
    last = None
    for line in inspect.getsource(cls).splitlines()[1:]:
        field = re.match(r"^(\s+)(\w+): [^#]*?(?:#\s*(.*))?$", line)
        only = re.match(r"^(\s+)#\s?(.*)$", line)
        if only and last and len(only.group(1)) > 4:     # deeper than the fields: continues the last field's comment
            comments[last].append(only.group(2).strip())
        elif only:
            above.append(only.group(2).strip())
        elif field:
            last = field.group(2)
            comments[last] = above + ([field.group(3).strip()] if field.group(3) else [])
            above = []
        else:
            above, last = [], None
    return {name: " ".join(lines) for name, lines in comments.items()}


def keys(cls=C.Config, prefix: str = "") -> list[Key]:
    """Every key; one whose values a registry holds lists the names registered now (a user's own included)."""
    hints, comments, out = typing.get_type_hints(cls), field_comments(cls), []
    defaults, registered = cls(), C.registry_choices()
    for f in dataclasses.fields(cls):
        tp, name = hints[f.name], prefix + f.name
        if dataclasses.is_dataclass(tp):
            out += keys(tp, f"{name}.")
        else:
            kind = " | ".join(registered[name]) if name in registered else type_name(tp)
            out.append(Key(name, kind, yaml_value(getattr(defaults, f.name)), comments.get(f.name, "")))
    return out


def help_text(width: int = 118) -> str:
    """The epilog of train.py --help: every key by section."""
    lines = ["config keys (override any as section.key=value, values read as YAML; a recipe sets them with "
             "--config):"]
    section = None
    for key in keys():
        head = key.name.split(".")[0] if "." in key.name else "(top level)"
        if head != section:
            section = head
            lines.append(f"\n  {section}:")
        lines.append(f"    {key.name} ({key.type}, default {key.default})")
        if key.comment:
            lines += textwrap.wrap(key.comment, width, initial_indent=" " * 8, subsequent_indent=" " * 8)
    return "\n".join(lines)
