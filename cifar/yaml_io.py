"""Every YAML this project reads goes through safe_load here, bounded before it can cost time or memory.

YAML's aliases make a small text expand into a huge document ("billion laughs": nine levels of nine references to
the level below are 387 million values from 1.8 KB), and its nesting makes the parser, and any code walking the
result, recurse once per level. So: the text is capped before parsing (a file is read no further than the cap), the
composed document is counted with every alias expanded where it is used and refused above MAX_NODES values, and
nesting deeper than MAX_DEPTH is refused while composing, before Python's recursion limit is near. A refusal is a
UserError naming the source and the limit.
"""
from __future__ import annotations

from typing import IO, Any

import yaml

from .errors import UserError

FILE_CHARS = 1 << 20        # a recipe, a sweep file, a run's config.yaml: ours are a few KB
VALUE_CHARS = 64 << 10      # one override value on a command line
MAX_NODES = 100_000         # values (scalars, lists, mappings) after alias expansion
MAX_DEPTH = 100             # lists and mappings inside one another, aliases expanded


def safe_load(text_or_stream: str | IO[str], where: str, limit: int = FILE_CHARS) -> Any:
    """yaml.safe_load within the limits above; `where` names the source in a refusal ("config file X",
    "override optim.lr"). A stream is read no further than `limit` characters. Syntax errors stay yaml.YAMLError,
    for the caller to word."""
    try:
        text = text_or_stream if isinstance(text_or_stream, str) else text_or_stream.read(limit + 1)
    except UnicodeDecodeError:
        raise UserError(f"{where} is not a text (YAML) file: it holds bytes that are not UTF-8; pass a YAML "
                        f"file") from None
    if len(text) > limit:
        raise UserError(f"{where} is longer than {limit:,} characters, the limit for YAML read here; "
                        f"{'shorten it' if isinstance(text_or_stream, str) else 'pass a smaller file'}")
    loader = _BoundedLoader(text, where)
    try:
        return loader.get_single_data()
    except ValueError as e:   # a constructor's: a number of more than 4300 digits, a date such as 2026-13-45
        raise UserError(f"{where} holds a value YAML cannot read ({e}); fix it") from None
    finally:
        loader.dispose()


class _BoundedLoader(yaml.SafeLoader):
    """SafeLoader that refuses deep nesting while composing and a document too large once composed, before any
    Python object is constructed."""

    def __init__(self, text: str, where: str):
        super().__init__(text)
        self.where, self.depth = where, 0

    def compose_sequence_node(self, anchor):
        return self._nested(super().compose_sequence_node, anchor)

    def compose_mapping_node(self, anchor):
        return self._nested(super().compose_mapping_node, anchor)

    def _nested(self, compose, anchor):
        self.depth += 1
        try:
            if self.depth > MAX_DEPTH:
                raise _too_deep(self.where)
            return compose(anchor)
        finally:
            self.depth -= 1

    def get_single_node(self):
        node = super().get_single_node()
        if node is not None:
            _measure(node, 0, {}, self.where)
        return node


def _measure(node: yaml.Node, outer: int, known: dict, where: str) -> tuple[int, int]:
    """(values, levels of nesting) of the node with its aliases expanded; `outer`: the lists and mappings around
    it. An alias is the node it names, shared, so `known` remembers each node's measure: the walk visits every node
    once however often it is used, and goes no deeper than MAX_DEPTH (a node that holds itself is infinitely deep)."""
    if isinstance(node, yaml.ScalarNode):
        return 1, 0
    if id(node) not in known:
        if outer >= MAX_DEPTH:
            raise _too_deep(where)
        children = [child for pair in node.value for child in pair] if isinstance(node, yaml.MappingNode) else \
            node.value
        count, levels = 1, 1
        for child in children:
            values, below = _measure(child, outer + 1, known, where)
            count, levels = count + values, max(levels, below + 1)
            if count > MAX_NODES:
                raise UserError(f"{where} expands to more than {MAX_NODES:,} values (each use of an alias counts "
                                f"as a copy), the limit for YAML read here; write it without chains of aliases")
        known[id(node)] = count, levels
    count, levels = known[id(node)]
    if outer + levels > MAX_DEPTH:
        raise _too_deep(where)
    return count, levels


def _too_deep(where: str) -> UserError:
    return UserError(f"{where} nests deeper than {MAX_DEPTH} levels (aliases expanded), the limit for YAML read "
                     f"here; flatten it")
