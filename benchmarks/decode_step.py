"""Decode speed and ATen dispatches per token of the torch backend's one-token step.

    python benchmarks/decode_step.py --dtypes float32,int8,int4 --threads 2 --tokens 128

Loads the default model in this process, prefills a short prompt, then times ``--tokens`` greedy
decode steps through the runner (runner.forward + argmax, as the generation loop drives it), and
counts the ATen operators one step dispatches (a TorchDispatchMode). With --compiled, the step
runs the compiled artifact (`influence prepare` builds it).
"""

from __future__ import annotations

import argparse
import collections
import json
import time


def count_dispatches(step) -> collections.Counter:
    from torch.utils._python_dispatch import TorchDispatchMode

    class Counter(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.ops: collections.Counter = collections.Counter()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops[str(func.overloadpacket.__name__)] += 1
            return func(*args, **(kwargs or {}))

    with Counter() as counter:
        step()
    return counter.ops


def measure(dtype: str, threads: int, tokens: int, compiled: bool) -> dict:
    import torch

    import influence_core as influence

    model = influence.load(None, dtype=dtype, threads=threads, backend_options={"compiled": compiled})
    runner = model.runner
    prompt = model.tokenizer.encode("The history of computing began with mechanical calculators, and")
    logits = runner.forward(prompt, 0)
    position = len(prompt)
    token = int(torch.argmax(logits))
    ops = count_dispatches(lambda: runner.forward([token], position))
    for _ in range(4):  # warm-up
        token = int(torch.argmax(runner.forward([token], position)))
        position += 1
    started = time.perf_counter()
    for _ in range(tokens):
        token = int(torch.argmax(runner.forward([token], position)))
        position += 1
    elapsed = time.perf_counter() - started
    return {"dtype": dtype, "compiled": compiled, "decode_tok_s": round(tokens / elapsed, 2),
            "dispatches_per_token": sum(ops.values()), "top_ops": ops.most_common(8)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtypes", default="float32,int8,int4")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--compiled", action="store_true")
    arguments = parser.parse_args()
    for dtype in arguments.dtypes.split(","):
        print(json.dumps(measure(dtype, arguments.threads, arguments.tokens, arguments.compiled)), flush=True)


if __name__ == "__main__":
    main()
