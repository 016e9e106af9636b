"""Config trees and files for the config tests: a minimal valid tree, edits of it, loading."""

from __future__ import annotations

import copy
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml

from cdc_sync.config import Settings, load_settings
from cdc_sync.errors import ConfigError

REPO = Path(__file__).resolve().parent.parent
SECRET = "Zq9-sekret-value-42"
ENV = {"ENGAGELAB_API_KEY": "key-1", "ENGAGELAB_API_SECRET": SECRET}
DELETE = object()


def minimal() -> dict[str, Any]:
    """The smallest valid config tree, with the secret taken from the environment."""
    return {
        "name": "users",
        "source": {
            "url": "postgresql+psycopg://reader@replica.internal:5432/app",
            "table": "users",
            "key": "id",
            "cursor": "updated_at",
            "euid": "engagelab_euid",
        },
        "contacts": {"email": "email"},
        "engagelab": {"api_key": "${ENGAGELAB_API_KEY}", "api_secret": "${ENGAGELAB_API_SECRET}"},
    }


def changed(tree: Mapping[str, Any], key: str, value: object) -> dict[str, Any]:
    """A copy of ``tree`` with the dotted ``key`` set to ``value`` (or removed, for DELETE)."""
    result = copy.deepcopy(dict(tree))
    *parents, last = key.split(".")
    node = result
    for part in parents:
        node = node.setdefault(part, {})
    if value is DELETE:
        del node[last]
    else:
        node[last] = value
    return result


def write(directory: Path, tree: object, name: str = "config.yaml") -> Path:
    """Write ``tree`` as YAML into ``directory`` and return the file's path."""
    path = directory / name
    path.write_text(yaml.safe_dump(tree, sort_keys=False), encoding="utf-8")
    return path


def load(directory: Path, tree: object, environ: Mapping[str, str] = ENV) -> Settings:
    """Load ``tree`` through a real file, as the daemon would."""
    return load_settings(write(directory, tree), environ)


def failure(directory: Path, tree: object, environ: Mapping[str, str] = ENV) -> ConfigError:
    """The ConfigError that loading ``tree`` raises."""
    with pytest.raises(ConfigError) as caught:
        load(directory, tree, environ)
    return caught.value
