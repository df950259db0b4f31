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


# What the architectures convert from; integer, boolean and 8-bit float tensors are raw quantized
# data or something else that only reads as numbers, never a weight to run as it is.
FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")


def weight_files(directory: Path) -> dict[str, Path]:
    """Tensor name -> the file holding it; reads only the headers."""
    index = directory / "model.safetensors.index.json"
    if index.exists():
        return _indexed_files(directory, index)
    shards = sorted(directory.glob("*.safetensors"))
    if not shards:
        pickles = sorted(p.name for p in directory.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if pickles:
            raise ModelFormatError(
                f"{directory} has only pickle weights ({', '.join(pickles)}); Influence refuses to unpickle them "
                "because loading a pickle can run arbitrary code. Convert them to safetensors first."
            )
        raise ModelFormatError(f"{directory} has no *.safetensors weights")
    files: dict[str, Path] = {}
    for path in shards:
        for name in _open(path).keys():
            if name in files:
                raise ModelFormatError(f"tensor {name!r} is in both {files[name].name} and {path.name}")
            files[name] = path
    return files


def _indexed_files(directory: Path, index: Path) -> dict[str, Path]:
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as error:
        raise ModelFormatError(f"{index} is not a valid safetensors index: {error}") from None
    except RecursionError:
        raise ModelFormatError(f"{index} nests its JSON too deeply to read") from None
    if not isinstance(weight_map, dict) or not all(isinstance(name, str) and isinstance(file, str)
                                                   for name, file in weight_map.items()):
        raise ModelFormatError(f"{index}: weight_map should map tensor names to file names")
    for file in set(weight_map.values()):
        if Path(file).name != file or not file.endswith(".safetensors"):
            raise ModelFormatError(f"{index} names {file!r}, not a .safetensors file in the model's directory")
    files = {name: directory / file for name, file in weight_map.items()}
    for path in set(files.values()):
        held = set(_open(path).keys())  # fail now, with the file's name, if a shard is missing or corrupt
        missing = sorted(name for name, file in files.items() if file == path and name not in held)
        if missing:
            raise ModelFormatError(f"{index} puts {missing[0]!r} in {path.name}, which does not hold it")
    return files


def check_weights(config: ModelConfig, files: dict[str, Path], source: Path) -> None:
    """Every weight and bias floating point and shaped as the config implies; reads only the headers."""
    shapes = {}
    for path in set(files.values()):
        with _open(path) as handle:
            for name in handle.keys():
                if files.get(name) != path:
                    continue
                header = handle.get_slice(name)
                dtype = header.get_dtype()
                if name.endswith((".weight", ".bias")) and dtype not in FLOAT_DTYPES:
                    raise ModelFormatError(f"{path}: tensor {name!r} is stored as {dtype}; weights must be "
                                           f"floating point ({', '.join(FLOAT_DTYPES)})")
                shapes[name] = tuple(header.get_shape())
    config.check_tensors(shapes, str(source))


def is_model_directory(path: Path) -> bool:
    return path.is_dir() and (path / "config.json").is_file()


def load_directory(path: Path) -> ModelSource:
    config = ModelConfig.from_dir(path)
    files = weight_files(path)
    check_weights(config, files, path)
    tokenizer = Tokenizer.from_dir(path, bos_token_id=config.bos_token_id, eos_token_ids=config.eos_token_ids,
                                   pad_token_id=config.pad_token_id)
    largest_id = max(tokenizer.backend.get_vocab(with_added_tokens=True).values(), default=-1)
    if largest_id >= config.vocab_size:  # encoding would produce an id the embedding has no row for
        raise ModelFormatError(f"{path / 'tokenizer.json'} has the token id {largest_id}, beyond the "
                               f"{config.vocab_size} rows of the embedding (vocab_size)")
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
