"""The torch backend on a CUDA device. Skipped where torch sees no GPU; run on the device machine."""

from __future__ import annotations

import pytest
import torch

import influence_core as influence
from influence_core import BackendError

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

PROMPT_IDS = [1, 17, 250, 33, 98, 5, 77, 310, 12, 64, 200, 9]


def test_auto_picks_the_gpu_and_bfloat16(tiny_model):
    model = influence.load(tiny_model)
    assert model.device == "cuda:0" and model.dtype == "bfloat16"


def test_float32_on_cuda_matches_transformers_and_the_cpu(tiny_model):
    from transformers import LlamaForCausalLM

    reference = LlamaForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    with torch.no_grad():
        expected = reference(torch.tensor([PROMPT_IDS])).logits[0]
    model = influence.load(tiny_model, device="cuda", dtype="float32")
    logits = model.logits(PROMPT_IDS)
    assert logits.device.type == "cuda"
    assert torch.allclose(logits.cpu(), expected, atol=1e-4, rtol=0)
    runner = model.runner
    runner.forward(PROMPT_IDS[:4], 0)
    for position in range(4, len(PROMPT_IDS)):
        assert torch.allclose(runner.forward([PROMPT_IDS[position]], position).cpu(), expected[position], atol=1e-4)
    cpu = influence.load(tiny_model, device="cpu", dtype="float32")
    assert (model.generate(PROMPT_IDS, max_tokens=32, temperature=0).token_ids
            == cpu.generate(PROMPT_IDS, max_tokens=32, temperature=0).token_ids)


def test_bfloat16_on_cuda_is_close_and_samples_on_the_device(tiny_model):
    f32 = influence.load(tiny_model, device="cpu", dtype="float32").logits(PROMPT_IDS)
    model = influence.load(tiny_model, device="cuda", dtype="bfloat16")
    assert (model.logits(PROMPT_IDS).cpu() - f32).abs().max() < 0.15
    first = model.generate("hello", max_tokens=16, temperature=0.8, top_p=0.9, seed=3)
    again = model.generate("hello", max_tokens=16, temperature=0.8, top_p=0.9, seed=3)
    assert first.token_ids == again.token_ids


def test_batched_decode_on_cuda_matches_single_sequences(tiny_model):
    prompts = ["hello", "the quick brown fox", "Rust is"]
    alone = influence.load(tiny_model, device="cuda", dtype="float32")
    batched = influence.load(tiny_model, device="cuda", dtype="float32", max_batch=3)
    expected = [alone.generate(p, raw=True, max_tokens=12, temperature=0).token_ids for p in prompts]
    assert [r.token_ids for r in batched.generate_batch(prompts, raw=True, max_tokens=12, temperature=0)] == expected


def test_an_absent_gpu_index_is_a_clear_error(tiny_model):
    missing = f"cuda:{torch.cuda.device_count()}"
    with pytest.raises(BackendError, match="not available"):
        influence.load(tiny_model, device=missing)


def test_cuda_graph_decode_matches_eager_across_cache_growth(tmp_path):
    from tiny_models import make_tiny_llama

    path = make_tiny_llama(tmp_path / "model", max_position_embeddings=1024)
    graphed = influence.load(path, device="cuda", dtype="float32", max_batch=2).runner
    assert graphed.graph_step is not None
    eager = influence.load(path, device="cuda", dtype="float32", max_batch=2).runner
    eager.graph_step = None
    for runner in (graphed, eager):
        runner.forward(PROMPT_IDS, 0)
        runner.forward(PROMPT_IDS[:3], 0, slot=1)
    # Past 256 positions the cache grows, and the graphs are recorded again for the new one.
    for position in range(len(PROMPT_IDS), 300):
        token = [position % 400]
        assert torch.allclose(graphed.forward(token, position), eager.forward(token, position), atol=1e-4), position
    batch = ([5, 6], [300, 3])
    assert torch.allclose(graphed.decode_batch(*batch), eager.decode_batch(*batch), atol=1e-4)
