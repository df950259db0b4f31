"""Tensor parallelism on the CPU: two gloo ranks give what one process gives, and fail cleanly."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch

import influence_core as influence
from influence_core import BackendError
from tiny_models import make_tiny_llama

CLI = [sys.executable, "-c", "from influence_core.cli import run; run()"]
PROMPT_IDS = [1, 17, 250, 33, 98, 5, 77, 310, 12, 64, 200, 9]
BATCH_PROMPTS = ["hello", "the quick brown fox", "Rust is"]

# One rank of a torchrun-style run: the same calls on every rank; rank 0 saves what it got.
RANK_SCRIPT = f"""
import os, sys, torch
import influence_core as influence

results = {{}}
for path in sys.argv[2:]:
    model = influence.load(path, device="cpu", max_batch=3, backend_options={{"tensor_parallel": 2}})
    results[path] = dict(
        logits=model.logits({PROMPT_IDS}),
        greedy=model.generate({PROMPT_IDS}, max_tokens=24, temperature=0).token_ids,
        sampled=model.generate("hello", raw=True, max_tokens=16, temperature=0.9, top_p=0.95, seed=7).token_ids,
        batch=[r.token_ids for r in model.generate_batch({BATCH_PROMPTS}, raw=True, max_tokens=12, temperature=0)],
    )
if os.environ["RANK"] == "0":
    torch.save(results, sys.argv[1])
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_ranks(command: list[str], world_size: int = 2, **popen) -> list[subprocess.Popen]:
    """Start ``command`` once per rank with the environment torchrun gives its workers."""
    port = free_port()
    ranks = []
    for rank in range(world_size):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world_size),
               "LOCAL_WORLD_SIZE": str(world_size), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
               "OMP_NUM_THREADS": "1"}
        ranks.append(subprocess.Popen(command, env=env, **popen))
    return ranks


