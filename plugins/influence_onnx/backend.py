"""The ONNX Runtime backend: runs optimum's exported graph with a plain `InferenceSession`.

The graph takes ``input_ids``, ``attention_mask``, ``position_ids`` and ``past_key_values.N.key``/
``.value`` ([1, kv_heads, past, head_dim]) and returns ``logits`` and ``present.N.key``/``.value``
(the past with the new positions appended). The runner binds those to buffers it owns (IO binding),
so the cache never leaves the device and no step allocates or copies it outside the graph: each
layer has two buffers, and every step reads the past from one and has the graph write the present
into the other.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from influence_core.errors import BackendError, ContextLengthError
from influence_core.interfaces import Architecture, Backend, BackendOptions, ModelSource, Runner, option

from .export import damaged, export_for, model_file

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}
OPTIMIZATION_LEVELS = ("disable", "basic", "extended", "all")
INITIAL_CACHE_POSITIONS = 256


@dataclass(frozen=True)
class OnnxOptions(BackendOptions):
    """The ONNX backend's own options (``-B KEY=VALUE``)."""

    graph_optimization: str = option(
        "all", "ONNX Runtime's graph optimization level; the optimized graph is kept beside the export.",
        choices=OPTIMIZATION_LEVELS)


class OnnxBackend(Backend):
    name = "onnx"
    devices = ("cpu", "cuda")
    dtypes = ("float32", "float16", "int8")
    description = "ONNX Runtime over optimum's export (exported once per model, kept in the store)"
    uses_architectures = False
    options_type = OnnxOptions

    def available_devices(self) -> list[str]:
        import onnxruntime

        return (["cuda:0"] if PROVIDERS["cuda"] in onnxruntime.get_available_providers() else []) + ["cpu"]

    def resolve_device(self, requested: str) -> str:
        import onnxruntime

        kind = requested.split(":", 1)[0]
        available = onnxruntime.get_available_providers()
        if kind in PROVIDERS and PROVIDERS[kind] not in available:
            raise BackendError(
                f"--device {requested} needs ONNX Runtime's {PROVIDERS[kind]}, but onnxruntime "
                f"{onnxruntime.__version__} has only {', '.join(available)}"
                + ("; install onnxruntime-gpu instead of onnxruntime, or use --device cpu" if kind == "cuda" else "")
            )
        if kind == "cuda" and requested != "cuda":  # any cuda:N; the session reports a device that is absent
            return requested
        return super().resolve_device(requested)

    def resolve_dtype(self, requested: str, device: str, source: ModelSource | None = None) -> str:
        if requested == "auto":
            return "float32" if device == "cpu" else "float16"
        dtype = super().resolve_dtype(requested, device, source)
        if dtype == "int8" and device != "cpu":
            raise BackendError("--dtype int8 (dynamically quantized weights) runs on the CPU only; use --device cpu")
        return dtype

    def load(self, source: ModelSource, architecture: Architecture | None, device: str, dtype: str,
             options: dict[str, Any], backend_options: OnnxOptions = OnnxOptions()) -> Runner:
        # max_batch is accepted, and the runner keeps one sequence (its max_batch is 1): batches and
        # servers queue their sequences and decode them one after another.
        context_length = min(int(options.get("context_length") or source.config.context_length),
                             source.config.context_length)
        export = export_for(source)
        session = open_session(export, model_file(export, dtype), device, options.get("threads"),
                               backend_options.graph_optimization)
        return OnnxRunner(session, export, device, context_length)


