"""``influence bench``: prompt processing, decode, time to first token, load time and peak RSS for
our backends and, with ``--reference``, for reference engines on the same model in the same run.

Modelled on llama.cpp's llama-bench: pp is an N-token prompt in one forward pass, tg is M greedy
decode steps, and neither counts tokenization or sampling. Every engine and dtype runs in its own
subprocess, so load time and peak RSS are its own.

``--cli`` measures what users run instead (`measure_processes`): whole ``influence generate``
processes, start-up, loading, chat template, sampling and detokenization included, beside a whole
llama-cpp-python process answering the same chat prompt.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from influence_core.defaults import DEFAULT_KEEP_ALIVE_S, KEEP_ALIVE_ENV
from influence_core.resident import MIN_MODEL_BYTES

REFERENCE_ENGINES = ("transformers", "optimum", "llama.cpp")
PROMPT_TEXT = (
    "The history of computing is a story of abstraction. Early machines were programmed by rewiring "
    "panels; later, stored programs let the same hardware do many jobs. Assemblers named instructions, "
    "compilers translated languages that people could read, and operating systems shared one machine "
    "among many users. Each layer hid the one below it and let programmers think about bigger problems. "
)


@dataclass
class Case:
    engine: str  # one of our backends ("torch", "onnx", ...) or a reference engine
    dtype: str
    reference: bool = False
    compiled: bool = False  # our backend's compiled decode step
    output_format: str | None = None  # "json": every decode step also masks with a JSON-mode grammar

    @property
    def label(self) -> str:
        return f"{self.engine}{' compiled' if self.compiled else ''} {self.dtype}" + (
            f" --format {self.output_format}" if self.output_format else "")


@dataclass
class Settings:
    model: str  # a Hugging Face directory (ours, transformers, optimum)
    gguf: str | None  # a GGUF file (llama.cpp)
    device: str
    threads: int
    prompt_tokens: int
    gen_tokens: int
    repetitions: int


@dataclass
class Measurement:
    case: Case
    load_s: float = 0.0
    pp_tokens_per_s: list[float] = field(default_factory=list)
    tg_tokens_per_s: list[float] = field(default_factory=list)
    ttft_s: list[float] = field(default_factory=list)
    peak_rss_mb: float = 0.0
    runtime_rss_mb: float = 0.0  # resident before loading, once the engine's libraries are imported
    weight_bytes_per_token: int = 0
    format_overhead_percent: list[float] = field(default_factory=list)  # the mask's share of a decode step
    error: str | None = None


# ---- in the worker subprocess -------------------------------------------------------------------

def _prompt_ids(tokenize: Callable[[str], list[int]], count: int) -> list[int]:
    ids: list[int] = []
    while len(ids) < count:
        ids += tokenize(PROMPT_TEXT)
    return ids[:count]


def _timed(function: Callable[[], Any]) -> float:
    started = time.perf_counter()
    function()
    return time.perf_counter() - started


def _measure_ours(case: Case, settings: Settings, result: Measurement) -> None:
    import importlib

    import torch  # noqa: F401  (imports are start-up cost, not load time, as for the references)

    import influence_core

    if case.engine == "onnx":
        importlib.import_module("onnxruntime")

    result.runtime_rss_mb = rss_mb("VmRSS")
    started = time.perf_counter()
    model = influence_core.load(settings.model, backend=case.engine, device=settings.device, dtype=case.dtype,
                                threads=settings.threads, backend_options={"compiled": True} if case.compiled else None)
    result.load_s = time.perf_counter() - started
    result.weight_bytes_per_token = weight_bytes_per_token(model.config, case.dtype)
    runner = model.runner
    ids = _prompt_ids(lambda text: model.tokenizer.encode(text, add_special_tokens=False), settings.prompt_tokens)

    def synchronized(logits: Any) -> int:
        return int(logits.argmax())  # also waits for the device

    # Warm-up: first-call allocations, kernel selection and compilation are not what pp and tg measure.
    synchronized(runner.forward([synchronized(runner.forward(ids, 0))], len(ids)))
    synchronized(runner.forward([ids[0]], len(ids) + 1))
    for _ in range(settings.repetitions):
        elapsed = _timed(lambda: synchronized(runner.forward(ids, 0)))
        result.pp_tokens_per_s.append(len(ids) / elapsed)
        token, position = ids[-1], len(ids)
        started = time.perf_counter()
        for _ in range(settings.gen_tokens):
            token = synchronized(runner.forward([token], position))
            position += 1
        result.tg_tokens_per_s.append(settings.gen_tokens / (time.perf_counter() - started))
        model.cache.token_ids = []
        result.ttft_s.append(model.generate(ids, max_tokens=1, temperature=0).stats.time_to_first_token_s)
    if case.output_format:
        _measure_format_overhead(model, ids, settings, result)


def _measure_format_overhead(model: Any, ids: list[int], settings: Settings, result: Measurement) -> None:
    """tg again with JSON mode's grammar mask applied to every step's logits, the tokens forced along a
    JSON document (a prefix of valid JSON is always allowed); the overhead is the mask's time over
    the unmasked step's."""
    import torch

    from influence_core.interfaces import SamplingContext

    words = PROMPT_TEXT.split()
    document = json.dumps({"items": [{"word": w, "length": len(w)} for w in words * 8]}, separators=(",", ":"))
    forced = model.tokenizer.encode(document, add_special_tokens=False)[:settings.gen_tokens]
    history = torch.tensor(ids + forced)
    runner = model.runner
    result.tg_tokens_per_s.clear()
    for _ in range(settings.repetitions):
        mask = model.new_generation(ids, max_tokens=len(forced) + 1, response_format=_format_constraint(result.case)
                                    ).chain.processors[0]
        runner.forward(ids, 0)
        masking = 0.0  # timed apart from the steps, so a busy machine's noise in the steps does not swamp it
        started = time.perf_counter()
        for step in range(len(forced)):
            logits = runner.forward([ids[-1] if step == 0 else forced[step - 1]], len(ids) + step)
            int(logits.argmax())
            masked_at = time.perf_counter()
            int(mask(logits, SamplingContext(history[:len(ids) + step], None, len(ids))).argmax())
            masking += time.perf_counter() - masked_at
        elapsed = time.perf_counter() - started
        result.tg_tokens_per_s.append(len(forced) / elapsed)
        result.format_overhead_percent.append(100 * masking / (elapsed - masking))


