"""The ``influence`` command line, a thin layer over `influence_core.api`.

Every failure a user can cause ends as one ``error: ...`` line on stderr: exit status 2 for a usage
error (an unknown option, a value click cannot parse or that is out of its range), 1 for the rest.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Optional

import typer

from . import __version__
from .defaults import DEFAULT_MAX_TOKENS, DEFAULT_MODEL
from .batching import DEFAULT_PREFILL_CHUNK
from .errors import InfluenceError
from .sampling import MAX_SEED
from .server_limits import DEFAULT_MAX_BODY_BYTES

# Plain click help rather than rich's: rich's help formatter costs a third of a second at every start.
app = typer.Typer(
    help="Influence: run large language models locally, with plugins for formats, architectures, "
         f"samplers and backends. Default model: {DEFAULT_MODEL.title}.",
    no_args_is_help=True, pretty_exceptions_enable=False, rich_markup_mode=None,
)


def _complete_model_names(incomplete: str) -> list[str]:
    """Shell completion for -m: the store's models and their aliases."""
    from .catalog import list_models

    try:
        models = list_models()
    except InfluenceError:
        return []
    names = [name for model in models for name in (model.name, *model.aliases)]
    return [name for name in names if name.startswith(incomplete)]

ModelPathOption = Annotated[Optional[Path], typer.Option(
    "--model-path", "-p", help="A Hugging Face model directory or a .gguf file. "
                               f"Default: {DEFAULT_MODEL.title}.")]
ModelOption = Annotated[Optional[str], typer.Option(
    "--model", "-m", help="A model by name: ORG/NAME on the Hugging Face hub (downloaded into the store on "
                          "first use), a name in the store, or an alias; see `influence models list`. "
                          "Without -m or -p: the default model (`influence models default`).",
    autocompletion=_complete_model_names)]
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
CompileOption = Annotated[bool, typer.Option(
    "--compile", help="Use the torch backend's compiled decode step, building it into the store first if it "
                      "is not there (a minute or more, once; `influence prepare` does it ahead of time). "
                      "Runs use a step built before without this flag.")]


def _in_range(text: str, wanted: str, inside: Callable[[float], bool]) -> float:
    """A float option's value, refused as a usage error unless ``inside`` it: for an interval with an
    open end, which typer's min/max cannot express. ``wanted`` says it: "in (0, 1]"."""
    value = float(text)
    if not inside(value):
        raise typer.BadParameter(f"{value} is not {wanted}")
    return value


TemperatureOption = Annotated[Optional[float], typer.Option(
    min=0, help="0 = greedy. Default: the model's generation_config.json, else the built-in sampling "
                "(docs/defaults.md).")]
TopKOption = Annotated[Optional[int], typer.Option(min=0, help="Keep the K most likely tokens (0 = off).")]
TopPOption = Annotated[Optional[float], typer.Option(
    parser=lambda text: _in_range(text, "in (0, 1]", lambda p: 0 < p <= 1), help="Nucleus sampling mass, in (0, 1].")]
MinPOption = Annotated[Optional[float], typer.Option(min=0, max=1, help="Drop tokens below P x the top probability.")]
RepetitionPenaltyOption = Annotated[Optional[float], typer.Option(
    parser=lambda text: _in_range(text, "> 0", lambda p: p > 0), help="> 1 discourages repeating tokens.")]
SeedOption = Annotated[Optional[int], typer.Option(
    min=0, max=MAX_SEED, help="Seed for reproducible sampling, in [0, 2**64 - 1].")]


def _version_callback(value: bool) -> None:
    if value:
        print(f"influence {__version__}")
        raise typer.Exit()


@app.callback()
def main(version: Annotated[bool, typer.Option("--version", callback=_version_callback, is_eager=True,
                                               help="Print the version and exit.")] = False) -> None:
    """Influence: run large language models locally."""


def _model_reference(model_path: Optional[Path], model_name: Optional[str]) -> Optional[Path | str]:
    """What -p/--model-path or -m/--model named; None means the default model."""
    if model_path is not None and model_name is not None:
        raise InfluenceError("give -m/--model or -p/--model-path, not both")
    return model_name if model_name is not None else model_path


def _load(model_path: Optional[Path], model_name: Optional[str], backend: str, device: str, dtype: str,
          threads: Optional[int] = None, backend_option: Optional[list[str]] = None):
    from .api import load

    return load(_model_reference(model_path, model_name), backend=backend, device=device, dtype=dtype,
                threads=threads, backend_options=_backend_options(backend_option))


def _backend_options(pairs: Optional[list[str]]) -> dict[str, str]:
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


OPTION_FLAGS = ("-o", "--option")