def open_session(export: Path, path: Path, device: str, threads: int | None, optimization: str) -> Any:
    """An `InferenceSession` for ``path`` on ``device``. The first one optimizes the graph and saves
    the result beside it; later ones load that and skip the optimization."""
    import onnxruntime

    kind, _, index = device.partition(":")
    provider = PROVIDERS[kind]
    providers = [provider]
    if kind == "cuda":
        # TF32 would round float32 matrix products to 10-bit mantissas; float32 should mean float32.
        providers = [(provider, {"device_id": int(index or 0), "use_tf32": 0}), "CPUExecutionProvider"]
        with contextlib.redirect_stdout(sys.stderr):  # it prints its warnings
            onnxruntime.preload_dlls()  # CUDA and cuDNN from pip's nvidia packages, where those are installed
    options = onnxruntime.SessionOptions()
    if threads:
        options.intra_op_num_threads = int(threads)
    options.inter_op_num_threads = 1
    # The optimized graph depends on the source graph, the provider (it holds provider-specific fused
    # nodes), the level and the ONNX Runtime version; its name records all four.
    optimized = path.with_name(f"{path.stem}.optimized-{_optimization_key(path, kind, optimization)}.onnx")
    if optimized.is_file():
        path, optimization = optimized, "disable"
    elif optimization != "disable" and os.access(path.parent, os.W_OK):
        # Written under a temporary name and renamed once the session exists, so a half-written
        # file is never loaded. Large weights go to a side file that only the finished graph names.
        partial = optimized.with_name(f".{optimized.name}.partial-{os.getpid()}")
        options.optimized_model_filepath = str(partial)
        options.add_session_config_entry("session.optimized_model_external_initializers_file_name",
                                         f"{optimized.name}.data")
        options.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes",
                                         str(1 << 20))
    options.graph_optimization_level = {
        "disable": onnxruntime.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": onnxruntime.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": onnxruntime.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }[optimization]
    options.log_severity_level = 3  # errors only: its warnings about optimized-model files are expected
    try:
        session = onnxruntime.InferenceSession(str(path), options, providers=providers)
    except Exception as error:  # ONNX Runtime raises its own types, for bad graphs and for devices alike
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        if any(mark in reason for mark in ("INVALID_PROTOBUF", "INVALID_GRAPH", "Load model from")):
            raise damaged(export, f"ONNX Runtime cannot load {path}: {reason}") from None
        raise BackendError(f"ONNX Runtime could not open {path} on {device}: {reason}") from None
    if options.optimized_model_filepath:
        Path(options.optimized_model_filepath).rename(optimized)
    if session.get_providers()[0] != provider:  # ONNX Runtime falls back to the CPU when CUDA fails to start
        raise BackendError(f"ONNX Runtime could not start {provider} on {device} "
                           f"(it offered {', '.join(session.get_providers())}); check the GPU and its driver")
    return session


def _optimization_key(path: Path, kind: str, optimization: str) -> str:
    import onnxruntime

    stat = path.stat()
    source = f"{stat.st_size}:{stat.st_mtime_ns}"
    return f"{kind}-{optimization}-{onnxruntime.__version__}-{hashlib.sha256(source.encode()).hexdigest()[:8]}"


