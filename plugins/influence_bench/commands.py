"""``influence bench``, ``influence compare`` and ``influence perplexity``: the command line over
`bench`, `compare` and `perplexity`, which do the measuring."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from influence_core.cli_options import (BackendOption, DeviceOption, DtypeOption, ModelOption, ModelPathOption,
                                        ThreadsOption, model_reference, utf8)
from influence_core.errors import InfluenceError


def _load(model_path: Optional[Path], model_name: Optional[str], backend: str, device: str, dtype: str,
          threads: Optional[int]):
    from influence_core.api import load

    return load(model_reference(model_path, model_name), backend=backend, device=device, dtype=dtype,
                threads=threads)


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
        prompt = utf8(sys.stdin.buffer.read(), "stdin")
    comparison = compare_backends(prompt, parse_backends(backends), model=model_path, device=device, dtype=dtype,
                                  threads=threads, max_tokens=max_tokens, raw=raw)
    if as_json:
        print(json.dumps(comparison.as_dict(), ensure_ascii=False))
    else:
        print_comparison(comparison)


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
    resident: Annotated[bool, typer.Option(
        "--resident", help="With --cli: also time processes that reuse a resident model, as a user's later "
                           "`influence generate` runs do by default (the others load in-process).")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """Measure prompt processing, decode, time to first token, load time and peak RSS (llama-bench style)."""
    from influence_core.api import open_default_model, open_source
    from influence_core.hf_directory import hf_directory_for

    from . import bench as benchmarks

    if cli_mode:
        if output_format is not None:
            raise InfluenceError("--format measures the grammar mask in the kernel benchmark, not with --cli")
        _bench_processes(model_path, model_name, backends, dtypes or "auto", device, threads, prompt_tokens,
                         gen_tokens, repetitions, reference, compiled, gguf, reference_python, resident, as_json)
        return
    if reference_python is not None:
        raise InfluenceError("--reference-python applies to --cli only")
    if resident:
        raise InfluenceError("--resident applies to --cli only")
    dtypes = dtypes or "float32"
    prompt_tokens = 128 if prompt_tokens is None else prompt_tokens
    reference_model = model_reference(model_path, model_name)
    source = open_default_model() if reference_model is None else open_source(reference_model)
    if source.format == "gguf" and gguf is None:
        gguf = source.path
    if source.hf_directory is None:
        source = open_source(hf_directory_for(source))
    gguf = gguf or (_default_gguf() if reference_model is None else None)
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


def _default_gguf() -> Optional[Path]:
    """The default model's GGUF file, for llama.cpp, if the default model is one."""
    from influence_core.api import open_default_model

    source = open_default_model(quantized=True)
    return source.path if source.format == "gguf" else None


def _bench_processes(model_path, model_name, backends, dtypes, device, threads, prompt_tokens, gen_tokens,
                     repetitions, reference, compiled, gguf, reference_python, resident, as_json) -> None:
    """`influence bench --cli`: whole processes, as `bench.measure_processes` times them."""
    from . import bench as benchmarks

    if prompt_tokens is not None:
        raise InfluenceError("--prompt-tokens sets the kernel benchmark's prompt; --cli sends a chat prompt")
    model = ["-p", str(model_path)] if model_path else ["-m", model_name] if model_name else []
    cases = [case for backend in _split(backends)
             for case in benchmarks.generate_cases(model, backend, _split(dtypes), device, threads, gen_tokens,
                                                   compiled, resident)]
    if reference:
        gguf = gguf or (model_path if model_path and model_path.suffix == ".gguf" else None)
        gguf = gguf or (_default_gguf() if not (model_path or model_name) else None)
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
