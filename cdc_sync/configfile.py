"""Reading ``config.yaml``: finding the file, parsing its YAML, expanding ``${VAR}`` in values.

The first half of loading a config (:mod:`cdc_sync.config` validates what this returns). Every
problem is a :class:`~cdc_sync.errors.ConfigError` naming the file and, where there is one, the
dotted key path; no message quotes a value, which may be a secret.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from cdc_sync.errors import ConfigError

CONFIG_ENV_VAR = "CDC_SYNC_CONFIG"
DEFAULT_CONFIG_FILE = "config.yaml"


def resolve_config_path(cli_value: str | None, environ: Mapping[str, str]) -> Path:
    """Pick the config file: ``-c/--config``, else ``$CDC_SYNC_CONFIG``, else ``./config.yaml``."""
    chosen = cli_value or environ.get(CONFIG_ENV_VAR) or DEFAULT_CONFIG_FILE
    return Path(chosen).expanduser()


class _StrictLoader(yaml.SafeLoader):
    """A safe loader that refuses duplicate keys, which PyYAML would silently let the last win."""

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
                    None, None, f"duplicate key {key!r}", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _yaml_problem(error: yaml.YAMLError) -> str:
    """Describe a YAML error by position only: PyYAML's own text quotes the line, maybe a secret."""
    if not isinstance(error, yaml.MarkedYAMLError):
        return "not valid YAML"
    mark = error.problem_mark or error.context_mark
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
    problem = error.problem or error.context or "syntax error"
    return f"not valid YAML{where}: {problem}"


def read_tree(path: Path) -> dict[Any, Any]:
    """The file's YAML as a mapping, or a ConfigError saying why it is not one."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(
            str(path),
            "",
            "no such file; pass -c/--config, set CDC_SYNC_CONFIG, or create ./config.yaml",
        ) from None
    except UnicodeDecodeError:
        raise ConfigError(str(path), "", "not UTF-8 text") from None
    except OSError as error:
        raise ConfigError(str(path), "", f"cannot read: {error.strerror}") from None
    problem = None
    try:
        tree = yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - _StrictLoader is a SafeLoader
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
    return tree


_REFERENCE = re.compile(r"\$\$|\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?::-(?P<default>[^}]*))?\}|\$")


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

    return _REFERENCE.sub(replace, text)


def dotted(keys: tuple[object, ...]) -> str:
    return ".".join(str(key) for key in keys)


def interpolate(tree: Any, environ: Mapping[str, str], path: str) -> Any:
    """Expand environment references in every string value of a parsed YAML tree.

    Keys are never expanded. ``path`` is the config file, for the ConfigError that names the key
    path of a bad reference; the error never quotes the value, which may be a secret.
    """

    def walk(node: Any, keys: tuple[object, ...]) -> Any:
        if isinstance(node, str):
            try:
                return _substitute(node, environ)
            except ValueError as error:
                raise ConfigError(path, dotted(keys), str(error)) from None
        if isinstance(node, dict):
            return {key: walk(value, (*keys, key)) for key, value in node.items()}
        if isinstance(node, list):
            return [walk(value, (*keys, index)) for index, value in enumerate(node)]
        return node

    return walk(tree, ())
