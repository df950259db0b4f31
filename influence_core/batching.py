"""Continuous batching: many generations share one runner's decode steps.

Cache slots are laid out in three bands. Decoding generations fill slots 0..n-1, so a decode step
is one batched pass over the first n slots. The generation being prefilled sits in slot n and is
fed its prompt a chunk per step while others decode, as in vLLM's and llama.cpp's chunked prefill:
the chunk is sized so that it takes about as long as a decode step (at most `prefill_chunk`
tokens), so a running stream's gap between tokens at most about doubles while a long prompt comes
in, instead of stopping for the whole prompt. The slots above hold sequences that finished recently, kept warm:
a new prompt starts from the longest prefix that any slot holds (a chat client resends the whole
conversation each turn) and computes only the rest; that prefix is its ``reused_prompt_tokens``.

When a generation leaves, the last decoding one moves into its slot (keeping the band contiguous)
and the one being prefilled moves down behind it; the leaving sequence is first copied into a
free slot above, evicting the least recently used warm one when none is empty.

The engine is driven either by its own thread (`start`, for the server) or synchronously
(`run_until_idle`, for batched `generate`).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from .errors import InfluenceError
from .generation import Generation, GenerationResult
from .interfaces import Runner

DEFAULT_PREFILL_CHUNK = 512
# However slow a chunk, a prompt advances at least this much per step.
MIN_PREFILL_CHUNK = 4


class QueueFullError(InfluenceError):
    """Too many generations are waiting; try again later."""


@dataclass
class Job:
    generation: Generation
    # Called from the engine with each text piece, then once with None when the job is over.
    deliver: Callable[[str | None], None]
    cancelled: bool = False
    error: str | None = None
    done: threading.Event = field(default_factory=threading.Event)
    prefilled: int = 0  # prompt positions already in the job's cache slot
    last_token_at: float | None = None

    @property
    def result(self) -> GenerationResult:
        return self.generation.result()

    def cached_tokens(self) -> list[int]:
        """The token ids whose keys and values its slot holds (every token fed so far)."""
        generation = self.generation
        if len(generation.generated) == 0:
            return generation.prompt_ids[:self.prefilled]
        return generation.prompt_ids + generation.generated[:-1]


@dataclass
class WarmSequence:
    token_ids: list[int]
    used_at: float


def shared_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    shared = 0
    for x, y in zip(a, b):
        if x != y:
            break
        shared += 1
    return shared


# Called from the engine thread after each token a job picks, with the time since its previous
# token (None for the first).
TokenObserver = Callable[[Job, float | None], None]


class BatchEngine:
    def __init__(self, runner: Runner, max_queue: int = 64, prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
                 prefix_cache: bool = True, chunked_prefill: bool = True,
                 on_token: TokenObserver | None = None) -> None:
        """``chunked_prefill``: False prefills each prompt whole even while others decode (offline
        batches, where only throughput counts)."""
        if prefill_chunk < MIN_PREFILL_CHUNK:
            raise InfluenceError(f"the prefill chunk must be >= {MIN_PREFILL_CHUNK} tokens, got {prefill_chunk}")
        self.runner = runner
        self.max_queue = max_queue
        self.prefill_chunk = prefill_chunk
        self.prefix_cache = prefix_cache
        self.chunked_prefill = chunked_prefill
        self.on_token = on_token
        self.pending: deque[Job] = deque()
        self.active: list[Job] = []  # active[i] decodes in cache slot i
        self.prefilling: Job | None = None  # in slot len(active)
        self.warm: dict[int, WarmSequence] = {}  # slot -> finished sequence still in it
        self._wake = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.cancelled = 0  # jobs dropped before they finished, in all (clients that went away)
        self._decode_seconds = 0.0  # a decode step's duration, smoothed over the last few
        self._chunk = MIN_PREFILL_CHUNK  # prompt tokens per step while others decode; grows as it can

    @property
    def busy_slots(self) -> int:
        return len(self.active) + (self.prefilling is not None)

    @property
    def queued(self) -> int:
        return len(self.pending)

    def submit(self, generation: Generation, deliver: Callable[[str | None], None] = lambda piece: None) -> Job:
        job = Job(generation, deliver)
        with self._wake:
            if self._stopping:
                raise InfluenceError("the server is shutting down")
            if len(self.pending) >= self.max_queue:
                raise QueueFullError(f"{len(self.pending)} requests are already waiting")
            self.pending.append(job)
            self._wake.notify()
        return job

    def cancel(self, job: Job) -> None:
        """Stop a job at the next step boundary and free its slot (a client went away); a job still
        queued leaves the queue now, so it holds no place another request could take."""
        with self._wake:
            if job.done.is_set():
                return
            job.cancelled = True
            queued = job in self.pending
            if queued:
                self.pending.remove(job)
            self._wake.notify()
        if queued:
            self._finish(job)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._serve, name="influence-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the engine thread; whatever is queued or running ends as cancelled."""
        with self._wake:
            self._stopping = True
            self._wake.notify()
        if self._thread:
            self._thread.join()
        for job in [*self.active, *([self.prefilling] if self.prefilling else []), *self.pending]:
            job.cancelled = True
            self._finish(job)
        self.active, self.prefilling = [], None
        self.pending.clear()

    def run_until_idle(self) -> None:
        while self.pending or self.active or self.prefilling:
            self.step()

    def _serve(self) -> None:
        while True:
            with self._wake:
                while not (self.pending or self.active or self.prefilling or self._stopping):
                    self._wake.wait()
                if self._stopping:
                    return
            self.step()

    def step(self) -> None:
        """Drop cancelled jobs, decode one token for every decoding job, then feed the next prompt
        chunk (admitting queued jobs into free slots)."""
        try:
            self._release([i for i, job in enumerate(self.active) if job.cancelled])
            if self.prefilling and self.prefilling.cancelled:
                self._drop_prefilling()
            if self.active:
                self._decode()
            self._prefill()
        except Exception as error:  # a failed step fails its jobs, never the engine
            message = str(error) if isinstance(error, InfluenceError) else f"{type(error).__name__}: {error}"
            failed = [*self.active, *([self.prefilling] if self.prefilling else [])]
            for job in failed:
                job.error = message
            self.active, self.prefilling = [], None
            self.warm.clear()  # what the failed step left in the cache is unknown
            for job in failed:
                self._finish(job)

    def _decode(self) -> None:
        generations = [job.generation for job in self.active]
        started = time.perf_counter()
        logits = self.runner.decode_batch([g.generated[-1] for g in generations], [g.next_position for g in generations])
        elapsed = time.perf_counter() - started
        self._decode_seconds = elapsed if not self._decode_seconds else 0.8 * self._decode_seconds + 0.2 * elapsed
        for job, row in zip(self.active, logits):
            self._accept(job, row)
        self._release([i for i, job in enumerate(self.active) if job.generation.finish_reason])

    def _prefill(self) -> None:
        """Feed prompts into slot len(active): all of one at once when nothing decodes, else one
        chunk this step."""
        while len(self.active) < self.runner.max_batch:
            job = self.prefilling or self._admit()
            if job is None:
                return
            prompt = job.generation.prompt_ids
            decoding = bool(self.active) and self.chunked_prefill
            count = min(len(prompt) - job.prefilled, self._chunk) if decoding else len(prompt) - job.prefilled
            started = time.perf_counter()
            logits = self.runner.forward(prompt[job.prefilled:job.prefilled + count], job.prefilled,
                                         slot=len(self.active))
            job.prefilled += count
            if decoding:
                self._resize_chunk(count, time.perf_counter() - started)
            if job.prefilled < len(prompt):
                return
            self.prefilling = None
            self.active.append(job)
            self._accept(job, logits)
            if job.generation.finish_reason:
                self._release([len(self.active) - 1])

    def _resize_chunk(self, count: int, seconds: float) -> None:
        """Aim the next chunk at a decode step's duration, scaling this one's size by how far its
        time was off, by at most half or half as much again a step: one noisy step moves it little,
        and a chunk's cost, part fixed and growing with the prompt's position, is never overshot
        by much. Measured rather than modelled, it converges on the size whose cost matches."""
        if count < self._chunk and seconds < self._decode_seconds:
            return  # a prompt's short last piece says nothing about a full chunk
        scale = min(1.5, max(0.5, self._decode_seconds / seconds)) if seconds > 0 else 1.5
        self._chunk = max(MIN_PREFILL_CHUNK, min(self.prefill_chunk, int(self._chunk * scale + 0.5)))

    def _admit(self) -> Job | None:
        """Take the next queued job into slot len(active), starting from the longest cached prefix."""
        with self._wake:
            if not self.pending:
                return None
            job = self.pending.popleft()
        slot = len(self.active)
        generation = job.generation
        generation.prefill_started_at = time.perf_counter()
        source, reused = self._longest_prefix(generation.prompt_ids) if self.prefix_cache else (slot, 0)
        if source != slot or not reused:  # the slot's own warm sequence is of no use to this job
            self._keep_warm(slot, first_free=slot + 1, avoid=source)
            if reused:
                self.runner.copy_slot(source, slot, reused)
        self.warm.pop(slot, None)
        job.prefilled = generation.reused_prompt_tokens = reused
        self.prefilling = job
        return job

    def _longest_prefix(self, prompt_ids: list[int]) -> tuple[int, int]:
        """(slot, length) of the longest prefix of the prompt any slot holds; the last prompt token
        is always recomputed, since its logits pick the first new token."""
        held = {i: job.cached_tokens() for i, job in enumerate(self.active)}
        held.update((slot, warm.token_ids) for slot, warm in self.warm.items())
        best_slot, best = len(self.active), 0
        for slot, token_ids in held.items():
            length = min(shared_prefix(token_ids, prompt_ids), len(prompt_ids) - 1)
            if length > best:
                best_slot, best = slot, length
        return best_slot, best

    def _keep_warm(self, slot: int, first_free: int, avoid: int | None = None) -> None:
        """Copy the warm sequence in ``slot`` (if any) to a free slot at or above ``first_free``:
        an empty one, else the least recently used warm one if it is older; else let it go."""
        sequence = self.warm.pop(slot, None)
        if sequence is None:
            return
        candidates = [s for s in range(first_free, self.runner.max_batch) if s != avoid]
        empty = [s for s in candidates if s not in self.warm]
        target = empty[0] if empty else min(candidates, key=lambda s: self.warm[s].used_at, default=None)
        if target is None or (target in self.warm and self.warm[target].used_at > sequence.used_at):
            return
        self.runner.copy_slot(slot, target, len(sequence.token_ids))
        self.warm[target] = sequence

    def _accept(self, job: Job, logits) -> None:
        piece = job.generation.accept(logits)
        now = time.perf_counter()
        if self.on_token:
            self.on_token(job, None if job.last_token_at is None else now - job.last_token_at)
        job.last_token_at = now
        if piece:
            job.deliver(piece)

    def _release(self, indices: list[int]) -> None:
        """Take decoding jobs out, keeping the bands contiguous and the sequences warm."""
        # From the highest index down, so the last active job is never one already released.
        for index in sorted(indices, reverse=True):
            job = self.active[index]
            last = len(self.active) - 1
            top = last + 1 + (self.prefilling is not None)  # slots [0, top) are in use
            if self.prefix_cache:
                self.warm[index] = WarmSequence(job.cached_tokens(), time.perf_counter())
                if index != last or self.prefilling:
                    self._keep_warm(index, first_free=top)
            if index != last:
                moved = self.active[last]
                self.runner.copy_slot(last, index, len(moved.cached_tokens()))
                self.active[index] = moved
            self.active.pop()
            if self.prefilling:  # it sat right behind the last decoding job: follow it down
                self.runner.copy_slot(top - 1, top - 2, self.prefilling.prefilled)
                self.warm.pop(top - 2, None)
            self._finish(job)

    def _drop_prefilling(self) -> None:
        job, self.prefilling = self.prefilling, None
        if self.prefix_cache and job.prefilled:
            self.warm[len(self.active)] = WarmSequence(job.cached_tokens(), time.perf_counter())
        self._finish(job)

    def _finish(self, job: Job) -> None:
        if job.generation.finish_reason is None:  # cancelled or failed before it finished
            job.generation.finished_at = time.perf_counter()
            with self._wake:
                self.cancelled += job.cancelled
        job.done.set()
        job.deliver(None)
