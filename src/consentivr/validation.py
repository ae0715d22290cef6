"""Reading YAML with positions: every problem is collected as one line.

``load_document`` parses with ``yaml.SafeLoader`` (composing nodes, so that every
value keeps its line and column) and rejects duplicate keys. ``Field`` walks the
nodes along a dotted path and records problems instead of raising, so a file
with ten mistakes gets ten lines, in the style of pre-commit's config checks:

    dialplan/gemeente.yaml:12:7: flows.main.purposes.recording.timeout: expected seconds
"""

from __future__ import annotations

import json
import math
import os
import stat
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from consentivr.errors import ConfigError
from consentivr.model import DTMF_KEYS
from consentivr.text import one_line, strip_controls

_STR = "tag:yaml.org,2002:str"
_INT = "tag:yaml.org,2002:int"
_FLOAT = "tag:yaml.org,2002:float"
_BOOL = "tag:yaml.org,2002:bool"
_NULL = "tag:yaml.org,2002:null"


@dataclass
class Problems:
    """The problems found in one file, in the order found; ``sorted()`` orders by line."""

    file: str
    lines: list[str] = field(default_factory=list)
    _at: list[tuple[int, int]] = field(default_factory=list, repr=False)

    def add(self, node: yaml.Node | None, path: str, message: str) -> None:
        line, col = (node.start_mark.line + 1, node.start_mark.column + 1) if node else (1, 1)
        self.add_at(line, col, path, message)

    def add_at(self, line: int, col: int, path: str, message: str) -> None:
        where = f"{path}: " if path else ""
        # The file name is quoted when odd: a newline in it must not forge a line.
        self.lines.append(f"{one_line(self.file)}:{line}:{col}: {where}{_one_line(message)}")
        self._at.append((line, col))

    def sorted(self) -> list[str]:
        """The problems by line and column; problems on one spot keep their order."""
        at = self._at + [(0, 0)] * (len(self.lines) - len(self._at))  # lines added directly
        order = sorted(range(len(self.lines)), key=lambda i: at[i])
        return [self.lines[i] for i in order]

    def raise_if_any(self) -> None:
        if self.lines:
            raise ConfigError(self.sorted())


def _one_line(text: str) -> str:
    return strip_controls(" ".join(str(text).split()))


# Config and dialplan files are small; 80,000 numbers fit in a few MiB. The cap
# keeps a wrong path (a log file, a disk image) from eating all memory.
MAX_CONFIG_BYTES = 16 * 1024 * 1024


class UnreadableFile(Exception):
    """A file that is not a small regular UTF-8 text file; the message says why."""


def read_small_file(path: Path, limit: int, *, binary: bool = False) -> str | bytes:
    """Read a regular file of at most ``limit`` bytes, never blocking.

    ``O_NONBLOCK`` comes first, so a FIFO is refused instead of waiting for a
    writer; a device (``/dev/zero``) is not a regular file; a larger file is
    refused before it is read. Raises :class:`UnreadableFile`.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise UnreadableFile("file not found") from None
    except (OSError, ValueError) as exc:  # ValueError: a NUL in the name
        raise UnreadableFile(f"cannot read file: {getattr(exc, 'strerror', None) or exc}") \
            from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise UnreadableFile("cannot read file: not a regular file")
        if st.st_size > limit:
            raise UnreadableFile(f"cannot read file: too large ({st.st_size} bytes; "
                                 f"at most {limit})")
        os.set_blocking(fd, True)
        chunks: list[bytes] = []
        size = 0
        while chunk := os.read(fd, 1 << 20):
            size += len(chunk)
            if size > limit:  # it grew since fstat
                raise UnreadableFile(f"cannot read file: too large (at most {limit} bytes)")
            chunks.append(chunk)
    except OSError as exc:
        raise UnreadableFile(f"cannot read file: {exc.strerror}") from None
    finally:
        os.close(fd)
    data = b"".join(chunks)
    if binary:
        return data
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UnreadableFile(f"cannot read file: not UTF-8 text (byte {exc.start})") from None


def load_document(path: Path, problems: Problems) -> Field | None:
    """Parse a YAML file into a ``Field`` for its root, or record why it can't."""
    try:
        text = read_small_file(path, MAX_CONFIG_BYTES)
    except UnreadableFile as exc:
        problems.add(None, "", str(exc))
        return None
    assert isinstance(text, str)
    return parse_text(text, problems)


