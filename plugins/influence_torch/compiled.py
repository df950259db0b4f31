"""The decode step compiled ahead of time with AOTInductor and kept in the store.

`torch.export` traces `Llama.forward` for one token per row (any batch, any cache capacity), and
`torch._inductor.aoti_compile_and_package` turns it into a package of native code and frozen
weights. That takes a minute or more, so it is done once per model and weight format and kept
under ``INFLUENCE_HOME/exports/compiled/<key>/`` (with the store's manifest naming the model, so
`influence models list` shows it and `influence models prune` removes it); later processes load the
package in seconds. Loading it costs more than one short generation saves, so a plain run starts
eager; a resident model (`influence_core.resident`) switches to the package while idle, building it
first in a low-priority child process when it is missing (`BackgroundBuild`).

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
import platform
import shutil
import sys
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from filelock import FileLock, Timeout

from influence_core import artifacts
from influence_core.errors import BackendError

from .linear import QUANTIZED_FORMATS, float_weights_left_for_inductor
from .llama import KVCache, Llama

PACKAGE = "step.pt2"
KEY_FILE = "key.json"  # written last: a directory without it is an unfinished build
# The first build's estimate, until this machine has timed its own: SmolLM2-135M's int8 step
# exported in 9 s and compiled in 72-87 s on a quiet 2-core machine (shared notes, cpu-kernels.md).
SECONDS_PER_PARAMETER = 90 / 134_515_008
MAX_BATCH = 64  # the largest batch the compiled step accepts (serve's --max-batch beyond it runs eager)


def compiled_dir() -> Path:
    return artifacts.exports_dir("compiled")


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
                 label: str, source: Path | None = None) -> CompiledStep:
    """Load the compiled step for ``key``, building it first if it is missing or broken; ``source``,
    the model's path, goes into the store's manifest beside it."""
    step = load_step(key, device)
    if step is not None:
        return step
    directory = artifact_path(key)
    directory.parent.mkdir(parents=True, exist_ok=True)
    with _build_lock(directory):
        step = load_step(key, device)  # another process may have built it while this one waited
        if step is None:
            _build(model, key, device, caches, label)
            if source is not None:
                artifacts.write_manifest(directory, source)
            remove_stale(key)
            step = load_step(key, device)
            if step is not None:  # asked for and built: an earlier failure (`BackgroundBuild`) is past
                directory.with_name(directory.name + ".failed").unlink(missing_ok=True)
    if step is None:
        raise BackendError(f"the compiled decode step built in {directory} does not load")
    return step


class BackgroundBuild:
    """The compiled step for ``key``, made ready while a long-lived runner serves eager: `poll`
    loads it when it is in the store, and otherwise builds it in a child process at the lowest CPU
    priority (``influence prepare``'s build, so under the same lock), then loads it. A build that
    fails leaves a note beside the package's directory, so no later runner tries the same key again
    unasked (``influence prepare`` does, and says why it fails); the child's output is kept there."""

    def __init__(self, key: dict[str, str], source: Path, dtype: str, device: str) -> None:
        self.key, self.source, self.dtype, self.device = key, source, dtype, device
        self.process: Any = None
        self.finished = False
        self.paused = False

    def pause(self) -> None:
        """Stop the build (the child and its compilers) while the runner serves: even at nice 19, a
        build beside a generation on 2 cores made a 40-token answer take 17 s instead of about 1."""
        if self.process is not None and not self.paused and self.process.poll() is None:
            self._signal_build("SIGSTOP")
            self.paused = True

    def resume(self) -> None:
        if self.paused:
            self._signal_build("SIGCONT")
            self.paused = False

    def _signal_build(self, name: str) -> None:
        import os
        import signal

        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, getattr(signal, name))  # its own session: the child and its compilers

    @property
    def failure_note(self) -> Path:
        directory = artifact_path(self.key)
        return directory.with_name(directory.name + ".failed")

    def poll(self) -> CompiledStep | None:
        """The loaded step once there is one; None while it builds, or after a failure (``finished``)."""
        import subprocess

        if self.finished:
            return None
        self.resume()
        if self.process is None:
            step = load_step(self.key, self.device)
            if step is not None or self.failure_note.exists():
                self.finished = True
                return step
            self.failure_note.parent.mkdir(parents=True, exist_ok=True)
            arguments = json.dumps({"source": str(self.source), "dtype": self.dtype, "device": self.device,
                                    "key": self.key})
            with open(self.failure_note.with_suffix(".log"), "wb") as log:
                self.process = subprocess.Popen(
                    [sys.executable, "-c", "import os, sys; os.nice(19); from influence_torch.compiled import "
                     "build_in_child; build_in_child(sys.argv[1])", arguments],
                    stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
            return None
        if self.process.poll() is None:
            return None
        self.finished = True
        step = load_step(self.key, self.device) if self.process.returncode == 0 else None
        if step is not None:
            self.failure_note.with_suffix(".log").unlink(missing_ok=True)
        else:
            self.failure_note.write_text(f"the background build exited with status {self.process.returncode}; "
                                         f"its output is in {self.failure_note.with_suffix('.log')}\n",
                                         encoding="utf-8")
        return step

    def cancel(self) -> None:
        """Stop a build still running, with the compiler it runs (its partial directory is never
        taken for a package)."""
        import subprocess

        if self.process is not None and self.process.poll() is None:
            self._signal_build("SIGTERM")
            self.resume()  # a stopped process handles its SIGTERM once continued
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._signal_build("SIGKILL")
                self.process.wait()


def build_in_child(arguments: str) -> None:
    """A `BackgroundBuild`'s child: build the model from its file and its step under the parent's key
    (`influence prepare`'s build, without keeping another built model in the store)."""
    import signal

    from influence_core.api import open_source
    from influence_core.plugins import get_registry

    # Stopped (`BackgroundBuild.cancel`): exit through Python, so the partial directory is removed.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    given = json.loads(arguments)
    source = open_source(Path(given["source"]))
    architecture = get_registry().architecture_for(source.config, "torch")
    with float_weights_left_for_inductor():  # float weights as plain tensors, for inductor to pack
        model = architecture.build(source.config, source.weights(), given["device"], given["dtype"])
    prepare_step(model, given["key"], given["device"], model.new_caches, f"{source.path.name} {given['dtype']}",
                 source.path)


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

    from influence_core.artifacts import atomic_directory, report_disk_use, timed_build

    directory = artifact_path(key)
    print(f"influence: compiling the decode step of {label} (once: resident models and -B compiled=true "
          f"load it from {directory})", file=sys.stderr)
    # On CPU the package serves single sequences (`CompiledStep`), so it is built for one: a fixed
    # shape lets inductor pick its float GEMVs by timing them (max-autotune's C++ templates stream
    # float32 weights at about twice oneDNN's rate here; the quantized kernels are fixed calls).
    rows = 1 if device == "cpu" else 2
    batch, capacity = torch.export.Dim("batch", min=1, max=MAX_BATCH), torch.export.Dim("capacity", min=2)
    example = (torch.zeros((rows, 1), dtype=torch.long, device=device), torch.tensor([[3], [5]][:rows], device=device),
               torch.arange(256, device=device), [part for cache in caches(rows, 256) for part in cache])
    if device == "cpu":
        shapes = (None, None, {0: capacity}, [{2: capacity}] * len(example[3]))
    else:
        shapes = ({0: batch}, {0: batch}, {0: capacity}, [{0: batch, 2: capacity}] * len(example[3]))
    configs: dict[str, Any] = {"freezing": True}
    if device == "cpu" and key["weight_format"] not in QUANTIZED_FORMATS:
        configs.update(max_autotune=True, max_autotune_gemm_backends="CPP,ATEN")
    with warnings.catch_warnings(), timed_build("compiling the decode step", f"compiled-{key['weight_format']}",
                                               model.config.parameter_count(), SECONDS_PER_PARAMETER):
        warnings.simplefilter("ignore", FutureWarning)  # torch's own deprecations, nothing a user can act on
        with torch.no_grad():
            exported = torch.export.export(_Step(model), example, dynamic_shapes=shapes, strict=False)
        with atomic_directory(directory) as partial:
            aoti_compile_and_package(exported, package_path=str(partial / PACKAGE), inductor_configs=configs)
            (partial / KEY_FILE).write_text(json.dumps(key, sort_keys=True), encoding="utf-8")
    report_disk_use("the compiled decode step", directory)


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
