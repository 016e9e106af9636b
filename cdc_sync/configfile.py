"""Reading ``config.yaml``: finding the file, parsing its YAML, expanding ``${VAR}`` in values.

The first half of loading a config (:mod:`cdc_sync.config` validates what this returns). Every
problem is a :class:`~cdc_sync.errors.ConfigError` naming the file and, where there is one, the
dotted key path; no message quotes a value, which may be a secret.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import yaml

from cdc_sync.errors import ConfigError

CONFIG_ENV_VAR = "CDC_SYNC_CONFIG"
DEFAULT_CONFIG_FILE = "config.yaml"


def resolve_config_path(cli_value: str | None, environ: Mapping[str, str]) -> Path:
    """Pick the config file: ``-c/--config``, else ``$CDC_SYNC_CONFIG``, else ``./config.yaml``."""
    chosen = cli_value or environ.get(CONFIG_ENV_VAR) or DEFAULT_CONFIG_FILE
    return Path(chosen).expanduser()


# A config is a few kilobytes, about four levels deep, and has no use for YAML aliases. Past these
# bounds a file is refused before anything walks it, so no file can exhaust memory, time or the
# interpreter's stack: an alias bomb or a self-referencing alias (``&r [*r]``), a file nested
# hundreds deep, an integer of thousands of digits. The size bound also bounds the time: PyYAML's
# pure-Python parser (the C one composes nodes recursively, out of our reach) takes seconds for
# 64 KiB of one-character list items, its worst case.
MAX_FILE_BYTES = 64 * 1024
MAX_DEPTH = 20
MAX_NUMBER_LENGTH = 32


class _StrictLoader(yaml.SafeLoader):
    """A safe loader that refuses duplicate keys, aliases, deep nesting and values it cannot read.

    PyYAML would let the last of two equal keys win silently, expand aliases without limit, nest
    until the stack overflows, and let a scalar its constructors cannot read (``!!int x``,
    ``2026-13-45``) escape as a ValueError; each is a :class:`yaml.YAMLError` at its position here.
    """

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent: yaml.Node | None, index: int) -> yaml.Node | None:
        event: yaml.Event = self.peek_event()  # type: ignore[no-untyped-call]  # stubs lack it
        mark = cast("yaml.error.Mark", event.start_mark)  # the pure-Python parser's marks
        if isinstance(event, yaml.AliasEvent):
            raise yaml.composer.ComposerError(
                None, None, "aliases (*name) are not accepted; write the value out", mark
            )
        if self._depth >= MAX_DEPTH:
            raise yaml.composer.ComposerError(
                None, None, f"nested more than {MAX_DEPTH} levels deep", mark
            )
        self._depth += 1
        try:
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_object(self, node: yaml.Node, deep: bool = False) -> Any:
        try:
            return super().construct_object(node, deep=deep)
        # What PyYAML's scalar constructors raise for text their tag cannot read: int() and
        # float() ValueError, the timestamp pattern's failed match AttributeError, !!bool KeyError.
        except (ValueError, TypeError, KeyError, AttributeError, OverflowError):
            tag = node.tag.rsplit(":", 1)[-1]
            raise yaml.constructor.ConstructorError(
                None, None, f"not a valid {tag}", node.start_mark
            ) from None

    def construct_yaml_int(self, node: yaml.ScalarNode) -> int:
        if len(node.value) > MAX_NUMBER_LENGTH:
            raise yaml.constructor.ConstructorError(
                None,
                None,
                f"a number of {len(node.value)} characters; no setting takes one that long",
                node.start_mark,
            )
        return super().construct_yaml_int(node)

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=deep)
            try:
                duplicate = key in seen
            except TypeError:  # unhashable; the base class reports that
                continue
            if duplicate:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {printable(key)!r}", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


_StrictLoader.add_constructor("tag:yaml.org,2002:int", _StrictLoader.construct_yaml_int)


def _yaml_problem(error: yaml.YAMLError) -> str:
    """Describe a YAML error by position only: PyYAML's own text quotes the line, maybe a secret."""
    if isinstance(error, yaml.reader.ReaderError):
        return (
            f"not valid YAML: control character #x{error.character:x} at character "
            f"{error.position + 1}; YAML files hold printable text"
        )
    if not isinstance(error, yaml.MarkedYAMLError):
        return "not valid YAML"
    mark = error.problem_mark or error.context_mark
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
    problem = error.problem or error.context or "syntax error"
    return f"not valid YAML{where}: {problem}"


