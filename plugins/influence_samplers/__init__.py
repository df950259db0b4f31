"""The built-in samplers: temperature, top-k, top-p, min-p, repetition penalty and OpenAI's
presence and frequency penalties as logits processors, and argmax and a seeded draw as token pickers.

Each ``create`` checks its options and returns the function the generation loop calls per token;
everything stays on the logits' device.
"""

from __future__ import annotations

from typing import Any

from influence_core import SamplingError, hookimpl
from influence_core.interfaces import Sampler, SamplingContext


def _number(name: str, value: Any, kind: type) -> Any:
    try:
        number = kind(value)
    except (TypeError, ValueError):
        raise SamplingError(f"{name} must be a {kind.__name__}, got {value!r}") from None
    if kind is int and isinstance(value, float) and value != number:
        raise SamplingError(f"{name} must be a whole number, got {value!r}")
    return number


def temperature(temperature: Any = 1.0):
    value = _number("temperature", temperature, float)
    if not value > 0:
        raise SamplingError(f"temperature must be > 0 for the temperature processor, got {value}")

    def process(logits, context: SamplingContext):
        return logits / value

    return process


def top_k(k: Any = 50):
    value = _number("top_k", k, int)
    if value < 1:
        raise SamplingError(f"top_k must be >= 1, got {value}")

    def process(logits, context: SamplingContext):
        import torch

        if value >= logits.shape[-1]:
            return logits
        kept = torch.topk(logits, value)
        # Scatter the k winners into -inf so exactly k survive, even when the k-th value is tied.
        return torch.full_like(logits, float("-inf")).scatter(-1, kept.indices, kept.values)

    return process


def top_p(p: Any = 1.0):
    value = _number("top_p", p, float)
    if not 0 < value <= 1:
        raise SamplingError(f"top_p must be in (0, 1], got {value}")

    def process(logits, context: SamplingContext):
        import torch

        if value >= 1:
            return logits
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        mass_before = torch.cumsum(probs, dim=-1) - probs
        # Keep the smallest prefix whose mass reaches p: a token stays while the mass before it is < p.
        drop_sorted = mass_before >= value
        drop_sorted[..., 0] = False
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        return logits.masked_fill(drop, float("-inf"))

    return process


def min_p(p: Any = 0.0):
    value = _number("min_p", p, float)
    if not 0 <= value <= 1:
        raise SamplingError(f"min_p must be in [0, 1], got {value}")

    def process(logits, context: SamplingContext):
        import torch

        probs = torch.softmax(logits, dim=-1)
        threshold = value * probs.max(dim=-1, keepdim=True).values
        return logits.masked_fill(probs < threshold, float("-inf"))

    return process


def repetition_penalty(penalty: Any = 1.0):
    value = _number("repetition_penalty", penalty, float)
    if not value > 0:
        raise SamplingError(f"repetition_penalty must be > 0, got {value}")

    def process(logits, context: SamplingContext):
        import torch

        seen = context.token_ids
        if value == 1.0 or seen.numel() == 0:
            return logits
        # As transformers' RepetitionPenaltyLogitsProcessor: divide positive logits, multiply negative ones.
        score = logits.gather(-1, seen)
        score = torch.where(score < 0, score * value, score / value)
        return logits.scatter(-1, seen, score)

    return process


def _openai_penalty(name: str, penalty: Any, per_count: bool):
    """OpenAI's penalties, over the output so far (not the prompt): logit -= count * penalty
    (frequency) or -= penalty once a token has appeared (presence)."""
    value = _number(name, penalty, float)
    if not -2 <= value <= 2:
        raise SamplingError(f"{name} must be in [-2, 2], got {value}")

    def process(logits, context: SamplingContext):
        import torch

        output = context.token_ids[context.prompt_length:]
        if value == 0 or output.numel() == 0:
            return logits
        counts = torch.bincount(output, minlength=logits.shape[-1])[:logits.shape[-1]].to(logits.dtype)
        return logits - value * (counts if per_count else (counts > 0).to(logits.dtype))

    return process


def presence_penalty(penalty: Any = 0.0):
    return _openai_penalty("presence_penalty", penalty, per_count=False)


def frequency_penalty(penalty: Any = 0.0):
    return _openai_penalty("frequency_penalty", penalty, per_count=True)


def argmax():
    def pick(logits, context: SamplingContext) -> int:
        return int(logits.argmax(dim=-1))

    return pick


def sample():
    def pick(logits, context: SamplingContext) -> int:
        import torch

        probs = torch.softmax(logits, dim=-1)
        return int(torch.multinomial(probs, 1, generator=context.generator))

    return pick


@hookimpl(trylast=True)
def register_samplers(register) -> None:
    register(Sampler("repetition_penalty", "processor", repetition_penalty,
                     "divide logits of tokens already seen by PENALTY (multiply when negative)"))
    register(Sampler("presence_penalty", "processor", presence_penalty,
                     "subtract PENALTY (-2..2) from tokens already in the output (OpenAI's)"))
    register(Sampler("frequency_penalty", "processor", frequency_penalty,
                     "subtract PENALTY (-2..2) times each token's count in the output (OpenAI's)"))
    register(Sampler("temperature", "processor", temperature, "divide logits by TEMPERATURE"))
    register(Sampler("top_k", "processor", top_k, "keep the K most likely tokens"))
    register(Sampler("top_p", "processor", top_p, "keep the smallest set of tokens whose probability reaches P"))
    register(Sampler("min_p", "processor", min_p, "drop tokens less likely than P times the most likely one"))
    register(Sampler("argmax", "picker", argmax, "pick the most likely token (greedy)"))
    register(Sampler("sample", "picker", sample, "draw a token from the softmax, seeded by --seed"))
