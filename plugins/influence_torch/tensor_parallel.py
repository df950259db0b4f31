"""Tensor parallelism for Llama-family models over torch.distributed, in the style of gpt-fast's tp.py.

Each of N ranks holds 1/N of every layer (Megatron's split):

- q/k/v and gate/up are split by output rows: each rank owns 1/N of the query heads, of the
  key-value heads (so of the KV cache) and of the MLP's intermediate units, and computes them with
  no communication;
- o and down are split by input columns to match: each rank's product is a partial sum, so one
  all-reduce after attention and one after the MLP make the hidden state whole on every rank.

The embedding and the output head are replicated, not split. The embedding is a lookup that reads
a few rows, so splitting it saves memory but no time, and would cost a collective per step. A
vocabulary-split head would need an all-gather per step to give every rank the whole logits the
sampler reads; replicated, it needs none, at the price of vocab x hidden weights per rank (memory,
and read time in decode: see docs/scaling.md).

A rank reads only its slices (`ShardedWeights`), so a model larger than one device fits across
several, and build_llama converts each slice to the fast CPU format (packed, int8, int4) as usual:
every weight format works. The all-reduces are then added to the built model in place, as
forward hooks. After them the logits are identical on every rank, so every rank runs the same
generation loop; `TensorParallelRunner` checks each step against rank 0's.

Processes: torchrun, or `influence tensor-parallel N COMMAND` (launch.py), each loading the model with
the backend option ``tensor_parallel=N``. NCCL on CUDA (rank r on cuda:LOCAL_RANK), gloo on CPU.
"""

from __future__ import annotations

import atexit
import dataclasses
import os
import secrets
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from influence_core.config import ModelConfig
from influence_core.errors import BackendError
from influence_core.interfaces import Architecture, ModelSource, Weights

from .backend import TorchRunner
from .launch import check_splittable
from .llama import Llama

# How long a rank waits in a collective (and for its peers to join) before it gives up. Generous,
# because the first collective also waits for the slowest rank to finish loading its weights.
TIMEOUT_S = 120

COLUMN_PARALLEL = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj")
ROW_PARALLEL = ("self_attn.o_proj", "mlp.down_proj")


def load_tensor_parallel(source: ModelSource, architecture: Architecture, device: str, dtype: str,
                         context_length: int, max_batch: int, world_size: int) -> TensorParallelRunner:
    """Join the process group as this process's rank and build its slice of the model."""
    check_splittable(source.config, world_size)
    rank, device = _join_process_group(device, world_size)
    model = architecture.build(rank_config(source.config, world_size), ShardedWeights(source.weights(), rank,
                                                                                        world_size), device, dtype)
    if not isinstance(model, Llama):
        raise BackendError(f"tensor_parallel splits Llama-family models (built by build_llama); the "
                           f"{architecture.name!r} architecture builds another kind")
    add_all_reduces(model)
    return TensorParallelRunner(model, device, context_length, max_batch, rank)


def _join_process_group(device: str, world_size: int) -> tuple[int, str]:
    """(this rank, its device). One GPU per rank with NCCL; gloo on CPU."""
    if "WORLD_SIZE" not in os.environ:
        raise BackendError(f"tensor parallelism needs one process per rank: run the command as "
                           f"`influence tensor-parallel {world_size} COMMAND ...`, or start {world_size} processes "
                           f"under `torchrun --nproc-per-node {world_size}`")
    if int(os.environ["WORLD_SIZE"]) != world_size:
        raise BackendError(f"tensor_parallel {world_size}, but {os.environ['WORLD_SIZE']} processes were started")
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", os.environ["RANK"]))
    if device.startswith("cuda"):
        if torch.cuda.device_count() <= local_rank:
            raise BackendError(f"tensor-parallel rank {rank} needs cuda:{local_rank}, but this machine has "
                               f"{torch.cuda.device_count()} CUDA device(s); use as many ranks as GPUs, "
                               "or --device cpu")
        device = f"cuda:{local_rank}"
        torch.cuda.set_device(device)
    elif device != "cpu":
        raise BackendError(f"tensor parallelism runs on CUDA (NCCL) or the CPU (gloo), not {device}")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo", timeout=timedelta(seconds=TIMEOUT_S),
                                device_id=torch.device(device) if device.startswith("cuda") else None)
        atexit.register(_leave_process_group)
    return rank, device


