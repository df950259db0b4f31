"""``influence serve``: its options, the models it serves, and the hand-over to the server or to Ray Serve.

Importing this needs neither the serve extra nor ray: the command checks for them when it runs, so
that ``influence serve`` is listed, and explains what to install, in an environment without them.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from influence_core.batching import DEFAULT_PREFILL_CHUNK
from influence_core.cli_options import (BackendOption, BackendOptionsOption, DeviceOption, DtypeOption, ThreadsOption,
                                        backend_options)
from influence_core.defaults import DEFAULT_MODEL
from influence_core.errors import InfluenceError

from .limits import DEFAULT_MAX_BODY_BYTES

SERVE_EXTRA_MODULES = ("fastapi", "uvicorn", "prometheus_client")


def serve(
    model_paths: Annotated[Optional[list[Path]], typer.Option(
        "--model-path", "-p", help="A Hugging Face model directory or a .gguf file to serve; repeatable.")] = None,
    model_names: Annotated[Optional[list[str]], typer.Option(
        "--model", "-m", help="A model by name to serve (as for `generate`); repeatable. The first model given "
                              "answers requests that name none. Without -m or -p: the default model.")] = None,
    models_dir: Annotated[Optional[Path], typer.Option(
        "--models-dir", help="Serve every model in this directory (each subdirectory and .gguf file), "
                             "named after its entry.")] = None,
    backend: BackendOption = "torch",
    device: DeviceOption = "auto",
    dtype: DtypeOption = "auto",
    threads: ThreadsOption = None,
    backend_option: BackendOptionsOption = None,
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535, help="Port to listen on.")] = 8000,
    max_batch: Annotated[int, typer.Option(min=1, help="Most requests decoding together (KV cache slots).")] = 8,
    max_queue: Annotated[int, typer.Option(min=1, help="Most requests waiting; beyond it, 429 with Retry-After.")] = 64,
    context_length: Annotated[Optional[int], typer.Option(
        min=2, help="Tokens each request's prompt and reply may hold (per cache slot). Default: the model's.")] = None,
    prefill_chunk: Annotated[int, typer.Option(
        min=4, help="Most prompt tokens computed per step while other requests decode (fewer when a chunk "
                    "would take longer than a decode step, keeping their streams smooth).")] = DEFAULT_PREFILL_CHUNK,
    prefix_cache: Annotated[bool, typer.Option(
        help="Start each prompt from the longest prefix already in the cache (earlier chat turns).")] = True,
    max_loaded: Annotated[int, typer.Option(
        min=1, help="Most models loaded at once; the least recently used idle one is unloaded for another.")] = 2,
    api_key: Annotated[Optional[str], typer.Option(
        envvar="INFLUENCE_API_KEY", help="Require 'Authorization: Bearer KEY' on every route but /health.")] = None,
    max_body_bytes: Annotated[int, typer.Option(
        min=1, help="Largest request body accepted; beyond it, 413.")] = DEFAULT_MAX_BODY_BYTES,
    name: Annotated[Optional[str], typer.Option(
        help="The model id clients see, with one model (default: from the path or name).")] = None,
    use_ray: Annotated[bool, typer.Option("--ray", help="Run the server as Ray Serve replicas (the ray extra), on "
                                          "a local Ray instance or the cluster RAY_ADDRESS names.")] = False,
    replicas: Annotated[int, typer.Option(min=1, help="With --ray: how many replicas, each with its own copy "
                                                      "of the model.")] = 1,
    autoscaling: Annotated[Optional[str], typer.Option(
        metavar="JSON", help="With --ray: Ray Serve's autoscaling_config, e.g. "
                             "'{\"min_replicas\": 1, \"max_replicas\": 4}'; replaces --replicas.")] = None,
) -> None:
    """Serve models over an OpenAI-compatible HTTP API with continuous batching and a prefix cache."""
    _require_serve_extra()
    from influence_core.api import load, open_default_model, open_source

    from .router import EngineSettings, ModelRouter, ModelSpec
    from .server import ServerSettings
    from .server import serve as run_server

    own_options = backend_options(backend_option)
    references: list[str | Path] = [*(model_names or []), *(model_paths or []), *_models_in(models_dir)]
    if len(references) > 1 and (name or use_ray):
        raise InfluenceError(f"{'--name' if name else '--ray'} serves one model; {len(references)} were given")
    if use_ray:
        _serve_with_ray(model_paths[0] if model_paths else None, model_names[0] if model_names else None, name,
                        dict(backend=backend, device=device, dtype=dtype, threads=threads, max_batch=max_batch,
                             context_length=context_length, backend_options=own_options), host, port, max_queue, replicas, autoscaling)
        return
    specs = []
    for reference in references or [None]:
        source = open_default_model() if reference is None else open_source(reference)
        served_name = name or (DEFAULT_MODEL.name if reference is None else
                               reference if isinstance(reference, str) else source.path.stem)
        specs.append(ModelSpec(served_name, reference))

    def load_spec(spec: ModelSpec):
        return load(spec.reference, backend=backend, device=device, dtype=dtype, threads=threads,
                    context_length=context_length, max_batch=max_batch, backend_options=own_options)

    router = ModelRouter(specs, load_spec, EngineSettings(max_queue=max_queue, prefill_chunk=prefill_chunk,
                                                          prefix_cache=prefix_cache), max_loaded=max_loaded)
    first = router.load_now(router.default).model
    print(f"influence: serving {', '.join(router.names)} ({first.backend}, {first.device}, {first.dtype}) on "
          f"http://{host}:{port}/v1", file=sys.stderr)
    run_server(router, ServerSettings(api_key=api_key, max_body_bytes=max_body_bytes), host, port)


def _require_serve_extra() -> None:
    """Refuse, before any model is opened, to serve without the web framework the server runs on."""
    missing = [module for module in SERVE_EXTRA_MODULES if importlib.util.find_spec(module) is None]
    if missing:
        raise InfluenceError(f"`influence serve` needs {', '.join(missing)}: pip install 'influence[serve]'")


def _models_in(directory: Optional[Path]) -> list[Path]:
    if directory is None:
        return []
    if not directory.is_dir():
        raise InfluenceError(f"--models-dir {str(directory)!r} is not a directory")
    found = sorted(entry for entry in directory.iterdir()
                   if not entry.name.startswith(".") and (entry.is_dir() or entry.suffix == ".gguf"))
    if not found:
        raise InfluenceError(f"--models-dir {str(directory)!r} holds no model (subdirectories or .gguf files)")
    return found


def _serve_with_ray(model_path: Optional[Path], model_name: Optional[str], name: Optional[str], load_options: dict,
                    host: str, port: int, max_queue: int, replicas: int, autoscaling: Optional[str]) -> None:
    """``model_path`` and ``model_name``: at most one is given (the caller serves one model with --ray)."""
    from influence_core.api import open_default_model, open_source

    try:
        from . import ray_serve
    except ImportError:
        raise InfluenceError("--ray needs Ray Serve: pip install 'influence[ray]'") from None
    try:
        autoscaling_config = json.loads(autoscaling) if autoscaling else None
    except json.JSONDecodeError as error:
        raise InfluenceError(f"--autoscaling is not JSON: {error}") from None
    # Opened here once: the replicas then find the default model already converted into the store.
    reference = model_name if model_name is not None else model_path
    source = open_default_model() if reference is None else open_source(reference)
    served_name = name or (DEFAULT_MODEL.name if reference is None else str(model_name or source.path.stem))
    # Replicas may start in another directory: a path goes to them absolute.
    replica_model = str(model_path.resolve()) if model_path else model_name
    app = ray_serve.deployment(replica_model, served_name, load_options, max_queue, replicas, autoscaling_config)
    print(f"influence: serving {served_name} ({source.path.name}) with Ray Serve, "
          f"{autoscaling or f'{replicas} replica(s)'}, on http://{host}:{port}/v1", file=sys.stderr)
    ray_serve.run(app, host, port)
