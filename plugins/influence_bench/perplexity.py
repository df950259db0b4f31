"""``influence perplexity``: how well a model predicts a text, and how far a reduced format drifts
from float32 on it.

Follows llama.cpp's llama-perplexity: the text is cut into chunks of ``context`` tokens, each run
from an empty cache, and only the second half of each chunk is scored, so every scored token has
at least half a context before it. With a reference (the same model in float32, say), both see
the same chunks and each scored position also adds the KL divergence of the model's next-token
distribution from the reference's, and whether their most likely tokens agree.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from influence_core.errors import InfluenceError


@dataclass
class Perplexity:
    perplexity: float
    tokens: int  # scored tokens
    chunks: int
    context: int
    dtype: str
    weight_format: str
    # With a reference: its own perplexity, and the model's divergence from it.
    against: str | None = None
    reference_perplexity: float | None = None
    kl_divergence: float | None = None  # mean over scored tokens of KL(reference || model), in nats
    top1_agreement: float | None = None  # fraction of scored tokens where both rank the same token first

    def as_dict(self) -> dict[str, Any]:
        return {key: value for key, value in asdict(self).items() if value is not None}


def chunks(token_ids: list[int], context: int, bos_token_id: int | None) -> list[list[int]]:
    """Whole chunks of ``context`` tokens (the rest is dropped, as llama.cpp does), each starting
    with the BOS token where the model has one, as every sequence it saw in training did."""
    if context < 2:
        raise InfluenceError(f"--context must be at least 2 tokens, not {context}")
    if len(token_ids) < context:
        raise InfluenceError(f"the text has {len(token_ids)} tokens, fewer than one chunk of --context {context}; "
                             "use a longer text or a smaller --context")
    pieces = [token_ids[start:start + context] for start in range(0, len(token_ids) - context + 1, context)]
    if bos_token_id is not None:
        pieces = [[bos_token_id] + piece[1:] for piece in pieces]
    return pieces


def measure(model: Any, text: str, context: int, reference: Any | None = None,
            progress: Callable[[int, int], None] | None = None) -> Perplexity:
    """Perplexity of ``model`` (an `influence_core.api.Model`) over ``text``; with ``reference``,
    a second model of the same vocabulary, also the KL divergence and top-1 agreement."""
    return measure_all([model], text, context, reference, progress)[0]


def measure_all(models: list[Any], text: str, context: int, reference: Any | None = None,
                progress: Callable[[int, int], None] | None = None) -> list[Perplexity]:
    """`measure` for several models (formats of one model) on the same chunks, the reference's
    logits computed once per chunk for all of them."""
    import torch

    tokenizer = models[0].tokenizer
    bos = tokenizer.bos_token_id if tokenizer.encode("") else None  # the tokenizer adds BOS to every text
    pieces = chunks(tokenizer.encode(text, add_special_tokens=False), context, bos)
    first = context // 2  # the first position whose prediction is scored
    nll = [0.0] * len(models)
    kl = [0.0] * len(models)
    agreed = [0] * len(models)
    reference_nll = 0.0
    scored = 0

    def log_probs(model: Any, piece: list[int]) -> Any:
        return torch.log_softmax(model.logits(piece)[first:-1].double(), dim=-1)

    for done, piece in enumerate(pieces):
        targets = torch.tensor(piece[first + 1:])[:, None]
        expected = log_probs(reference, piece) if reference is not None else None
        if expected is not None:
            reference_nll -= expected.gather(1, targets).sum().item()
        for i, model in enumerate(models):
            observed = log_probs(model, piece)
            nll[i] -= observed.gather(1, targets).sum().item()
            if expected is not None:
                kl[i] += (expected.exp() * (expected - observed)).sum().item()
                agreed[i] += int((expected.argmax(-1) == observed.argmax(-1)).sum())
        scored += len(targets)
        if progress is not None:
            progress(done + 1, len(pieces))
    results = []
    for i, model in enumerate(models):
        result = Perplexity(perplexity=math.exp(nll[i] / scored), tokens=scored, chunks=len(pieces),
                            context=context, dtype=model.dtype, weight_format=model.weight_format)
        if reference is not None:
            result.against = reference.weight_format
            result.reference_perplexity = math.exp(reference_nll / scored)
            result.kl_divergence = kl[i] / scored
            result.top1_agreement = agreed[i] / scored
        results.append(result)
    return results
