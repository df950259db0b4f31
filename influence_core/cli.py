"""The ``influence`` command line, a thin layer over `influence_core.api`.

Every failure a user can cause ends as one ``error: ...`` line on stderr and exit status 1.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from . import __version__
from .errors import ContextLengthError, InfluenceError
from .store import DEFAULT_MODEL

app = typer.Typer(
    help="Influence: run large language models locally, with plugins for formats, architectures, "
         f"samplers and backends. Default model: {DEFAULT_MODEL.title}.",
    no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
)

ModelPathOption = Annotated[Optional[Path], typer.Option(
    "--model-path", "-p", help="A Hugging Face model directory or a .gguf file. "
                               f"Default: {DEFAULT_MODEL.title}.")]
BackendOption = Annotated[str, typer.Option(help="Execution backend: torch, onnx or one a plugin adds.")]
DeviceOption = Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:N or mps.")]
DtypeOption = Annotated[str, typer.Option(help="auto (float32 on CPU, bfloat16 on GPUs), float32, bfloat16, float16.")]
ThreadsOption = Annotated[Optional[int], typer.Option(help="CPU threads for the backend.")]


def _version_callback(value: bool) -> None:
    if value:
        print(f"influence {__version__}")
        raise typer.Exit()


@app.callback()
def main(version: Annotated[bool, typer.Option("--version", callback=_version_callback, is_eager=True,
                                               help="Print the version and exit.")] = False) -> None:
    """Influence: run large language models locally."""


def _load(model_path: Optional[Path], backend: str, device: str, dtype: str, threads: Optional[int] = None,
          context_length: Optional[int] = None):
    from .api import load

    return load(model_path, backend=backend, device=device, dtype=dtype, threads=threads,
                context_length=context_length)


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
    prompt: Annotated[str, typer.Argument(help="The prompt; '-' reads it from stdin.")],
    model_path: ModelPathOption = None,
    backend: BackendOption = "torch",
    device: DeviceOption = "auto",
    dtype: DtypeOption = "auto",
    threads: ThreadsOption = None,
    max_tokens: Annotated[int, typer.Option(help="Most tokens to generate.")] = 256,
    sampler: Annotated[Optional[str], typer.Option(help="A registered sampler by name (see `influence plugins`).")] = None,
    option: Annotated[Optional[list[str]], typer.Option(
        "--option", "-o", metavar="KEY VALUE", help="An option for --sampler; repeatable.")] = None,
    temperature: Annotated[Optional[float], typer.Option(help="0 = greedy. Default: the model's, else 0.")] = None,
    top_k: Annotated[Optional[int], typer.Option(help="Keep the K most likely tokens (0 = off).")] = None,
    top_p: Annotated[Optional[float], typer.Option(help="Nucleus sampling mass, in (0, 1].")] = None,
    min_p: Annotated[Optional[float], typer.Option(help="Drop tokens below P x the top probability.")] = None,
    repetition_penalty: Annotated[Optional[float], typer.Option(help="> 1 discourages repeating tokens.")] = None,
    seed: Annotated[Optional[int], typer.Option(help="Seed for reproducible sampling.")] = None,
    stop: Annotated[Optional[list[str]], typer.Option(help="Stop when this text appears; repeatable.")] = None,
    raw: Annotated[bool, typer.Option("--raw", help="Send the prompt as is, without the chat template.")] = False,
    system: Annotated[Optional[str], typer.Option(help="A system message for the chat template.")] = None,
    no_stream: Annotated[bool, typer.Option("--no-stream", help="Print the text only when it is complete.")] = False,
    stats: Annotated[bool, typer.Option("--stats", help="Print token counts and timings after the text.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object with text, tokens and timings.")] = False,
) -> None:
    """Generate text from a prompt, streaming it as it comes."""
    if prompt == "-":
        prompt = sys.stdin.read()
    model = _load(model_path, backend, device, dtype, threads)
    stream = model.stream(
        prompt, max_tokens=max_tokens, stop=stop or (), raw=raw, system=system, temperature=temperature,
        top_k=top_k, top_p=top_p, min_p=min_p, repetition_penalty=repetition_penalty, seed=seed,
        sampler=sampler, sampler_options=_sampler_options(option or []),
    )
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
            "model": str(model.source.path), "load_s": round(model.load_seconds, 6), **result.stats.as_dict(),
        }, ensure_ascii=False))
        return
    if not streaming:
        sys.stdout.write(result.text)
    sys.stdout.write("\n")
    if stats:
        _print_stats(result, model)


def _print_stats(result, model) -> None:
    s = result.stats
    print(f"prompt {s.prompt_tokens} tokens ({s.cached_prompt_tokens} cached), prefill "
          f"{s.prefill_tokens_per_s:.1f} tok/s | generated {s.generated_tokens} tokens, decode "
          f"{s.decode_tokens_per_s:.1f} tok/s | time to first token {s.time_to_first_token_s * 1000:.0f} ms | "
          f"finish: {result.finish_reason} | {model.backend} {model.device} {model.dtype}", file=sys.stderr)


@app.command()
def compare(
    prompt: Annotated[str, typer.Argument(help="The prompt; '-' reads it from stdin.")],
    backends: Annotated[str, typer.Option(
        help="Backends to compare, comma-separated; NAME:DTYPE sets one's dtype (torch,onnx:int8).")] = "torch,onnx",
    model_path: ModelPathOption = None,
    device: DeviceOption = "auto",
    dtype: DtypeOption = "auto",
    threads: ThreadsOption = None,
    max_tokens: Annotated[int, typer.Option(help="Greedy tokens to generate on each backend.")] = 32,
    raw: Annotated[bool, typer.Option("--raw", help="Send the prompt as is, without the chat template.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Run the same greedy generation on several backends: texts, first divergent token, speeds."""
    from .compare import compare_backends, parse_backends, print_comparison

    if prompt == "-":
        prompt = sys.stdin.read()
    comparison = compare_backends(prompt, parse_backends(backends), model=model_path, device=device, dtype=dtype,
                                  threads=threads, max_tokens=max_tokens, raw=raw)
    if as_json:
        print(json.dumps(comparison.as_dict(), ensure_ascii=False))
    else:
        print_comparison(comparison)