def finish(processes: list[subprocess.Popen], timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    try:
        for process in processes:
            process.wait(max(0.1, deadline - time.monotonic()))
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()


@pytest.fixture(scope="module")
def biased_gqa_model(tmp_path_factory) -> Path:
    # Biases on every projection (the row-parallel ones must be added once), GQA, explicit head_dim.
    return make_tiny_llama(tmp_path_factory.mktemp("tp") / "biased", attention_bias=True, mlp_bias=True,
                           head_dim=32, num_key_value_heads=2, tie_word_embeddings=True)


@pytest.fixture(scope="module")
def long_context_model(tmp_path_factory) -> Path:
    # Room for a generation long enough to kill a rank in the middle of it.
    return make_tiny_llama(tmp_path_factory.mktemp("tp") / "long", max_position_embeddings=8192)


def test_two_ranks_give_the_logits_and_tokens_of_one_process(tiny_model, biased_gqa_model, tmp_path):
    saved = tmp_path / "rank0.pt"
    ranks = start_ranks([sys.executable, "-c", RANK_SCRIPT, str(saved), str(tiny_model), str(biased_gqa_model)],
                        stderr=subprocess.PIPE, text=True)
    finish(ranks)
    assert [r.returncode for r in ranks] == [0, 0], ranks[0].stderr.read() + ranks[1].stderr.read()
    results = torch.load(saved)
    for path in (tiny_model, biased_gqa_model):
        one = influence.load(path, device="cpu", max_batch=3)
        split = results[str(path)]
        assert (split["logits"] - one.logits(PROMPT_IDS)).abs().max() < 1e-5
        assert split["greedy"] == one.generate(PROMPT_IDS, max_tokens=24, temperature=0).token_ids
        assert split["sampled"] == one.generate("hello", raw=True, max_tokens=16, temperature=0.9, top_p=0.95,
                                                seed=7).token_ids
        assert split["batch"] == [r.token_ids for r in one.generate_batch(BATCH_PROMPTS, raw=True, max_tokens=12,
                                                                          temperature=0)]


def test_the_launcher_starts_the_ranks_and_only_rank_0_prints(tiny_model):
    expected = influence.load(tiny_model, device="cpu").generate("hello world", raw=True, max_tokens=16,
                                                                 temperature=0)
    done = subprocess.run([*CLI, "tensor-parallel", "2", "generate", "hello world", "-p", str(tiny_model), "--raw",
                           "--device", "cpu", "--temperature", "0", "--max-tokens", "16", "--no-stream", "--stats"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout == expected.text + "\n"
    assert [line.startswith("prompt ") for line in done.stderr.splitlines()].count(True) == 1, done.stderr
    # Sampling with no --seed: the ranks agree on one, or rank 1 would fail on the first step.
    sampled = subprocess.run([*CLI, "tensor-parallel", "2", "generate", "hello", "-p", str(tiny_model), "--raw",
                              "--device", "cpu", "--temperature", "1.0", "--max-tokens", "16", "--json"],
                             capture_output=True, text=True, timeout=120)
    assert sampled.returncode == 0, sampled.stderr
    assert len(sampled.stdout.splitlines()) == 1


def test_a_rank_that_dies_stops_the_others_with_a_clear_error(long_context_model):
    launcher = subprocess.Popen([*CLI, "tensor-parallel", "2", "generate", "hello", "-p", str(long_context_model),
                                 "--raw", "--device", "cpu", "--temperature", "0", "--max-tokens", "8000"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert os.read(launcher.stdout.fileno(), 1), "the ranks never started generating"
        rank_1 = next(child for child in psutil.Process(launcher.pid).children()
                      if child.environ().get("RANK") == "1")
        rank_1.send_signal(signal.SIGKILL)
        killed_at = time.monotonic()
        launcher.wait(30)
        assert time.monotonic() - killed_at < 15
    finally:
        finish([launcher])
    assert launcher.returncode == 1
    assert "error: tensor-parallel rank 1 was killed by SIGKILL; stopped the other ranks" in launcher.stderr.read()
    assert not psutil.Process().children(recursive=True), "a rank outlived the launcher"


def test_stopping_the_launcher_stops_its_ranks(long_context_model):
    launcher = subprocess.Popen([*CLI, "tensor-parallel", "2", "generate", "hello", "-p", str(long_context_model),
                                 "--raw", "--device", "cpu", "--temperature", "0", "--max-tokens", "8000"],
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        assert os.read(launcher.stdout.fileno(), 1), "the ranks never started generating"
        ranks = psutil.Process(launcher.pid).children()
        launcher.terminate()
        launcher.wait(30)
        psutil.wait_procs(ranks, timeout=10)
    finally:
        finish([launcher])
    assert launcher.returncode == 128 + signal.SIGTERM
    assert len(ranks) == 2 and not any(rank.is_running() for rank in ranks)


def test_under_torchrun_a_dead_rank_is_a_clear_error_on_the_others(long_context_model):
    # Nobody watches these ranks, as under a launcher that does not stop the rest: rank 0 must see for
    # itself that its peer is gone.
    ranks = start_ranks([*CLI, "generate", "hello", "-p", str(long_context_model), "--raw", "--device", "cpu",
                         "-B", "tensor_parallel=2", "--temperature", "0", "--max-tokens", "8000"],
                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert os.read(ranks[0].stdout.fileno(), 1), "the ranks never started generating"
        ranks[1].kill()
        ranks[0].wait(30)
    finally:
        finish(ranks)
    assert ranks[0].returncode == 1
    error = ranks[0].stderr.read()
    assert "error: tensor-parallel rank 0: a collective failed, most likely because another rank exited" in error
    assert len(error.splitlines()) == 1


def test_heads_that_do_not_divide_are_one_clear_error(tiny_models):
    done = subprocess.run([*CLI, "tensor-parallel", "2", "generate", "hi", "-p", str(tiny_models["bias_headdim_sharded"]),
                           "--device", "cpu"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert done.stderr == ("error: tensor_parallel 2 cannot split this model: its key-value heads (1) do not "
                           "divide by 2\n")


@pytest.mark.parametrize("arguments, message", [
    (["generate", "-", "-p", "MODEL"], "reads no prompt from stdin"),
    (["chat", "-p", "MODEL"], "it runs generate only"),
    ([], "give the command to split after N"),
    (["generate", "hi", "-p", "MODEL", "-B", "tensor_parallel=3"], "give the number of ranks once"),
    (["generate", "hi", "-p", "MODEL", "--backend", "onnx"], "the torch backend's, not --backend onnx's"),
])
def test_the_launcher_refuses_what_the_ranks_cannot_run(tiny_model, arguments, message):
    arguments = [str(tiny_model) if argument == "MODEL" else argument for argument in arguments]
    done = subprocess.run([*CLI, "tensor-parallel", "2", *arguments], capture_output=True, text=True, timeout=60)
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr.startswith("error: ") and message in done.stderr and len(done.stderr.splitlines()) == 1


def test_tensor_parallel_needs_one_process_per_rank(tiny_model):
    with pytest.raises(BackendError, match="influence tensor-parallel 2 COMMAND .*torchrun --nproc-per-node 2"):
        influence.load(tiny_model, device="cpu", backend_options={"tensor_parallel": 2})


def test_tensor_parallel_is_not_compiled(tiny_model):
    with pytest.raises(BackendError, match="tensor_parallel and compiled do not go together"):
        influence.load(tiny_model, device="cpu", backend_options={"tensor_parallel": 2, "compiled": True})


def test_the_cost_benchmark_runs_on_two_ranks(tiny_model):
    script = Path(__file__).parent.parent / "benchmarks" / "tensor_parallel_costs.py"
    ranks = start_ranks([sys.executable, str(script), "--model-path", str(tiny_model), "--steps", "4"],
                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    finish(ranks)
    assert [r.returncode for r in ranks] == [0, 0], ranks[0].stderr.read()
    costs = json.loads(ranks[0].stdout.read())
    assert costs["world_size"] == 2 and costs["all_reduces_per_step"] == 4 and costs["step_ms"] > 0
    assert ranks[1].stdout.read() == ""


# The NCCL path with the one GPU a device machine has: a single rank, so the all-reduces are trivial,
# but process-group set-up, device placement and every collective call run as they do with several.
ONE_NCCL_RANK_SCRIPT = f"""
import sys, torch
from influence_core.api import open_source
from influence_core.plugins import get_registry
from influence_torch.tensor_parallel import load_tensor_parallel

source = open_source(sys.argv[2])
runner = load_tensor_parallel(source, get_registry().architecture_for(source.config, "torch"), "cuda", "float32",
                              256, 1, world_size=1)
assert runner.device == "cuda:0" and torch.distributed.get_backend() == "nccl"
runner.random_seed()
torch.save(runner.forward({PROMPT_IDS}, 0, all_logits=True).cpu(), sys.argv[1])
runner.close()
"""


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_one_nccl_rank_on_cuda_gives_the_logits_of_one_process(tiny_model, tmp_path):
    saved = tmp_path / "logits.pt"
    ranks = start_ranks([sys.executable, "-c", ONE_NCCL_RANK_SCRIPT, str(saved), str(tiny_model)], world_size=1,
                        stderr=subprocess.PIPE, text=True)
    finish(ranks)
    assert ranks[0].returncode == 0, ranks[0].stderr.read()
    expected = influence.load(tiny_model, device="cuda", dtype="float32").logits(PROMPT_IDS).cpu()
    assert (torch.load(saved) - expected).abs().max() < 1e-5