@dataclass(frozen=True)
class Document:
    """A config file as read: its YAML tree, where each key was written, and who may read it."""

    path: Path
    tree: dict[Any, Any]
    lines: Mapping[tuple[str, ...], int]  # key path, each key as written → its line (from 1)
    mode: int  # the file's permission bits (st_mode & 0o7777)

    def line(self, keys: tuple[object, ...]) -> int | None:
        """The line the key at ``keys`` was written on, if it is known."""
        return self.lines.get(tuple(str(key) for key in keys))


def _key_lines(node: yaml.Node) -> dict[tuple[str, ...], int]:
    """Where each scalar key of a composed document was written, by key path."""
    lines: dict[tuple[str, ...], int] = {}

    def walk(node: yaml.Node, keys: tuple[str, ...]) -> None:  # depth bounded by MAX_DEPTH
        if isinstance(node, yaml.MappingNode):
            for key_node, value_node in node.value:
                if isinstance(key_node, yaml.ScalarNode):
                    lines[(*keys, key_node.value)] = key_node.start_mark.line + 1
                    walk(value_node, (*keys, key_node.value))
        elif isinstance(node, yaml.SequenceNode):
            for index, item in enumerate(node.value):
                walk(item, (*keys, str(index)))

    walk(node, ())
    return lines


def _read_text(path: Path) -> tuple[str, int]:
    """The file's text and permission bits, or a ConfigError saying why it cannot be had."""
    try:
        with path.open("rb") as file:
            mode = os.fstat(file.fileno()).st_mode & 0o7777
            data = file.read(MAX_FILE_BYTES + 1)
    except FileNotFoundError:
        raise ConfigError(
            str(path),
            "",
            "no such file; pass -c/--config, set CDC_SYNC_CONFIG, or create ./config.yaml",
        ) from None
    except OSError as error:
        raise ConfigError(str(path), "", f"cannot read: {error.strerror}") from None
    if len(data) > MAX_FILE_BYTES:
        raise ConfigError(
            str(path), "", f"larger than {MAX_FILE_BYTES // 1024} KiB; a config is a few KiB"
        )
    try:
        return data.decode("utf-8"), mode
    except UnicodeDecodeError as error:
        raise ConfigError(str(path), "", f"not UTF-8 text (byte {error.start + 1})") from None


def read_document(path: Path) -> Document:
    """The file's YAML as a mapping, or a ConfigError saying why it is not one."""
    text, mode = _read_text(path)
    problem = node = tree = None
    try:
        loader = _StrictLoader(text)  # its reader refuses control characters at once
        try:
            node = loader.get_single_node()
            tree = None if node is None else loader.construct_document(node)
        finally:
            loader.dispose()
    except yaml.YAMLError as error:
        problem = _yaml_problem(error)
    if problem is not None:  # raised outside the except block so the YAML error is not chained
        raise ConfigError(str(path), "", problem)
    if not isinstance(tree, dict):
        found = "the file is empty" if tree is None else f"found a {type(tree).__name__}"
        raise ConfigError(
            str(path),
            "",
            f"the top level must be a mapping of keys (source:, engagelab:, ...); {found}",
        )
    return Document(path, tree, {} if node is None else _key_lines(node), mode)


REFERENCE = re.compile(r"\$\$|\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?::-(?P<default>[^}]*))?\}|\$")


def _substitute(text: str, environ: Mapping[str, str]) -> str:
    """Expand ``${VAR}``, ``${VAR:-default}`` and ``$$`` in one string; ValueError names the fault.

    A lone ``$`` is an error rather than a literal: ``$VAR`` would otherwise reach EngageLab as
    the text "$VAR" and fail far from the typo. Substituted values are not expanded again.
    """

    def replace(match: re.Match[str]) -> str:
        name, default = match.group("name"), match.group("default")
        if match.group() == "$$":
            return "$"
        if name is None:
            raise ValueError(
                "a '$' must start ${NAME} or ${NAME:-default}; write $$ for a literal $"
            )
        value = environ.get(name)
        if default is not None:
            return value or default
        if value is None:
            raise ValueError(f"environment variable {name} is not set")
        return value

    return REFERENCE.sub(replace, text)


