"""Faster linear layers for CPU inference, swapped in after the weights are loaded.

Decode is a chain of matrix-vector products, bound by how fast weights stream from memory. On
CPU the default MKL GEMV reaches about a third of the machine's bandwidth (docs/performance.md),
so each format here keeps weights in a layout whose kernel streams them at full speed:

- float32 / bfloat16: oneDNN's prepacked weights (``mkldnn._linear_pointwise``);
- int8: per-output-channel symmetric int8, bfloat16 activations (``_weight_int8pack_mm``);
- int4: groups of 32 with a scale and a zero point each, bfloat16 activations
  (``_weight_int4pack_mm_for_cpu``), the same layout as GGUF's Q4_1; the output head stays int8.

Any architecture gets these by calling `convert_linears` on its modules.
"""

from __future__ import annotations

import contextlib
import ctypes
from collections.abc import Iterator

import torch
from torch import nn

QUANTIZED_FORMATS = ("int8", "int4")
INT4_GROUP_SIZE = 32
_pack_float_weights = True


@contextlib.contextmanager
def float_weights_left_for_inductor() -> Iterator[None]:
    """Build with plain float nn.Linear layers: a model that torch.compile will run gets its float
    weights packed by inductor (with max-autotune, into kernels faster still), and inductor cannot
    compile oneDNN's prepacked ones."""
    global _pack_float_weights
    _pack_float_weights = False
    try:
        yield
    finally:
        _pack_float_weights = True


def activation_dtype(weight_format: str) -> torch.dtype:
    """The dtype activations (and norms, embeddings) use for a weight format."""
    return torch.bfloat16 if weight_format in QUANTIZED_FORMATS else getattr(torch, weight_format)


class PackedLinear(nn.Module):
    """A linear layer whose weight oneDNN has reordered once for fast CPU products."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.out_features = linear.out_features
        self.register_buffer("packed_weight", torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), 1))
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed_weight, self.bias, "none", [], "")


def return_freed_memory() -> None:
    """Give the heap's free pages back to the system. glibc keeps freed temporaries resident, and
    the blocks each conversion keeps pin them in place, so without this loading a model leaves
    (and peaks at) a hundred MB more than its weights."""
    with contextlib.suppress(OSError, AttributeError):  # not glibc: its allocator is not ours to tune
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _by_row_blocks(weight: torch.Tensor, quantize, rows_per_block: int = 4096) -> list[torch.Tensor]:
    """Quantize a weight a block of rows at a time (rows are independent), so the float32
    temporaries stay small even for a 128k-row output head; returns the results concatenated."""
    blocks = []
    for start in range(0, weight.shape[0], rows_per_block):
        blocks.append(quantize(weight[start:start + rows_per_block].float()))
        return_freed_memory()
    return [torch.cat(parts) for parts in zip(*blocks)]


def _int8_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    scale = (weight.abs().amax(dim=1) / 127).clamp(min=1e-10)
    return torch.round(weight / scale[:, None]).clamp(-128, 127).to(torch.int8), scale.to(torch.bfloat16)


def _int4_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    rows, columns = weight.shape
    groups = weight.reshape(rows, columns // INT4_GROUP_SIZE, INT4_GROUP_SIZE)
    low, high = groups.amin(dim=-1, keepdim=True), groups.amax(dim=-1, keepdim=True)
    scale = ((high - low) / 15).clamp(min=1e-10)
    codes = torch.round((groups - low) / scale).clamp(0, 15).to(torch.int32).reshape(rows, columns)
    # The kernel computes (code - 8) * scale + zero, so zero is the group's value at code 8.
    zero = low + 8 * scale
    return torch._convert_weight_to_int4pack_for_cpu(codes, 1), torch.cat([scale, zero], dim=-1).to(torch.bfloat16)


class Int8Linear(nn.Module):
    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        weight, scale = _by_row_blocks(linear.weight.detach(), _int8_rows)
        self.register_buffer("weight", weight)
        self.register_buffer("scale", scale)
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().to(torch.bfloat16))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch._weight_int8pack_mm(x.reshape(-1, x.shape[-1]), self.weight, self.scale)
        y = y.reshape(*x.shape[:-1], -1)
        return y if self.bias is None else y + self.bias


class Int4Linear(nn.Module):
    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        packed, scales_and_zeros = _by_row_blocks(linear.weight.detach(), _int4_rows)
        self.register_buffer("packed_weight", packed)
        # The kernel wants them as [group, row, (scale, zero)].
        self.register_buffer("scales_and_zeros", scales_and_zeros.transpose(0, 1).contiguous())
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().to(torch.bfloat16))

    @staticmethod
    def supports(linear: nn.Linear) -> bool:
        return linear.out_features % 16 == 0 and linear.in_features % INT4_GROUP_SIZE == 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch._weight_int4pack_mm_for_cpu(x.reshape(-1, x.shape[-1]), self.packed_weight, INT4_GROUP_SIZE,
                                              self.scales_and_zeros)
        y = y.reshape(*x.shape[:-1], -1)
        return y if self.bias is None else y + self.bias


def convert_linear(linear: nn.Linear, weight_format: str, device: str) -> nn.Module:
    """The fastest layer for this format on this device; unchanged where nothing beats F.linear."""
    if device != "cpu":
        return linear
    if weight_format == "int8":
        converted = Int8Linear(linear)
    elif weight_format == "int4":
        converted = Int4Linear(linear) if Int4Linear.supports(linear) else Int8Linear(linear)
    elif weight_format in ("float32", "bfloat16") and _pack_float_weights and torch.backends.mkldnn.is_available():
        converted = PackedLinear(linear)
    else:
        return linear
    return_freed_memory()
    return converted


def convert_output_head(head: nn.Linear, weight_format: str, device: str) -> nn.Module:
    """The output head as `convert_linear` would make it, except that int4 keeps it at int8. Its
    rounding errors land straight on the logits the next token is picked from (llama.cpp's 4-bit
    mixes keep it at 6 or 8 bits too; the default model's GGUF stores it as Q8_0)."""
    return convert_linear(head, "int8" if weight_format == "int4" else weight_format, device)


def convert_linears(module: nn.Module, weight_format: str, device: str) -> None:
    """Replace every nn.Linear below ``module`` (in place)."""
    for name, child in module.named_children():
        if isinstance(child, nn.Linear):
            setattr(module, name, convert_linear(child, weight_format, device))
        else:
            convert_linears(child, weight_format, device)

