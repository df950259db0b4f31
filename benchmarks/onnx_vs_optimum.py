"""Decode speed of Influence's onnx backend next to optimum's ORTModelForCausalLM, on the same export.

    .venv/bin/python benchmarks/onnx_vs_optimum.py [--model-path DIR] [--threads 2] [--repeats 3] [--json]

Both engines run in this process on the store's export (made first if missing), with the same
thread count, the same 128-token prompt and 128 greedy tokens. Repetitions alternate between the
engines, so a noisy neighbour slows all alike; each figure is the median. Influence runs the float32
graph it derives from the export once (ONNX Runtime's transformer fusions); optimum runs the
export as its exporter wrote it and, for reference, that same fused graph.

Measured for Influence: ``runner`` is the backend alone (one forward per token, argmax), as
`influence bench` measures it; ``generate`` is the whole user-facing loop (sampler chain, text
decoding), which stops early if the model emits EOS. For optimum: ``generate`` with
``min_new_tokens``, decode speed from a 129-token run minus a 1-token run (both include prefill).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

PROMPT_TEXT = (
    "The history of computing is a story of abstraction. Early machines were programmed by rewiring "
    "panels; later, stored programs let the same hardware do many jobs. Assemblers named instructions, "
    "compilers translated languages that people could read, and operating systems shared one machine "
    "among many users. Each layer hid the one below it and let programmers think about bigger problems. "
)


def prompt_ids(tokenizer, count: int) -> list[int]:
    ids: list[int] = []
    while len(ids) < count:
        ids += tokenizer.encode(PROMPT_TEXT, add_special_tokens=False)
    return ids[:count]


def measure_runner(model, ids: list[int], new_tokens: int) -> tuple[float, float]:
    """(prefill tok/s, decode tok/s) driving the runner directly."""
    runner = model.runner
    started = time.perf_counter()
    token = int(runner.forward(ids, 0).argmax())
    prefill = len(ids) / (time.perf_counter() - started)
    started = time.perf_counter()
    for position in range(len(ids), len(ids) + new_tokens):
        token = int(runner.forward([token], position).argmax())
    return prefill, new_tokens / (time.perf_counter() - started)


def measure_generate(model, ids: list[int], new_tokens: int) -> tuple[float, int]:
    """(decode tok/s, tokens generated) through Model.generate, from an empty cache."""
    model.cache.token_ids = []
    result = model.generate(ids, max_tokens=new_tokens, temperature=0)
    return result.stats.decode_tokens_per_s, len(result.token_ids)


def measure_optimum(optimum, ids: list[int], new_tokens: int) -> tuple[float, float]:
    """(prefill tok/s, decode tok/s) for ORTModelForCausalLM.generate."""
    import torch

    input_ids = torch.tensor([ids])

    def generate(count: int) -> float:
        started = time.perf_counter()
        optimum.generate(input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=count,
                         min_new_tokens=count, do_sample=False, pad_token_id=0)
        return time.perf_counter() - started

    first = generate(1)
    total = generate(new_tokens + 1)
    return len(ids) / first, new_tokens / (total - first)


def fused_view(export: Path) -> Path:
    """A directory like the export (config, tokenizer) whose model.onnx is the fused float32 graph."""
    view = Path(tempfile.mkdtemp(prefix="fused-view-"))
    for file in export.iterdir():
        if file.is_file() and not file.name.startswith("model."):
            (view / file.name).symlink_to(file)
    for file in (export / "float32").glob("model.onnx*"):
        (view / file.name).symlink_to(file)
    return view


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-path", type=Path, help="default: the default model")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    import onnxruntime
    import torch
    from optimum.onnxruntime import ORTModelForCausalLM

    import influence_core as influence
    from influence_core.api import open_default_model, open_source
    from influence_onnx.export import MODEL_FILE, export_for

    torch.set_num_threads(args.threads)  # transformers' generate loop runs torch ops between sessions
    source = open_default_model() if args.model_path is None else open_source(args.model_path)
    export = export_for(source)
    model = influence.load(source, backend="onnx", device="cpu", dtype="float32", threads=args.threads)
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = args.threads
    optimum = ORTModelForCausalLM.from_pretrained(export, file_name=MODEL_FILE, session_options=options,
                                                  provider="CPUExecutionProvider")
    optimum_fused = ORTModelForCausalLM.from_pretrained(fused_view(export), file_name=MODEL_FILE,
                                                        session_options=options, provider="CPUExecutionProvider")
    ids = prompt_ids(model.tokenizer, args.prompt_tokens)

    load_before = os.getloadavg()[0]  # a shared machine: say how busy it was
    # Warm-up: first-call allocations are not what the runs measure.
    measure_runner(model, ids, 2)
    measure_optimum(optimum, ids, 2)
    measure_optimum(optimum_fused, ids, 2)
    runs: dict[str, list[float]] = {"influence runner": [], "influence generate": [], "optimum generate": [],
                                    "optimum, fused graph": []}
    prefill: dict[str, list[float]] = {"influence runner": [], "optimum generate": []}
    generated = []
    for _ in range(args.repeats):
        pp, tg = measure_runner(model, ids, args.new_tokens)
        runs["influence runner"].append(tg)
        prefill["influence runner"].append(pp)
        tg, count = measure_generate(model, ids, args.new_tokens)
        runs["influence generate"].append(tg)
        generated.append(count)
        pp, tg = measure_optimum(optimum, ids, args.new_tokens)
        runs["optimum generate"].append(tg)
        prefill["optimum generate"].append(pp)
        runs["optimum, fused graph"].append(measure_optimum(optimum_fused, ids, args.new_tokens)[1])

    medians = {name: statistics.median(values) for name, values in runs.items()}
    report = {
        "model": str(source.path), "export": str(export), "threads": args.threads,
        "prompt_tokens": len(ids), "new_tokens": args.new_tokens, "repeats": args.repeats,
        "onnxruntime": onnxruntime.__version__, "influence_generate_tokens": generated,
        "load_average_1min": {"before": round(load_before, 2), "after": round(os.getloadavg()[0], 2)},
        "decode_tokens_per_s": {name: round(value, 1) for name, value in medians.items()},
        "decode_runs": {name: [round(v, 1) for v in values] for name, values in runs.items()},
        "prefill_tokens_per_s": {name: round(statistics.median(v), 1) for name, v in prefill.items()},
        "speedup_vs_optimum": {name: round(medians[name] / medians["optimum generate"], 2)
                               for name in ("influence runner", "influence generate")},
    }
    if args.json:
        print(json.dumps(report, indent=2))
        return
    print(f"{report['model']} | threads {args.threads} | prompt {len(ids)} tokens | {args.new_tokens} greedy tokens | "
          f"median of {args.repeats} | onnxruntime {onnxruntime.__version__} | load average "
          f"{report['load_average_1min']['before']} before, {report['load_average_1min']['after']} after")
    print(f"{'engine':<20} {'decode tok/s':>12} {'runs':>24} {'vs optimum':>11}")
    for name, values in runs.items():
        ratio = medians[name] / medians["optimum generate"]
        print(f"{name:<20} {medians[name]:>12.1f} {', '.join(f'{v:.1f}' for v in values):>24} {ratio:>10.2f}x")
    if any(count < args.new_tokens for count in generated):
        print(f"note: influence generate stopped early at EOS: {generated} tokens")


if __name__ == "__main__":
    main()
