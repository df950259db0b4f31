"""The decode step compiled ahead of time with AOTInductor and kept in the store.

`torch.export` traces `Llama.forward` for one token per row (any batch, any cache capacity), and
`torch._inductor.aoti_compile_and_package` turns it into a package of native code and frozen
weights. That takes a minute or more, so it is done once per model and weight format and kept
under ``INFLUENCE_HOME/compiled/<key>/``; later processes load the package in seconds.

The key names everything the package depends on (the model's files, the weight format, the
torch version, the device, the CPU's instruction set and this plugin's own code), so a package
built for anything else is never found. A package that fails to load is rebuilt, never trusted.
Builds take a file lock, and a package is written to a temporary directory that replaces the
final one only when complete, so two processes building at once neither corrupt it nor both build.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import json
import os
import platform
import shutil
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from filelock import FileLock, Timeout

from influence_core import store
from influence_core.errors import BackendError

from .llama import KVCache, Llama

PACKAGE = "step.pt2"
KEY_FILE = "key.json"  # written last: a directory without it is an unfinished build
TIMINGS = "build-seconds.json"  # how long past builds took here, for the next build's estimate
MAX_BATCH = 64  # the largest batch the compiled step accepts (serve's --max-batch beyond it runs eager)


def compiled_dir() -> Path:
    return store.home() / "compiled"


def step_key(model_fingerprint: str, weight_format: str, device: str) -> dict[str, str]:
    """Everything a compiled step depends on. Any change gives another key, so another package."""
    # The traced code: the model, its linear layers, and how this module exports and compiles them.
    code = hashlib.sha256()
    for module in ("llama.py", "linear.py"):
        code.update((Path(__file__).parent / module).read_bytes())
    for function in (_Step, _build):
        code.update(inspect.getsource(function).encode())
    return {
        "model": model_fingerprint,
        "weight_format": weight_format,
        "torch": torch.__version__,
        "device": _device_identity(device),
        "cpu": f"{platform.machine()} {torch.backends.cpu.get_cpu_capability()}",
        "code": code.hexdigest()[:16],
    }


def _device_identity(device: str) -> str:
    if device.startswith("cuda"):
        major, minor = torch.cuda.get_device_capability(device)
        return f"cuda {torch.cuda.get_device_name(device)} sm_{major}{minor}"
    return device


def artifact_path(key: dict[str, str]) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return compiled_dir() / digest


class CompiledStep:
    """The loaded package, called like the eager `Llama.forward` for one-token steps. Its
    attention reads the cache's whole capacity (masked past each row's position), so one graph
    serves every position: the capacity doubles as runs grow, so a step reads at most twice the
    positions it needs.

    On CPU it takes single sequences only: batched, the eager step was as fast or faster
    (docs/performance.md; a batch reads the weights once for all its rows, and the compiled
    step's attention reads every row's whole cache). On CUDA its CUDA graphs serve every batch.
    """

    def __init__(self, package: Any, device: str) -> None:
        # The package's own __call__ parses its input and output specs on every call; the inputs
        # here are always the same flat list of tensors, so call its runner directly.
        self.run = package.loader.boxed_run
        self.max_batch = 1 if device == "cpu" else MAX_BATCH

    def __call__(self, tokens: torch.Tensor, positions: torch.Tensor, keys: torch.Tensor,
                 caches: list[KVCache]) -> torch.Tensor:
        batch = tokens.shape[0]
        return self.run([tokens, positions, keys, *(part[:batch] for cache in caches for part in cache)])[0]


class _Step(torch.nn.Module):
    """What is exported: the model's forward for one token per row, its caches as inputs (a flat
    list of each layer's keys then values: a package's inputs are plain tensors and lists)."""

    def __init__(self, model: Llama) -> None:
        super().__init__()
        self.model = model

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, keys: torch.Tensor,
                caches: list[torch.Tensor]) -> torch.Tensor:
        return self.model(tokens, positions, keys, [KVCache(*pair) for pair in zip(caches[0::2], caches[1::2])])


def load_step(key: dict[str, str], device: str) -> CompiledStep | None:
    """The compiled step stored under ``key``, or None when there is none (or only a broken one)."""
    directory = artifact_path(key)
    try:
        if json.loads((directory / KEY_FILE).read_text(encoding="utf-8")) != key:
            return None
    except (OSError, ValueError):
        return None
    try:
        return CompiledStep(torch._inductor.aoti_load_package(str(directory / PACKAGE)), device)
    except Exception as error:  # a truncated or foreign package fails in torch's own ways
        print(f"influence: the compiled decode step in {directory} does not load ({type(error).__name__}); "
              "it will be rebuilt", file=sys.stderr)
        return None


def prepare_step(model: Llama, key: dict[str, str], device: str, caches: Callable[[int, int], list[KVCache]],
                 label: str) -> CompiledStep:
    """Load the compiled step for ``key``, building it first if it is missing or broken."""
    step = load_step(key, device)
    if step is not None:
        return step
    directory = artifact_path(key)
    directory.parent.mkdir(parents=True, exist_ok=True)
    with _build_lock(directory):
        step = load_step(key, device)  # another process may have built it while this one waited
        if step is None:
            _build(model, key, device, caches, label)
            remove_stale(key)
            step = load_step(key, device)
    if step is None:
        raise BackendError(f"the compiled decode step built in {directory} does not load")
    return step


@contextlib.contextmanager
def _build_lock(directory: Path) -> Iterator[None]:
    lock = FileLock(str(directory.with_name(directory.name + ".lock")))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        print("influence: another process is compiling this decode step; waiting for it", file=sys.stderr)
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


def _build(model: Llama, key: dict[str, str], device: str, caches: Callable[[int, int], list[KVCache]],
           label: str) -> None:
    from torch._inductor import aoti_compile_and_package

    from influence_core.store import atomic_directory

    directory = artifact_path(key)
    estimate = _estimate(key["weight_format"])
    print(f"influence: compiling the decode step of {label} ({estimate}; once: later runs load it from "
          f"{directory})", file=sys.stderr)
    started = time.perf_counter()
    batch, capacity = torch.export.Dim("batch", min=1, max=MAX_BATCH), torch.export.Dim("capacity", min=2)
    example = (torch.zeros((2, 1), dtype=torch.long, device=device), torch.tensor([[3], [5]], device=device),
               torch.arange(256, device=device), [part for cache in caches(2, 256) for part in cache])
    shapes = ({0: batch}, {0: batch}, {0: capacity}, [{0: batch, 2: capacity}] * len(example[3]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch's own deprecations, nothing a user can act on
        with torch.no_grad(), _phase("exporting the graph"):
            exported = torch.export.export(_Step(model), example, dynamic_shapes=shapes, strict=False)
        with atomic_directory(directory) as partial:
            with _phase("compiling native code (the long part)"):
                aoti_compile_and_package(exported, package_path=str(partial / PACKAGE),
                                         inductor_configs={"freezing": True})
            (partial / KEY_FILE).write_text(json.dumps(key, sort_keys=True), encoding="utf-8")
    seconds = time.perf_counter() - started
    _record_build_time(key["weight_format"], seconds)
    print(f"influence: compiled in {seconds:.0f} s", file=sys.stderr)


@contextlib.contextmanager
def _phase(description: str) -> Iterator[None]:
    """A spinner with the elapsed time on stderr while one build phase runs."""
    from rich.console import Console
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    with Progress(SpinnerColumn(), TextColumn(description), TimeElapsedColumn(), console=Console(stderr=True),
                  transient=True) as progress:
        progress.add_task(description, total=None)
        yield


def _estimate(weight_format: str) -> str:
    try:
        seconds = json.loads((compiled_dir() / TIMINGS).read_text(encoding="utf-8"))[weight_format]
        return f"about {seconds / 60:.1f} minutes, as the last build took here"
    except (OSError, ValueError, KeyError, TypeError):
        return "1-3 minutes on a 2-core machine"


def _record_build_time(weight_format: str, seconds: float) -> None:
    path = compiled_dir() / TIMINGS
    try:
        timings = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        timings = {}
    timings[weight_format] = round(seconds, 1)
    partial = path.with_name(f".{path.name}.partial-{os.getpid()}")
    partial.write_text(json.dumps(timings), encoding="utf-8")
    partial.replace(path)


def remove_stale(keep: dict[str, str]) -> None:
    """Delete the packages built for this model and format under other keys (an older torch or
    plugin version): they can never be loaded again."""
    for key_file in compiled_dir().glob(f"*/{KEY_FILE}"):
        try:
            other = json.loads(key_file.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        same_target = all(other.get(field) == keep[field] for field in ("model", "weight_format", "device"))
        if same_target and other != keep:
            shutil.rmtree(key_file.parent, ignore_errors=True)
