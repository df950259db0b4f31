"""Run the same greedy generation on several backends and show where they agree, and how fast each is.

Greedy decoding picks the argmax at every step, so two backends that compute the same function give
the same tokens; the first position where they differ is where to start looking when they do not.
Backend-agnostic: it uses only `api.load` and `Model.generate`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from influence_core.api import load, open_default_model, open_source
from influence_core.errors import InfluenceError


@dataclass
class BackendRun:
    label: str  # what --backends named: "torch", "onnx:int8", ...
    backend: str
    device: str
    dtype: str
    text: str
    token_ids: list[int]
    finish_reason: str
    time_to_first_token_s: float
    decode_tokens_per_s: float


@dataclass
class DivergentToken:
    label: str
    token_id: int | None  # None: this run had already ended
    text: str


@dataclass
class Comparison:
    prompt: str
    runs: list[BackendRun]
    divergence_position: int | None  # index into the generated tokens; None when all runs agree
    divergent_tokens: list[DivergentToken]

    @property
    def agree(self) -> bool:
        return self.divergence_position is None

    def as_dict(self) -> dict[str, Any]:
        return {
            "prompt": self.prompt, "agree": self.agree,
            "first_divergence": None if self.agree else {
                "position": self.divergence_position, "tokens": [asdict(t) for t in self.divergent_tokens]},
            "runs": [asdict(run) for run in self.runs],
        }


def parse_backends(spec: str) -> list[tuple[str, str | None]]:
    """``"torch,onnx:int8"`` -> ``[("torch", None), ("onnx", "int8")]``: a dtype after a colon
    overrides --dtype for that backend."""
    entries = []
    for item in spec.split(","):
        name, _, dtype = item.strip().partition(":")
        if not name:
            raise InfluenceError(f"--backends {spec!r} has an empty entry; expected e.g. torch,onnx or torch,onnx:int8")
        entries.append((name, dtype or None))
    if len(entries) < 2:
        raise InfluenceError(f"--backends {spec!r} names one backend; a comparison needs two or more")
    return entries


def compare_backends(prompt: str, backends: list[tuple[str, str | None]], *, model: str | Path | None = None,
                     device: str = "auto", dtype: str = "auto", threads: int | None = None, max_tokens: int = 32,
                     raw: bool = False) -> Comparison:
    """Generate ``max_tokens`` greedy tokens from ``prompt`` on each backend in turn."""
    source = open_default_model() if model is None else open_source(model)
    runs = []
    for name, backend_dtype in backends:
        loaded = load(source, backend=name, device=device, dtype=backend_dtype or dtype, threads=threads)
        try:
            # A short warm-up takes one-time costs (allocations, lazy initialisation) out of the timings;
            # the cache is then forgotten so the timed run prefills the whole prompt.
            loaded.generate(prompt, max_tokens=2, temperature=0, raw=raw)
            loaded.cache.token_ids = []
            result = loaded.generate(prompt, max_tokens=max_tokens, temperature=0, raw=raw)
        finally:
            loaded.close()
        label = name if backend_dtype is None else f"{name}:{backend_dtype}"
        runs.append(BackendRun(
            label=label, backend=name, device=loaded.device, dtype=loaded.dtype, text=result.text,
            token_ids=result.token_ids, finish_reason=result.finish_reason,
            time_to_first_token_s=round(result.stats.time_to_first_token_s, 6),
            decode_tokens_per_s=round(result.stats.decode_tokens_per_s, 3),
        ))
    position = first_divergence([run.token_ids for run in runs])
    divergent = [] if position is None else [_token_at(run, position, source.tokenizer) for run in runs]
    return Comparison(prompt, runs, position, divergent)


def _token_at(run: BackendRun, position: int, tokenizer: Any) -> DivergentToken:
    if position >= len(run.token_ids):
        return DivergentToken(run.label, None, "(ended)")
    token = run.token_ids[position]
    return DivergentToken(run.label, token, tokenizer.decode([token], skip_special_tokens=False))


def first_divergence(sequences: list[list[int]]) -> int | None:
    """The first index where the sequences differ (one ending early counts), or None if all are equal."""
    longest = max(len(s) for s in sequences)
    for position in range(longest):
        if len({s[position] if position < len(s) else None for s in sequences}) > 1:
            return position
    return None


def print_comparison(comparison: Comparison) -> None:
    """The runs side by side in a table, then one line on whether they agree."""
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    runs = comparison.runs
    table = Table("", *(f"{run.label}\n{run.device} {run.dtype}" for run in runs), show_lines=True)
    table.add_row("text", *(Text(run.text) for run in runs))
    table.add_row("tokens", *(f"{len(run.token_ids)} ({run.finish_reason})" for run in runs))
    table.add_row("time to first token", *(f"{run.time_to_first_token_s * 1000:.0f} ms" for run in runs))
    table.add_row("decode", *(f"{run.decode_tokens_per_s:.1f} tok/s" for run in runs))
    console = Console()
    console.print(table)
    if comparison.agree:
        console.print(f"agree: all {len(runs[0].token_ids)} greedy tokens are identical", markup=False)
        return
    tokens = ", ".join(f"{t.label} {t.token_id} {t.text!r}" if t.token_id is not None else f"{t.label} {t.text}"
                       for t in comparison.divergent_tokens)
    console.print(f"differ: first at generated token {comparison.divergence_position}: {tokens}", markup=False)
