"""The models plugin's commands: ``influence models list/rm/prune/alias/default``, ``influence
download`` and ``influence convert``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from influence_core.errors import InfluenceError


def convert(
    source: Annotated[Path, typer.Argument(help="A model in any format a loader reads, e.g. MODEL.gguf.")],
    out_dir: Annotated[Path, typer.Argument(help="The Hugging Face directory to write.")],
    force: Annotated[bool, typer.Option("--force", help="Replace OUT_DIR if it exists.")] = False,
) -> None:
    """Write a model as a standard Hugging Face directory (config, tokenizer, safetensors weights)."""
    from influence_core.api import open_source
    from influence_core.artifacts import report_disk_use
    from influence_core.hf_directory import write_hf_directory

    if out_dir.exists() and any(out_dir.iterdir()) and not force:
        raise InfluenceError(f"{out_dir} exists and is not empty; pass --force to replace it")
    model = open_source(source)
    write_hf_directory(model, out_dir, progress=True)
    report_disk_use("the converted model", out_dir)
    print(f"wrote {out_dir} (config.json, generation_config.json, tokenizer.json, tokenizer_config.json, "
          "safetensors weights)")


def download(
    model_name: Annotated[str, typer.Option("--model", "-m", help="The Hugging Face repo, ORG/NAME.")],
    revision: Annotated[Optional[str], typer.Option(help="A branch, tag or commit. Default: main.")] = None,
    include: Annotated[Optional[list[str]], typer.Option(
        help="Also download the repo files matching this glob; repeatable.")] = None,
    exclude: Annotated[Optional[list[str]], typer.Option(
        help="Skip the repo files matching this glob; repeatable.")] = None,
    gguf_file: Annotated[Optional[str], typer.Option(
        "--file", help="Download this GGUF file instead of the safetensors weights.")] = None,
) -> None:
    """Download a model from the Hugging Face hub into the store.

    Fetches config, tokenizer, and safetensors weights (or one GGUF file), never pickle weights;
    an interrupted download resumes when run again. HF_ENDPOINT, HF_TOKEN and HF_HUB_OFFLINE are
    honoured.
    """
    from .hub import download as download_model

    print(download_model(model_name, revision=revision, include=include or (), exclude=exclude or (),
                         gguf_file=gguf_file))


ModelNameArgument = Annotated[str, typer.Argument(help="A model name, as `influence models list` shows it.")]
models_app = typer.Typer(help="The local model store: list, remove, alias, and choose the default model.",
                         no_args_is_help=True, rich_markup_mode=None)


@models_app.command("list")
def models_list(as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False) -> None:
    """List the models in the store; * marks the default."""
    from influence_core.artifacts import format_size

    from .catalog import list_models

    models = list_models()
    if as_json:
        print(json.dumps([model.as_dict() for model in models], indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table()
    table.add_column("name", no_wrap=True)
    for column in ("architecture", "parameters", "format", "size", "derived (influence models prune)", "source"):
        table.add_column(column, justify="right" if column in ("parameters", "size") else "left")
    for model in models:
        name = ("* " if model.default else "") + model.name
        if model.aliases:
            name += f" ({', '.join(model.aliases)})"
        derived = "\n".join(f"{d.kind} {format_size(d.size_bytes)}{'' if d.current else ' (stale)'}"
                             for d in model.derived)
        table.add_row(name, model.architecture or "?", _format_parameters(model.parameters),
                      " ".join(filter(None, (model.format, model.quantization))), format_size(model.size_bytes),
                      derived or "-", model.source)
    Console().print(table)


def _format_parameters(parameters: Optional[int]) -> str:
    if parameters is None:
        return "?"
    for scale, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if parameters >= scale:
            return f"{parameters / scale:.1f}{suffix}"
    return str(parameters)


@models_app.command("rm")
def models_rm(name: ModelNameArgument) -> None:
    """Remove a model from the store (and its aliases)."""
    from .catalog import remove_model

    print(f"removed {remove_model(name)}")


@models_app.command("prune")
def models_prune(
    name: Annotated[Optional[str], typer.Argument(help="Only this model's artefacts.")] = None,
    everything: Annotated[bool, typer.Option("--all", help="Every derived artefact, current or not.")] = False,
) -> None:
    """Remove derived artefacts (ONNX exports, compiled steps): by default those whose model is gone
    or has changed; they are made again when next needed. Models themselves are kept."""
    from influence_core.artifacts import format_size

    from .catalog import prune

    if name is not None and everything:
        raise InfluenceError("give a model NAME or --all, not both")
    removed = prune(name, everything)
    for artifact in removed:
        print(f"removed {artifact.kind} {artifact.path} ({format_size(artifact.size_bytes)})")
    print(f"freed {format_size(sum(a.size_bytes for a in removed))} ({len(removed)} artefacts)")


@models_app.command("alias")
def models_alias(name: ModelNameArgument, alias: Annotated[str, typer.Argument(help="Another name for it.")]) -> None:
    """Give a model another name, usable wherever a model name is."""
    from .catalog import add_alias

    add_alias(name, alias)
    print(f"{alias} now names {name}")


@models_app.command("default")
def models_default(name: ModelNameArgument) -> None:
    """Choose the model used when a command is given none."""
    from .catalog import set_default

    set_default(name)
    print(f"the default model is now {name}")
