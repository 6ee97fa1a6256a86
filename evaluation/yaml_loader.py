"""The safe front door for YAML configs: bounded size and depth, UTF-8 only, no aliases, no duplicate keys.

A config is a small hand-written file. Anything else is refused before it can cost memory or time: a file
over ``MAX_BYTES``, a byte sequence that is not UTF-8, an anchor or alias (a 527-byte alias bomb expands to
gigabytes), a key given twice (YAML keeps the last one silently), nesting deeper than ``MAX_DEPTH``. The node
tree is checked before anything is constructed, with libyaml's C parser when it is installed.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from leakbench.splitnn.errors import ParameterError, short_repr

MAX_BYTES = 1_000_000
MAX_DEPTH = 20
MAX_NODES = 100_000
_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class YAMLInputError(ParameterError):
    """A config file that is not acceptable YAML; ``key`` is the file (and line), never a huge value."""


def _where(path: str, node: yaml.Node) -> str:
    return f"{path}:{node.start_mark.line + 1}:{node.start_mark.column + 1}"


def _check_tree(root: yaml.Node, path: str) -> None:
    """Refuse aliases, duplicate keys, deep nesting and huge trees, walking the nodes without recursion."""
    seen: set[int] = set()
    stack: list[tuple[yaml.Node, int]] = [(root, 1)]
    while stack:
        node, depth = stack.pop()
        if id(node) in seen:  # the composer shares one node object between an anchor and its aliases
            raise YAMLInputError(_where(path, node), "<alias>", "no anchors or aliases (&name / *name)")
        seen.add(id(node))
        if len(seen) > MAX_NODES:
            raise YAMLInputError(path, f"<more than {MAX_NODES} values>", "a config of hand-written size")
        if depth > MAX_DEPTH:
            raise YAMLInputError(_where(path, node), "<deeper nesting>", f"at most {MAX_DEPTH} levels of nesting")
        if isinstance(node, yaml.MappingNode):
            keys: set[tuple[str, str]] = set()
            for key, value in node.value:
                if isinstance(key, yaml.ScalarNode):
                    if key.tag == "tag:yaml.org,2002:merge":
                        raise YAMLInputError(_where(path, key), "<<", "no merge keys (they need aliases)")
                    if (key.tag, key.value) in keys:
                        raise YAMLInputError(_where(path, key), key.value,
                                             "each key once in a mapping (this one is given twice)")
                    keys.add((key.tag, key.value))
                stack.extend(((key, depth + 1), (value, depth + 1)))
        elif isinstance(node, yaml.SequenceNode):
            stack.extend((item, depth + 1) for item in node.value)


def parse_yaml(data: bytes, path: str = "<config>") -> Any:
    """Parse the bytes of a config file, refusing what the module docstring lists with a YAMLInputError."""
    if len(data) > MAX_BYTES:
        raise YAMLInputError(path, f"<{len(data):,} bytes>", f"a config file of at most {MAX_BYTES:,} bytes")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise YAMLInputError(path, f"<byte {short_repr(data[exc.start:exc.start + 1])} at offset {exc.start}>",
                             "a UTF-8 text file") from None
    loader = _Loader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _check_tree(node, path)
        return loader.construct_document(node)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else path
        problem = getattr(exc, "problem", None) or str(exc)
        raise YAMLInputError(where, "<unparseable YAML>", f"valid YAML ({short_repr(problem, 200)[1:-1]})") from None
    finally:
        loader.dispose()


def load_yaml(path: str | Path) -> Any:
    """Read and parse a config file; a missing or unreadable file raises OSError (the CLI says "cannot read")."""
    path = Path(path)
    with path.open("rb") as file:
        data = file.read(MAX_BYTES + 1)  # never read more of a huge file than it takes to refuse it
    return parse_yaml(data, str(path))
