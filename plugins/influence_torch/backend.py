"""The torch backend: picks the device and dtype, builds the architecture there and runs it."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from influence_core.artifacts import fingerprint
from influence_core.errors import BackendError, ContextLengthError
from influence_core.interfaces import Architecture, Backend, BackendOptions, ModelSource, Runner, option

from .protocol import TorchCausalLM, check_causal_lm


FIRST_CAPACITY = 256  # KV positions a runner starts with; the cache doubles from there as runs need
KV_MEMORY_SHARE = 0.5  # at most this share of the machine's memory goes to a context-sized KV cache


class TorchRunner(Runner):
    """Drives a `TorchCausalLM`: owns its KV cache (grown in powers of two as positions are reached,
    never sized to the model's advertised context up front) and runs each call through the eager
    model, and single-token and batched decode through `graph_step` when there is one."""

    def __init__(self, model: TorchCausalLM, device: str, context_length: int, max_batch: int) -> None:
        import torch

        self.model = model
        self.device = self.logits_device = device
        self.context_length = fit_context_to_memory(context_length, max_batch * model.kv_bytes_per_position())
        self.max_batch = max_batch
        self.slot_lengths = [0] * max_batch  # positions written in each slot, for copy_slot
        self.caches = model.new_caches(max_batch, min(FIRST_CAPACITY, self.context_length))
        self.key_positions = torch.arange(self.capacity, device=device)
        # When set, one-token steps (single and batched) run this instead of the eager model: the
        # compiled package, or a CUDA graph. It attends over the cache's whole capacity (masked), so
        # one graph serves every position.
        self.graph_step: Any = None
        # Set where a compiled step would be faster but none was asked for (`on_idle`).
        self.background_build: Any = None
        # A single sequence's decode feeds one token at one position: reused, not rebuilt per token.
        self.one_token = torch.zeros((1, 1), dtype=torch.long, device=device)
        self.one_position = torch.zeros((1, 1), dtype=torch.long, device=device)

    @property
    def capacity(self) -> int:
        return self.caches[0].k.shape[2]

    def _prepare(self, end: int, slots: int) -> None:
        """Check a call reaching position ``end`` in ``slots`` slots, and grow the cache to hold it."""
        if end > self.context_length:
            raise ContextLengthError(f"position {end} is past the context length {self.context_length}")
        if slots > self.max_batch:
            raise BackendError(f"slot {slots - 1} is past this runner's {self.max_batch} slots")
        if end > self.capacity:
            self._grow(min(1 << (end - 1).bit_length(), self.context_length))

    def _grow(self, capacity: int) -> None:
        import torch

        used = max(self.slot_lengths)
        grown = self.model.new_caches(self.max_batch, capacity)
        for old, new in zip(self.caches, grown):
            new.k[:, :, :used] = old.k[:, :, :used]
            new.v[:, :, :used] = old.v[:, :, :used]
        self.caches = grown
        self.key_positions = torch.arange(capacity, device=self.device)

    def forward(self, token_ids: Sequence[int], start_pos: int, all_logits: bool = False, slot: int = 0) -> Any:
        import torch

        if self.background_build is not None:
            self.background_build.pause()  # until the next idle moment (`on_idle`)
        end = start_pos + len(token_ids)
        self._prepare(end, slot + 1)
        self.slot_lengths[slot] = end
        with torch.inference_mode():
            if len(token_ids) == 1 and not all_logits and slot == 0:
                self.one_token.fill_(token_ids[0])
                self.one_position.fill_(start_pos)
                return self._decode(self.one_token, self.one_position, end)[0, -1]
            tokens = torch.tensor([list(token_ids)], dtype=torch.long, device=self.device)
            positions = self.key_positions[start_pos:end][None]
            logits = self.model(tokens, positions, self.key_positions[:end], self.caches, first_slot=slot,
                                last_only=not all_logits)
        return logits[0] if all_logits else logits[0, -1]

    def decode_batch(self, token_ids: Sequence[int], positions: Sequence[int]) -> Any:
        import torch

        if self.background_build is not None:
            self.background_build.pause()
        end = max(positions) + 1
        self._prepare(end, len(token_ids))
        for slot, position in enumerate(positions):
            self.slot_lengths[slot] = position + 1
        with torch.inference_mode():
            tokens = torch.tensor(list(token_ids), dtype=torch.long, device=self.device)[:, None]
            rows = torch.tensor(list(positions), dtype=torch.long, device=self.device)[:, None]
            return self._decode(tokens, rows, end)[:, -1]

    def _decode(self, tokens: Any, positions: Any, end: int) -> Any:
        if self.graph_step is not None and tokens.shape[0] <= self.graph_step.max_batch:
            return self.graph_step(tokens, positions, self.key_positions, self.caches)
        # Eager attention reads exactly the positions written so far.
        return self.model(tokens, positions, self.key_positions[:end], self.caches)

    def copy_slot(self, source: int, target: int, length: int | None = None) -> None:
        import torch

        # Only what the source sequence wrote, or the prefix asked for.
        used = self.slot_lengths[source] if length is None else min(length, self.slot_lengths[source])
        with torch.inference_mode():
            for cache in self.caches:
                cache.k[target, :, :used] = cache.k[source, :, :used]
                cache.v[target, :, :used] = cache.v[source, :, :used]
        self.slot_lengths[target] = used

    def on_idle(self) -> bool:
        """Kept loaded (a resident model): switch to the compiled decode step, loading it from the
        store or building it there in the background first (`compiled.BackgroundBuild`)."""
        if self.background_build is None:
            return False
        step = self.background_build.poll()
        if step is not None:
            self.graph_step = step
        if self.background_build.finished:
            self.background_build = None
        return self.background_build is not None

    def close(self) -> None:
        if self.background_build is not None:
            self.background_build.cancel()
        self.model = self.graph_step = self.background_build = None
        self.caches = []


# The weight formats whose compiled CPU decode step beats eager (docs/performance.md: int4
# 1.3-1.4x; float32 about 2x with max-autotune's GEMVs). bfloat16 is unmeasured, so it stays eager.
COMPILED_FASTER = ("int8", "int4", "float32")
# Below this a model is not worth compiling unasked: a build costs a minute or more of CPU and a GB
# or more of memory whatever the model's size, and a model this small already runs fast eager.
MIN_BACKGROUND_BUILD_PARAMETERS = 20_000_000
# What a compiled float32 step costs beside the eager model, in multiples of the float32 weights: the
# package holds them about 2.2 times over (max-autotune's packed layouts beside the originals), in
# memory and mapped from disk. The default model's resident measured 3.3 GB for 0.54 GB of weights.
COMPILED_FLOAT32_MEMORY_FACTOR = 6
# Built unasked only where that fits in this share of the machine's memory.
COMPILED_MEMORY_SHARE = 0.25


def worth_compiling(source: ModelSource, dtype: str) -> bool:
    """Whether a runner kept loaded should build (or load) its compiled CPU step unasked."""
    import os

    parameters = source.config.parameter_count()
    if dtype not in COMPILED_FASTER or parameters < MIN_BACKGROUND_BUILD_PARAMETERS:
        return False
    if dtype != "float32":
        return True
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return parameters * 4 * COMPILED_FLOAT32_MEMORY_FACTOR <= memory * COMPILED_MEMORY_SHARE


def fit_context_to_memory(context_length: int, bytes_per_position: int) -> int:
    """The context a run can hold: the model's (or the user's) unless its KV cache would take more
    than `KV_MEMORY_SHARE` of this machine's memory, in which case less, with a notice."""
    import os
    import sys

    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    affordable = int(memory * KV_MEMORY_SHARE) // bytes_per_position
    if context_length <= affordable:
        return context_length
    if affordable < FIRST_CAPACITY:
        raise BackendError(f"the KV cache needs {bytes_per_position / 2**20:.1f} MiB per position, so even "
                           f"{FIRST_CAPACITY} positions do not fit in half of this machine's "
                           f"{memory / 2**30:.1f} GiB; use a smaller max_batch (--max-batch)")
    capped = affordable // FIRST_CAPACITY * FIRST_CAPACITY
    print(f"influence: the model's context of {context_length:,} positions would need "
          f"{context_length * bytes_per_position / 2**30:,.1f} GiB of KV cache; this run holds "
          f"{capped:,} (half of this machine's memory; a smaller context_length holds fewer)", file=sys.stderr)
    return capped


