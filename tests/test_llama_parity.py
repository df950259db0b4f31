"""Our torch Llama against transformers' LlamaForCausalLM on the same weights."""

from __future__ import annotations

import pytest
import torch

import influence_core as influence
from tiny_models import TINY_VARIANTS

PROMPT_IDS = [1, 17, 250, 33, 98, 5, 77, 310, 12, 64, 200, 9]


def reference(path):
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


@pytest.mark.parametrize("variant", sorted(TINY_VARIANTS))
def test_prefill_and_every_decode_step_match_transformers(tiny_models, variant):
    path = tiny_models[variant]
    model = influence.load(path, device="cpu", dtype="float32")
    ref = reference(path)
    with torch.no_grad():
        expected = ref(torch.tensor([PROMPT_IDS])).logits[0]
    assert torch.allclose(model.logits(PROMPT_IDS), expected, atol=1e-4, rtol=0)

    # Prefill a prefix, then feed one token at a time through the KV cache.
    runner = model.runner
    runner.forward(PROMPT_IDS[:4], 0)
    for position in range(4, len(PROMPT_IDS)):
        step = runner.forward([PROMPT_IDS[position]], position)
        assert torch.allclose(step, expected[position], atol=1e-4, rtol=0), position


@pytest.mark.parametrize("variant", sorted(TINY_VARIANTS))
def test_greedy_32_tokens_match_transformers(tiny_models, variant):
    path = tiny_models[variant]
    model = influence.load(path, device="cpu", dtype="float32")
    ours = model.generate(PROMPT_IDS, max_tokens=32, temperature=0)
    with torch.no_grad():
        theirs = reference(path).generate(torch.tensor([PROMPT_IDS]), max_new_tokens=32, do_sample=False,
                                          eos_token_id=None, pad_token_id=0)[0, len(PROMPT_IDS):].tolist()
    # Stop where transformers would have stopped on EOS, had it been asked to.
    expected = theirs[:theirs.index(2) + 1] if 2 in theirs else theirs
    assert ours.token_ids == expected


def test_prompt_continuing_the_cache_matches_a_fresh_run(tiny_model):
    """A second prompt that extends the first reuses the cached prefix and must not change the output."""
    model = influence.load(tiny_model, device="cpu")
    first = model.generate(PROMPT_IDS[:6], max_tokens=5, temperature=0)
    extended = PROMPT_IDS[:6] + first.token_ids + [42, 43]
    reused = model.generate(extended, max_tokens=10, temperature=0)
    assert reused.stats.cached_prompt_tokens > 6
    fresh = influence.load(tiny_model, device="cpu").generate(extended, max_tokens=10, temperature=0)
    assert fresh.stats.cached_prompt_tokens == 0
    assert reused.token_ids == fresh.token_ids


def test_rewinding_to_a_shorter_prompt_recomputes(tiny_model):
    model = influence.load(tiny_model, device="cpu")
    long = model.generate(PROMPT_IDS, max_tokens=8, temperature=0)
    short = model.generate(PROMPT_IDS[:5], max_tokens=8, temperature=0)
    fresh = influence.load(tiny_model, device="cpu").generate(PROMPT_IDS[:5], max_tokens=8, temperature=0)
    assert short.token_ids == fresh.token_ids
    assert long.token_ids  # the first run generated something to be rewound over


def test_bfloat16_runs_close_to_float32(tiny_model):
    f32 = influence.load(tiny_model, device="cpu", dtype="float32").logits(PROMPT_IDS)
    bf16 = influence.load(tiny_model, device="cpu", dtype="bfloat16").logits(PROMPT_IDS)
    assert bf16.dtype == torch.float32  # logits always come back as float32
    assert (bf16 - f32).abs().max() < 0.1


def test_batched_decode_of_independent_sequences_matches_each_alone(tiny_model):
    prompts = [[1, 5, 9, 200], [1, 77, 3], [1, 300, 301, 302, 303, 12]]
    batched = influence.load(tiny_model, device="cpu", max_batch=3).runner
    alone = influence.load(tiny_model, device="cpu").runner
    tokens = []
    for slot, prompt in enumerate(prompts):
        tokens.append(int(batched.forward(prompt, 0, slot=slot).argmax()))
    positions = [len(p) for p in prompts]
    history = [list(p) for p in prompts]
    for _ in range(6):
        logits = batched.decode_batch(tokens, positions)
        for row, prompt in enumerate(history):
            prompt.append(tokens[row])
            expected = alone.forward(prompt, 0)
            assert torch.allclose(logits[row], expected, atol=1e-4), row
        tokens = [int(row.argmax()) for row in logits]
        positions = [p + 1 for p in positions]

    # Moving the last sequence into slot 0 carries its cache along.
    batched.copy_slot(2, 0)
    moved = batched.decode_batch([tokens[2]], [positions[2]])[0]
    history[2].append(tokens[2])
    assert torch.allclose(moved, alone.forward(history[2], 0), atol=1e-4)
