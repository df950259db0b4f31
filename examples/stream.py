"""Stream a reply piece by piece, then read the timings.

    python examples/stream.py "Tell me a story about a crab." --temperature 0.7 --seed 1
"""

import argparse

import influence_core as influence

parser = argparse.ArgumentParser()
parser.add_argument("prompt")
parser.add_argument("--model-path", default=None)
parser.add_argument("--max-tokens", type=int, default=64)
parser.add_argument("--temperature", type=float, default=0.7)
parser.add_argument("--seed", type=int, default=None)
args = parser.parse_args()

model = influence.load(args.model_path)
stream = model.stream(args.prompt, max_tokens=args.max_tokens, temperature=args.temperature, top_p=0.95,
                      seed=args.seed)
for piece in stream:
    print(piece, end="", flush=True)
print()
stats = stream.result.stats
print(f"[time to first token {stats.time_to_first_token_s * 1000:.0f} ms, prefill {stats.prefill_tokens_per_s:.0f} "
      f"tok/s, decode {stats.decode_tokens_per_s:.1f} tok/s, seed {stream.result.seed}]")
