"""Plugin ``safetensors``: loads Hugging Face model directories.

A directory with config.json, tokenizer.json and weights in one ``model.safetensors`` or in shards
listed by ``model.safetensors.index.json``. Tensors are read through safetensors' memory map, one at
a time, as the architecture asks for them. Pickle checkpoints (.bin/.pt/.pth) can run arbitrary
code when loaded, so they are refused, never unpickled.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from influence_core import hookimpl
from influence_core.config import ModelConfig
from influence_core.errors import ModelFormatError
from influence_core.interfaces import ModelLoader, ModelSource
from influence_core.tokenizer import Tokenizer

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")


class SafetensorsWeights:
    """Lazy tensors by name across one or more safetensors files.

    Each tensor comes from its own memory map, so the pages it holds leave this process's resident
    memory as soon as the tensor is dropped (a converted or packed copy replaced it); one shared map
    would keep every page ever read resident for as long as any tensor of the file lived.
    """

    def __init__(self, files_by_name: dict[str, Path]) -> None:
        self.files_by_name = files_by_name

    def keys(self) -> Iterator[str]:
        return iter(self.files_by_name)

    def __contains__(self, name: object) -> bool:
        return name in self.files_by_name

    def __getitem__(self, name: str) -> Any:
        with _open(self.files_by_name[name]) as handle:
            return handle.get_tensor(name)


def _open(path: Path) -> Any:
    from safetensors import safe_open

    try:
        return safe_open(str(path), framework="pt")
    except FileNotFoundError:
        raise ModelFormatError(f"{path} is missing") from None
    except Exception as error:  # safetensors raises its own error type for bad headers
        raise ModelFormatError(f"{path} is not a valid safetensors file: {error}") from None


def weight_files(directory: Path) -> dict[str, Path]:
    """Tensor name -> the file holding it; reads only the headers."""
    index = directory / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as error:
            raise ModelFormatError(f"{index} is not a valid safetensors index: {error}") from None
        files = {name: directory / file for name, file in weight_map.items()}
        for path in set(files.values()):
            _open(path)  # fail now, with the file's name, if a shard is missing or corrupt
        return files
    shards = sorted(directory.glob("*.safetensors"))
    if not shards:
        pickles = sorted(p.name for p in directory.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if pickles:
            raise ModelFormatError(
                f"{directory} has only pickle weights ({', '.join(pickles)}); Influence refuses to unpickle them "
                "because loading a pickle can run arbitrary code. Convert them to safetensors first."
            )
        raise ModelFormatError(f"{directory} has no *.safetensors weights")
    return {name: path for path in shards for name in _open(path).keys()}


def is_model_directory(path: Path) -> bool:
    return path.is_dir() and (path / "config.json").is_file()


def load_directory(path: Path) -> ModelSource:
    config = ModelConfig.from_dir(path)
    files = weight_files(path)
    tokenizer = Tokenizer.from_dir(path, bos_token_id=config.bos_token_id, eos_token_ids=config.eos_token_ids,
                                   pad_token_id=config.pad_token_id)
    sizes = sum(p.stat().st_size for p in set(files.values()))
    return ModelSource(
        path=path, format="safetensors", config=config, tokenizer=tokenizer,
        weights=lambda: SafetensorsWeights(files), hf_directory=path,
        details={"files": len(set(files.values())), "bytes": sizes},
    )


@hookimpl(trylast=True)
def register_model_loaders(register) -> None:
    register(ModelLoader("safetensors", is_model_directory, load_directory,
                         "Hugging Face directory: config.json, tokenizer.json, *.safetensors"))
