"""Continuous batching: many generations share one runner's decode steps.

Each running generation owns one cache slot; active generations always fill slots 0..n-1, so a
decode step is one batched pass over the first n slots. Between steps, queued generations are
prefilled into free slots and join, and finished or cancelled ones leave (the last active
generation moves into the freed slot, keeping the slots contiguous).

The engine is driven either by its own thread (`start`, for the server) or synchronously
(`run_until_idle`, for batched `generate`).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from .errors import InfluenceError
from .generation import Generation, GenerationResult
from .interfaces import Runner


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

    @property
    def result(self) -> GenerationResult:
        return self.generation.result()


class BatchEngine:
    def __init__(self, runner: Runner, max_queue: int = 64) -> None:
        self.runner = runner
        self.max_queue = max_queue
        self.pending: deque[Job] = deque()
        self.active: list[Job] = []  # active[i] occupies cache slot i
        self._wake = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.cancelled = 0  # jobs dropped before they finished, in all (clients that went away)

    @property
    def busy_slots(self) -> int:
        return len(self.active)

    def submit(self, generation: Generation, deliver: Callable[[str | None], None] = lambda piece: None) -> Job:
        job = Job(generation, deliver)
        with self._wake:
            if len(self.pending) >= self.max_queue:
                raise QueueFullError(f"{len(self.pending)} requests are already waiting")
            self.pending.append(job)
            self._wake.notify()
        return job

    def cancel(self, job: Job) -> None:
        """Stop a job at the next step boundary and free its slot (a client went away)."""
        job.cancelled = True
        with self._wake:
            self._wake.notify()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._serve, name="influence-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with self._wake:
            self._stopping = True
            self._wake.notify()
        if self._thread:
            self._thread.join()

    def run_until_idle(self) -> None:
        while self.pending or self.active:
            self.step()

    def _serve(self) -> None:
        while True:
            with self._wake:
                while not (self.pending or self.active or self._stopping):
                    self._wake.wait()
                if self._stopping:
                    return
            self.step()

    def step(self) -> None:
        """Drop cancelled jobs, admit queued ones into free slots, then decode one token for all."""
        try:
            self._release([i for i, job in enumerate(self.active) if job.cancelled])
            self._admit()
            if self.active:
                self._decode()
        except Exception as error:  # a failed step fails its jobs, never the engine
            message = str(error) if isinstance(error, InfluenceError) else f"{type(error).__name__}: {error}"
            for job in self.active:
                job.error = message
            self._release(list(range(len(self.active))))

    def _admit(self) -> None:
        while len(self.active) < self.runner.max_batch:
            with self._wake:
                if not self.pending:
                    return
                job = self.pending.popleft()
            if job.cancelled:
                self._finish(job)
                continue
            generation = job.generation
            generation.prefill_started_at = time.perf_counter()
            self.active.append(job)
            self._accept(job, self.runner.forward(generation.prompt_ids, 0, slot=len(self.active) - 1))
            if generation.finish_reason:
                self._release([len(self.active) - 1])

    def _decode(self) -> None:
        generations = [job.generation for job in self.active]
        logits = self.runner.decode_batch([g.generated[-1] for g in generations], [g.next_position for g in generations])
        for job, row in zip(self.active, logits):
            self._accept(job, row)
        self._release([i for i, job in enumerate(self.active) if job.generation.finish_reason])

    def _accept(self, job: Job, logits) -> None:
        piece = job.generation.accept(logits)
        if piece:
            job.deliver(piece)

    def _release(self, indices: list[int]) -> None:
        # From the highest index down, so the last active job is never one already released.
        for index in sorted(indices, reverse=True):
            job = self.active[index]
            last = len(self.active) - 1
            if index != last:
                self.runner.copy_slot(last, index)
                self.active[index] = self.active[last]
            self.active.pop()
            self._finish(job)

    def _finish(self, job: Job) -> None:
        if job.generation.finish_reason is None:  # cancelled or failed before it finished
            job.generation.finished_at = time.perf_counter()
            self.cancelled += job.cancelled
        job.done.set()
        job.deliver(None)
