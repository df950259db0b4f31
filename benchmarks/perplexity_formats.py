"""Perplexity of every weight format on one text, and each one's drift from float32.

What `influence perplexity FILE --dtype D --against float32 --json` reports for each D, all the
formats loaded at once and scored chunk by chunk against one float32 pass:

    .venv/bin/python benchmarks/perplexity_formats.py benchmarks/alice-chapters-1-2.txt

Rows: the default format (auto; for the default model that is int4 from the GGUF's own blocks,
as `--dtype int4` is too), each explicit dtype, int4 requantized from the float copy of the
model in the store (what int4 ran as before it took the GGUF's own blocks), and auto with its
output head in bfloat16 instead of int8 (the default model's head is Q8_0: blocks of 32 with a
scale each, which per-channel int8 can only requantize; bfloat16 holds them to 8 bits but reads
twice the bytes).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("text", type=Path)
    parser.add_argument("--dtypes", default="auto,bfloat16,int8")
    parser.add_argument("--context", type=int, default=512)
    parser.add_argument("--chunks", type=int, help="score only the first N chunks of the text")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-variants", action="store_true",
                        help="skip the int4-from-floats and bfloat16-head rows")
    args = parser.parse_args()

    import influence_core as influence
    from influence_bench.perplexity import measure_all

    text = args.text.read_text(encoding="utf-8")
    reference = influence.load(dtype="float32", threads=args.threads)
    if args.chunks:
        ids = reference.tokenizer.encode(text, add_special_tokens=False)[:args.chunks * args.context]
        text = reference.tokenizer.decode(ids, skip_special_tokens=False)
    runs = [(dtype, None, False) for dtype in args.dtypes.split(",")]
    if not args.no_variants:
        runs.append(("int4", reference.source.path, False))  # the float copy in the store: int4 from floats
        runs.append(("auto", None, True))
    models = []
    for dtype, path, bfloat16_head in runs:
        models.append(influence.load(path, dtype=dtype, threads=args.threads))
        if bfloat16_head:
            with_bfloat16_head(models[-1])
    results = measure_all(models, text, args.context, reference,
                          lambda done, total: print(f"chunk {done}/{total}", file=sys.stderr))
    rows = [{"requested": dtype, "model": str(model.source.path), **result.as_dict()}
            for (dtype, _, _), model, result in zip(runs, models, results)]
    print(json.dumps(rows, indent=2))


def with_bfloat16_head(model) -> None:
    """Swap the output head for the dequantized head (tied: the embedding) in packed bfloat16."""
    import torch
    from torch import nn

    from influence_torch.linear import PackedLinear

    weights = model.source.weights()
    name = "model.embed_tokens.weight" if model.config.tie_word_embeddings else "lm_head.weight"
    head = nn.Linear(model.config.hidden_size, model.config.vocab_size, bias=False)
    with torch.no_grad():
        head.weight = nn.Parameter(weights[name].to(torch.bfloat16), requires_grad=False)
    model.runner.model.output = PackedLinear(head)
    model.weight_format += ", output head bfloat16 (dequantized) instead"


if __name__ == "__main__":
    main()
