"""The user's config file: defaults for commands, and overrides per model.

    # ~/.config/influence/config.toml (where platformdirs puts it; INFLUENCE_CONFIG names another)
    [generate]
    max_tokens = 64
    temperature = 0.7

    [serve]
    port = 8080

    [models."smollm2-135m-instruct"]
    temperature = 0.2

A table named after a command holds defaults for that command's options, under their long names
with underscores (``--max-tokens`` is ``max_tokens``). A ``[models.NAME]`` table holds sampling and
length settings for one model, NAME being what ``-m`` was given, the last part of ``-p``'s path, or
the default model's name. Command-line flags beat the file, a model's table beats a command's, and
the file beats the built-in defaults. Unknown tables and keys are refused by name, never ignored.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import InfluenceError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

CONFIGURABLE_COMMANDS = ("generate", "chat", "serve")
# What a [models.NAME] table may set: how a model samples and how long it talks.
MODEL_KEYS = ("max_tokens", "temperature", "top_k", "top_p", "min_p", "repetition_penalty")


def config_path() -> Path:
    if os.environ.get("INFLUENCE_CONFIG"):
        return Path(os.environ["INFLUENCE_CONFIG"]).expanduser()
    from platformdirs import user_config_dir

    return Path(user_config_dir("influence", appauthor=False)) / "config.toml"


@dataclass(frozen=True)
class UserConfig:
    path: Path
    commands: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    models: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)

    def for_model(self, name: str | None) -> Mapping[str, Any]:
        return self.models.get(name, {}) if name else {}


def read_config(path: Path | None = None) -> UserConfig:
    """The config file, parsed and checked for shape (a missing file is an empty config)."""
    path = path or config_path()
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return UserConfig(path)
    except UnicodeDecodeError as error:
        raise InfluenceError(f"{path} is not UTF-8 text (byte {error.start})") from None
    except OSError as error:
        raise InfluenceError(f"cannot read {path}: {error.strerror}") from None
    except tomllib.TOMLDecodeError as error:
        raise InfluenceError(f"{path} is not valid TOML: {error}") from None
    commands, models = {}, {}
    for table, values in data.items():
        if table == "models":
            if not isinstance(values, dict) or not all(isinstance(v, dict) for v in values.values()):
                raise InfluenceError(f'{path}: "models" holds one table per model, e.g. [models."NAME"]')
            for name, settings in values.items():
                unknown = sorted(set(settings) - set(MODEL_KEYS))
                if unknown:
                    raise InfluenceError(f"{path}: [models.{name!r}] has no setting {unknown[0]!r} "
                                         f"(model settings: {', '.join(MODEL_KEYS)})")
                models[name] = settings
        elif table in CONFIGURABLE_COMMANDS:
            if not isinstance(values, dict):
                raise InfluenceError(f"{path}: {table!r} must be a table, [{table}]")
            commands[table] = values
        else:
            raise InfluenceError(f"{path}: unknown table [{table}] (tables: "
                                 f"{', '.join(f'[{c}]' for c in CONFIGURABLE_COMMANDS)}, [models.NAME])")
    return UserConfig(path, commands, models)


def parse_value(text: str) -> Any:
    """A value typed on the command line, read as TOML would (numbers, booleans, lists), else as text."""
    try:
        return tomllib.loads(f"value = {text}")["value"]
    except tomllib.TOMLDecodeError:
        return text


def write_setting(path: Path, table: tuple[str, ...], key: str, value: Any | None) -> None:
    """Set (or, with None, remove) ``key`` in ``table`` of the file, keeping its comments and layout;
    written to a temporary sibling and renamed into place."""
    import tomlkit

    try:
        document = tomlkit.parse(path.read_text(encoding="utf-8")) if path.exists() else tomlkit.document()
    except tomlkit.exceptions.ParseError as error:
        raise InfluenceError(f"{path} is not valid TOML: {error}") from None
    container: Any = document
    for part in table:
        if part not in container:
            if value is None:
                return
            container[part] = tomlkit.table(is_super_table=part == "models")
        container = container[part]
    if value is None:
        container.pop(key, None)
    else:
        container[key] = value
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial-{os.getpid()}")
    partial.write_text(tomlkit.dumps(document), encoding="utf-8")
    partial.replace(path)
