"""The options every command that loads a model shares, for the core's commands and plugins' alike.

A plugin's command takes a model the way `influence generate` does by annotating its parameters with
these types (``model_path: ModelPathOption = None``) and calling `model_reference` and
`backend_options` on what it got, so that -p, -m, --backend, --device, --dtype and -B mean the same
everywhere.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from .defaults import DEFAULT_MAX_TOKENS, DEFAULT_MODEL
from .errors import InfluenceError


def complete_model_names(incomplete: str) -> list[str]:
    """Shell completion for -m: the names the model resolvers list (the store's models and aliases)."""
    from .plugins import get_registry

    try:
        names = get_registry().model_names()
    except InfluenceError:  # a broken store or resolver: no completions rather than an error mid-line
        return []
    return [name for name in names if name.startswith(incomplete)]

ModelPathOption = Annotated[Optional[Path], typer.Option(
    "--model-path", "-p", help="A Hugging Face model directory or a .gguf file. "
                               f"Default: {DEFAULT_MODEL.title}.")]
ModelOption = Annotated[Optional[str], typer.Option(
    "--model", "-m", help="A model by name: ORG/NAME on the Hugging Face hub (downloaded into the store on "
                          "first use), a name in the store, or an alias; see `influence models list`. "
                          "Without -m or -p: the default model (`influence models default`).",
    autocompletion=complete_model_names)]
BackendOption = Annotated[str, typer.Option(help="Execution backend: torch, onnx or one a plugin adds.")]
DeviceOption = Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:N or mps.")]
DtypeOption = Annotated[str, typer.Option(
    help="auto (on CPU the file's own precision: int4 for a 4-bit GGUF, int8 for Q8_0, bfloat16 for a 16-bit "
         "checkpoint where the CPU has bfloat16 arithmetic, else float32; bfloat16 on GPUs), float32, bfloat16, "
         "float16, int8, int4.")]
ThreadsOption = Annotated[Optional[int], typer.Option(min=1, help="CPU threads for the backend.")]
MaxTokensOption = Annotated[Optional[int], typer.Option(
    min=1, help=f"Most tokens to generate. Default: {DEFAULT_MAX_TOKENS}.")]
BackendOptionsOption = Annotated[Optional[list[str]], typer.Option(
    "--backend-option", "-B", metavar="KEY=VALUE",
    help="One of the backend's own options, as it declares them (`influence plugins` lists each backend's; "
         "torch: compiled=true, tensor_parallel=N); repeatable.")]


def model_reference(model_path: Optional[Path], model_name: Optional[str]) -> Optional[Path | str]:
    """What -p/--model-path or -m/--model named; None means the default model."""
    if model_path is not None and model_name is not None:
        raise InfluenceError("give -m/--model or -p/--model-path, not both")
    return model_name if model_name is not None else model_path


def backend_options(pairs: Optional[list[str]]) -> dict[str, str]:
    """-B KEY=VALUE pairs by key; the backend reads each value as its option's type."""
    options: dict[str, str] = {}
    for pair in pairs or []:
        key, separator, value = pair.partition("=")
        if not separator or not key:
            raise InfluenceError(f"-B {pair!r} needs a key and a value: -B KEY=VALUE")
        if key in options:
            raise InfluenceError(f"-B {key} is given twice")
        options[key] = value
    return options


def utf8(data: bytes, what: str) -> str:
    """``data`` as text, or one error naming ``what`` and the first byte that is not UTF-8."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise InfluenceError(f"{what} is not UTF-8 text: byte 0x{data[error.start]:02x} at offset {error.start} "
                             f"({error.reason})") from None
