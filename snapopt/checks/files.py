"""Reading configuration files a user hands us: strict UTF-8, bounded size, YAML without duplicate keys,
bounded nesting and bounded size after alias expansion. Errors name the file (and line where known)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from snapopt.errors import UsageError

#: a recipe or spec is a few KB; anything this big is not one
MAX_BYTES = 1 << 20
#: nesting deeper than this is not a recipe (and PyYAML's recursive composer would overflow the stack)
MAX_DEPTH = 64
#: values after alias expansion (a "billion laughs" document is small on disk and huge in memory)
MAX_NODES = 100_000


def read_text_file(path: str | Path, what: str = "file", max_bytes: int = MAX_BYTES) -> str:
    """The file's text, or a one-line error saying why it is not a readable UTF-8 text file."""
    path = Path(path)
    try:
        if not path.exists():
            raise UsageError(f"{what} '{path}' not found")
        if path.is_dir():
            raise UsageError(f"{what} '{path}' is a folder, not a file")
        if not path.is_file():  # a FIFO or a device (/dev/zero) would block or never end
            raise UsageError(f"{what} '{path}' is not a regular file")
        size = path.stat().st_size
        if size > max_bytes:
            raise UsageError(f"{what} '{path}' is {size:,} bytes; a {what} is at most {max_bytes:,}")
        data = path.read_bytes()
    except OSError as exc:
        raise UsageError(f"{what} '{_short(path)}' cannot be read: {exc.strerror or exc.__class__.__name__}") from None
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise UsageError(f"{what} '{path}' is UTF-16 text; save it as UTF-8")
    if b"\x00" in data:
        raise UsageError(f"{what} '{path}' is a binary file (contains NUL bytes), not UTF-8 text")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise UsageError(f"{what} '{path}' is not UTF-8 text (byte 0x{data[exc.start]:02x} at line {line}); save it as UTF-8") from None
    return text


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that rejects a key given twice in one mapping (PyYAML silently keeps the last)."""


def _construct_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False):
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":
            continue
        key = loader.construct_object(key_node, deep=True)
        try:
            hash(key)
        except TypeError:
            raise yaml.constructor.ConstructorError(None, None, f"unhashable key {key!r}", key_node.start_mark) from None
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key '{key}' (first on line {seen[key] + 1})", key_node.start_mark)
        seen[key] = key_node.start_mark.line
    return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)

_OPEN = (yaml.BlockMappingStartToken, yaml.BlockSequenceStartToken, yaml.FlowMappingStartToken, yaml.FlowSequenceStartToken)
_CLOSE = (yaml.BlockEndToken, yaml.FlowMappingEndToken, yaml.FlowSequenceEndToken)


def _check_depth(text: str, where: str) -> None:
    """Nesting depth from the token stream (PyYAML's scanner is iterative, its composer is recursive)."""
    depth = 0
    try:
        for tok in yaml.scan(text, Loader=yaml.SafeLoader):
            if isinstance(tok, _OPEN):
                depth += 1
                if depth > MAX_DEPTH:
                    raise UsageError(f"{where} line {tok.start_mark.line + 1}: nesting deeper than {MAX_DEPTH} levels")
            elif isinstance(tok, _CLOSE):
                depth -= 1
    except yaml.YAMLError:
        return  # the parse below reports it with its line


def _count_nodes(value: Any, where: str) -> None:
    budget = MAX_NODES
    stack = [value]
    while stack:
        v = stack.pop()
        budget -= 1
        if budget < 0:
            raise UsageError(f"{where} expands to more than {MAX_NODES:,} values (aliases?); a recipe is far smaller")
        if isinstance(v, dict):
            stack.extend(v.keys())
            stack.extend(v.values())
        elif isinstance(v, (list, tuple)):
            stack.extend(v)


def parse_yaml(text: str, where: str) -> Any:
    """Parse YAML text strictly; ``where`` names the source in errors (``'recipe x.yaml'``)."""
    _check_depth(text, where)
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" line {mark.line + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or exc.__class__.__name__
        raise UsageError(f"{where}{at}: invalid YAML ({_short(problem, 200)})") from None
    except RecursionError:
        raise UsageError(f"{where}: nesting too deep") from None
    _count_nodes(data, where)
    return data


def load_yaml_file(path: str | Path, what: str = "file") -> Any:
    return parse_yaml(read_text_file(path, what), f"{what} '{_short(path, 300)}'")


def load_json_file(path: str | Path, what: str = "file", max_bytes: int = 64 << 20) -> Any:
    text = read_text_file(path, what, max_bytes=max_bytes)
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise UsageError(f"{what} '{path}' is not valid JSON (line {exc.lineno}: {exc.msg})") from None
    except RecursionError:
        raise UsageError(f"{what} '{path}': JSON nesting too deep") from None


def _short(value: Any, limit: int = 120) -> str:
    s = str(value)
    return s if len(s) <= limit else s[: limit - 1] + "…"
