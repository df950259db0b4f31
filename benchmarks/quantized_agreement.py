"""How closely a reduced-precision variant follows float32 on the same backend, greedy.

    .venv/bin/python benchmarks/quantized_agreement.py --backend torch --dtypes bfloat16,int8,int4 [--json]

For each dtype, on the 20 chat prompts of onnx_int8.py: how many greedy sequences are identical to
float32's, how long the common prefix is, and, feeding both float32's tokens (teacher forcing, so
one early flip does not decide the rest), how often the variant's top token is float32's.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from onnx_int8 import PROMPTS, common_prefix  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-path", type=Path, help="default: the default model")
    parser.add_argument("--backend", default="torch")
    parser.add_argument("--dtypes", default="bfloat16,int8,int4")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    import influence_core as influence
    from influence_core.api import open_default_model, open_source

    source = open_default_model() if args.model_path is None else open_source(args.model_path)

    def greedy(model) -> list[list[int]]:
        return [model.generate(prompt, max_tokens=args.max_tokens, temperature=0).token_ids for prompt in PROMPTS]

    reference = greedy(influence.load(source, backend=args.backend, device="cpu", dtype="float32",
                                      threads=args.threads))
    report = {"model": str(source.path), "backend": args.backend, "prompts": len(PROMPTS),
              "max_tokens": args.max_tokens, "against_float32": {}}
    for dtype in args.dtypes.split(","):
        model = influence.load(source, backend=args.backend, device="cpu", dtype=dtype, threads=args.threads)
        outputs = greedy(model)
        matches = positions = 0
        for prompt, expected in zip(PROMPTS, reference):
            ids = model.encode_prompt(prompt)
            picked = model.logits(ids + expected[:-1])[len(ids) - 1:].argmax(dim=-1).tolist()
            matches += sum(a == b for a, b in zip(picked, expected))
            positions += len(expected)
        report["against_float32"][dtype] = {
            "identical_sequences": sum(a == b for a, b in zip(reference, outputs)),
            "mean_common_prefix_tokens": round(statistics.mean(common_prefix(a, b) for a, b in zip(reference, outputs)), 1),
            "teacher_forced_top1_agreement": round(matches / positions, 4),
        }
    if args.json:
        print(json.dumps(report, indent=2))
        return
    print(f"{report['model']}, backend {args.backend}, {len(PROMPTS)} prompts x {args.max_tokens} greedy tokens")
    for dtype, figures in report["against_float32"].items():
        print(f"  {dtype}: {figures['identical_sequences']}/{len(PROMPTS)} sequences identical to float32, "
              f"common prefix {figures['mean_common_prefix_tokens']} tokens on average, "
              f"teacher-forced top-1 agreement {100 * figures['teacher_forced_top1_agreement']:.1f}%")


if __name__ == "__main__":
    main()
