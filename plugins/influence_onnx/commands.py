"""``influence export onnx``: run optimum's exporter into the store or a directory of your choice."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from influence_core.cli_options import ModelPathOption
from influence_core.errors import InfluenceError
from influence_core.hf_directory import hf_directory_for

from .export import export_for, export_model

export_app = typer.Typer(help="Export a model for another runtime.", no_args_is_help=True)


@export_app.command("onnx")
def export_onnx(
    out: Annotated[Optional[Path], typer.Argument(
        help="The directory to write. Default: the store, where --backend onnx finds it "
             "(an export already there is reused unless --force).")] = None,
    model_path: ModelPathOption = None,
    force: Annotated[bool, typer.Option("--force", help="Export again, replacing OUT or the stored export.")] = False,
) -> None:
    """Export a model to ONNX with optimum (task text-generation-with-past) and print where it went."""
    from influence_core.api import open_default_model, open_source

    source = open_default_model() if model_path is None else open_source(model_path)
    if out is None:
        print(export_for(source, force=force))
        return
    if source.format == "onnx":
        raise InfluenceError(f"{source.path} is already an ONNX export")
    if out.exists() and any(out.iterdir()) and not force:
        raise InfluenceError(f"{out} exists and is not empty; pass --force to replace it")
    export_model(hf_directory_for(source), out)
    print(out)