def _join_option_pairs(argv: list[str]) -> list[str]:
    """Rewrite ``-o KEY VALUE`` as ``-o KEY=VALUE``: typer options take one value each."""
    joined, i = [], 0
    while i < len(argv):
        if argv[i] in OPTION_FLAGS and i + 2 < len(argv) and "=" not in argv[i + 1]:
            joined += [argv[i], f"{argv[i + 1]}={argv[i + 2]}"]
            i += 3
        else:
            joined.append(argv[i])
            i += 1
    return joined


def _sampler_options(pairs: list[str]) -> dict:
    options = {}
    for pair in pairs:
        key, separator, value = pair.partition("=")
        if not separator:
            raise InfluenceError(f"-o {pair!r} needs a value: -o KEY VALUE")
        try:
            options[key] = json.loads(value)  # numbers and booleans arrive typed; anything else as text
        except json.JSONDecodeError:
            options[key] = value
    return options


@app.command()
def generate(
    ctx: typer.Context,
    prompt: Annotated[Optional[str], typer.Argument(help="The prompt; '-' reads it from stdin.")] = None,
    model_path: ModelPathOption = None,
    model_name: ModelOption = None,
    backend: BackendOption = "torch",
    device: DeviceOption = "auto",
    dtype: DtypeOption = "auto",
    threads: ThreadsOption = None,
    backend_option: BackendOptionsOption = None,
    max_tokens: MaxTokensOption = None,
    sampler: Annotated[Optional[str], typer.Option(help="A registered sampler by name (see `influence plugins`).")] = None,
    option: Annotated[Optional[list[str]], typer.Option(
        "--option", "-o", metavar="KEY VALUE", help="An option for --sampler; repeatable.")] = None,
    temperature: TemperatureOption = None,
    top_k: TopKOption = None,
    top_p: TopPOption = None,
    min_p: MinPOption = None,
    repetition_penalty: RepetitionPenaltyOption = None,
    seed: SeedOption = None,
    stop: Annotated[Optional[list[str]], typer.Option(help="Stop when this text appears; repeatable.")] = None,
    raw: Annotated[bool, typer.Option("--raw", help="Send the prompt as is, without the chat template.")] = False,
    system: Annotated[Optional[str], typer.Option(help="A system message for the chat template.")] = None,
    no_stream: Annotated[bool, typer.Option("--no-stream", help="Print the text only when it is complete.")] = False,
    stats: Annotated[bool, typer.Option("--stats", help="Print token counts and timings after the text.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object with text, tokens and timings.")] = False,
    output_format: Annotated[Optional[str], typer.Option(
        "--format", metavar="json|FILE.json", help="Constrain the output: 'json' for any JSON object, or a "
                                                  "JSON schema file.")] = None,
    json_schema: Annotated[Optional[Path], typer.Option(
        metavar="FILE", help="Constrain the output to this JSON schema.")] = None,
    grammar: Annotated[Optional[Path], typer.Option(
        metavar="FILE", help="Constrain the output to this grammar (GBNF, as llama.cpp's, or Lark).")] = None,
    regex: Annotated[Optional[str], typer.Option(help="Constrain the output to match this regular expression.")] = None,
    prompts_file: Annotated[Optional[Path], typer.Option(
        help="Run every line of FILE as a prompt, in one batch; print one JSON result per line.")] = None,
    max_batch: Annotated[int, typer.Option(min=1, help="With --prompts-file: most prompts decoding together.")] = 8,
) -> None:
    """Generate text from a prompt, streaming it as it comes."""
    options = dict(max_tokens=max_tokens, stop=stop or (), raw=raw, system=system, temperature=temperature,
                   top_k=top_k, top_p=top_p, min_p=min_p, repetition_penalty=repetition_penalty, seed=seed,
                   sampler=sampler, sampler_options=_sampler_options(option or []),
                   response_format=_constraint(output_format, json_schema, grammar, regex))
    options.update(_model_settings(ctx, _model_reference(model_path, model_name)))
    if prompts_file is not None:
        _generate_batch(prompts_file, _model_reference(model_path, model_name), backend, device, dtype, threads,
                        max_batch, _backend_options(backend_option), options)
        return
    if prompt is None:
        raise InfluenceError("give a PROMPT (or '-' to read it from stdin), or --prompts-file FILE")
    if prompt == "-":
        prompt = _utf8(sys.stdin.buffer.read(), "stdin")
    model = _load(model_path, model_name, backend, device, dtype, threads, backend_option)
    stream = model.stream(prompt, **options)
    streaming = not (no_stream or as_json)
    for piece in stream:
        if streaming:
            sys.stdout.write(piece)
            sys.stdout.flush()
    result = stream.result
    if as_json:
        print(json.dumps({
            "text": result.text, "token_ids": result.token_ids, "finish_reason": result.finish_reason,
            "seed": result.seed, "backend": model.backend, "device": model.device, "dtype": model.dtype,
            "weight_format": model.weight_format, "model": str(model.source.path),
            "load_s": round(model.load_seconds, 6), "settings": result.settings, **result.stats.as_dict(),
        }, ensure_ascii=False))
        return
    if not streaming:
        sys.stdout.write(result.text)
    sys.stdout.write("\n")
    if stats:
        _print_stats(result, model)