def _format_constraint(case: Case) -> Any:
    from influence_core.structured import Constraint

    if case.output_format != "json":
        raise ValueError(f"bench --format takes json, got {case.output_format!r}")
    return Constraint.json_object()


def _measure_hf_generate(model: Any, ids: list[int], settings: Settings, result: Measurement) -> None:
    """Decode speed from two greedy generate calls: M tokens minus 1 token is M-1 decode steps."""
    import torch

    input_ids = torch.tensor([ids])

    def generate(count: int) -> None:
        model.generate(input_ids, max_new_tokens=count, min_new_tokens=count, do_sample=False,
                       pad_token_id=0)

    generate(2)  # warm-up
    for _ in range(settings.repetitions):
        first = _timed(lambda: generate(1))
        total = _timed(lambda: generate(settings.gen_tokens + 1))
        result.ttft_s.append(first)
        result.pp_tokens_per_s.append(len(ids) / first)
        result.tg_tokens_per_s.append(settings.gen_tokens / (total - first))


def _measure_transformers(case: Case, settings: Settings, result: Measurement) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from influence_core.config import ModelConfig

    torch.set_num_threads(settings.threads)
    result.runtime_rss_mb = rss_mb("VmRSS")
    started = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(settings.model, dtype=getattr(torch, case.dtype)).eval()
    result.load_s = time.perf_counter() - started
    result.weight_bytes_per_token = weight_bytes_per_token(ModelConfig.from_dir(Path(settings.model)), case.dtype)
    tokenizer = AutoTokenizer.from_pretrained(settings.model)
    ids = _prompt_ids(lambda text: tokenizer(text, add_special_tokens=False)["input_ids"], settings.prompt_tokens)
    with torch.inference_mode():
        _measure_hf_generate(model, ids, settings, result)


def _measure_optimum(case: Case, settings: Settings, result: Measurement) -> None:
    import onnxruntime
    from optimum.onnxruntime import ORTModelForCausalLM
    from transformers import AutoTokenizer

    from influence_core.config import ModelConfig

    from influence_core.artifacts import exports_dir, fingerprint

    export_dir = exports_dir("optimum-reference") / fingerprint(Path(settings.model))
    if not (export_dir / "model.onnx").exists():  # exporting is set-up, not load time
        from optimum.exporters.onnx import main_export

        main_export(settings.model, output=export_dir, task="text-generation-with-past", library_name="transformers")
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = settings.threads
    result.runtime_rss_mb = rss_mb("VmRSS")
    started = time.perf_counter()
    model = ORTModelForCausalLM.from_pretrained(export_dir, session_options=options)
    result.load_s = time.perf_counter() - started
    result.weight_bytes_per_token = weight_bytes_per_token(ModelConfig.from_dir(Path(settings.model)), "float32")
    tokenizer = AutoTokenizer.from_pretrained(settings.model)
    ids = _prompt_ids(lambda text: tokenizer(text, add_special_tokens=False)["input_ids"], settings.prompt_tokens)
    _measure_hf_generate(model, ids, settings, result)


