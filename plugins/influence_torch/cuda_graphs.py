"""Decode steps replayed as CUDA graphs.

On a GPU a one-token step of a small model is a few hundred tiny kernels, and launching them
costs more than running them (docs/performance.md: about 20 tok/s whatever the model size). A
CUDA graph records the launches once and replays them with one call. A graph holds the addresses
of its inputs, so the step reads its tokens and positions from buffers of its own, and the graphs
are recorded again whenever the runner's cache moves (it grows by doubling, so rarely).
"""

from __future__ import annotations

from typing import Any

import torch

from .llama import KVCache


class CudaGraphStep:
    """Wraps a step called as ``step(tokens, positions, keys, caches)`` whose attention reads the
    whole cache (``keys`` is every position it holds): the eager model or a compiled package.
    One graph per batch size, all sharing one memory pool."""

    max_batch = 64

    def __init__(self, step: Any) -> None:
        self.step = step
        self.pool = torch.cuda.graph_pool_handle()
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        self.recorded_for: tuple[int, int] | None = None  # (keys, first cache) addresses the graphs use

    def __call__(self, tokens: torch.Tensor, positions: torch.Tensor, keys: torch.Tensor,
                 caches: list[KVCache]) -> torch.Tensor:
        addresses = (keys.data_ptr(), caches[0].k.data_ptr())
        if addresses != self.recorded_for:
            self.graphs.clear()
            self.recorded_for = addresses
        batch = tokens.shape[0]
        if batch not in self.graphs:
            self.graphs[batch] = self._record(tokens, positions, keys, caches)
        graph, static_tokens, static_positions, logits = self.graphs[batch]
        static_tokens.copy_(tokens)
        static_positions.copy_(positions)
        graph.replay()
        return logits.clone()  # the next replay overwrites the graph's own output

    def _record(self, tokens: torch.Tensor, positions: torch.Tensor, keys: torch.Tensor,
                caches: list[KVCache]) -> tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor, torch.Tensor]:
        static_tokens, static_positions = tokens.clone(), positions.clone()
        # Warm up on a side stream first, as capturing requires. The warm-up writes this step's keys
        # and values into the cache, as the replay that follows will again: the same values.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self.step(static_tokens, static_positions, keys, caches)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            logits = self.step(static_tokens, static_positions, keys, caches)
        return graph, static_tokens, static_positions, logits
