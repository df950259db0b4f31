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

# How many tokens a generation may produce when its caller names no limit (CLI, API and server alike).
DEFAULT_MAX_TOKENS = 256


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


class Generation:
    """One generation's bookkeeping, whatever drives it (one request, or a row of a batch):
    sampling, the EOS/stop/length checks, streaming text and timings."""

    def __init__(self, tokenizer: Tokenizer, prompt_ids: list[int], chain: SamplerChain, max_tokens: int,
                 stop: Sequence[str], eos_token_ids: Sequence[int], context_length: int, device: str,
                 requested_at: float | None = None) -> None:
        import torch

        if not prompt_ids:
            raise InfluenceError("the prompt is empty")
        if len(prompt_ids) > context_length:
            raise ContextLengthError(
                f"the prompt has {len(prompt_ids)} tokens but the context holds {context_length}; shorten the prompt"
            )
        if max_tokens < 1:
            raise InfluenceError(f"max_tokens must be >= 1, got {max_tokens}")
        self.prompt_ids = prompt_ids
        self.chain = chain
        self.eos_token_ids = frozenset(eos_token_ids)
        self.limit = min(max_tokens, context_length - len(prompt_ids) + 1)
        self.limit_reason = "length" if self.limit == max_tokens else "context"
        self.history = torch.empty(len(prompt_ids) + self.limit, dtype=torch.long, device=device)
        self.history[:len(prompt_ids)] = torch.tensor(prompt_ids, dtype=torch.long)
        self.decoder = IncrementalDecoder(tokenizer)
        self.stop_filter = StopStringFilter(stop)
        self.generated: list[int] = []
        self.text_parts: list[str] = []
        self.finish_reason: str | None = None
        self.requested_at = requested_at or time.perf_counter()
        self.prefill_started_at = self.first_token_at = self.finished_at = self.requested_at
        self.reused_prompt_tokens = 0

    @property
    def next_position(self) -> int:
        """Where the last picked token goes when it is fed back."""
        return len(self.prompt_ids) + len(self.generated) - 1

    def accept(self, logits) -> str:
        """Pick the next token from ``logits``; return the text it completes (maybe "")."""
        position = len(self.prompt_ids) + len(self.generated)
        token = self.chain(logits, self.history[:position])
        if not self.generated:
            self.first_token_at = time.perf_counter()
        self.generated.append(token)
        piece = ""
        if token in self.eos_token_ids:
            self.finish_reason = "eos"
        else:
            piece, stopped = self.stop_filter.push(self.decoder.push(token))
            if stopped:
                self.finish_reason = "stop"
            elif len(self.generated) == self.limit:
                self.finish_reason = self.limit_reason
            else:
                self.history[position] = token
        if self.finish_reason and self.finish_reason != "stop":
            tail, stopped = self.stop_filter.push(self.decoder.flush())
            piece += tail if stopped else tail + self.stop_filter.flush()
            self.finish_reason = "stop" if stopped else self.finish_reason
        if self.finish_reason:
            self.finished_at = time.perf_counter()
        self.text_parts.append(piece)
        return piece

    def result(self) -> GenerationResult:
        stats = GenerationStats(
            prompt_tokens=len(self.prompt_ids), cached_prompt_tokens=self.reused_prompt_tokens,
            generated_tokens=len(self.generated), time_to_first_token_s=self.first_token_at - self.requested_at,
            prefill_s=self.first_token_at - self.prefill_started_at, decode_s=self.finished_at - self.first_token_at,
        )
        return GenerationResult(text="".join(self.text_parts), token_ids=list(self.generated),
                                finish_reason=self.finish_reason or "cancelled", stats=stats, seed=self.chain.seed)


class TextStream:
    """One sequence on a runner's slot 0. Iterate for text pieces; after the iteration ends,
    `result` holds the whole outcome."""

    def __init__(self, runner: Runner, cache: CacheState, generation: Generation) -> None:
        self.runner = runner
        self.cache = cache
        self.generation = generation
        self.result: GenerationResult | None = None
        self._pieces = self._run()

    def __iter__(self) -> Iterator[str]:
        return self._pieces

    def __next__(self) -> str:
        return next(self._pieces)

    def _run(self) -> Iterator[str]:
        generation, prompt_ids = self.generation, self.generation.prompt_ids
        generation.prefill_started_at = time.perf_counter()
        reused = generation.reused_prompt_tokens = self.cache.reusable_prefix(prompt_ids)
        # Until the run ends cleanly, only the reused prefix is known to be in the cache.
        self.cache.token_ids = prompt_ids[:reused]
        logits = self.runner.forward(prompt_ids[reused:], reused)
        while True:
            piece = generation.accept(logits)
            if piece:
                yield piece
            if generation.finish_reason:
                break
            logits = self.runner.forward([generation.generated[-1]], generation.next_position)
        # Every generated token but the last was fed back, so its KV is cached too.
        self.cache.token_ids = prompt_ids + generation.generated[:-1]
        self.result = generation.result()
