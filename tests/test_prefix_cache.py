"""The batch engine's prefix cache and chunked prefill change how much is computed, never the output."""

from __future__ import annotations

import pytest

import influence_core as influence
from influence_core.batching import MIN_PREFILL_CHUNK, BatchEngine

BASE = "hello world, the quick brown fox jumps over the lazy dog."
# Prompts that share prefixes with each other in many ways, and some that share nothing.
PROMPTS = [BASE, BASE + " Rust is", BASE + " Rust is a systems", "Rust is a systems programming language.",
           BASE[:20], "def main(): return 42", BASE + " Rust is a systems programming", "🦀🚀 中文", BASE]


@pytest.fixture(scope="module")
def alone(tiny_model):
    return influence.load(tiny_model, device="cpu")


@pytest.fixture(scope="module")
def batched(tiny_model):
    return influence.load(tiny_model, device="cpu", max_batch=3)


def expected(alone, prompt: str, max_tokens: int) -> list[int]:
    alone.cache.token_ids = []  # a cold run: nothing reused
    return alone.generate(prompt, raw=True, max_tokens=max_tokens, temperature=0).token_ids


@pytest.mark.parametrize("prefill_chunk", [MIN_PREFILL_CHUNK, 512])
def test_waves_of_prompts_sharing_prefixes_give_what_each_gives_alone(alone, batched, prefill_chunk):
    engine = BatchEngine(batched.runner, prefill_chunk=prefill_chunk)
    reused = []
    for wave in range(3):
        # Different lengths, so sequences leave while others decode and another is mid-prefill.
        lengths = [2 + (i * 5 + wave * 3) % 11 for i in range(len(PROMPTS))]
        jobs = [engine.submit(batched.new_generation(p, raw=True, max_tokens=n, temperature=0))
                for p, n in zip(PROMPTS, lengths)]
        engine.run_until_idle()
        for prompt, length, job in zip(PROMPTS, lengths, jobs):
            assert job.error is None
            assert job.result.token_ids == expected(alone, prompt, length), (wave, prompt, length)
        reused += [job.generation.reused_prompt_tokens for job in jobs]
    assert sum(reused) > 0
    assert all(count < len(alone.encode_prompt(p, raw=True)) for count, p in zip(reused, PROMPTS * 3))


def test_a_conversation_reuses_its_earlier_turns(alone, batched):
    engine = BatchEngine(batched.runner)
    messages = [{"role": "user", "content": "hello"}]
    for turn in range(3):
        job = engine.submit(batched.new_generation(messages, max_tokens=6, temperature=0))
        engine.run_until_idle()
        alone.cache.token_ids = []
        assert job.result.text == alone.generate(messages, max_tokens=6, temperature=0).text
        prompt_tokens = len(job.generation.prompt_ids)
        if turn == 0:
            assert job.generation.reused_prompt_tokens == 0
        else:
            # Everything but the reply's last token (never fed back) and the new turn is reused.
            assert job.generation.reused_prompt_tokens >= previous_tokens
        assert job.generation.reused_prompt_tokens < prompt_tokens
        previous_tokens = prompt_tokens
        messages += [{"role": "assistant", "content": job.result.text}, {"role": "user", "content": f"more {turn}"}]


def test_without_the_prefix_cache_nothing_is_reused(batched):
    engine = BatchEngine(batched.runner, prefix_cache=False)
    jobs = [engine.submit(batched.new_generation(BASE, raw=True, max_tokens=3, temperature=0)) for _ in range(4)]
    engine.run_until_idle()
    assert [job.generation.reused_prompt_tokens for job in jobs] == [0] * 4


def test_a_queued_job_cancelled_leaves_the_queue_at_once(batched):
    engine = BatchEngine(batched.runner, max_queue=2)
    first = engine.submit(batched.new_generation(BASE, raw=True, max_tokens=3, temperature=0))
    engine.submit(batched.new_generation(BASE, raw=True, max_tokens=3, temperature=0))
    engine.cancel(first)
    assert first.done.is_set() and engine.queued == 1 and engine.cancelled == 1
    engine.submit(batched.new_generation(BASE, raw=True, max_tokens=3, temperature=0))  # room again
    engine.run_until_idle()