def _measure_llama_cpp(case: Case, settings: Settings, result: Measurement) -> None:
    import numpy as np
    from llama_cpp import Llama

    if not settings.gguf:
        raise RuntimeError("llama.cpp needs a GGUF file (pass --gguf)")
    result.runtime_rss_mb = rss_mb("VmRSS")
    started = time.perf_counter()
    llm = Llama(settings.gguf, n_ctx=settings.prompt_tokens + settings.gen_tokens + 16, n_threads=settings.threads,
                n_threads_batch=settings.threads, n_batch=512, verbose=False, logits_all=False)
    result.load_s = time.perf_counter() - started
    result.weight_bytes_per_token = gguf_weight_bytes(settings.gguf)
    ids = _prompt_ids(lambda text: llm.tokenize(text.encode(), add_bos=False, special=False), settings.prompt_tokens)

    def next_token() -> int:
        return int(np.argmax(llm.scores[llm.n_tokens - 1]))

    llm.reset()
    llm.eval(ids[:8])  # warm-up
    for _ in range(settings.repetitions):
        llm.reset()
        elapsed = _timed(lambda: llm.eval(ids))
        result.pp_tokens_per_s.append(len(ids) / elapsed)
        result.ttft_s.append(elapsed)
        started = time.perf_counter()
        for _ in range(settings.gen_tokens):
            llm.eval([next_token()])
        result.tg_tokens_per_s.append(settings.gen_tokens / (time.perf_counter() - started))


MEASURES = {"transformers": _measure_transformers, "optimum": _measure_optimum, "llama.cpp": _measure_llama_cpp}


def worker(arguments: dict[str, Any]) -> dict[str, Any]:
    case, settings = Case(**arguments["case"]), Settings(**arguments["settings"])
    result = Measurement(case)
    try:
        measure = MEASURES[case.engine] if case.reference else _measure_ours
        measure(case, settings, result)
    except Exception as error:  # reported in the table, never a traceback
        result.error = f"{type(error).__name__}: {error}".splitlines()[0]
    result.peak_rss_mb = rss_mb("VmHWM")
    return asdict(result)


def rss_mb(field: str) -> float:
    """This process's resident memory now (VmRSS) or at its peak (VmHWM, which unlike ru_maxrss
    starts afresh at exec, so a worker does not inherit its parent's peak)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 if field == "VmHWM" else 0.0


# ---- in the parent ------------------------------------------------------------------------------

def weight_bytes_per_token(config: Any, dtype: str) -> int:
    """Bytes of weights one decode step reads: every linear layer and the output head (the
    embedding table is only gathered from, one row per token)."""
    per_layer = (config.hidden_size * (config.num_attention_heads + 2 * config.num_key_value_heads) * config.head_dim
                 + config.num_attention_heads * config.head_dim * config.hidden_size
                 + 3 * config.hidden_size * config.intermediate_size)
    # int4 stores a bfloat16 scale and zero per group of 32 weights: 5 bits a weight; the torch
    # backend keeps the output head at int8 then.
    bits = {"float32": 32, "float16": 16, "bfloat16": 16, "int8": 8, "int4": 5}[dtype]
    head_bits = 8 if dtype == "int4" else bits
    return (config.num_hidden_layers * per_layer * bits + config.vocab_size * config.hidden_size * head_bits) // 8


def gguf_weight_bytes(path: str) -> int:
    """Bytes of every tensor but the embedding table, unless it doubles as the output head."""
    from gguf import GGUFReader

    tensors = GGUFReader(path).tensors
    tied = not any(t.name == "output.weight" for t in tensors)
    return sum(int(t.n_bytes) for t in tensors if t.name != "token_embd.weight" or tied)


def memory_bandwidth_gb_s(threads: int) -> float:
    """Read bandwidth as torch.sum over 1 GiB of float32, best of 5."""
    import torch

    torch.set_num_threads(threads)
    data = torch.ones(1 << 28)
    data.sum()
    best = min(_timed(data.sum) for _ in range(5))
    return data.numel() * 4 / best / 1e9


def run_case(case: Case, settings: Settings, timeout_s: float = 1800) -> Measurement:
    payload = json.dumps({"case": asdict(case), "settings": asdict(settings)})
    done = subprocess.run([sys.executable, "-m", "influence_bench.bench", payload], capture_output=True, text=True,
                          timeout=timeout_s)
    if done.returncode != 0 or not done.stdout.strip():
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return Measurement(case, error=f"worker failed: {tail}")
    data = json.loads(done.stdout.strip().splitlines()[-1])
    data["case"] = Case(**data["case"])
    return Measurement(**data)


def median(values: list[float]) -> float:
    return statistics.median(values) if values else 0.0


def spread(values: list[float]) -> float:
    return (max(values) - min(values)) / 2 if len(values) > 1 else 0.0


def reference_for(case: Case, references: dict[str, Measurement]) -> list[tuple[str, Measurement]]:
    """The references a row of ours is compared with: transformers at the same float dtype,
    optimum's ORT for the onnx backend, and llama.cpp for everything."""
    chosen = []
    if case.dtype in ("float32", "bfloat16", "float16") and f"transformers {case.dtype}" in references:
        chosen.append(("transformers", references[f"transformers {case.dtype}"]))
    if case.engine == "onnx" and "optimum float32" in references:
        chosen.append(("optimum", references["optimum float32"]))
    chosen += [("llama.cpp", m) for label, m in references.items() if label.startswith("llama.cpp")]
    return [(name, m) for name, m in chosen if not m.error]