def _utf8(data: bytes, what: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise InfluenceError(f"{what} is not UTF-8 text: byte 0x{data[error.start]:02x} at offset {error.start} "
                             f"({error.reason})") from None


def _constraint(output_format: Optional[str], json_schema: Optional[Path], grammar: Optional[Path],
                regex: Optional[str]):
    """The one constraint --format, --json-schema, --grammar or --regex asked for, if any."""
    from .structured import Constraint, read_json_schema

    given = [flag for flag, value in (("--format", output_format), ("--json-schema", json_schema),
                                      ("--grammar", grammar), ("--regex", regex)) if value is not None]
    if len(given) > 1:
        raise InfluenceError(f"give one of {', '.join(given)}: each constrains the whole output")
    if output_format is not None:
        if output_format == "json":
            return Constraint.json_object()
        if not output_format.endswith(".json"):
            raise InfluenceError(f"--format takes 'json' or a JSON schema file (FILE.json), got {output_format!r}")
        return read_json_schema(Path(output_format))
    if json_schema is not None:
        return read_json_schema(json_schema)
    if grammar is not None:
        try:
            return Constraint.grammar(grammar.read_text(encoding="utf-8"))
        except OSError as error:
            raise InfluenceError(f"cannot read {grammar}: {error.strerror}") from None
    return Constraint.regex(regex) if regex is not None else None


def _generate_batch(prompts_file: Path, model, backend, device, dtype, threads, max_batch, backend_options,
                    options) -> None:
    try:
        prompts = [line for line in _utf8(prompts_file.read_bytes(), str(prompts_file)).splitlines() if line.strip()]
    except OSError as error:
        raise InfluenceError(f"cannot read {prompts_file}: {error.strerror}") from None
    if not prompts:
        raise InfluenceError(f"{prompts_file} has no prompts (one per line)")
    from .api import load

    loaded = load(model, backend=backend, device=device, dtype=dtype, threads=threads,
                  max_batch=min(max_batch, len(prompts)), backend_options=backend_options)
    for prompt, result in zip(prompts, loaded.generate_batch(prompts, **options)):
        print(json.dumps({"prompt": prompt, "text": result.text, "token_ids": result.token_ids,
                          "finish_reason": result.finish_reason, "settings": result.settings,
                          **result.stats.as_dict()}, ensure_ascii=False))


def _print_stats(result, model) -> None:
    s = result.stats
    print(f"prompt {s.prompt_tokens} tokens ({s.cached_prompt_tokens} cached), prefill "
          f"{s.prefill_tokens_per_s:.1f} tok/s | generated {s.generated_tokens} tokens, decode "
          f"{s.decode_tokens_per_s:.1f} tok/s | time to first token {s.time_to_first_token_s * 1000:.0f} ms | "
          f"finish: {result.finish_reason} | {model.backend} {model.device} {model.weight_format}", file=sys.stderr)
    ran = ", ".join(f"{key} {value}" for key, value in result.settings.items() if value is not None)
    print(f"settings: {ran}", file=sys.stderr)


def _model_settings(ctx: typer.Context, reference: Optional[Path | str]) -> dict:
    """The config file's ``[models.NAME]`` settings for this run's model, except those given as flags."""
    settings = _user_config().for_model(_model_label(reference)) if _user_config().models else {}
    return {key: value for key, value in settings.items() if ctx.get_parameter_source(key).name != "COMMANDLINE"}


def _model_label(reference: Optional[Path | str]) -> str:
    """The name a ``[models.NAME]`` table uses: -m's value, -p's last part, or the default model's name."""
    if isinstance(reference, Path):
        return reference.name
    if reference is not None:
        return reference
    from .store import read_names

    return read_names().get("default") or DEFAULT_MODEL.name


@app.command()
def compare(
    prompt: Annotated[str, typer.Argument(help="The prompt; '-' reads it from stdin.")],
    backends: Annotated[str, typer.Option(
        help="Backends to compare, comma-separated; NAME:DTYPE sets one's dtype (torch,onnx:int8).")] = "torch,onnx",
    model_path: ModelPathOption = None,
    device: DeviceOption = "auto",
    dtype: DtypeOption = "auto",
    threads: ThreadsOption = None,
    max_tokens: Annotated[int, typer.Option(min=1, help="Greedy tokens to generate on each backend.")] = 32,
    raw: Annotated[bool, typer.Option("--raw", help="Send the prompt as is, without the chat template.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Run the same greedy generation on several backends: texts, first divergent token, speeds."""
    from .compare import compare_backends, parse_backends, print_comparison

    if prompt == "-":
        prompt = _utf8(sys.stdin.buffer.read(), "stdin")
    comparison = compare_backends(prompt, parse_backends(backends), model=model_path, device=device, dtype=dtype,
                                  threads=threads, max_tokens=max_tokens, raw=raw)
    if as_json:
        print(json.dumps(comparison.as_dict(), ensure_ascii=False))
    else:
        print_comparison(comparison)


@app.command()
def chat(
    ctx: typer.Context,
    model_path: ModelPathOption = None,
    model_name: ModelOption = None,
    backend: BackendOption = "torch",
    device: DeviceOption = "auto",
    dtype: DtypeOption = "auto",
    threads: ThreadsOption = None,
    backend_option: BackendOptionsOption = None,
    system: Annotated[Optional[str], typer.Option(help="A system message starting the conversation.")] = None,
    max_tokens: MaxTokensOption = None,
    temperature: TemperatureOption = None,
    top_k: TopKOption = None,
    top_p: TopPOption = None,
    min_p: MinPOption = None,
    repetition_penalty: RepetitionPenaltyOption = None,
    seed: SeedOption = None,
    stats: Annotated[bool, typer.Option("--stats", help="Print token counts and timings after each reply.")] = False,
) -> None:
    """Chat with a model, turn by turn (line editing and history; /help lists the commands)."""
    from .chat import run_chat

    model = _load(model_path, model_name, backend, device, dtype, threads, backend_option)
    if not model.tokenizer.chat_template:
        raise InfluenceError("this model has no chat template, so it cannot chat; use `influence generate --raw`")
    options = dict(max_tokens=max_tokens, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                   repetition_penalty=repetition_penalty, seed=seed)
    options.update(_model_settings(ctx, _model_reference(model_path, model_name)))
    run_chat(model, options, system, after_reply=(lambda result: _print_stats(result, model)) if stats else None)


@app.command()
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
    compiled: CompileOption = False,
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
    from .api import load, open_default_model, open_source
    from .model_router import EngineSettings, ModelRouter, ModelSpec
    from .server import ServerSettings
    from .server import serve as run_server

    references: list[str | Path] = [*(model_names or []), *(model_paths or []), *_models_in(models_dir)]
    if len(references) > 1 and (name or use_ray):
        raise InfluenceError(f"{'--name' if name else '--ray'} serves one model; {len(references)} were given")
    if use_ray:
        _serve_with_ray(model_paths[0] if model_paths else None, model_names[0] if model_names else None, name,
                        dict(backend=backend, device=device, dtype=dtype, threads=threads, max_batch=max_batch,
                             context_length=context_length), host, port, max_queue, replicas, autoscaling)
        return
    specs = []
    for reference in references or [None]:
        source = open_default_model() if reference is None else open_source(reference)
        served_name = name or (DEFAULT_MODEL.name if reference is None else
                               reference if isinstance(reference, str) else source.path.stem)
        specs.append(ModelSpec(served_name, reference))

    def load_spec(spec: ModelSpec):
        return load(spec.reference, backend=backend, device=device, dtype=dtype, threads=threads,
                    context_length=context_length, max_batch=max_batch,
                    backend_options={"compiled": True} if compiled else None)

    router = ModelRouter(specs, load_spec, EngineSettings(max_queue=max_queue, prefill_chunk=prefill_chunk,
                                                          prefix_cache=prefix_cache), max_loaded=max_loaded)
    first = router.load_now(router.default).model
    print(f"influence: serving {', '.join(router.names)} ({first.backend}, {first.device}, {first.dtype}) on "
          f"http://{host}:{port}/v1", file=sys.stderr)
    run_server(router, ServerSettings(api_key=api_key, max_body_bytes=max_body_bytes), host, port)


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
    from .api import open_default_model, open_source

    try:
        from . import ray_serve
    except ImportError:
        raise InfluenceError("--ray needs Ray Serve: pip install 'influence[ray]'") from None
    try:
        autoscaling_config = json.loads(autoscaling) if autoscaling else None
    except json.JSONDecodeError as error:
        raise InfluenceError(f"--autoscaling is not JSON: {error}") from None
    # Opened here once: the replicas then find the default model already converted into the store.
    reference = _model_reference(model_path, model_name)
    source = open_default_model() if reference is None else open_source(reference)
    served_name = name or (DEFAULT_MODEL.name if reference is None else str(model_name or source.path.stem))
    # Replicas may start in another directory: a path goes to them absolute.
    replica_model = str(model_path.resolve()) if model_path else model_name
    app = ray_serve.deployment(replica_model, served_name, load_options, max_queue, replicas, autoscaling_config)
    print(f"influence: serving {served_name} ({source.path.name}) with Ray Serve, "
          f"{autoscaling or f'{replicas} replica(s)'}, on http://{host}:{port}/v1", file=sys.stderr)
    ray_serve.run(app, host, port)


@app.command()
def plugins(as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False) -> None:
    """List the installed plugins, their versions, hooks and what they register."""
    from .plugins import list_plugins

    infos = list_plugins()
    if as_json:
        print(json.dumps([info.__dict__ for info in infos], indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table("plugin", "version", "hooks", "provides", "overrides")
    for info in infos:
        table.add_row(info.name, info.version or "-", "\n".join(info.hooks), "\n".join(info.provides),
                      "\n".join(info.overrides))
    options = Table("backend", "option", "takes", "default", "help", title="backend options (-B KEY=VALUE)")
    for info in infos:
        for backend, declared in info.backend_options.items():
            for option in declared:
                bound = f" >= {option['minimum']}" if option["minimum"] is not None else ""
                takes = "|".join(option["choices"]) or option["type"] + bound
                options.add_row(backend, option["name"], takes, json.dumps(option["default"]), option["help"])
    Console().print(table, *([options] if options.rows else []))


@app.command()
def bench(
    model_path: ModelPathOption = None,
    model_name: ModelOption = None,
    backends: Annotated[str, typer.Option(help="Comma-separated backends to measure; NAME:DTYPE for one dtype.")] = "torch",
    dtypes: Annotated[Optional[str], typer.Option(
        help="Comma-separated dtypes, e.g. float32,bfloat16,int8,int4. Default: float32; with --cli, auto.")] = None,
    device: DeviceOption = "cpu",
    threads: Annotated[int, typer.Option(min=1, help="Threads for every engine.")] = os.cpu_count() or 1,
    prompt_tokens: Annotated[Optional[int], typer.Option(
        "--prompt-tokens", "-n", min=1, help="Prompt length for pp (default 128; not with --cli, which sends a chat "
                                             "prompt).")] = None,
    gen_tokens: Annotated[int, typer.Option("--gen-tokens", "-g", min=1, help="Greedy tokens for tg.")] = 128,
    repetitions: Annotated[int, typer.Option(
        "--repetitions", "-r", min=1, help="Runs per engine (median and spread).")] = 3,
    reference: Annotated[bool, typer.Option("--reference", help="Also measure transformers, optimum's "
                                            "ORTModelForCausalLM and llama-cpp-python where installed.")] = False,
    compiled: Annotated[bool, typer.Option("--compile", help="Also measure the torch backend with its decode "
                                           "step compiled (compilation itself is not timed).")] = False,
    gguf: Annotated[Optional[Path], typer.Option(help="GGUF file for llama.cpp (default: the default model's).")] = None,
    output_format: Annotated[Optional[str], typer.Option(
        "--format", metavar="json", help="Also measure tg with JSON mode's grammar mask on every step, and its "
                                         "share of a decode step.")] = None,
    cli_mode: Annotated[bool, typer.Option("--cli", help="Time whole `influence generate` processes (start-up, "
                                           "loading, sampling and detokenization included; -g tokens of a chat "
                                           "prompt), rounds alternating, beside a whole llama-cpp-python process "
                                           "with --reference.")] = False,
    reference_python: Annotated[Optional[Path], typer.Option(
        help="With --cli: the Python interpreter that has llama-cpp-python (default: this one).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """Measure prompt processing, decode, time to first token, load time and peak RSS (llama-bench style)."""
    from . import bench as benchmarks
    from .api import open_default_model, open_source
    from .store import installed_default_gguf

    if cli_mode:
        if output_format is not None:
            raise InfluenceError("--format measures the grammar mask in the kernel benchmark, not with --cli")
        _bench_processes(model_path, model_name, backends, dtypes or "auto", device, threads, prompt_tokens,
                         gen_tokens, repetitions, reference, compiled, gguf, reference_python, as_json)
        return
    if reference_python is not None:
        raise InfluenceError("--reference-python applies to --cli only")
    dtypes = dtypes or "float32"
    prompt_tokens = 128 if prompt_tokens is None else prompt_tokens
    reference_model = _model_reference(model_path, model_name)
    source = open_default_model() if reference_model is None else open_source(reference_model)
    if source.format == "gguf" and gguf is None:
        gguf = source.path
    if source.hf_directory is None:
        from .store import convert_into_store, fingerprint

        source = open_source(convert_into_store(source, f"{source.path.stem}-{fingerprint(source.path)}"))
    gguf = gguf or (installed_default_gguf() if reference_model is None else None)
    settings = benchmarks.Settings(model=str(source.hf_directory), gguf=str(gguf) if gguf else None, device=device,
                                   threads=threads, prompt_tokens=prompt_tokens, gen_tokens=gen_tokens,
                                   repetitions=repetitions)
    # A backend may name its dtype ("onnx:int8"); otherwise it runs every one of --dtypes.
    cases = [benchmarks.Case(engine, dtype)
             for spec in _split(backends)
             for engine, _, only in [spec.partition(":")]
             for dtype in ([only] if only else _split(dtypes))]
    if compiled:
        cases += [benchmarks.Case("torch", dtype, compiled=True) for dtype in _split(dtypes)]
    if output_format is not None:
        if output_format != "json":
            raise InfluenceError(f"bench --format takes json, got {output_format!r}")
        cases += [benchmarks.Case(case.engine, case.dtype, output_format=output_format)
                  for case in list(cases) if not case.reference and not case.compiled]
    if reference:
        float_dtypes = [d for d in _split(dtypes) if d in ("float32", "bfloat16", "float16")]
        cases += [benchmarks.Case("transformers", d, reference=True) for d in float_dtypes]
        cases.append(benchmarks.Case("optimum", "float32", reference=True))
        if gguf:
            cases.append(benchmarks.Case("llama.cpp", "gguf", reference=True))
    bandwidth = benchmarks.memory_bandwidth_gb_s(threads)
    results = []
    for case in cases:
        print(f"influence bench: measuring {case.label}...", file=sys.stderr)
        results.append(benchmarks.run_case(case, settings))
    rows = benchmarks.summarise(results, bandwidth)
    facts = benchmarks.machine_facts(threads, bandwidth)
    if as_json:
        print(json.dumps({"machine": facts, "settings": settings.__dict__, "results": rows}, indent=2))
        return
    _print_bench_table(rows, facts, settings)


def _bench_processes(model_path, model_name, backends, dtypes, device, threads, prompt_tokens, gen_tokens,
                     repetitions, reference, compiled, gguf, reference_python, as_json) -> None:
    """`influence bench --cli`: whole processes, as `bench.measure_processes` times them."""
    from . import bench as benchmarks
    from .store import installed_default_gguf

    if prompt_tokens is not None:
        raise InfluenceError("--prompt-tokens sets the kernel benchmark's prompt; --cli sends a chat prompt")
    model = ["-p", str(model_path)] if model_path else ["-m", model_name] if model_name else []
    cases = [case for backend in _split(backends)
             for case in benchmarks.generate_cases(model, backend, _split(dtypes), device, threads, gen_tokens,
                                                   compiled)]
    if reference:
        gguf = gguf or (model_path if model_path and model_path.suffix == ".gguf" else None)
        gguf = gguf or (installed_default_gguf() if not (model_path or model_name) else None)
        if gguf is None:
            raise InfluenceError("--reference needs a GGUF for llama.cpp: pass --gguf FILE")
        cases.append(benchmarks.llama_cpp_case(str(reference_python or sys.executable), str(gguf), threads,
                                               gen_tokens))
    rows = benchmarks.measure_processes(cases, repetitions,
                                        lambda step: print(f"influence bench: {step}", file=sys.stderr))
    facts = benchmarks.machine_facts(threads, benchmarks.memory_bandwidth_gb_s(threads))
    if as_json:
        print(json.dumps({"machine": facts, "prompt": benchmarks.CLI_PROMPT, "max_tokens": gen_tokens,
                          "repetitions": repetitions, "results": rows}, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table("process", "weights", "wall s", "decode tok/s", "TTFT ms", "peak RSS MB", "tokens",
                  "vs llama.cpp (wall, decode, TTFT, RSS)",
                  title=f"{facts['cpu']}, {threads} threads; whole processes, {gen_tokens} greedy tokens of a chat "
                        f"prompt, median of {repetitions} alternating rounds")
    for row in rows:
        if row["error"]:
            table.add_row(row["case"], "", "", "", "", "", "", f"[red]{row['error']}[/red]")
            continue
        ratios = row["ratios"]
        versus = ", ".join(f"{ratios[key]}x" for key in ("wall_vs_llama_cpp", "decode_vs_llama_cpp",
                                                         "ttft_vs_llama_cpp", "peak_rss_vs_llama_cpp") if key in ratios)
        table.add_row(row["case"], row["weight_format"] or "", f"{row['wall_s']:.2f}", f"{row['decode_tokens_per_s']}",
                      f"{row['ttft_ms']}", f"{row['peak_rss_mb']:.0f}", ",".join(map(str, row["generated_tokens"])),
                      versus)
    Console().print(table)


def _split(values: str) -> list[str]:
    return [value.strip() for value in values.split(",") if value.strip()]


def _print_bench_table(rows: list[dict], facts: dict, settings) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table("engine", "dtype", "load s", "pp tok/s", "tg tok/s", "TTFT ms", "peak RSS MB (model / weights)", "roofline",
                  "vs references (tg, pp)",
                  title=f"{facts['cpu']}, {facts['threads']} threads, {facts['read_bandwidth_gb_s']} GB/s read; "
                        f"pp {settings.prompt_tokens} tokens, tg {settings.gen_tokens} tokens, "
                        f"median of {settings.repetitions}")
    for row in rows:
        name = f"{row['engine']}{' (reference)' if row['reference'] else ''}{' compiled' if row['compiled'] else ''}"
        if row["output_format"]:
            name += f" --format {row['output_format']} (mask {row['format_overhead_percent']}% of a step)"
        if row["error"]:
            table.add_row(name, row["dtype"], "", "", "", "", "", "", f"[red]{row['error']}[/red]")
            continue
        ratios = row["ratios"]
        versus = ", ".join(f"{key.split('_vs_')[1]} {ratios[key]}x / {ratios.get(key.replace('tg_', 'pp_'))}x"
                           for key in ratios if key.startswith("tg_vs_"))
        table.add_row(name, row["dtype"], f"{row['load_s']:.2f}", f"{row['pp_tokens_per_s']} ± {row['pp_spread']}",
                      f"{row['tg_tokens_per_s']} ± {row['tg_spread']}", f"{row['ttft_ms']}",
                      f"{row['peak_rss_mb']:.0f}" + (f" ({row['model_rss_vs_weights']}x)" if row["model_rss_vs_weights"] else ""),
                      f"{row['roofline_percent']}%" if row["roofline_percent"] else "", versus)
    Console().print(table)


@app.command()
def perplexity(
    text_file: Annotated[Path, typer.Argument(help="A text file (UTF-8) to score.")],
    model_path: ModelPathOption = None,
    model_name: ModelOption = None,
    backend: BackendOption = "torch",
    device: DeviceOption = "auto",
    dtype: DtypeOption = "auto",
    threads: ThreadsOption = None,
    context: Annotated[int, typer.Option(min=2, help="Tokens per chunk; the second half of each is scored.")] = 512,
    against: Annotated[Optional[str], typer.Option(
        metavar="DTYPE", help="Also run the model in DTYPE (e.g. float32) on the same chunks and report the KL "
                              "divergence from it and the top-1 agreement with it.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Perplexity over a text file (llama-perplexity's chunks), and the drift from another format."""
    from rich.console import Console
    from rich.progress import Progress

    from .perplexity import measure

    try:
        text = text_file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise InfluenceError(f"cannot read {text_file} as UTF-8 text: {getattr(error, 'strerror', None) or error}") from None
    model = _load(model_path, model_name, backend, device, dtype, threads)
    reference = _load(model_path, model_name, backend, device, against, threads) if against else None
    with Progress(transient=True, console=Console(stderr=True), disable=as_json) as bar:
        task = bar.add_task("scoring chunks", total=None)
        result = measure(model, text, context, reference, lambda done, total: bar.update(task, completed=done,
                                                                                          total=total))
    if as_json:
        print(json.dumps(result.as_dict()))
        return
    line = (f"perplexity {result.perplexity:.4f} over {result.tokens} tokens ({result.chunks} chunks of "
            f"{result.context}) | {model.backend} {model.device} {result.weight_format}")
    if reference is not None:
        line += (f"\nagainst {result.against}: perplexity {result.reference_perplexity:.4f}, KL divergence "
                 f"{result.kl_divergence:.6f}, top-1 agreement {100 * result.top1_agreement:.2f}%")
    print(line)


@app.command()
def convert(
    source: Annotated[Path, typer.Argument(help="A model in any format a loader reads, e.g. MODEL.gguf.")],
    out_dir: Annotated[Path, typer.Argument(help="The Hugging Face directory to write.")],
    force: Annotated[bool, typer.Option("--force", help="Replace OUT_DIR if it exists.")] = False,
) -> None:
    """Write a model as a standard Hugging Face directory (config, tokenizer, safetensors weights)."""
    from .api import open_source
    from .store import write_hf_directory

    if out_dir.exists() and any(out_dir.iterdir()) and not force:
        raise InfluenceError(f"{out_dir} exists and is not empty; pass --force to replace it")
    from .artifacts import report_disk_use

    model = open_source(source)
    write_hf_directory(model, out_dir, progress=True)
    report_disk_use("the converted model", out_dir)
    print(f"wrote {out_dir} (config.json, generation_config.json, tokenizer.json, tokenizer_config.json, "
          "safetensors weights)")


@app.command()
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
app.add_typer(models_app, name="models")


@models_app.command("list")
def models_list(as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False) -> None:
    """List the models in the store; * marks the default."""
    from .catalog import list_models
    from .artifacts import format_size

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
    from .catalog import prune
    from .artifacts import format_size

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


from .config_cli import config_app  # noqa: E402  (defined beside its helpers; no heavy imports)

app.add_typer(config_app, name="config")

_plugin_commands_added = False
_config: dict = {}  # this run's config file, read once (`_user_config`)


def _user_config():
    from .userconfig import read_config

    if "file" not in _config:
        _config["file"] = read_config()
    return _config["file"]


def _config_defaults(args: list[str]) -> Optional[dict]:
    """click's default_map from the config file, for the commands it configures; None for the rest,
    so that `influence --help` or `influence config ...` never trip over a broken file."""
    from .userconfig import CONFIGURABLE_COMMANDS

    command = next((arg for arg in args if not arg.startswith("-")), None)
    if command not in CONFIGURABLE_COMMANDS:
        return None
    config = _user_config()
    if not (config.commands or config.models):
        return None
    from .config_cli import default_map

    return default_map(typer.main.get_command(app), config)


def _add_plugin_commands() -> None:
    """Let plugins add subcommands (`register_commands`); one that fails is skipped with a warning.
    A plugin's command named as a built-in one replaces it, and is reported as an override."""
    global _plugin_commands_added
    if _plugin_commands_added:
        return
    _plugin_commands_added = True
    from .plugins import CORE, call_each_implementation, record_command_overrides

    providers = dict.fromkeys(_command_names(), CORE)
    counted = len(app.registered_commands), len(app.registered_groups)

    def after(plugin_name: str) -> None:
        nonlocal counted
        added = _command_names(*counted)
        counted = len(app.registered_commands), len(app.registered_groups)
        record_command_overrides(plugin_name, {name: providers[name] for name in added if name in providers})
        providers.update(dict.fromkeys(added, plugin_name))

    call_each_implementation("register_commands", cli=app, after=after)


def _command_names(commands_from: int = 0, groups_from: int = 0) -> list[str]:
    """The names of the app's commands and command groups, from the given positions on."""
    commands = [info.name or info.callback.__name__.lower().replace("_", "-")
                for info in app.registered_commands[commands_from:] if info.callback is not None or info.name]
    return commands + [info.name for info in app.registered_groups[groups_from:] if info.name]


def run(argv: Optional[list[str]] = None) -> None:
    """Console entry point: run the app, turning errors into one line and a non-zero exit."""
    _config.clear()
    try:
        _add_plugin_commands()
        args = _join_option_pairs(sys.argv[1:] if argv is None else argv)
        # Not standalone, so that click's usage errors reach the handlers below instead of its own box.
        status = app(args=args, prog_name="influence", standalone_mode=False,
                     default_map=_config_defaults(args))
        if isinstance(status, int) and status:  # typer.Exit(code), or 130 after Ctrl-C
            sys.exit(status)
    except typer.TyperException as error:  # click's exceptions (typer vendors click); usage errors exit 2
        if type(error).__name__ != "NoArgsIsHelpError":  # whose help is already printed, as typer does
            message = " ".join(error.format_message().split())
            context = getattr(error, "ctx", None)
            hint = f" (see `{context.command_path} --help`)" if context is not None and error.exit_code == 2 else ""
            print(f"error: {message}{hint}", file=sys.stderr)
        sys.exit(error.exit_code)
    except typer.Abort:  # end of input where typer was reading it
        print("error: the input ended unexpectedly", file=sys.stderr)
        sys.exit(1)
    except InfluenceError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(1)
    except UnicodeDecodeError as error:  # input read as text somewhere (chat's stdin, say)
        print(f"error: the input is not UTF-8 text: {error}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except Exception as error:
        if os.environ.get("INFLUENCE_DEBUG"):
            raise
        print(f"error: unexpected {type(error).__name__}: {error} (INFLUENCE_DEBUG=1 shows the traceback)",
              file=sys.stderr)
        sys.exit(1)
