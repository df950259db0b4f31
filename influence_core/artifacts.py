"""Where Influence keeps what it makes, and how it makes it safely.

Everything lives under ``INFLUENCE_HOME`` (default ``~/.cache/influence``). The core owns two
things there that every plugin may use:

    exports/KIND/KEY/   derived artefacts (an ONNX export, a compiled step, a parsed header): each
                        a directory holding a manifest, influence.json, that names its ``source``
                        and the source's fingerprint, so it can be listed, found stale and pruned
    timings.json        how long one-off steps took here, for the next estimate (`timed_build`)
    notices.json        the notices already shown once (plugins' overrides of built-ins)

Small JSON files that several processes may edit at once (those, an index of names) are edited under
a file lock and replaced atomically (`editing_json`).

An artefact is written into a hidden sibling and renamed into place (`atomic_directory`), so a
crash never leaves half of one; Influence deletes only directories it made itself (`made_here`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import InfluenceError

MANIFEST = "influence.json"
JSON_LOCK_TIMEOUT_S = 30


def home() -> Path:
    return Path(os.environ.get("INFLUENCE_HOME") or "~/.cache/influence").expanduser()


def exports_dir(kind: str) -> Path:
    return home() / "exports" / kind


def fingerprint(path: Path) -> str:
    """Changes whenever the model's files change (names, sizes, modification times)."""
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    digest = hashlib.sha256()
    for file in files:
        if file.name == MANIFEST:
            continue
        stat = file.stat()
        digest.update(f"{file.relative_to(path) if path.is_dir() else file.name}:{stat.st_size}:{stat.st_mtime_ns}\n"
                      .encode())
    return digest.hexdigest()[:16]


