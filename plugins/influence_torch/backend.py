"""The torch backend: picks the device and dtype, builds the architecture there and runs it."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from influence_core.errors import BackendError, ContextLengthError
from influence_core.interfaces import Architecture, Backend, ModelSource, Runner


class TorchRunner(Runner):
    def __init__(self, model: Any, device: str, context_length: int, max_batch: int) -> None:
        self.model = model
        self.device = device
        self.context_length = context_length
        self.max_batch = max_batch

    def _check(self, end: int, slots: int) -> None:
        if end > self.context_length:
            raise ContextLengthError(f"position {end} is past the context length {self.context_length}")
        if slots > self.max_batch:
            raise BackendError(f"slot {slots - 1} is past this runner's {self.max_batch} slots")

    def forward(self, token_ids: Sequence[int], start_pos: int, all_logits: bool = False, slot: int = 0) -> Any:
        import torch

        self._check(start_pos + len(token_ids), slot + 1)
        with torch.inference_mode():
            self.model.ensure_capacity(start_pos + len(token_ids), slot + 1)
            tokens = torch.tensor([list(token_ids)], dtype=torch.long, device=self.device)
            logits = self.model(tokens, start_pos, last_only=not all_logits, first_slot=slot)
        return logits[0] if all_logits else logits[0, -1]

    def decode_batch(self, token_ids: Sequence[int], positions: Sequence[int]) -> Any:
        import torch

        self._check(max(positions) + 1, len(token_ids))
        with torch.inference_mode():
            self.model.ensure_capacity(max(positions) + 1, len(token_ids))
            tokens = torch.tensor(list(token_ids), dtype=torch.long, device=self.device)[:, None]
            return self.model(tokens, list(positions))[:, -1]

    def copy_slot(self, source: int, target: int) -> None:
        import torch

        with torch.inference_mode():
            self.model.copy_slot(source, target)

    def close(self) -> None:
        self.model = None


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

        unknown = set(options) - {"threads", "context_length", "max_batch", "tensor_parallel"}
        if unknown:
            raise BackendError(f"backend 'torch' has no option {sorted(unknown)[0]!r} "
                               "(options: threads, context_length, max_batch, tensor_parallel)")
        if options.get("threads"):
            torch.set_num_threads(int(options["threads"]))
        context_length = min(int(options.get("context_length") or source.config.context_length),
                             source.config.context_length)
        max_batch = int(options.get("max_batch") or 1)
        tensor_parallel = int(options.get("tensor_parallel") or 1)
        if tensor_parallel > 1:
            from .tensor_parallel import load_tensor_parallel

            return load_tensor_parallel(source, architecture, device, dtype, context_length, max_batch, tensor_parallel)
        model = architecture.build(source.config, source.weights(), device, dtype)
        return TorchRunner(model, device, context_length, max_batch=max_batch)
