"""How closely the onnx backend's int8 variant follows float32, and how fast each decodes.

    .venv/bin/python benchmarks/onnx_int8.py [--model-path DIR] [--threads 2] [--max-tokens 32] [--json]

Agreement: 20 chat prompts, greedy, ``--max-tokens`` each, on float32 and on int8 (the export
quantized by onnxruntime.quantization.quantize_dynamic): how many sequences are identical, how long
the common prefix is, and, feeding both float32's tokens (teacher forcing, so that one early flip
does not decide the rest), how often int8's top token is float32's. Speed: the backend alone (one forward per
token, argmax) on a 128-token prompt and 128 tokens, median of 3, the two dtypes alternating.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from onnx_vs_optimum import measure_runner, prompt_ids  # noqa: E402

PROMPTS = [
    "What is Rust?", "Write a haiku about the sea.", "List three prime numbers.",
    "Explain what a KV cache is in one sentence.", "What is the capital of France?",
    "Give me a recipe for pancakes.", "Why is the sky blue?", "Translate 'good morning' into Spanish.",
    "What does a compiler do?", "Name the planets of the solar system.", "How do vaccines work?",
    "Write a Python function that reverses a string.", "What is photosynthesis?",
    "Summarise the plot of Romeo and Juliet.", "What are the benefits of exercise?",
    "Explain recursion to a child.", "What is the difference between weather and climate?",
    "Suggest a name for a pet turtle.", "How many legs does a spider have?", "What is machine learning?",
]


def common_prefix(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-path", type=Path, help="default: the default model")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    import influence_core as influence
    from influence_core.api import open_default_model, open_source

    source = open_default_model() if args.model_path is None else open_source(args.model_path)
    models = {dtype: influence.load(source, backend="onnx", device="cpu", dtype=dtype, threads=args.threads)
              for dtype in ("float32", "int8")}
    outputs = {dtype: [model.generate(prompt, max_tokens=args.max_tokens, temperature=0).token_ids
                       for prompt in PROMPTS] for dtype, model in models.items()}
    prefixes = [common_prefix(a, b) for a, b in zip(outputs["float32"], outputs["int8"])]
    identical = sum(a == b for a, b in zip(outputs["float32"], outputs["int8"]))
    matches = positions = 0
    for prompt, reference in zip(PROMPTS, outputs["float32"]):
        ids = models["int8"].encode_prompt(prompt)
        picked = models["int8"].logits(ids + reference[:-1])[len(ids) - 1:].argmax(dim=-1).tolist()
        matches += sum(a == b for a, b in zip(picked, reference))
        positions += len(reference)

    ids = prompt_ids(models["float32"].tokenizer, 128)
    for model in models.values():
        measure_runner(model, ids, 2)  # warm-up
    decode: dict[str, list[float]] = {dtype: [] for dtype in models}
    for _ in range(args.repeats):
        for dtype, model in models.items():
            decode[dtype].append(measure_runner(model, ids, 128)[1])

    report = {
        "model": str(source.path), "threads": args.threads, "prompts": len(PROMPTS), "max_tokens": args.max_tokens,
        "identical_sequences": identical, "mean_common_prefix_tokens": round(statistics.mean(prefixes), 1),
        "common_prefix_per_prompt": prefixes,
        "teacher_forced_top1_agreement": round(matches / positions, 4),
        "decode_tokens_per_s": {dtype: round(statistics.median(v), 1) for dtype, v in decode.items()},
        "decode_runs": {dtype: [round(x, 1) for x in v] for dtype, v in decode.items()},
    }
    if args.json:
        print(json.dumps(report, indent=2))
        return
    print(f"int8 vs float32 greedy: {identical}/{len(PROMPTS)} sequences identical over {args.max_tokens} tokens; "
          f"mean common prefix {report['mean_common_prefix_tokens']} tokens; teacher-forced top-1 agreement "
          f"{100 * matches / positions:.1f}% of {positions} positions")
    for dtype, values in decode.items():
        print(f"{dtype:<8} decode {statistics.median(values):6.1f} tok/s (runs: {', '.join(f'{v:.1f}' for v in values)})")


if __name__ == "__main__":
    main()