def printable(key: object) -> str:
    """A key as a message shows it: unprintable characters (NUL, surrogates) as escapes."""
    text = str(key)
    return "".join(char if char.isprintable() else repr(char)[1:-1] for char in text)


def dotted(keys: tuple[object, ...]) -> str:
    """A key path as messages write it: ``engagelab.codes.40050``."""
    return ".".join(printable(key) for key in keys)


def _unstorable(text: str) -> str | None:
    """Why a string cannot travel to a database, a header or a log, or None if it can.

    YAML's ``"\\ud800"`` and an environment variable holding bytes that are not UTF-8 (Python
    reads those as surrogates) both give a lone surrogate, which no encoding can write.
    """
    if "\x00" in text:
        return "contains a NUL character, which no database name or HTTP header can hold"
    if any("\ud800" <= char <= "\udfff" for char in text):
        return (
            "contains an unpaired surrogate (\\ud800-\\udfff), which is not a character; "
            "write the character itself (or a \\U escape), and check the variable it comes from"
        )
    return None


Problem = tuple[tuple[object, ...], str]  # (key path, what is wrong there)


@dataclass(frozen=True)
class Expanded:
    """A tree with its environment references expanded, and what went wrong on the way."""

    tree: Any
    problems: list[Problem] = field(default_factory=list)  # every bad reference and string
    written: dict[tuple[object, ...], str] = field(default_factory=dict)  # text of each ${...}


def expand(tree: Any, environ: Mapping[str, str]) -> Expanded:
    """Expand environment references in every string value of a parsed YAML tree.

    Keys are never expanded. A value that took a variable is kept in ``written`` as the file
    wrote it (``${ENGAGELAB_API_SECRET}``), which is what a message shows instead of the value.
    A bad reference leaves its value as written, and every one is reported, not the first.
    """
    result = Expanded(tree=None)

    def text(value: str, keys: tuple[object, ...]) -> str:
        try:
            expanded = _substitute(value, environ)
        except ValueError as error:
            result.problems.append((keys, str(error)))
            return value
        if expanded != value or "$" in value:
            result.written[keys] = value
        problem = _unstorable(expanded)
        if problem is not None:
            result.problems.append((keys, problem))
        return expanded

    def walk(node: Any, keys: tuple[object, ...]) -> Any:  # depth bounded by MAX_DEPTH
        if isinstance(node, str):
            return text(node, keys)
        if isinstance(node, dict):
            for key in node:
                problem = _unstorable(key) if isinstance(key, str) else None
                if problem is not None:
                    result.problems.append(((*keys, key), f"this key {problem}"))
            return {key: walk(value, (*keys, key)) for key, value in node.items()}
        if isinstance(node, list):
            return [walk(value, (*keys, index)) for index, value in enumerate(node)]
        return node

    return Expanded(walk(tree, ()), result.problems, result.written)


MAX_PROBLEMS = 50  # lines of one ConfigError; a file of garbage should not print a book


def config_error(path: str, problems: list[tuple[str, str]]) -> ConfigError:
    """One ConfigError for every ``(dotted key, problem)``: one ``path: key: problem`` line each."""
    (key, first), rest = problems[0], problems[1:MAX_PROBLEMS]
    lines = [first, *(f"{path}: {other_key}: {other}" for other_key, other in rest)]
    if len(problems) > MAX_PROBLEMS:
        lines.append(f"{path}: ... and {len(problems) - MAX_PROBLEMS} more problems")
    return ConfigError(path, key, "\n".join(lines))


def interpolate(tree: Any, environ: Mapping[str, str], path: str) -> Any:
    """:func:`expand` the tree, or raise one ConfigError naming every bad reference.

    ``path`` is the config file, for the ConfigError that names the key path of each bad
    reference; the error never quotes the value, which may be a secret.
    """
    expanded = expand(tree, environ)
    if expanded.problems:
        raise config_error(path, [(dotted(keys), problem) for keys, problem in expanded.problems])
    return expanded.tree
