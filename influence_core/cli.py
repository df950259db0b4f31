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
from .cli_options import (BackendOption, BackendOptionsOption, DeviceOption, DtypeOption, MaxTokensOption,
                          ModelOption, ModelPathOption, ThreadsOption, backend_options, model_reference, utf8)
from .defaults import DEFAULT_KEEP_ALIVE_S, DEFAULT_MODEL, KEEP_ALIVE_ENV
from .errors import InfluenceError
from .sampling import MAX_SEED

# Plain click help rather than rich's: rich's help formatter costs a third of a second at every start.
app = typer.Typer(
    help="Influence: run large language models locally, with plugins for formats, architectures, "
         f"samplers and backends. Default model: {DEFAULT_MODEL.title}.",
    no_args_is_help=True, pretty_exceptions_enable=False, rich_markup_mode=None,
)


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


def _load(model_path: Optional[Path], model_name: Optional[str], backend: str, device: str, dtype: str,
          threads: Optional[int] = None, backend_option: Optional[list[str]] = None):
    from .api import load

    return load(model_reference(model_path, model_name), backend=backend, device=device, dtype=dtype,
                threads=threads, backend_options=backend_options(backend_option))


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
    keep_alive: Annotated[float, typer.Option(
        min=0, envvar=KEEP_ALIVE_ENV, metavar="SECONDS",
        help="Keep the model loaded in a background process this long after the run, so that later runs with "
             "the same model and options start fast; 0 = never (docs/defaults.md).")] = DEFAULT_KEEP_ALIVE_S,
) -> None:
    """Generate text from a prompt, streaming it as it comes."""
    options = dict(max_tokens=max_tokens, stop=stop or (), raw=raw, system=system, temperature=temperature,
                   top_k=top_k, top_p=top_p, min_p=min_p, repetition_penalty=repetition_penalty, seed=seed,
                   sampler=sampler, sampler_options=_sampler_options(option or []),
                   response_format=_constraint(output_format, json_schema, grammar, regex))
    options.update(_model_settings(ctx, model_reference(model_path, model_name)))
    if prompts_file is not None:
        if ctx.get_parameter_source("keep_alive").name == "COMMANDLINE":
            raise InfluenceError("--keep-alive keeps a single prompt's model loaded, not --prompts-file's")
        _generate_batch(prompts_file, model_reference(model_path, model_name), backend, device, dtype, threads,
                        max_batch, backend_options(backend_option), options)
        return
    if prompt is None:
        raise InfluenceError("give a PROMPT (or '-' to read it from stdin), or --prompts-file FILE")
    if prompt == "-":
        prompt = utf8(sys.stdin.buffer.read(), "stdin")
    from . import resident

    spec = resident.Spec.of(model_reference(model_path, model_name), backend, device, dtype, threads,
                            backend_options(backend_option))
    served = resident.stream(spec, prompt, options, keep_alive) if keep_alive > 0 else None
    if served is not None:
        _print_generation(*served, no_stream=no_stream, as_json=as_json, stats=stats)
        return
    model = _load(model_path, model_name, backend, device, dtype, threads, backend_option)
    _print_generation(model.stream(prompt, **options), resident.model_facts(model), no_stream=no_stream,
                      as_json=as_json, stats=stats)
    if keep_alive > 0 and resident.worth_keeping(model):
        resident.start(spec, keep_alive, announce=sys.stderr.isatty())


def _print_generation(stream, facts: dict, *, no_stream: bool, as_json: bool, stats: bool) -> None:
    """Print a generation as it streams (``stream``: in-process or in a resident model), then its
    result: the text's end, or one JSON object, and --stats."""
    streaming = not (no_stream or as_json)
    for piece in stream:
        if streaming:
            sys.stdout.write(piece)
            sys.stdout.flush()
    result = stream.result
    if as_json:
        print(json.dumps({"text": result.text, "token_ids": result.token_ids, "finish_reason": result.finish_reason,
                          "seed": result.seed, **facts, "settings": result.settings, **result.stats.as_dict()},
                         ensure_ascii=False))
        return
    if not streaming:
        sys.stdout.write(result.text)
    sys.stdout.write("\n")
    if stats:
        _print_stats(result, facts)


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
        prompts = [line for line in utf8(prompts_file.read_bytes(), str(prompts_file)).splitlines() if line.strip()]
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


