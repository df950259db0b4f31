"""The eager model built from a quantized GGUF, kept in the store so later runs load it instead.

Building the default model's int4 layers from its GGUF (dequantizing the Q8_0 embedding, packing
the Q4_1 codes, requantizing the head to int8) took about half a second of every `influence
generate`; saved whole with `torch.save`, the built model loads memory-mapped in a few hundredths
of a second. It is kept under ``INFLUENCE_HOME/exports/built/<key>/`` with the store's manifest
naming the GGUF, so `influence models list` shows it and `influence models prune` removes it.

The key names everything the built model depends on (the file and the config read from it, the
weight format, torch, the CPU's instruction set and this plugin's code), so one saved for anything else is never found. It
is loaded with ``weights_only=True``, which builds nothing but tensors and the classes a built
Llama is made of, and is used only if it is the model of this file's config; one that fails any of
that is rebuilt, never trusted. Saving takes a file lock and writes into a temporary directory
that replaces the final one when complete, so two processes starting at once build it once.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import platform
import shutil
import sys
from pathlib import Path
from typing import Any

import torch
from filelock import FileLock

from influence_core import artifacts
from influence_core.config import GenerationDefaults, ModelConfig
from influence_core.interfaces import Architecture, ModelSource

from .linear import QUANTIZED_FORMATS, Int4Linear, Int8Linear
from .llama import Attention, Block, FeedForward, Llama, LlamaVariant, RMSNorm

MODEL_FILE = "model.pt"
KEY_FILE = "key.json"  # written last: a directory without it is an unfinished save
# What a built Llama is made of; `torch.load` refuses to build anything else from the file.
SAVED_CLASSES = [Llama, Block, Attention, FeedForward, RMSNorm, LlamaVariant, Int4Linear, Int8Linear,
                 torch.nn.ModuleList, ModelConfig, GenerationDefaults]


def built_dir() -> Path:
    return artifacts.exports_dir("built")


def is_kept(source: ModelSource, architecture: Architecture, device: str, dtype: str) -> bool:
    """Kept: quantized formats built from a GGUF by this plugin's Llama. Their layers hold plain
    tensors (float formats hold oneDNN's opaque packed ones), and the model holds no copy of the
    file's own tensors (a float checkpoint's embedding stays in the checkpoint's memory map)."""
    from . import _build_llama

    return (source.format == "gguf" and device == "cpu" and dtype in QUANTIZED_FORMATS
            and architecture.build is _build_llama)


def build_or_load(source: ModelSource, architecture: Architecture, device: str, dtype: str) -> Any:
    """The model ``architecture`` builds from ``source``: loaded from the store where it was kept
    (`is_kept`), else built, and kept for next time where it can be."""
    if not is_kept(source, architecture, device, dtype):
        return architecture.build(source.config, source.weights(), device, dtype)
    key = built_key(source, dtype)
    model = load_built(key, source.config)
    if model is not None:
        return model
    directory = artifact_path(key)
    try:
        directory.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(directory.with_name(directory.name + ".lock"))):
            model = load_built(key, source.config)  # another process may have saved it meanwhile
            if model is None:
                model = architecture.build(source.config, source.weights(), device, dtype)
                save_built(model, key, source.path)
    except OSError as error:  # a store that cannot be written: this run builds, the next one again
        print(f"influence: could not keep the built model in {directory}: {error.strerror or error}", file=sys.stderr)
        if model is None:
            model = architecture.build(source.config, source.weights(), device, dtype)
    return model


def built_key(source: ModelSource, dtype: str) -> dict[str, str]:
    code = hashlib.sha256()
    for module in ("llama.py", "linear.py", "prebuilt.py"):
        code.update((Path(__file__).parent / module).read_bytes())
    # The config as well as the file: opened as the bundled default, the same GGUF comes with the
    # generation defaults of its converted copy, and the built model holds the config it was built from.
    config = json.dumps(dataclasses.asdict(source.config), sort_keys=True, default=repr)
    return {
        "model": artifacts.fingerprint(source.path),
        "config": hashlib.sha256(config.encode()).hexdigest()[:16],
        "weight_format": dtype,
        "torch": torch.__version__,
        "cpu": f"{platform.machine()} {torch.backends.cpu.get_cpu_capability()}",
        "code": code.hexdigest()[:16],
    }


def artifact_path(key: dict[str, str]) -> Path:
    return built_dir() / hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def load_built(key: dict[str, str], config: ModelConfig) -> Llama | None:
    """The model kept under ``key``, or None when there is none (or only one not to be trusted)."""
    directory = artifact_path(key)
    try:
        saved = json.loads((directory / KEY_FILE).read_text(encoding="utf-8"))
        if saved.get("key") != key or saved.get("bytes") != (directory / MODEL_FILE).stat().st_size:
            return None
    except (OSError, ValueError, AttributeError):
        return None
    try:
        with torch.serialization.safe_globals(SAVED_CLASSES):
            model = torch.load(directory / MODEL_FILE, mmap=True, weights_only=True)
    except Exception as error:  # a damaged or foreign file fails in torch's (or pickle's) own ways
        print(f"influence: the built model kept in {directory} does not load ({type(error).__name__}); "
              "it will be rebuilt", file=sys.stderr)
        return None
    if not isinstance(model, Llama) or model.config != config:
        print(f"influence: the built model kept in {directory} is not this model's; it will be rebuilt",
              file=sys.stderr)
        return None
    return model


def save_built(model: Llama, key: dict[str, str], source: Path) -> None:
    directory = artifact_path(key)
    with artifacts.atomic_directory(directory) as partial:
        torch.save(model, partial / MODEL_FILE)
        artifacts.write_manifest(partial, source)
        (partial / KEY_FILE).write_text(json.dumps({"key": key, "bytes": (partial / MODEL_FILE).stat().st_size},
                                                   sort_keys=True), encoding="utf-8")
    remove_stale(key)
    artifacts.report_disk_use("the model built for this CPU", directory)


def remove_stale(keep: dict[str, str]) -> None:
    """Delete the models kept for this file, config and format under other keys (another torch, CPU
    or plugin version): they can never be loaded again."""
    for key_file in built_dir().glob(f"*/{KEY_FILE}"):
        try:
            other = json.loads(key_file.read_text(encoding="utf-8"))["key"]
            same_target = all(other.get(field) == keep[field] for field in ("model", "config", "weight_format"))
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            continue
        if same_target and other != keep and artifacts.made_here(key_file.parent, built_dir()):
            shutil.rmtree(key_file.parent, ignore_errors=True)
