"""Read a YAML config (file or http(s) URL) safely, keeping each key's line number.

Line numbers let every config error point at ``file:line``; ``yaml.compose`` gives the
node marks that ``safe_load`` throws away, and ``SafeLoader`` constructs the values so no
YAML tag can run code.
"""

from __future__ import annotations

import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from lmforge.errors import LmforgeError

KeyPath = tuple[str | int, ...]


@dataclass
class RawConfig:
    """A config as written: plain values, where they came from, and each key's line."""

    values: dict[str, Any]
    source: str
    base_dir: Path
    lines: dict[KeyPath, int] = field(default_factory=dict)
    overridden: set[str] = field(default_factory=set)

    def where(self, path: KeyPath) -> str:
        """``file:line`` for a key path (or its nearest parent), for error messages."""
        if path and path[0] in self.overridden:
            return f"--{path[0]} on the command line"
        for end in range(len(path), 0, -1):
            line = self.lines.get(tuple(path[:end]))
            if line is not None:
                return f"{self.source}:{line}"
        return self.source


def _collect_lines(node: yaml.Node, prefix: KeyPath, lines: dict[KeyPath, int]) -> None:
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            path = prefix + (str(key_node.value),)
            lines[path] = key_node.start_mark.line + 1
            _collect_lines(value_node, path, lines)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            path = prefix + (index,)
            lines[path] = item.start_mark.line + 1
            _collect_lines(item, path, lines)


URL_TIMEOUT_S = 30
MAX_CONFIG_BYTES = 1 << 20  # a config is a few KB; a bigger answer is not one


def _decode(data: bytes, where: str) -> str:
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise LmforgeError(f"config is not valid UTF-8 (byte 0x{data[exc.start]:02x})", where=f"{where}:{line}",
                           fix="save the config as UTF-8") from None


def _read_text(location: str) -> str:
    """The config's text: a local file, or an http(s) URL (only those schemes, with a timeout and a size limit)."""
    if location.startswith(("http://", "https://")):
        try:
            with urllib.request.urlopen(location, timeout=URL_TIMEOUT_S) as response:  # noqa: S310 (scheme checked)
                data = response.read(MAX_CONFIG_BYTES + 1)
        except (urllib.error.URLError, TimeoutError, OSError, ValueError) as exc:
            raise LmforgeError(f"could not fetch config: {exc}", where=location, fix="check the URL and network") from exc
        if len(data) > MAX_CONFIG_BYTES:
            raise LmforgeError(f"the answer is over {MAX_CONFIG_BYTES >> 20} MiB, too big for a config", where=location,
                               fix="check the URL points at the YAML file itself (e.g. GitHub's raw link)")
        return _decode(data, location)
    if "://" in location:
        raise LmforgeError(f"configs are read from files or http(s) URLs, not {location.split('://')[0]}://", where=location,
                           fix="download the config and give its path")
    path = Path(location)
    if not path.is_file():
        raise LmforgeError("config file does not exist", where=location, fix="check the path")
    return _decode(path.read_bytes(), location)


def parse_yaml(text: str, source: str, base_dir: Path) -> RawConfig:
    """Parse YAML text into a RawConfig; syntax errors name file:line."""
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        values = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{source}:{mark.line + 1}" if mark else source
        column = f" (column {mark.column + 1})" if mark else ""
        problem = " ".join(str(getattr(exc, "problem", None) or exc).split())  # one line
        raise LmforgeError(f"invalid YAML: {problem}{column}", where=where,
                           fix="check the indentation, colons and quotes on that line") from exc
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise LmforgeError("a config must be a mapping of keys to values", where=source,
                           fix="write one `key: value` per line at the top level")
    lines: dict[KeyPath, int] = {}
    if node is not None:
        _collect_lines(node, (), lines)
    return RawConfig(values=values, source=source, base_dir=base_dir, lines=lines)


def read_config(location: str) -> RawConfig:
    """Read a config from a file path or an http(s) URL."""
    text = _read_text(location)
    is_url = location.startswith(("http://", "https://"))
    base_dir = Path.cwd() if is_url else Path(location).resolve().parent
    return parse_yaml(text, location, base_dir)


def parse_override(arg: str) -> tuple[str, Any]:
    """``--key=value`` → (key, value), the value typed by YAML (``--lora_r=8`` is an int)."""
    body = arg[2:] if arg.startswith("--") else arg
    key, sep, raw = body.partition("=")
    key = key.replace("-", "_")
    if not sep:
        return key, True  # a bare --flag switches a boolean on
    try:
        return key, yaml.safe_load(raw) if raw != "" else None
    except yaml.YAMLError:
        return key, raw


def apply_overrides(raw: RawConfig, overrides: list[str]) -> RawConfig:
    """Apply ``--key=value`` overrides on top of the file's values."""
    for arg in overrides:
        key, value = parse_override(arg)
        raw.values[key] = value
        raw.overridden.add(key)
    return raw
