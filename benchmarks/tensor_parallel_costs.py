"""What one decode step costs each rank under tensor parallelism: in all, in all-reduces, the rest.

    python benchmarks/tensor_parallel_costs.py --device cpu                    # one process: the baseline
    torchrun --nproc-per-node 2 benchmarks/tensor_parallel_costs.py --device cpu
    python benchmarks/tensor_parallel_costs.py --device cuda --shard-shapes    # one GPU: the matmuls of
                                                                               # big models' slices

Rank 0 prints JSON. A step runs 2 all-reduces per layer (after attention, after the MLP) of one
hidden-size vector per sequence, plus the runner's check against rank 0 (one 8-byte broadcast).
--shard-shapes times, on one device, the four projections one rank of N computes per layer for
Llama-3-8B and -70B (random bfloat16 weights): the per-rank compute that tensor parallelism divides.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

import influence_core as influence

# hidden, intermediate, attention heads, key-value heads, head_dim, layers
SHAPES = {"llama-3-8b": (4096, 14336, 32, 8, 128, 32), "llama-3-70b": (8192, 28672, 64, 8, 128, 80)}


def timed(function, repeats: int, device: str) -> float:
    """Mean seconds per call."""
    function()
    synchronize(device)
    started = time.perf_counter()
    for _ in range(repeats):
        function()
    synchronize(device)
    return (time.perf_counter() - started) / repeats


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def decode_step_costs(model_path: str | None, device: str, dtype: str, steps: int) -> dict:
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    model = influence.load(model_path, device=device, dtype=dtype,
                           backend_options={"tensor_parallel": world_size} if world_size > 1 else None)
    runner = model.runner
    prompt = list(range(1, 17))
    with torch.inference_mode():
        token = int(runner.forward(prompt, 0).argmax())
        position = len(prompt)

        def step():
            nonlocal token, position
            token = int(runner.forward([token], position).argmax())
            position += 1

        step_s = timed(step, steps, runner.device)
        result = {"world_size": world_size, "device": runner.device, "dtype": model.dtype,
                  "step_ms": round(step_s * 1e3, 3), "tokens_per_s": round(1 / step_s, 1)}
        if world_size > 1:
            import torch.distributed as dist

            config = model.config
            vector = torch.zeros(1, 1, config.hidden_size, device=runner.device,
                                 dtype=runner.model.embed_tokens.dtype)
            check = torch.zeros(1, dtype=torch.long, device=runner.device)

            def all_reduces():
                for _ in range(2 * config.num_hidden_layers):
                    dist.all_reduce(vector)

            all_reduce_s = timed(all_reduces, steps, runner.device)
            check_s = timed(lambda: dist.broadcast(check, src=0), steps, runner.device)
            result.update(all_reduces_per_step=2 * config.num_hidden_layers,
                          all_reduce_us=round(all_reduce_s / (2 * config.num_hidden_layers) * 1e6, 1),
                          all_reduces_ms=round(all_reduce_s * 1e3, 3), check_ms=round(check_s * 1e3, 3),
                          rest_ms=round((step_s - all_reduce_s - check_s) * 1e3, 3))
    return result


def shard_matmul_costs(device: str, repeats: int) -> list[dict]:
    rows = []
    for name, (hidden, intermediate, heads, kv_heads, head_dim, layers) in SHAPES.items():
        for world_size in (1, 2, 4, 8):
            qkv = (heads + 2 * kv_heads) * head_dim // world_size
            weights = [torch.randn(out, into, device=device, dtype=torch.bfloat16) for out, into in (
                (qkv, hidden), (hidden, heads * head_dim // world_size),
                (2 * intermediate // world_size, hidden), (hidden, intermediate // world_size))]
            inputs = [torch.randn(1, w.shape[1], device=device, dtype=torch.bfloat16) for w in weights]
            layer_s = timed(lambda: [torch.nn.functional.linear(x, w) for x, w in zip(inputs, weights)], repeats,
                            device)
            bytes_read = sum(w.numel() * 2 for w in weights)
            rows.append({"model": name, "world_size": world_size, "layer_us": round(layer_s * 1e6, 1),
                         "all_layers_ms": round(layer_s * layers * 1e3, 3),
                         "weights_gb_s": round(bytes_read / layer_s / 1e9, 1)})
            del weights, inputs
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model-path", default=None, help="Default: the default model.")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--shard-shapes", action="store_true", help="Time big models' per-rank matmuls instead.")
    args = parser.parse_args()
    if args.shard_shapes:
        print(json.dumps(shard_matmul_costs(args.device, args.steps), indent=1))
        return
    result = decode_step_costs(args.model_path, args.device, args.dtype, args.steps)
    if os.environ.get("RANK", "0") == "0":
        print(json.dumps(result))


if __name__ == "__main__":
    main()
