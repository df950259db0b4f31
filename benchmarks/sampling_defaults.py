"""Which default sampling settings give good first answers on a small chat model.

    .venv/bin/python benchmarks/sampling_defaults.py [--model-path PATH] [--max-tokens 256] [--seeds 3]
        [--prompts N] [--only 1,3] [--json]

For each candidate setting, every chat prompt of onnx_int8.py is answered with a few seeds, and
three things are counted: how often the model ends its answer itself (EOS) before the token limit,
how much of the text repeats itself (the share of word 4-grams already seen earlier in the same
answer; greedy decoding of a 135M model loops, which shows up here), and the mean answer length.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from onnx_int8 import PROMPTS  # noqa: E402

CANDIDATES = {
    "greedy": dict(temperature=0),
    "smollm2 card (0.2, top-p 0.9)": dict(temperature=0.2, top_p=0.9),
    "llama.cpp (0.8, 40, 0.95, min-p 0.05)": dict(temperature=0.8, top_k=40, top_p=0.95, min_p=0.05),
    "ollama (0.8, 40, 0.9, rep 1.1)": dict(temperature=0.8, top_k=40, top_p=0.9, repetition_penalty=1.1),
    "0.6, 40, 0.95, min-p 0.05, rep 1.1": dict(temperature=0.6, top_k=40, top_p=0.95, min_p=0.05,
                                              repetition_penalty=1.1),
}


def repeated_share(text: str) -> float:
    words = text.split()
    grams = [tuple(words[i:i + 4]) for i in range(len(words) - 3)]
    seen: set[tuple[str, ...]] = set()
    repeats = 0
    for gram in grams:
        repeats += gram in seen
        seen.add(gram)
    return repeats / len(grams) if grams else 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-path", type=Path, help="default: the default model")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--prompts", type=int, default=len(PROMPTS), help="use the first N prompts")
    parser.add_argument("--only", help="comma-separated candidate numbers (1-based), default: all")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    import influence_core as influence

    model = influence.load(args.model_path, dtype=args.dtype, threads=args.threads)
    rows = []
    chosen = [int(n) - 1 for n in args.only.split(",")] if args.only else range(len(CANDIDATES))
    for label, settings in [list(CANDIDATES.items())[i] for i in chosen]:
        seeds = [0] if settings.get("temperature") == 0 else range(args.seeds)
        results = [model.generate(prompt, max_tokens=args.max_tokens, seed=seed, **settings)
                   for prompt in PROMPTS[:args.prompts] for seed in seeds]
        rows.append({
            "settings": label,
            "answers": len(results),
            "ended_by_model": round(sum(r.finish_reason == "eos" for r in results) / len(results), 3),
            "repeated_4grams": round(statistics.mean(repeated_share(r.text) for r in results), 3),
            "mean_tokens": round(statistics.mean(len(r.token_ids) for r in results), 1),
        })
        print(json.dumps(rows[-1]), file=sys.stderr)
    if args.json:
        print(json.dumps({"max_tokens": args.max_tokens, "rows": rows}, indent=2))
        return
    print(f"| settings | answers | ended by the model | repeated 4-grams | mean tokens |\n|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['settings']} | {row['answers']} | {row['ended_by_model']:.0%} | "
              f"{row['repeated_4grams']:.1%} | {row['mean_tokens']} |")


if __name__ == "__main__":
    main()