class OnnxRunner(Runner):
    def __init__(self, session: Any, export: Path, device: str, context_length: int) -> None:
        import numpy as np

        self.session = session
        self.context_length = context_length
        self.logits_device = "cpu"  # ONNX Runtime copies logits to host memory, wherever the model runs
        inputs = {i.name: i for i in session.get_inputs()}
        outputs = {o.name: o for o in session.get_outputs()}
        self.layers = sum(1 for name in inputs if name.startswith("past_key_values.") and name.endswith(".key"))
        if not self.layers or "logits" not in outputs or "present.0.key" not in outputs:
            raise damaged(export, f"{export} is not a text-generation-with-past export (its graph lacks "
                                  "past_key_values inputs, present outputs or logits)")
        _, self.kv_heads, _, self.head_dim = inputs["past_key_values.0.key"].shape
        self.vocab_size = outputs["logits"].shape[-1]
        self.kv_dtype = _numpy_dtype(inputs["past_key_values.0.key"].type)
        self.logits_dtype = _numpy_dtype(outputs["logits"].type)
        self.feeds_positions = "position_ids" in inputs
        kind, _, index = device.partition(":")
        self.ort_device = ("cuda" if kind == "cuda" else "cpu", int(index or 0))
        self.names = [(f"past_key_values.{layer}.{part}", f"present.{layer}.{part}")
                      for layer in range(self.layers) for part in ("key", "value")]
        self.binding = session.io_binding()
        # No padding: every position is attended. Sized with the cache, never to the model's context.
        self.mask = np.ones((1, 0), dtype=np.int64)
        self.length = 0  # positions held in the cache
        self.capacity = 0  # positions the buffers can hold
        self.current: list[Any] = []  # per (layer, key/value): the buffer holding the cache
        self.spare: list[Any] = []  # per (layer, key/value): where the next step writes

    def forward(self, token_ids: Sequence[int], start_pos: int, all_logits: bool = False, slot: int = 0) -> Any:
        import numpy as np
        import torch

        if slot != 0:
            raise BackendError(f"slot {slot} is past this runner's single slot")
        end = start_pos + len(token_ids)
        if end > self.context_length:
            raise ContextLengthError(f"position {end} is past the context length {self.context_length}")
        if start_pos > self.length:
            raise ValueError(f"start_pos {start_pos} is past the {self.length} cached positions")
        self._fit_cache(start_pos, end)
        binding, (device, device_id) = self.binding, self.ort_device
        binding.bind_cpu_input("input_ids", np.array([token_ids], dtype=np.int64))
        binding.bind_cpu_input("attention_mask", self.mask[:, :end])
        if self.feeds_positions:
            binding.bind_cpu_input("position_ids", np.arange(start_pos, end, dtype=np.int64)[None])
        past_shape = [1, self.kv_heads, start_pos, self.head_dim]
        present_shape = [1, self.kv_heads, end, self.head_dim]
        for (past, present), source, target in zip(self.names, self.current, self.spare):
            binding.bind_input(past, device, device_id, self.kv_dtype, past_shape, source.data_ptr())
            binding.bind_output(present, device, device_id, self.kv_dtype, present_shape, target.data_ptr())
        logits = np.empty((1, len(token_ids), self.vocab_size), dtype=self.logits_dtype)
        binding.bind_output("logits", "cpu", 0, logits.dtype, list(logits.shape), logits.ctypes.data)
        self.session.run_with_iobinding(binding)
        self.current, self.spare = self.spare, self.current
        self.length = end
        return torch.from_numpy(logits[0] if all_logits else logits[0, -1]).float()

    def _fit_cache(self, start_pos: int, end: int) -> None:
        """Keep the first ``start_pos`` cached positions (dropping any after: a rewind) in buffers
        that can hold ``end``."""
        import numpy as np

        grow = end > self.capacity
        if start_pos == self.length and not grow:
            return
        capacity = min(max(end, 2 * self.capacity, INITIAL_CACHE_POSITIONS), self.context_length) if grow \
            else self.capacity
        target = self._allocate(capacity) if grow else self.spare
        if start_pos:
            self._copy_positions(start_pos, target, capacity)
        self.current, self.spare = target, self._allocate(capacity) if grow else self.current
        if grow:
            self.mask = np.ones((1, capacity), dtype=np.int64)
        self.capacity, self.length = capacity, start_pos

    def _copy_positions(self, count: int, target: list[Any], capacity: int) -> None:
        """Copy the first ``count`` positions into ``target``, laid out for a past of that length.
        Rare (a rewind or a growth step), so it goes through host memory, which works on any device."""
        import numpy as np

        per_position = self.kv_heads * self.head_dim
        for source, destination in zip(self.current, target):
            cached = source.numpy()[:self.length * per_position].reshape(self.kv_heads, self.length, self.head_dim)
            staged = np.zeros(capacity * per_position, dtype=self.kv_dtype)
            staged[:count * per_position] = cached[:, :count].ravel()
            destination.update_inplace(staged)

    def _allocate(self, capacity: int) -> list[Any]:
        from onnxruntime import OrtValue

        device, device_id = self.ort_device
        size = capacity * self.kv_heads * self.head_dim
        return [OrtValue.ortvalue_from_shape_and_type([size], self.kv_dtype, device, device_id) for _ in self.names]

    def close(self) -> None:
        self.current = self.spare = []
        self.binding = self.session = None


def _numpy_dtype(onnx_type: str) -> Any:
    import numpy as np

    return {"tensor(float)": np.float32, "tensor(float16)": np.float16}[onnx_type]
