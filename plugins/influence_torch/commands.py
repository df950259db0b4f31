"""The torch plugin's commands: ``influence prepare`` builds the compiled decode step ahead of time,
so no run waits for it; ``influence tensor-parallel N generate ...`` runs a generation as N ranks."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer

from influence_core.cli_options import DeviceOption, ModelOption, ModelPathOption, model_reference


def prepare(
    model_path: ModelPathOption = None,
    model_name: ModelOption = None,
    dtype: Annotated[str, typer.Option(help="The weight format to prepare: auto, float32, bfloat16, float16, "
                                            "int8, int4.")] = "auto",
    device: DeviceOption = "auto",
) -> None:
    """Compile the torch backend's decode step for a model and weight format into the store (minutes,
    once). A resident model of that model and format loads it for single-sequence decode (int4
    measured 1.3-1.4x eager; float32 no faster: docs/performance.md), as do runs with
    -B compiled=true; a resident builds it by itself when it is missing, in the background."""
    from influence_core.api import load

    started = time.perf_counter()
    model = load(model_reference(model_path, model_name), backend="torch", device=device,
                 dtype=dtype, backend_options={"compiled": True})
    print(f"prepared {model.source.path.name} ({model.dtype} on {model.device}) in "
          f"{time.perf_counter() - started:.0f} s")
    model.close()


# Commands a tensor-parallel run can be: every rank must make the same calls, which a server (its
# requests) or a chat (its input) would not (docs/scaling.md, Not done).
SPLITTABLE_COMMANDS = ("generate",)


def tensor_parallel(
    ctx: typer.Context,
    ranks: Annotated[int, typer.Argument(metavar="N", min=2, help="How many ranks: GPUs of this machine with "
                                                                  "NCCL (--device cuda), or CPU processes with gloo.")],
) -> None:
    """Run `influence tensor-parallel N generate PROMPT [OPTIONS]`: the generation as N processes, the
    model split across them (tensor parallelism: docs/scaling.md). Each rank runs the generate command
    with -B tensor_parallel=N; rank 0's output is the command's, and the moment one rank fails the
    others are stopped."""
    from influence_core.api import open_default_model, open_source
    from influence_core.errors import InfluenceError

    from .launch import check_splittable, launch

    if not ctx.args or ctx.args[0] not in SPLITTABLE_COMMANDS:
        raise InfluenceError(f"give the command to split after N: `influence tensor-parallel {ranks} generate ...` "
                             f"(it runs {', '.join(SPLITTABLE_COMMANDS)} only)")
    name, arguments = ctx.args[0], ctx.args[1:]
    root = ctx.find_root()
    command = root.command.get_command(root, name)
    given = command.make_context(name, list(arguments), parent=root, resilient_parsing=True).params
    if given.get("prompt") == "-" or given.get("prompts_file") == Path("-"):
        raise InfluenceError("a tensor-parallel run reads no prompt from stdin (every rank needs it); give it as an "
                             "argument or with --prompts-file")
    if given.get("backend") != "torch":
        raise InfluenceError(f"tensor parallelism is the torch backend's, not --backend {given.get('backend')}'s")
    if any(option.partition("=")[0] == "tensor_parallel" for option in given.get("backend_option") or ()):
        raise InfluenceError("give the number of ranks once, as tensor-parallel's N; each rank gets "
                             "-B tensor_parallel=N from it")
    if given.get("model_path") is not None and given.get("model_name") is not None:
        raise InfluenceError("give -m/--model or -p/--model-path, not both")
    reference = given.get("model_name") or given.get("model_path")
    # Checked here, once, rather than by every rank; opening the default model also converts it
    # into the store before the ranks start (they would race to do it).
    check_splittable((open_default_model() if reference is None else open_source(reference)).config, ranks)
    launch(ranks, [name, *arguments, "-B", f"tensor_parallel={ranks}"])
