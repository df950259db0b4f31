"""The generation loop, shared by every backend.

Prefill the prompt (reusing whatever prefix the runner's KV cache already holds), then pick one
token at a time with the sampler chain and feed it back, until an EOS id, a stop string, the token
limit or the end of the context. Text comes out as an iterator of pieces that never split a UTF-8
character and never show any part of a stop string.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from .errors import ContextLengthError, InfluenceError
from .interfaces import Runner
from .sampling import SamplerChain
from .tokenizer import IncrementalDecoder, Tokenizer


@dataclass
class GenerationStats:
    prompt_tokens: int
    cached_prompt_tokens: int  # prompt tokens whose KV came from an earlier call (chat turns)
    generated_tokens: int
    time_to_first_token_s: float
    prefill_s: float
    decode_s: float

    @property
    def prefill_tokens_per_s(self) -> float:
        computed = self.prompt_tokens - self.cached_prompt_tokens
        return computed / self.prefill_s if self.prefill_s > 0 else 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        # The first token comes out of prefill; decode speed counts the steps after it.
        steps = self.generated_tokens - 1
        return steps / self.decode_s if steps > 0 and self.decode_s > 0 else 0.0

    def as_dict(self) -> dict[str, float | int]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "cached_prompt_tokens": self.cached_prompt_tokens,
            "generated_tokens": self.generated_tokens,
            "time_to_first_token_s": round(self.time_to_first_token_s, 6),
            "prefill_s": round(self.prefill_s, 6),
            "decode_s": round(self.decode_s, 6),
            "prefill_tokens_per_s": round(self.prefill_tokens_per_s, 3),
            "decode_tokens_per_s": round(self.decode_tokens_per_s, 3),
        }


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]
    # "eos": the model ended; "stop": a stop string matched; "length": max_tokens reached;
    # "context": the context window is full.
    finish_reason: str
    stats: GenerationStats
    seed: int


@dataclass
class CacheState:
    """The token ids whose keys and values sit in a runner's cache, position by position."""

    token_ids: list[int] = field(default_factory=list)

    def reusable_prefix(self, prompt_ids: Sequence[int]) -> int:
        shared = 0
        for cached, wanted in zip(self.token_ids, prompt_ids):
            if cached != wanted:
                break
            shared += 1
        # The last prompt token is always recomputed: its logits pick the first new token.
        return min(shared, len(prompt_ids) - 1)


class StopStringFilter:
    """Holds back text that might be the start of a stop string until it is known not to be."""

    def __init__(self, stop: Sequence[str]) -> None:
        self.stop = [s for s in stop if s]
        self.pending = ""

    def push(self, piece: str) -> tuple[str, bool]:
        """Returns (text safe to emit, whether a stop string matched)."""
        self.pending += piece
        matches = [i for i in (self.pending.find(s) for s in self.stop) if i >= 0]
        if matches:
            text, self.pending = self.pending[:min(matches)], ""
            return text, True
        hold = max((n for s in self.stop for n in range(min(len(s) - 1, len(self.pending)), 0, -1)
                    if self.pending.endswith(s[:n])), default=0)
        cut = len(self.pending) - hold
        text, self.pending = self.pending[:cut], self.pending[cut:]
        return text, False

    def flush(self) -> str:
        text, self.pending = self.pending, ""
        return text


class TextStream:
    """Iterate for text pieces; after the iteration ends, `result` holds the whole outcome."""

    def __init__(self, runner: Runner, tokenizer: Tokenizer, cache: CacheState, prompt_ids: list[int],
                 chain: SamplerChain, max_tokens: int, stop: Sequence[str], eos_token_ids: Sequence[int],
                 requested_at: float | None = None) -> None:
        if not prompt_ids:
            raise InfluenceError("the prompt is empty")
        if len(prompt_ids) > runner.context_length:
            raise ContextLengthError(
                f"the prompt has {len(prompt_ids)} tokens but the context holds {runner.context_length}; "
                "shorten the prompt"
            )
        if max_tokens < 1:
            raise InfluenceError(f"max_tokens must be >= 1, got {max_tokens}")
        self.runner = runner
        self.tokenizer = tokenizer
        self.cache = cache
        self.prompt_ids = prompt_ids
        self.chain = chain
        self.max_tokens = max_tokens
        self.stop = stop
        self.eos_token_ids = frozenset(eos_token_ids)
        self.requested_at = requested_at  # when the caller asked (before tokenizing), for time to first token
        self.result: GenerationResult | None = None
        self._pieces = self._run()

    def __iter__(self) -> Iterator[str]:
        return self._pieces

    def __next__(self) -> str:
        return next(self._pieces)

    def _run(self) -> Iterator[str]:
        import torch

        runner, prompt_ids = self.runner, self.prompt_ids
        started = time.perf_counter()
        reused = self.cache.reusable_prefix(prompt_ids)
        # Until the run ends cleanly, only the reused prefix is known to be in the cache.
        self.cache.token_ids = prompt_ids[:reused]
        logits = runner.forward(prompt_ids[reused:], reused)
        limit = min(self.max_tokens, runner.context_length - len(prompt_ids) + 1)
        history = torch.empty(len(prompt_ids) + limit, dtype=torch.long, device=runner.device)
        history[:len(prompt_ids)] = torch.tensor(prompt_ids, dtype=torch.long)

        decoder = IncrementalDecoder(self.tokenizer)
        stop_filter = StopStringFilter(self.stop)
        generated: list[int] = []
        text_parts: list[str] = []
        first_token_at = started
        finish_reason = "length" if limit == self.max_tokens else "context"
        position = len(prompt_ids)
        while True:
            token = self.chain(logits, history[:position])
            if not generated:
                first_token_at = time.perf_counter()
            generated.append(token)
            if token in self.eos_token_ids:
                finish_reason = "eos"
                break
            piece, stopped = stop_filter.push(decoder.push(token))
            if piece:
                text_parts.append(piece)
                yield piece
            if stopped:
                finish_reason = "stop"
                break
            if len(generated) == limit:
                break
            history[position] = token
            logits = runner.forward([token], position)
            position += 1
        tail = ""
        if finish_reason != "stop":
            piece, stopped = stop_filter.push(decoder.flush())
            tail = piece if stopped else piece + stop_filter.flush()
            finish_reason = "stop" if stopped else finish_reason
        if tail:
            text_parts.append(tail)
            yield tail
        finished = time.perf_counter()
        # Every generated token but the last was fed back, so its KV is cached too.
        self.cache.token_ids = prompt_ids + generated[:-1]
        stats = GenerationStats(
            prompt_tokens=len(prompt_ids), cached_prompt_tokens=reused, generated_tokens=len(generated),
            time_to_first_token_s=first_token_at - (self.requested_at or started), prefill_s=first_token_at - started,
            decode_s=finished - first_token_at,
        )
        self.result = GenerationResult(text="".join(text_parts), token_ids=generated,
                                       finish_reason=finish_reason, stats=stats, seed=self.chain.seed)