def parse_text(text: str, problems: Problems) -> Field | None:
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line, col = (mark.line + 1, mark.column + 1) if mark else (1, 1)
        what = _one_line(exc.problem or exc.context or "invalid YAML")
        problems.add_at(line, col, "", f"invalid YAML: {what}")
        return None
    except yaml.YAMLError as exc:
        problems.add(None, "", f"invalid YAML: {_one_line(str(exc))}")
        return None
    except RecursionError:
        problems.add(None, "", "invalid YAML: nested too deeply")
        return None
    if node is None:
        problems.add(None, "", "the file is empty")
        return None
    return Field(node, "", problems)


def _scalar(node: yaml.Node) -> object:
    """The Python value of a scalar node, by the tag the SafeLoader resolved."""
    assert isinstance(node, yaml.ScalarNode)
    tag, value = node.tag, node.value
    if tag == _INT:
        try:
            return int(value.replace("_", ""), 0)
        except ValueError:
            return value
    if tag == _FLOAT:
        try:
            return float(value.replace("_", ""))
        except ValueError:
            return value
    if tag == _BOOL:
        return value.lower() in ("yes", "true", "on", "y")
    if tag == _NULL:
        return None
    return value


def _describe(node: yaml.Node) -> str:
    if isinstance(node, yaml.MappingNode):
        return "a mapping"
    if isinstance(node, yaml.SequenceNode):
        return "a list"
    value = _scalar(node)
    if value is None:
        return "nothing"
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