def summarise(results: list[Measurement], bandwidth: float) -> list[dict[str, Any]]:
    references = {m.case.label: m for m in results if m.case.reference}
    rows = []
    for m in results:
        tg = median(m.tg_tokens_per_s)
        roofline = bandwidth * 1e9 / m.weight_bytes_per_token if m.weight_bytes_per_token else 0.0
        row = {
            "engine": m.case.engine, "dtype": m.case.dtype, "reference": m.case.reference,
            "compiled": m.case.compiled, "output_format": m.case.output_format, "error": m.error,
            "format_overhead_percent": (round(median(m.format_overhead_percent), 1)
                                        if m.format_overhead_percent else None),
            "load_s": round(m.load_s, 3),
            "pp_tokens_per_s": round(median(m.pp_tokens_per_s), 1), "pp_spread": round(spread(m.pp_tokens_per_s), 1),
            "tg_tokens_per_s": round(tg, 1), "tg_spread": round(spread(m.tg_tokens_per_s), 1),
            "ttft_ms": round(median(m.ttft_s) * 1000, 1), "peak_rss_mb": round(m.peak_rss_mb, 1),
            "runtime_rss_mb": round(m.runtime_rss_mb, 1),
            "weight_mb_per_token": round(m.weight_bytes_per_token / 1e6, 1),
            # What the model added to the process at its peak, per byte of the weights it uses.
            "model_rss_vs_weights": (round((m.peak_rss_mb - m.runtime_rss_mb) * 2**20 / m.weight_bytes_per_token, 2)
                                     if m.weight_bytes_per_token and m.runtime_rss_mb else None),
            "roofline_percent": round(100 * tg / roofline, 1) if roofline else None,
            "runs": {"pp": m.pp_tokens_per_s, "tg": m.tg_tokens_per_s, "ttft_s": m.ttft_s},
            "ratios": {},
        }
        if not m.case.reference and not m.error:
            for name, ref in reference_for(m.case, references):
                row["ratios"][f"tg_vs_{name}"] = round(tg / median(ref.tg_tokens_per_s), 2)
                row["ratios"][f"pp_vs_{name}"] = round(median(m.pp_tokens_per_s) / median(ref.pp_tokens_per_s), 2)
        rows.append(row)
    return rows


def machine_facts(threads: int, bandwidth: float) -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "threads": threads, "read_bandwidth_gb_s": round(bandwidth, 1),
            "python": platform.python_version()}


# ---- --cli: whole processes ---------------------------------------------------------------------

CLI_PROMPT = "Write a long story about a lighthouse keeper who finds a message in a bottle."