def _print_stats(result, facts: dict) -> None:
    s = result.stats
    print(f"prompt {s.prompt_tokens} tokens ({s.cached_prompt_tokens} cached), prefill "
          f"{s.prefill_tokens_per_s:.1f} tok/s | generated {s.generated_tokens} tokens, decode "
          f"{s.decode_tokens_per_s:.1f} tok/s | time to first token {s.time_to_first_token_s * 1000:.0f} ms | "
          f"finish: {result.finish_reason} | {facts['backend']} {facts['device']} {facts['weight_format']}",
          file=sys.stderr)
    ran = ", ".join(f"{key} {value}" for key, value in result.settings.items() if value is not None)
    print(f"settings: {ran}", file=sys.stderr)


def _model_settings(ctx: typer.Context, reference: Optional[Path | str]) -> dict:
    """The config file's ``[models.NAME]`` settings for this run's model, except those given as flags."""
    settings = _user_config().for_model(_model_label(reference)) if _user_config().models else {}
    return {key: value for key, value in settings.items() if ctx.get_parameter_source(key).name != "COMMANDLINE"}


def _model_label(reference: Optional[Path | str]) -> Optional[str]:
    """The name a ``[models.NAME]`` table uses: -m's value, -p's last part, or the default model's name
    (as the model resolvers give it)."""
    if isinstance(reference, Path):
        return reference.name
    if reference is not None:
        return reference
    from .plugins import get_registry

    return get_registry().default_model_name()


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
    options.update(_model_settings(ctx, model_reference(model_path, model_name)))
    from .resident import model_facts

    facts = model_facts(model)
    run_chat(model, options, system, after_reply=(lambda result: _print_stats(result, facts)) if stats else None)


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
def ps(as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False) -> None:
    """List the resident models (kept loaded after `influence generate`; see `influence stop`)."""
    import time

    from .resident import memory_rss, residents

    now, rows = time.time(), []
    for state in residents():
        idle = now - state["last_used"]
        rows.append({"key": state["key"], "model": state["model"], "model_path": state.get("model_path"),
                     "backend": state["backend"], "device": state["device"], "dtype": state["dtype"],
                     "loaded": state["loaded"], "preparing": state.get("preparing", False), "pid": state["pid"],
                     "rss_bytes": memory_rss(state["pid"]),
                     "idle_s": round(idle, 1), "expires_in_s": round(max(0.0, state["keep_alive"] - idle), 1)})
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    if not rows:
        print("no resident models")
        return
    from .artifacts import format_size

    def dtype(row: dict) -> str:  # "preparing": making itself faster while idle (Runner.on_idle)
        return "(loading)" if not row["loaded"] else row["dtype"] + (" (preparing)" if row["preparing"] else "")

    table = [("KEY", "MODEL", "BACKEND", "DEVICE", "DTYPE", "MEMORY", "IDLE", "EXPIRES IN")] + [
        (row["key"], row["model"], row["backend"], row["device"], dtype(row),
         format_size(row["rss_bytes"]) if row["rss_bytes"] is not None else "-", f"{row['idle_s']:.0f} s",
         f"{row['expires_in_s']:.0f} s") for row in rows]
    widths = [max(len(line[column]) for line in table) for column in range(len(table[0]))]
    for line in table:
        print("  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip())


@app.command()
def stop(
    which: Annotated[Optional[str], typer.Argument(
        metavar="[KEY|MODEL]", help="A resident's key (or its start) or model, as `influence ps` shows them.")] = None,
    stop_all: Annotated[bool, typer.Option("--all", help="Stop every resident model.")] = False,
) -> None:
    """Stop resident models, freeing their memory (later runs load in-process again)."""
    from .resident import residents, stop_resident

    if (which is None) == (not stop_all):
        raise InfluenceError("give a KEY or MODEL from `influence ps`, or --all")
    running = residents()
    if which is not None and Path(which).expanduser().exists():  # a model path, as -p took it
        which = str(Path(which).expanduser().resolve())
    chosen = running if stop_all else [state for state in running if state["key"].startswith(which)
                                       or which in (state["model"], state.get("model_path"))]
    if not chosen:
        print("no resident model is running" if stop_all or not running
              else f"no resident model matches {which!r} (see `influence ps`)")
        if not stop_all:
            raise typer.Exit(1)
        return
    for state in chosen:
        stop_resident(state)
    names = ", ".join(sorted({state["model"] for state in chosen}))
    print(f"stopped {len(chosen)} resident model{'s' if len(chosen) > 1 else ''} ({names})")


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
    from .plugins import CORE, call_each_implementation, record_commands

    providers = dict.fromkeys(_command_names(), CORE)
    counted = len(app.registered_commands), len(app.registered_groups)

    def after(plugin_name: str) -> None:
        nonlocal counted
        added = _command_names(*counted)
        counted = len(app.registered_commands), len(app.registered_groups)
        record_commands(plugin_name, added, {name: providers[name] for name in added if name in providers})
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