def read_manifest(directory: Path) -> dict[str, Any] | None:
    try:
        return json.loads((directory / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


def write_manifest(directory: Path, source: Path, **fields: Any) -> None:
    """The manifest of an artefact made from ``source`` (a model file or directory)."""
    manifest = {"source": str(source.resolve()), "source_fingerprint": fingerprint(source),
                "created": time.strftime("%Y-%m-%dT%H:%M:%S"), **fields}
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")


def made_here(directory: Path, root: Path) -> bool:
    """Whether Influence made ``directory``: a real directory (not a link) directly inside ``root``,
    holding the manifest written into everything Influence creates."""
    try:
        inside = directory.resolve(strict=True).parent == root.resolve(strict=True)
    except OSError:
        return False
    return inside and not directory.is_symlink() and directory.is_dir() and isinstance(read_manifest(directory), dict)


@contextlib.contextmanager
def atomic_directory(target: Path) -> Iterator[Path]:
    """Yield a temporary sibling of ``target`` to fill; on success it replaces ``target``, so an
    interrupted or failed write never leaves a half-written directory behind."""
    partial = target.with_name(f".{target.name}.partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    try:
        yield partial
        if target.exists():
            shutil.rmtree(target)
        partial.rename(target)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise


@contextlib.contextmanager
def editing_json(path: Path, read: Callable[[], dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """``read()``'s JSON object, to change in the block and have written back to ``path`` under a
    file lock: written only if the block succeeds, and atomically, so no other process interleaves
    its edit and a crash or a concurrent reader never sees half of it."""
    from filelock import FileLock, Timeout

    path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(path.with_name(f".{path.name}.lock"))
    try:
        lock.acquire(timeout=JSON_LOCK_TIMEOUT_S)
    except Timeout:
        raise InfluenceError(f"another influence process has held {lock.lock_file} for "
                             f"{JSON_LOCK_TIMEOUT_S} s; try again when it is done") from None
    try:
        data = read()
        yield data
        _replace_json(path, data)
    finally:
        lock.release()


def _replace_json(path: Path, data: dict[str, Any]) -> None:
    descriptor, partial = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".partial")
    try:
        with os.fdopen(descriptor, "w", encoding="utf-8") as file:
            file.write(json.dumps(data, indent=2, ensure_ascii=False) + "\n")
            file.flush()
            os.fsync(file.fileno())
        os.replace(partial, path)
    except BaseException:
        Path(partial).unlink(missing_ok=True)
        raise


@dataclass(frozen=True)
class Derived:
    """Something made from a model and kept to save time later: ``exports/KIND/KEY/``, whose
    manifest names its ``source``; it can always be made again."""

    kind: str
    path: Path
    source: str
    size_bytes: int
    current: bool  # its source still exists, unchanged since it was made

    def as_dict(self) -> dict[str, Any]:
        return {**vars(self), "path": str(self.path)}


def derived_artifacts() -> list[Derived]:
    """Every finished artefact under exports/ that Influence made."""
    found = []
    for kind_dir in sorted(p for p in (home() / "exports").glob("[!.]*") if p.is_dir()):
        for directory in sorted(p for p in kind_dir.glob("[!.]*") if made_here(p, kind_dir)):
            manifest = read_manifest(directory) or {}
            source = str(manifest.get("source", ""))
            recorded = manifest.get("source_fingerprint")
            current = bool(source) and Path(source).exists() and (recorded is None or recorded == fingerprint(Path(source)))
            found.append(Derived(kind_dir.name, directory, source, directory_size(directory), current))
    return found


def remove_derived(artifacts: list[Derived]) -> None:
    """Delete artefacts `derived_artifacts` listed (each re-checked as Influence's own first)."""
    for artifact in artifacts:
        if not made_here(artifact.path, exports_dir(artifact.kind)):
            raise InfluenceError(f"{artifact.path} was not made by Influence, so it is left alone")
        try:
            shutil.rmtree(artifact.path)
        except OSError as error:
            raise InfluenceError(f"could not remove {artifact.path}: {error.strerror or error}") from None


# One-off steps (exports, compiles) are one opaque call each, so they are announced with an
# estimate: the time the same step took per unit the last time it ran here, else a built-in figure.

def _timings_file() -> Path:
    return home() / "timings.json"


def _read_rates() -> dict[str, float]:
    try:
        rates = json.loads(_timings_file().read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):  # none yet, or unreadable: the built-in figure serves
        return {}
    return {k: v for k, v in rates.items() if isinstance(v, (int, float)) and v > 0} if isinstance(rates, dict) else {}


def _remember_rate(kind: str, seconds_per_unit: float) -> None:
    rates = _read_rates()
    rates[kind] = seconds_per_unit
    path = _timings_file()
    with contextlib.suppress(OSError):  # an estimate not remembered is a worse estimate next time, no more
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f".{path.name}.partial-{os.getpid()}")
        partial.write_text(json.dumps(rates, indent=2) + "\n", encoding="utf-8")
        partial.replace(path)


@contextlib.contextmanager
def timed_build(description: str, kind: str, units: float, default_seconds_per_unit: float) -> Iterator[None]:
    """Say on stderr that ``description`` runs and about how long it takes; then how long it took.

    ``kind`` names the step for remembering its speed; ``units`` is its size (parameters, say), and
    the estimate is ``units`` times the remembered (else the default) seconds per unit.
    """
    estimate = units * _read_rates().get(kind, default_seconds_per_unit)
    print(f"influence: {description}, a one-off step of about {_duration(estimate)}...", file=sys.stderr, flush=True)
    started = time.perf_counter()
    yield
    elapsed = time.perf_counter() - started
    if units > 0:
        _remember_rate(kind, elapsed / units)
    print(f"influence: {description} took {_duration(elapsed)}", file=sys.stderr)


def _duration(seconds: float) -> str:
    seconds = round(seconds)
    return f"{seconds // 60} min {seconds % 60:02d} s" if seconds >= 60 else f"{seconds} s"


def directory_size(path: Path) -> int:
    if not path.is_dir():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def format_size(size: float) -> str:
    if size < 1000:
        return f"{size:.0f} B"
    for unit in ("kB", "MB", "GB"):
        size /= 1000
        if size < 1000:
            break
    return f"{size:.1f} {unit}"


def report_disk_use(what: str, path: Path) -> None:
    """Say once how much disk a new artefact takes, and where."""
    print(f"influence: {what} takes {format_size(directory_size(path))} in {path}", file=sys.stderr)
