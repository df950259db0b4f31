"""Batched and continuous-batched generation give each prompt exactly what it gets alone."""

from __future__ import annotations

import json
import subprocess
import sys
import threading

import pytest

import influence_core as influence
from influence_core.batching import BatchEngine, QueueFullError

PROMPTS = ["hello", "the quick brown fox jumps", "Rust is a systems programming language.", "def main():", "🦀"]
CLI = [sys.executable, "-c", "from influence_core.cli import run; run()"]


def test_batched_greedy_equals_each_prompt_alone(tiny_model):
    alone = influence.load(tiny_model, device="cpu")
    expected = [alone.generate(p, max_tokens=12, temperature=0, raw=True) for p in PROMPTS]
    batched = influence.load(tiny_model, device="cpu", max_batch=3)  # fewer slots than prompts: some wait
    results = batched.generate_batch(PROMPTS, max_tokens=12, temperature=0, raw=True)
    assert [r.token_ids for r in results] == [e.token_ids for e in expected]
    assert [r.text for r in results] == [e.text for e in expected]
    assert [r.finish_reason for r in results] == [e.finish_reason for e in expected]


def test_each_sequence_stops_on_its_own(tiny_model):
    alone = influence.load(tiny_model, device="cpu")
    long = alone.generate(PROMPTS[1], max_tokens=16, temperature=0, raw=True)
    stop = long.text[5:8]
    model = influence.load(tiny_model, device="cpu", max_batch=3)
    engine = BatchEngine(model.runner)
    jobs = [
        engine.submit(model.new_generation(PROMPTS[0], max_tokens=2, temperature=0, raw=True)),
        engine.submit(model.new_generation(PROMPTS[1], max_tokens=16, temperature=0, raw=True, stop=[stop])),
        engine.submit(model.new_generation(PROMPTS[1], max_tokens=16, temperature=0, raw=True)),
    ]
    engine.run_until_idle()
    assert jobs[0].result.finish_reason == "length" and len(jobs[0].result.token_ids) == 2
    assert jobs[1].result.finish_reason == "stop" and jobs[1].result.text == long.text[:long.text.index(stop)]
    assert jobs[2].result.token_ids == long.token_ids


def test_seeded_sampling_in_a_batch_matches_alone(tiny_model):
    alone = influence.load(tiny_model, device="cpu")
    expected = [alone.generate(p, max_tokens=10, temperature=1.0, seed=7, raw=True).token_ids for p in PROMPTS[:3]]
    batched = influence.load(tiny_model, device="cpu", max_batch=3)
    assert [r.token_ids for r in batched.generate_batch(PROMPTS[:3], max_tokens=10, temperature=1.0, seed=7,
                                                        raw=True)] == expected


def test_requests_join_and_leave_a_running_batch(tiny_model):
    """A request submitted while others decode joins between steps and still gets its own answer."""
    model = influence.load(tiny_model, device="cpu", max_batch=4)
    alone = influence.load(tiny_model, device="cpu")
    engine = BatchEngine(model.runner)
    first = engine.submit(model.new_generation(PROMPTS[1], max_tokens=20, temperature=0, raw=True))
    engine.step()
    engine.step()
    late = engine.submit(model.new_generation(PROMPTS[2], max_tokens=5, temperature=0, raw=True))
    cancelled = engine.submit(model.new_generation(PROMPTS[3], max_tokens=20, temperature=0, raw=True))
    for _ in range(10):  # prompts come in a chunk per step while the first decodes
        engine.step()
        if engine.queued == 0 and engine.busy_slots == 3:
            break
    assert engine.busy_slots == 3
    engine.cancel(cancelled)
    engine.run_until_idle()
    assert engine.busy_slots == 0
    assert first.result.token_ids == alone.generate(PROMPTS[1], max_tokens=20, temperature=0, raw=True).token_ids
    assert late.result.token_ids == alone.generate(PROMPTS[2], max_tokens=5, temperature=0, raw=True).token_ids
    assert cancelled.result.finish_reason == "cancelled" and cancelled.done.is_set()


def test_engine_thread_streams_pieces_and_bounds_its_queue(tiny_model):
    model = influence.load(tiny_model, device="cpu", max_batch=2)
    engine = BatchEngine(model.runner, max_queue=2)
    pieces: list[str | None] = []
    finished = threading.Event()

    def deliver(piece):
        pieces.append(piece)
        if piece is None:
            finished.set()

    engine.start()
    try:
        job = engine.submit(model.new_generation("hello", max_tokens=8, temperature=0, raw=True), deliver)
        assert finished.wait(30)
        assert "".join(p for p in pieces if p) == job.result.text and pieces[-1] is None
    finally:
        engine.stop()
    engine = BatchEngine(model.runner, max_queue=1)
    engine.submit(model.new_generation("hello", max_tokens=2))
    with pytest.raises(QueueFullError):
        engine.submit(model.new_generation("hello", max_tokens=2))


def test_prompts_file_prints_one_json_result_per_line(tiny_model, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS[:3]) + "\n\n")
    done = subprocess.run([*CLI, "generate", "--prompts-file", str(prompts), "-p", str(tiny_model), "--raw",
                           "--max-tokens", "6", "--temperature", "0"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    lines = [json.loads(line) for line in done.stdout.splitlines()]
    assert [line["prompt"] for line in lines] == PROMPTS[:3]
    alone = influence.load(tiny_model, device="cpu")
    assert lines[1]["token_ids"] == alone.generate(PROMPTS[1], max_tokens=6, temperature=0, raw=True).token_ids


def test_a_long_prompt_is_fed_in_chunks_while_others_decode(tiny_model):
    """Chunked prefill, counted rather than timed: while a generation decodes, a long prompt enters a
    chunk of at most `prefill_chunk` tokens per step, the decoding one gains a token every step, and
    both answers are those of runs alone."""
    model = influence.load(tiny_model, device="cpu", max_batch=4)
    alone = influence.load(tiny_model, device="cpu")
    long_prompt = "Rust is a systems programming language. " * 30
    engine = BatchEngine(model.runner, prefill_chunk=32)
    calls: list[int] = []
    forward = model.runner.forward

    def counting_forward(token_ids, start_pos, all_logits=False, slot=0):
        calls.append(len(token_ids))
        return forward(token_ids, start_pos, all_logits=all_logits, slot=slot)

    model.runner.forward = counting_forward
    decoding = engine.submit(model.new_generation(PROMPTS[1], max_tokens=60, temperature=0, raw=True))
    engine.step()
    engine.step()
    long_job = engine.submit(model.new_generation(long_prompt, max_tokens=3, temperature=0, raw=True))
    prompt_tokens = len(long_job.generation.prompt_ids)
    assert prompt_tokens > 4 * 32
    calls.clear()
    steps = 0
    while not long_job.done.is_set() and steps < 200:
        before = len(decoding.generation.generated)
        engine.step()
        steps += 1
        if not decoding.done.is_set():
            assert len(decoding.generation.generated) == before + 1  # never stalled for the prompt
    computed = prompt_tokens - long_job.generation.reused_prompt_tokens  # a shared prefix comes from the cache
    assert calls and max(calls) <= 32 and sum(calls) == computed
    assert len(calls) >= prompt_tokens // 32
    engine.run_until_idle()
    assert decoding.result.token_ids == alone.generate(PROMPTS[1], max_tokens=60, temperature=0, raw=True).token_ids
    assert long_job.result.token_ids == alone.generate(long_prompt, max_tokens=3, temperature=0, raw=True).token_ids