@dataclass(frozen=True)
class TorchOptions(BackendOptions):
    """The torch backend's own options: ``-B KEY=VALUE`` on the command line, ``backend_options`` in
    `influence_core.api.load`."""

    tensor_parallel: int = option(
        1, "Split the model across N processes, one per rank (N GPUs with NCCL, or CPU processes with gloo), "
           "started by `influence tensor-parallel N` or torchrun; docs/scaling.md.", minimum=1)
    compiled: bool = option(
        False, "Use the compiled decode step, building it into the store first if it is not there (a minute "
               "or more, once; `influence prepare` does it ahead of time). Without it a run starts eager, and a "
               "resident model switches to the compiled step by itself (docs/defaults.md).")


class TorchBackend(Backend):
    name = "torch"
    devices = ("cpu", "cuda", "mps")
    dtypes = ("float32", "bfloat16", "float16", "int8", "int4")
    description = "PyTorch on CPU, CUDA or Apple MPS; int8/int4 weight-only quantization on CPU"
    options_type = TorchOptions

    def available_devices(self) -> list[str]:
        import torch

        devices = [f"cuda:{i}" for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
        if torch.backends.mps.is_available():
            devices.append("mps")
        return devices + ["cpu"]

    def resolve_device(self, requested: str) -> str:
        if requested.startswith("cuda") and not any(d.startswith("cuda") for d in self.available_devices()):
            import torch

            build = f"built with CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
            raise BackendError(f"--device {requested} was requested, but torch ({torch.__version__}, {build}) "
                               "sees no CUDA device on this machine; use --device cpu")
        if requested == "mps" and "mps" not in self.available_devices():
            raise BackendError("--device mps was requested, but Apple's Metal (MPS) is not available here; "
                               "use --device cpu")
        return super().resolve_device(requested)

    def resolve_dtype(self, requested: str, device: str, source: ModelSource | None = None) -> str:
        """``auto`` on CPU runs a model in its file's own precision (`auto_cpu_dtype`); GPUs run bfloat16."""
        if requested == "auto" and device == "cpu" and source is not None:
            return auto_cpu_dtype(source)
        dtype = super().resolve_dtype(requested, device, source)
        if dtype in ("int8", "int4") and device != "cpu":
            raise BackendError(f"--dtype {dtype} (weight-only quantization) runs on CPU only in the torch backend; "
                               f"on {device} use bfloat16 or float16")
        return dtype

    def load(self, source: ModelSource, architecture: Architecture | None, device: str, dtype: str,
             options: dict[str, Any], backend_options: TorchOptions = TorchOptions()) -> Runner:
        import torch

        if options.get("threads"):
            torch.set_num_threads(int(options["threads"]))
        context_length = min(int(options.get("context_length") or source.config.context_length),
                             source.config.context_length)
        max_batch = int(options.get("max_batch") or 1)
        if backend_options.tensor_parallel > 1:
            if backend_options.compiled:
                raise BackendError("the torch backend's options tensor_parallel and compiled do not go together: "
                                   "a tensor-parallel run's decode step is eager")
            from .tensor_parallel import load_tensor_parallel

            return load_tensor_parallel(source, architecture, device, dtype, context_length, max_batch,
                                        backend_options.tensor_parallel)
        from .compiled import BackgroundBuild, prepare_step, step_key
        from .llama import Llama
        from .linear import float_weights_left_for_inductor, return_freed_memory
        from .prebuilt import build_or_load

        # A compiled step is loaded when asked for (and built first if missing). Otherwise a run
        # starts eager: loading a package costs more than it saves in one short generation
        # (docs/performance.md), so only a runner kept loaded (a resident model) switches to one,
        # loading it or building it in the background while idle (`TorchRunner.on_idle`).
        key = step_key(f"{architecture.name} {fingerprint(source.path)}", dtype, device)
        # The eager model runs prefill; for float formats a compiled step packs the weights itself.
        with float_weights_left_for_inductor() if backend_options.compiled else contextlib.nullcontext():
            model = build_or_load(source, architecture, device, dtype)
        return_freed_memory()
        check_causal_lm(model, architecture)
        runner = TorchRunner(model, device, context_length, max_batch=max_batch)
        runner.weight_format = model.weight_format
        if backend_options.compiled:
            runner.graph_step = prepare_step(model, key, device, model.new_caches, f"{source.path.name} {dtype}",
                                             source.path)
        elif device == "cpu" and max_batch == 1 and isinstance(model, Llama) and worth_compiling(source, dtype):
            runner.background_build = BackgroundBuild(key, source.path, dtype, device)
        if device.startswith("cuda"):  # kernel launches dominate a GPU's decode step: replay them as one
            from .cuda_graphs import CudaGraphStep

            runner.graph_step = CudaGraphStep(runner.graph_step or model)
        return runner


def auto_cpu_dtype(source: ModelSource) -> str:
    """A quantized GGUF in the matching quantized format (4-bit types as int4, wider ones as
    int8, by the type most of its bytes are in); a 16-bit checkpoint in bfloat16 where the CPU
    computes in bfloat16 natively (AVX-512 BF16 or AMX), else float32; float32 as it is."""
    from .linear import INT4_KINDS, INT8_KINDS

    stored = source.details.get("quantization") if source.format == "gguf" else source.config.torch_dtype
    if stored in INT4_KINDS:
        return "int4"
    if stored in INT8_KINDS:
        return "int8"
    if stored in ("F16", "BF16", "float16", "bfloat16") and native_bfloat16():
        return "bfloat16"
    return "float32"


def native_bfloat16() -> bool:
    """Whether this CPU has bfloat16 arithmetic (AVX-512 BF16 or AMX) for oneDNN's kernels to use;
    without it bfloat16 is converted to float32 and back around every product."""
    return bool(_cpu_flags() & {"avx512_bf16", "amx_bf16"})


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()
