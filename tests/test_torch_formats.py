"""The torch backend's weight formats: packed float, int8 and int4 weight-only quantization."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import influence_core as influence
from influence_core import BackendError
from influence_torch import linear as linear_module
from influence_torch.linear import Int4Linear, Int8Linear, PackedLinear, convert_linear


@pytest.fixture
def linear():
    torch.manual_seed(0)
    layer = nn.Linear(96, 48, bias=True)
    with torch.no_grad():
        layer.bias.normal_()
    return layer


def test_packed_linear_equals_f_linear(linear):
    x = torch.randn(3, 5, 96)
    assert torch.allclose(PackedLinear(linear)(x), linear(x), atol=1e-5)
    packed_bf16 = PackedLinear(linear.to(torch.bfloat16))
    assert torch.allclose(packed_bf16(x.bfloat16()).float(), linear(x.bfloat16()).float(), atol=0.05)


def test_int8_linear_is_per_channel_symmetric_int8(linear):
    layer = Int8Linear(linear)
    dequantized = layer.weight.float() * layer.scale.float()[:, None]
    assert (dequantized - linear.weight).abs().max() <= linear.weight.abs().max() / 127
    x = torch.randn(4, 96).bfloat16()
    expected = x.float() @ dequantized.t() + linear.bias
    assert torch.allclose(layer(x).float(), expected, rtol=0.02, atol=0.05)


def test_int4_linear_matches_its_groupwise_dequantization(linear):
    layer = Int4Linear.from_linear(linear)
    weight = linear.weight.detach().reshape(48, 3, 32)
    low, high = weight.amin(-1, keepdim=True), weight.amax(-1, keepdim=True)
    scale = (high - low) / 15
    dequantized = (torch.round((weight - low) / scale) * scale + low).reshape(48, 96)
    assert (dequantized - linear.weight).abs().max() <= scale.max() / 2 + 1e-6
    x = torch.randn(4, 96).bfloat16()
    expected = x.float() @ dequantized.t() + linear.bias
    assert torch.allclose(layer(x).float(), expected, rtol=0.02, atol=0.1)


def test_int4_keeps_q4_1_weights_as_they_are():
    # Groups of 32 whose values are d * q + m with q spanning 0..15, as a dequantized Q4_1 GGUF
    # holds them (m near -8d for weights centred on zero): int4 finds the same codes, d and m, and
    # loses only bfloat16 roundings (of its scale, zero and output), far below the one step d that
    # a single wrong code would cost.
    torch.manual_seed(0)
    codes = torch.randint(0, 16, (48, 3, 32)).float()
    codes[..., 0], codes[..., 1] = 0, 15
    d = torch.rand(48, 3, 1) * 0.01 + 0.001
    m = -d * (7 + torch.rand(48, 3, 1))
    linear = nn.Linear(96, 48, bias=False)
    with torch.no_grad():
        linear.weight.copy_((codes * d + m).reshape(48, 96))
    layer = Int4Linear.from_linear(linear)
    dequantized = layer(torch.eye(96).bfloat16()).float().t().reshape(48, 3, 32)
    assert ((dequantized - linear.weight.detach().reshape(48, 3, 32)).abs() < 0.25 * d).all()


@pytest.mark.parametrize("rows", [64, 960, 3072, 16, 48, 80])
def test_int4_codes_are_packed_as_torchs_converter_packs_them(rows):
    codes = torch.randint(0, 16, (rows, 96), dtype=torch.int32, generator=torch.Generator().manual_seed(rows))
    expected = torch._convert_weight_to_int4pack_for_cpu(codes, 1)
    assert torch.equal(linear_module._pack_int4_codes(codes), expected)
    assert torch.equal(linear_module._pack_int4_codes(codes.to(torch.uint8)), expected)


def test_int8_rounding_leaves_the_float_weight_untouched(linear):
    weight = linear.weight.detach().clone()
    codes, scale = linear_module._int8_rows(linear.weight.detach())
    assert torch.equal(linear.weight.detach(), weight)
    expected_scale = (weight.abs().amax(dim=1) / 127).clamp(min=1e-10)
    assert torch.equal(scale, expected_scale.to(torch.bfloat16))
    assert torch.equal(codes, torch.round(weight / expected_scale[:, None]).clamp(-128, 127).to(torch.int8))


def test_int4_keeps_the_output_head_at_int8(tiny_model):
    model = influence.load(tiny_model, dtype="int4").runner.model
    assert isinstance(model.output, Int8Linear)
    assert isinstance(model.layers[0].feed_forward.w13, Int4Linear)


def test_int4_falls_back_to_int8_for_shapes_its_kernel_cannot_pack():
    assert isinstance(convert_linear(nn.Linear(40, 24), "int4", "cpu"), Int8Linear)  # 24 rows: not a multiple of 16


def test_formats_leave_gpu_layers_alone(linear):
    assert convert_linear(linear, "bfloat16", "cuda:0") is linear


@pytest.mark.parametrize("dtype, tolerance", [("bfloat16", 0.15), ("int8", 0.3), ("int4", 1.0)])
def test_reduced_formats_stay_close_to_float32(tiny_model, dtype, tolerance):
    ids = [1, 17, 250, 33, 98, 5, 77, 310]
    reference = influence.load(tiny_model, dtype="float32").logits(ids)
    model = influence.load(tiny_model, dtype=dtype)
    logits = model.logits(ids)
    assert (logits - reference).abs().max() < tolerance
    # The KV-cache path agrees with the full pass in the same format.
    model.runner.forward(ids[:4], 0)
    for position in range(4, len(ids)):
        assert torch.allclose(model.runner.forward([ids[position]], position), logits[position], atol=0.05)


def test_quantized_formats_are_cpu_only():
    from influence_torch.backend import TorchBackend

    with pytest.raises(BackendError, match="CPU only"):
        TorchBackend().resolve_dtype("int4", "cuda:0")