@app.command()
def chat(
    model_path: ModelPathOption = None,
    backend: BackendOption = "torch",
    device: DeviceOption = "auto",
    dtype: DtypeOption = "auto",
    threads: ThreadsOption = None,
    system: Annotated[Optional[str], typer.Option(help="A system message starting the conversation.")] = None,
    max_tokens: Annotated[int, typer.Option(help="Most tokens per reply.")] = 512,
    temperature: Annotated[Optional[float], typer.Option(help="0 = greedy. Default: the model's, else 0.")] = None,
    top_k: Annotated[Optional[int], typer.Option(help="Keep the K most likely tokens (0 = off).")] = None,
    top_p: Annotated[Optional[float], typer.Option(help="Nucleus sampling mass, in (0, 1].")] = None,
    min_p: Annotated[Optional[float], typer.Option(help="Drop tokens below P x the top probability.")] = None,
    repetition_penalty: Annotated[Optional[float], typer.Option(help="> 1 discourages repeating tokens.")] = None,
    seed: Annotated[Optional[int], typer.Option(help="Seed for reproducible sampling.")] = None,
    stats: Annotated[bool, typer.Option("--stats", help="Print token counts and timings after each reply.")] = False,
) -> None:
    """Chat with a model, turn by turn. /reset forgets the conversation; /exit or Ctrl-D quits."""
    model = _load(model_path, backend, device, dtype, threads)
    if not model.tokenizer.chat_template:
        raise InfluenceError("this model has no chat template, so it cannot chat; use `influence generate --raw`")
    opening = [{"role": "system", "content": system}] if system else []
    messages = list(opening)
    interactive = sys.stdin.isatty()
    print(f"Chatting with {model.source.path.name} ({model.backend}, {model.device}, {model.dtype}). "
          "/reset forgets the conversation; /exit or Ctrl-D quits.", file=sys.stderr)
    while True:
        try:
            line = input("> " if interactive else "")
        except EOFError:
            break
        command = line.strip()
        if command == "/exit":
            break
        if command == "/reset":
            messages = list(opening)
            print("(conversation forgotten)", file=sys.stderr)
            continue
        if not command:
            continue
        messages.append({"role": "user", "content": line})
        try:
            # The KV cache still holds the conversation so far, so only the new turn is prefilled.
            stream = model.stream(messages, max_tokens=max_tokens, temperature=temperature, top_k=top_k,
                                  top_p=top_p, min_p=min_p, repetition_penalty=repetition_penalty, seed=seed)
            for piece in stream:
                sys.stdout.write(piece)
                sys.stdout.flush()
        except ContextLengthError as error:
            messages.pop()
            print(f"\nerror: {error}; /reset starts a new conversation", file=sys.stderr)
            continue
        except KeyboardInterrupt:
            messages.pop()
            print("\n(reply interrupted)", file=sys.stderr)
            continue
        sys.stdout.write("\n")
        messages.append({"role": "assistant", "content": stream.result.text})
        if stats:
            _print_stats(stream.result, model)


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

    table = Table("plugin", "version", "hooks", "provides")
    for info in infos:
        table.add_row(info.name, info.version or "-", "\n".join(info.hooks), "\n".join(info.provides))
    Console().print(table)


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
    model = open_source(source)
    write_hf_directory(model, out_dir, progress=True)
    print(f"wrote {out_dir} (config.json, generation_config.json, tokenizer.json, tokenizer_config.json, "
          "safetensors weights)")


_plugin_commands_added = False


def _add_plugin_commands() -> None:
    """Let plugins add subcommands (`register_commands`); one that fails is skipped with a warning."""
    global _plugin_commands_added
    if _plugin_commands_added:
        return
    _plugin_commands_added = True
    from .plugins import call_each_implementation

    call_each_implementation("register_commands", cli=app)


def run(argv: Optional[list[str]] = None) -> None:
    """Console entry point: run the app, turning errors into one line and a non-zero exit."""
    try:
        _add_plugin_commands()
        app(args=_join_option_pairs(sys.argv[1:] if argv is None else argv), prog_name="influence")
    except InfluenceError as error:
        print(f"error: {error}", file=sys.stderr)
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