# Run by the reference interpreter (llama-cpp-python installed; Influence need not be): the same
# chat prompt, greedy, streamed as a user would see it; prints one JSON line.
LLAMA_CPP_PROCESS = """
import json, sys, time
from llama_cpp import Llama
gguf, prompt, max_tokens, threads = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
llm = Llama(gguf, n_ctx=2048, n_threads=threads, n_threads_batch=threads, verbose=False)
requested = time.perf_counter()
first = end = None
tokens = 0
for chunk in llm.create_chat_completion([{"role": "user", "content": prompt}], max_tokens=max_tokens,
                                        temperature=0.0, stream=True):
    if chunk["choices"][0]["delta"].get("content"):
        end = time.perf_counter()
        first = first or end
        tokens += 1
print(json.dumps({"generated_tokens": tokens, "time_to_first_token_s": first - requested,
                  "decode_tokens_per_s": (tokens - 1) / (end - first) if tokens > 1 else 0.0}))
"""


@dataclass
class ProcessCase:
    label: str  # "influence generate --dtype auto", "llama.cpp (llama-cpp-python)"
    command: list[str]
    reference: bool = False
    environment: dict[str, str] = field(default_factory=dict)  # set for this process, over the caller's
    # A resident model's case: its warm-up loads in-process and starts the resident, which is then
    # waited for (`wait_for_resident`); every timed run must be served by it (load_s 0).
    resident: bool = False


@dataclass
class ProcessRun:
    wall_s: float
    peak_rss_mb: float
    decode_tokens_per_s: float
    time_to_first_token_s: float
    generated_tokens: int
    weight_format: str | None = None


def influence_command() -> list[str]:
    """The `influence` a user runs: the console script beside this interpreter where installed."""
    script = Path(sys.executable).with_name("influence")
    return [str(script)] if script.exists() else [sys.executable, "-c", "from influence_core.cli import run; run()"]


def generate_cases(model: list[str], backend: str, dtypes: list[str], device: str, threads: int, max_tokens: int,
                   compiled: bool, resident: bool = False) -> list[ProcessCase]:
    """``model``: the model arguments (``-m NAME``, ``-p PATH`` or none for the default model).
    Each case loads its model in-process (INFLUENCE_KEEP_ALIVE=0); with ``resident``, each also has
    a case whose runs reuse a resident model, as a user's later runs do by default."""
    cases = []
    for dtype in dtypes:
        flags = ["-B", "compiled=true"] if compiled else []
        command = [*influence_command(), "generate", CLI_PROMPT, *model, "--backend", backend, "--device", device,
                   "--dtype", dtype, "--threads", str(threads), "--max-tokens", str(max_tokens),
                   "--temperature", "0", "--json", *flags]
        label = f"influence generate --backend {backend} --dtype {dtype}{' -B compiled=true' * compiled}"
        cases.append(ProcessCase(label, command, environment={KEEP_ALIVE_ENV: "0"}))
        if resident:
            cases.append(ProcessCase(f"{label}, resident model", command,
                                     environment={KEEP_ALIVE_ENV: str(int(DEFAULT_KEEP_ALIVE_S))}, resident=True))
    return cases


def llama_cpp_case(python: str, gguf: str, threads: int, max_tokens: int) -> ProcessCase:
    return ProcessCase("llama.cpp (llama-cpp-python)", [python, "-c", LLAMA_CPP_PROCESS, gguf, CLI_PROMPT,
                                                        str(max_tokens), str(threads)], reference=True)


