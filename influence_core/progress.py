"""Feedback on stderr for one-off steps that take a while (exports, graph rewrites, compiles).

Such a step is one opaque call, so its progress is shown against an estimate: the time the same
step took per parameter the last time it ran on this machine (kept in the store's
``timings.json``), else a figure measured on a 2-core machine. The line says what runs, the time
so far and the time expected; when it is done, how long it took.
"""

from __future__ import annotations

import contextlib
import json
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path


def _timings_file() -> Path:
    from .store import home

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
        partial = path.with_name(f".{path.name}.partial-{id(rates)}")
        partial.write_text(json.dumps(rates, indent=2) + "\n", encoding="utf-8")
        partial.replace(path)


@contextlib.contextmanager
def timed_step(description: str, kind: str, units: float, default_seconds_per_unit: float) -> Iterator[None]:
    """Show ``description`` with elapsed and expected time while the block runs.

    ``kind`` names the step for remembering its speed; ``units`` is its size (parameters, say), and
    the estimate is ``units`` times the remembered (else the default) seconds per unit.
    """
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    estimate = units * _read_rates().get(kind, default_seconds_per_unit)
    console = Console(stderr=True)
    columns = (TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn(),
               TextColumn(f"of about {_duration(estimate)}"))
    started = time.perf_counter()
    done = threading.Event()
    with Progress(*columns, console=console, transient=True) as progress:
        task = progress.add_task(description, total=max(estimate, 1e-3))

        def tick() -> None:
            # The bar follows the clock, stopping short of the end until the step really ends.
            while not done.wait(0.5):
                progress.update(task, completed=min(time.perf_counter() - started, 0.95 * estimate))

        ticker = threading.Thread(target=tick, daemon=True)
        ticker.start()
        try:
            yield
        finally:
            done.set()
            ticker.join()
    elapsed = time.perf_counter() - started
    if units > 0:
        _remember_rate(kind, elapsed / units)
    print(f"influence: {description} took {_duration(elapsed)}", file=sys.stderr)


def _duration(seconds: float) -> str:
    seconds = round(seconds)
    return f"{seconds // 60} min {seconds % 60:02d} s" if seconds >= 60 else f"{seconds} s"


def directory_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else path.stat().st_size


def report_disk_use(what: str, path: Path) -> None:
    """Say once how much disk a new artefact takes, and where."""
    from .hub import format_size

    print(f"influence: {what} takes {format_size(directory_size(path))} in {path}", file=sys.stderr)
