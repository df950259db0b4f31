"""``influence prepare``: build the compiled decode step ahead of time, so no run waits for it."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Optional

import typer

from influence_core.defaults import DEFAULT_MODEL


def prepare(
    model_path: Annotated[Optional[Path], typer.Option(
        "--model-path", "-p", help=f"A Hugging Face model directory or a .gguf file. Default: {DEFAULT_MODEL.title}.")
    ] = None,
    model_name: Annotated[Optional[str], typer.Option(
        "--model", "-m", help="A model by name (see `influence models list`).")] = None,
    dtype: Annotated[str, typer.Option(help="The weight format to prepare: auto, float32, bfloat16, float16, "
                                            "int8, int4.")] = "auto",
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:N.")] = "auto",
) -> None:
    """Compile the torch backend's decode step for a model and weight format into the store (minutes,
    once). Later runs of that model and format load it for single-sequence decode (int4 measured
    1.3-1.4x eager; float32 no faster: docs/performance.md); without it they run eager."""
    from influence_core.api import load
    from influence_core.errors import InfluenceError

    if model_path is not None and model_name is not None:
        raise InfluenceError("give -m/--model or -p/--model-path, not both")
    started = time.perf_counter()
    model = load(model_name if model_name is not None else model_path, backend="torch", device=device,
                 dtype=dtype, compiled=True)
    print(f"prepared {model.source.path.name} ({model.dtype} on {model.device}) in "
          f"{time.perf_counter() - started:.0f} s")
    model.close()
