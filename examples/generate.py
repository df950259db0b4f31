"""Generate a reply with the Python API.

    python examples/generate.py "What is Rust?"               # the default model
    python examples/generate.py "What is Rust?" --model-path DIR
"""

import argparse

import influence_core as influence

parser = argparse.ArgumentParser()
parser.add_argument("prompt")
parser.add_argument("--model-path", default=None)
parser.add_argument("--max-tokens", type=int, default=64)
args = parser.parse_args()

model = influence.load(args.model_path, backend="torch", device="auto")
result = model.generate(args.prompt, max_tokens=args.max_tokens, temperature=0)
print(result.text)
print(f"[{result.stats.generated_tokens} tokens, {result.stats.decode_tokens_per_s:.1f} tok/s, "
      f"finished by {result.finish_reason}]")
