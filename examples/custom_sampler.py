"""Register a sampler in-process and use it by name, as a plugin package would.

Locally typical sampling (Meister et al., 2022): keep the tokens whose surprisal is closest to
the distribution's entropy, up to probability mass P. It runs after the built-in processors.

    python examples/custom_sampler.py "Write a haiku about the sea." --typical-p 0.9 --seed 3
"""

import argparse

import torch

import influence_core as influence
from influence_core import SamplingError, hookimpl
from influence_core.interfaces import Sampler


def typical(p=0.9):
    p = float(p)
    if not 0 < p <= 1:
        raise SamplingError(f"typical p must be in (0, 1], got {p}")

    def process(logits, context):
        log_probs = torch.log_softmax(logits, dim=-1)
        probs = log_probs.exp()
        entropy = -(probs * torch.nan_to_num(log_probs, neginf=0.0)).sum()
        distance = (-log_probs - entropy).abs()
        order = distance.argsort()
        mass_before = probs[order].cumsum(0) - probs[order]
        drop = torch.zeros_like(logits, dtype=torch.bool)
        drop[order[mass_before >= p]] = True
        return logits.masked_fill(drop, float("-inf"))

    return process


class TypicalSampling:
    @staticmethod
    @hookimpl
    def register_samplers(register):
        register(Sampler("typical", "processor", typical, "locally typical sampling with mass P"))


parser = argparse.ArgumentParser()
parser.add_argument("prompt")
parser.add_argument("--model-path", default=None)
parser.add_argument("--typical-p", type=float, default=0.9)
parser.add_argument("--seed", type=int, default=0)
parser.add_argument("--max-tokens", type=int, default=48)
args = parser.parse_args()

influence.register_plugin(TypicalSampling, name="typical-sampling")
model = influence.load(args.model_path)
result = model.generate(args.prompt, max_tokens=args.max_tokens, temperature=1.0, seed=args.seed,
                        sampler="typical", sampler_options={"p": args.typical_p})
print(result.text)
