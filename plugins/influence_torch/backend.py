"""The torch backend: picks the device and dtype, builds the architecture there and runs it."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any

from influence_core.errors import BackendError, ContextLengthError
from influence_core.interfaces import Architecture, Backend, ModelSource, Runner


class TorchRunner(Runner):
    def __init__(self, model: Any, device: str, context_length: int, max_batch: int, compiled: bool = False) -> None:
        import torch

        self.model = model
        self.device = device
        self.context_length = context_length
        self.max_batch = max_batch
        with torch.inference_mode():
            model.ensure_capacity(2, max_batch)  # every slot up front: a cache that moves recompiles
        # The one-token decode step is where per-op overhead dominates; compile just that path.
        self.decode_step = compile_decode_step(model, device) if compiled else model

    def _check(self, end: int, slots: int) -> None:
        if end > self.context_length:
            raise ContextLengthError(f"position {end} is past the context length {self.context_length}")
        if slots > self.max_batch:
            raise BackendError(f"slot {slots - 1} is past this runner's {self.max_batch} slots")

    def forward(self, token_ids: Sequence[int], start_pos: int, all_logits: bool = False, slot: int = 0) -> Any:
        import torch

        self._check(start_pos + len(token_ids), slot + 1)
        with torch.inference_mode():
            self.model.ensure_capacity(start_pos + len(token_ids), self.max_batch)
            tokens = torch.tensor([list(token_ids)], dtype=torch.long, device=self.device)
            step = self.decode_step if len(token_ids) == 1 and not all_logits else self.model
            logits = step(tokens, start_pos, last_only=not all_logits, first_slot=slot)
        return logits[0] if all_logits else logits[0, -1]

    def decode_batch(self, token_ids: Sequence[int], positions: Sequence[int]) -> Any:
        import torch

        self._check(max(positions) + 1, len(token_ids))
        with torch.inference_mode():
            self.model.ensure_capacity(max(positions) + 1, self.max_batch)
            tokens = torch.tensor(list(token_ids), dtype=torch.long, device=self.device)[:, None]
            return self.model(tokens, list(positions))[:, -1]

    def copy_slot(self, source: int, target: int, length: int | None = None) -> None:
        import torch

        with torch.inference_mode():
            self.model.copy_slot(source, target, length)

    def close(self) -> None:
        self.model = None


def compile_decode_step(model: Any, device: str) -> Any:
    """torch.compile of the model's forward for one-token steps, compiled now rather than in the
    middle of the first reply. On CPU, matmuls get inductor's own kernels (max-autotune), about
    twice oneDNN's speed for these matrix-vector products."""
    import sys
    import warnings

    import torch
    import torch._inductor.config as inductor

    inductor.freezing = True  # weights become constants inductor can pack and fold
    inductor.autotune_num_choices_displayed = 0  # keep autotuning's tables off the user's terminal
    inductor.max_autotune_report_choices_stats = False
    if device == "cpu":
        inductor.max_autotune = True
        inductor.max_autotune_gemm_backends = "CPP,ATEN"
    step = torch.compile(model, dynamic=True)
    print("influence: compiling the decode step (tens of seconds; once per process)", file=sys.stderr)
    with torch.inference_mode(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="TypedStorage is deprecated")
        step(torch.zeros((1, 1), dtype=torch.long, device=device), 1, last_only=True, first_slot=0)
    return step


class TorchBackend(Backend):
    name = "torch"
    devices = ("cpu", "cuda", "mps")
    dtypes = ("float32", "bfloat16", "float16", "int8", "int4")
    description = "PyTorch on CPU, CUDA or Apple MPS; int8/int4 weight-only quantization on CPU"

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

    def resolve_dtype(self, requested: str, device: str) -> str:
        dtype = super().resolve_dtype(requested, device)
        if dtype in ("int8", "int4") and device != "cpu":
            raise BackendError(f"--dtype {dtype} (weight-only quantization) runs on CPU only in the torch backend; "
                               f"on {device} use bfloat16 or float16")
        return dtype

    def load(self, source: ModelSource, architecture: Architecture | None, device: str, dtype: str,
             options: dict[str, Any]) -> Runner:
        import torch

        unknown = set(options) - {"threads", "context_length", "max_batch", "tensor_parallel", "compile"}
        if unknown:
            raise BackendError(f"backend 'torch' has no option {sorted(unknown)[0]!r} "
                               "(options: threads, context_length, max_batch, tensor_parallel, compile)")
        if options.get("threads"):
            torch.set_num_threads(int(options["threads"]))
        context_length = min(int(options.get("context_length") or source.config.context_length),
                             source.config.context_length)
        max_batch = int(options.get("max_batch") or 1)
        tensor_parallel = int(options.get("tensor_parallel") or 1)
        if tensor_parallel > 1:
            from .tensor_parallel import load_tensor_parallel

            return load_tensor_parallel(source, architecture, device, dtype, context_length, max_batch, tensor_parallel)
        from .linear import float_weights_left_for_inductor, return_freed_memory

        compiled = bool(options.get("compile"))
        with float_weights_left_for_inductor() if compiled else contextlib.nullcontext():
            model = architecture.build(source.config, source.weights(), device, dtype)
        return_freed_memory()
        return TorchRunner(model, device, context_length, max_batch=max_batch, compiled=compiled)