class Field:
    """A YAML node at a dotted path. Accessors record problems and return None."""

    def __init__(self, node: yaml.Node, path: str, problems: Problems) -> None:
        self.node = node
        self.path = path
        self.problems = problems

    @property
    def line(self) -> int:
        return self.node.start_mark.line + 1

    def error(self, message: str) -> None:
        self.problems.add(self.node, self.path, message)

    def child_path(self, key: str | int) -> str:
        if isinstance(key, int):
            return f"{self.path}[{key}]"
        if not key.isprintable():
            key = json.dumps(key)  # a control character must not break the one-line report
        return f"{self.path}.{key}" if self.path else key

    # -- containers -------------------------------------------------------

    def entries(self) -> Iterator[tuple[str, Field]]:
        """The key/value pairs of a mapping whose keys are names (flows, purposes)."""
        if not isinstance(self.node, yaml.MappingNode):
            self.error(f"expected a mapping, got {_describe(self.node)}")
            return
        seen: dict[str, int] = {}
        for key_node, value_node in self.node.value:
            if not isinstance(key_node, yaml.ScalarNode) or _scalar(key_node) is None:
                self.problems.add(key_node, self.path, "keys must be plain names")
                continue
            key = str(key_node.value)
            if key in seen:
                self.problems.add(
                    key_node, self.child_path(key), f"duplicate key (first on line {seen[key]})"
                )
                continue
            seen[key] = key_node.start_mark.line + 1
            yield key, Field(value_node, self.child_path(key), self.problems)

    def mapping(
        self, required: Iterable[str] = (), optional: Iterable[str] = ()
    ) -> dict[str, Field] | None:
        """A mapping with a fixed set of keys: unknown keys and missing ones are problems."""
        if not isinstance(self.node, yaml.MappingNode):
            self.error(f"expected a mapping, got {_describe(self.node)}")
            return None
        required = tuple(required)
        allowed = set(required) | set(optional)
        found: dict[str, Field] = {}
        for key, value in self.entries():
            if key not in allowed:
                hint = ", ".join(sorted(allowed)) or "none"
                value.problems.add(
                    _key_node(self.node, key), value.path, f"unknown key (allowed: {hint})"
                )
                continue
            found[key] = value
        for key in required:
            if key not in found:
                self.error(f"missing required key '{key}'")
        return found

    def items(self) -> list[Field]:
        if not isinstance(self.node, yaml.SequenceNode):
            self.error(f"expected a list, got {_describe(self.node)}")
            return []
        return [Field(n, self.child_path(i), self.problems) for i, n in enumerate(self.node.value)]

    # -- scalars ----------------------------------------------------------

    def _value(self) -> object:
        if not isinstance(self.node, yaml.ScalarNode):
            return _Missing
        return _scalar(self.node)

    def string(self, *, allow_empty: bool = False) -> str | None:
        value = self._value()
        if isinstance(value, str) and (allow_empty or value.strip()):
            return value
        if isinstance(value, int | float) and not isinstance(value, bool):
            return str(self.node.value)  # e.g. an unquoted extension like 100
        self.error(f"expected text, got {_describe(self.node)}")
        return None

    def name(self) -> str | None:
        """An identifier safe for Asterisk and file names: letters, digits, - and _."""
        value = self.string()
        if value is None:
            return None
        if not value.replace("-", "").replace("_", "").isalnum() or not value.isascii():
            self.error("expected a name of letters, digits, '-' or '_'")
            return None
        return value

    def seconds(self) -> float | None:
        value = self._value()
        if (
            isinstance(value, int | float)
            and not isinstance(value, bool)
            and math.isfinite(value)
            and 0 < value <= 3600
        ):
            return float(value)
        self.error("expected a positive number of seconds (at most 3600)")
        return None

    def integer(self, minimum: int = 0, maximum: int = 1_000_000) -> int | None:
        value = self._value()
        if isinstance(value, int) and not isinstance(value, bool) and minimum <= value <= maximum:
            return value
        self.error(f"expected a whole number from {minimum} to {maximum}")
        return None

    def boolean(self) -> bool | None:
        value = self._value()
        if isinstance(value, bool):
            return value
        self.error("expected true or false")
        return None

    def choice(self, options: Iterable[str]) -> str | None:
        options = tuple(options)
        value = self._value()
        if isinstance(value, str) and value in options:
            return value
        self.error(f"expected one of {', '.join(options)}, got {_describe(self.node)}")
        return None

    def dtmf_key(self) -> str | None:
        value = self._value()
        if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= 9:
            return str(value)
        if isinstance(value, str) and value in DTMF_KEYS:
            return value
        self.error("expected one DTMF key: 0-9, '*' or '#' (quote * and #)")
        return None

    def strings(self) -> list[str]:
        """A string, or a list of strings."""
        if isinstance(self.node, yaml.SequenceNode):
            values = [item.string() for item in self.items()]
            return [v for v in values if v is not None]
        value = self.string()
        return [value] if value is not None else []


class _MissingType:
    pass


_Missing = _MissingType()


def _key_node(mapping: yaml.MappingNode, key: str) -> yaml.Node:
    for key_node, _ in mapping.value:
        if isinstance(key_node, yaml.ScalarNode) and key_node.value == key:
            return key_node
    return mapping


# --- paths in config files ---------------------------------------------------

NAME_MAX = 255  # bytes in one file name (Linux)
PATH_MAX = 4096


def bad_path(f: Field, value: str) -> bool:
    """Record why a path cannot be a file name at all (NUL, too long); True if so."""
    if "\0" in value:
        f.error("a path cannot contain a NUL byte")
        return True
    encoded = os.fsencode(value)
    if len(encoded) >= PATH_MAX or any(len(p) > NAME_MAX for p in encoded.split(b"/")):
        f.error(f"a path may have at most {NAME_MAX} bytes in each name and {PATH_MAX - 1} "
                "in all")
        return True
    return False


def field_path(f: Field, value: str) -> Path:
    base = Path(f.problems.file).resolve().parent
    if "\0" in value:
        value = value.replace("\0", "")  # reported by bad_path; never reaches the OS
    return (base / os.path.expanduser(value)).resolve()