def run_process(case: ProcessCase, timeout_s: float = 1800, warm_up: bool = False) -> ProcessRun:
    """One whole process: wall time from spawn to exit, its own peak RSS (wait4's rusage; a
    resident model's case counts the client only), and the figures it printed as JSON on its last line."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        started = time.perf_counter()
        process = subprocess.Popen(case.command, stdout=out, stderr=err, stdin=subprocess.DEVNULL, text=True,
                                   env={**os.environ, **case.environment})
        try:
            _, status, usage = _wait_with_timeout(process, timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
            raise RuntimeError(f"{case.label} ran past {timeout_s:.0f} s") from None
        wall = time.perf_counter() - started
        out.seek(0)
        err.seek(0)
        lines = out.read().strip().splitlines()
        if os.waitstatus_to_exitcode(status) != 0 or not lines:
            tail = (err.read().strip().splitlines() or ["no output"])[-1]
            raise RuntimeError(f"{case.label} failed: {tail}")
    printed = json.loads(lines[-1])
    if case.resident and not warm_up and printed.get("load_s") != 0:
        raise RuntimeError(f"{case.label}: no resident model served it (a model under "
                           f"{MIN_MODEL_BYTES >> 20} MiB is not kept), so it loaded in {printed.get('load_s')} s")
    return ProcessRun(wall_s=wall, peak_rss_mb=usage.ru_maxrss / 1024,  # Linux reports KiB
                      decode_tokens_per_s=printed["decode_tokens_per_s"],
                      time_to_first_token_s=printed["time_to_first_token_s"],
                      generated_tokens=printed["generated_tokens"], weight_format=printed.get("weight_format"))


def wait_for_resident(since: float, timeout_s: float = 900) -> None:
    """Until a resident model started after ``since`` has loaded and done what it prepares while
    idle (the torch runner's compiled step: the steady state later runs meet); none starts for a
    small model."""
    from influence_core.resident import residents, wait_ready

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        started = [state for state in residents() if state["started"] >= since]
        if not started:
            return
        if not started[0].get("loaded"):  # asking it would keep it from the idle time it prepares in
            if not wait_ready(started[0]["key"], max(0.0, deadline - time.monotonic())):
                break
        elif not started[0].get("preparing", True):
            return
        time.sleep(0.5)
    raise RuntimeError(f"the resident model did not load and prepare within {timeout_s:.0f} s")


def _wait_with_timeout(process: subprocess.Popen, timeout_s: float):
    deadline = time.monotonic() + timeout_s
    while True:
        pid, status, usage = os.wait4(process.pid, os.WNOHANG)
        if pid:
            process.returncode = os.waitstatus_to_exitcode(status)
            return pid, status, usage
        if time.monotonic() > deadline:
            raise subprocess.TimeoutExpired(process.args, timeout_s)
        time.sleep(0.02)


def measure_processes(cases: list[ProcessCase], repetitions: int,
                      progress: Callable[[str], None] = lambda _: None) -> list[dict[str, Any]]:
    """One untimed warm-up process per case (conversions, caches and artifacts then exist), then
    ``repetitions`` rounds in which the cases alternate, so a busy machine slows all of them
    alike; medians, and each of ours as ratios to the reference."""
    runs: dict[str, list[ProcessRun]] = {case.label: [] for case in cases}
    errors: dict[str, str] = {}
    for round_number in range(repetitions + 1):
        for case in cases:
            if case.label in errors:
                continue
            progress(f"{'warm-up' if round_number == 0 else f'round {round_number}/{repetitions}'}: {case.label}")
            try:
                started = time.time()
                run = run_process(case, warm_up=round_number == 0)
                if case.resident and round_number == 0:
                    wait_for_resident(started)
            except RuntimeError as error:
                errors[case.label] = str(error)
                continue
            progress(f"  {run.wall_s:.2f} s wall, {run.decode_tokens_per_s:.1f} tok/s decode, TTFT "
                     f"{run.time_to_first_token_s * 1000:.0f} ms, peak RSS {run.peak_rss_mb:.0f} MB, "
                     f"{run.generated_tokens} tokens")
            if round_number:
                runs[case.label].append(run)
    rows = [_process_row(case, runs[case.label], errors.get(case.label)) for case in cases]
    reference = next((row for row in rows if row["reference"] and not row["error"]), None)
    for row in rows:
        if reference is not None and not row["reference"] and not row["error"]:
            row["ratios"] = {
                "wall_vs_llama_cpp": round(row["wall_s"] / reference["wall_s"], 2),
                "decode_vs_llama_cpp": round(row["decode_tokens_per_s"] / reference["decode_tokens_per_s"], 2),
                "ttft_vs_llama_cpp": round(row["ttft_ms"] / reference["ttft_ms"], 2),
                "peak_rss_vs_llama_cpp": round(row["peak_rss_mb"] / reference["peak_rss_mb"], 2),
            }
    return rows


def _process_row(case: ProcessCase, runs: list[ProcessRun], error: str | None) -> dict[str, Any]:
    row: dict[str, Any] = {"case": case.label, "reference": case.reference, "error": error, "ratios": {}}
    if error or not runs:
        return row
    row.update({
        "weight_format": runs[0].weight_format,
        "wall_s": round(median([run.wall_s for run in runs]), 3),
        "decode_tokens_per_s": round(median([run.decode_tokens_per_s for run in runs]), 1),
        "ttft_ms": round(median([run.time_to_first_token_s for run in runs]) * 1000, 1),
        "peak_rss_mb": round(median([run.peak_rss_mb for run in runs]), 1),
        "generated_tokens": [run.generated_tokens for run in runs],
        "runs": {"wall_s": [round(run.wall_s, 3) for run in runs],
                 "decode_tokens_per_s": [round(run.decode_tokens_per_s, 1) for run in runs]},
    })
    return row


if __name__ == "__main__":
    print(json.dumps(worker(json.loads(sys.argv[1]))))
