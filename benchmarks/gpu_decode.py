"""Decode speed on a GPU: our torch backend next to transformers, on random weights of real shapes.

No model files travel to the GPU machine, so this builds random-weight models with the shapes of
SmolLM2-135M and Llama-3.2-1B; speed depends on shapes, not on the values of the weights.

    python benchmarks/gpu_decode.py [--out results.json]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

import influence_core as influence

SHAPES = {
    "smollm2-135m": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True, rope_theta=100000.0),
    "llama-3.2-1b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                         num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=True, rope_theta=500000.0),
}


def write_model(directory: Path, shape: dict) -> Path:
    import sys

    from transformers import LlamaConfig, LlamaForCausalLM

    sys.path.insert(0, str(Path(__file__).parent.parent / "tests"))
    from tiny_models import write_tokenizer

    torch.manual_seed(0)
    with torch.device("cuda"):
        model = LlamaForCausalLM(LlamaConfig(max_position_embeddings=4096, bos_token_id=1, eos_token_id=2, **shape))
    model.to(torch.bfloat16).save_pretrained(directory)
    write_tokenizer(directory, 400)
    return directory


def ours(path: Path, prompt: list[int], new_tokens: int, batch: int) -> dict:
    model = influence.load(path, device="cuda", dtype="bfloat16", max_batch=batch)
    runner = model.runner
    runner.forward(prompt, 0)
    torch.cuda.synchronize()
    started = time.perf_counter()
    logits = runner.forward(prompt, 0)
    token = int(logits.argmax())
    prefill = time.perf_counter() - started
    started = time.perf_counter()
    for position in range(len(prompt), len(prompt) + new_tokens):
        token = int(runner.forward([token], position).argmax())
    decode = time.perf_counter() - started
    prompts = [prompt] * batch
    started = time.perf_counter()
    results = model.generate_batch(prompts, max_tokens=new_tokens, temperature=0)
    batched = time.perf_counter() - started
    generated = sum(len(r.token_ids) for r in results)
    return {"prefill_tokens_per_s": len(prompt) / prefill, "decode_tokens_per_s": new_tokens / decode,
            f"batch{batch}_generated_tokens_per_s": generated / batched}


def reference(path: Path, prompt: list[int], new_tokens: int) -> dict:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).to("cuda").eval()
    ids = torch.tensor([prompt], device="cuda")

    def generate(count: int) -> float:
        torch.cuda.synchronize()
        started = time.perf_counter()
        model.generate(ids, max_new_tokens=count, min_new_tokens=count, do_sample=False, pad_token_id=0)
        torch.cuda.synchronize()
        return time.perf_counter() - started

    generate(4)
    first, total = generate(1), generate(new_tokens + 1)
    return {"prefill_tokens_per_s": len(prompt) / first, "decode_tokens_per_s": new_tokens / (total - first)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--batch", type=int, default=16)
    args = parser.parse_args()
    prompt = list(range(3, 131))
    report = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "models": {}}
    with tempfile.TemporaryDirectory() as scratch:
        for name, shape in SHAPES.items():
            path = write_model(Path(scratch) / name, shape)
            report["models"][name] = {"influence_torch_bf16": ours(path, prompt, args.new_tokens, args.batch),
                                      "transformers_bf16": reference(path, prompt, args.new_tokens)}
            print(name, json.dumps(report["models"][name]), flush=True)
    if args.out:
        args.out.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