def _leave_process_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def rank_config(config: ModelConfig, world_size: int) -> ModelConfig:
    """The config of one rank's slice: 1/world_size of the heads and of the MLP units."""
    return dataclasses.replace(config, num_attention_heads=config.num_attention_heads // world_size,
                               num_key_value_heads=config.num_key_value_heads // world_size,
                               intermediate_size=config.intermediate_size // world_size)


class ShardedWeights:
    """One rank's view of a checkpoint: its slice of each layer's projections, the rest whole."""

    def __init__(self, weights: Weights, rank: int, world_size: int) -> None:
        self.weights = weights
        self.rank = rank
        self.world_size = world_size

    def keys(self) -> Iterator[str]:
        return self.weights.keys()

    def __contains__(self, name: object) -> bool:
        return name in self.weights

    def __getitem__(self, name: str) -> torch.Tensor:
        tensor = self.weights[name]
        module, _, kind = name.rpartition(".")
        projection = module.split(".", 3)[-1] if module.startswith("model.layers.") else None
        if projection in COLUMN_PARALLEL:
            return self._slice(tensor, 0)
        if projection in ROW_PARALLEL and kind == "bias":
            # The all-reduce sums the ranks' partial products; the bias must be added once, by rank 0.
            return tensor if self.rank == 0 else torch.zeros_like(tensor)
        if projection in ROW_PARALLEL:
            return self._slice(tensor, 1)
        return tensor

    def _slice(self, tensor: torch.Tensor, dim: int) -> torch.Tensor:
        # Rows are whole heads (or MLP units), in order, so equal chunks are equal numbers of heads.
        # A copy, so the whole tensor it came from can be freed.
        return tensor.chunk(self.world_size, dim)[self.rank].clone(memory_format=torch.contiguous_format)


def add_all_reduces(model: Llama) -> None:
    """Sum the ranks' partial outputs of attention and of the MLP in every layer (in place)."""
    for block in model.layers:
        block.attention.register_forward_hook(_all_reduce_output)
        block.feed_forward.register_forward_hook(_all_reduce_output)


def _all_reduce_output(module: torch.nn.Module, inputs: Any, output: torch.Tensor) -> torch.Tensor:
    dist.all_reduce(output)
    return output


class TensorParallelRunner(TorchRunner):
    """One rank's runner. Every rank must make the same calls with the same tokens (they all run
    the same generation loop on identical logits); each step checks that against rank 0 first."""

    def __init__(self, model: Llama, device: str, context_length: int, max_batch: int, rank: int) -> None:
        super().__init__(model, device, context_length, max_batch)
        self.rank = rank

    def forward(self, token_ids: Sequence[int], start_pos: int, all_logits: bool = False, slot: int = 0) -> Any:
        with self._in_step_with_rank_0(tuple(token_ids), start_pos, all_logits, slot):
            return super().forward(token_ids, start_pos, all_logits, slot)

    def decode_batch(self, token_ids: Sequence[int], positions: Sequence[int]) -> Any:
        with self._in_step_with_rank_0(tuple(token_ids), tuple(positions)):
            return super().decode_batch(token_ids, positions)

    def random_seed(self) -> int:
        """A random seed, the same on every rank: rank 0 draws it. Sampling with it keeps the ranks
        picking the same tokens."""
        seed = torch.tensor([secrets.randbits(63)], device=self.device)
        with self._collectives():
            dist.broadcast(seed, src=0)
        return int(seed.item())

    @contextmanager
    def _in_step_with_rank_0(self, *step: Any) -> Iterator[None]:
        with self._collectives():
            # hash() of a tuple of ints is the same in every process (only str hashes are salted).
            mine = torch.tensor([hash(step)], device=self.device)
            rank_0 = mine.clone()
            dist.broadcast(rank_0, src=0)
            if not torch.equal(mine, rank_0):
                raise BackendError(f"tensor-parallel rank {self.rank} was asked for another step than rank 0: the "
                                   "ranks picked different tokens (every rank must sample with the same seed)")
            yield

    @contextmanager
    def _collectives(self) -> Iterator[None]:
        try:
            yield
        except RuntimeError as error:  # what gloo and NCCL raise (DistError is a RuntimeError too)
            detail = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise BackendError(f"tensor-parallel rank {self.rank}: a collective failed, most likely because another "
                               f"rank exited or stalled for {TIMEOUT_S}s ({detail})") from None

    def close(self) -> None:
        super().close()
        _leave_process_group()
