"""Faster linear layers for CPU inference, swapped in after the weights are loaded.

Decode is a chain of matrix-vector products, bound by how fast weights stream from memory. On
CPU the default MKL GEMV reaches about a third of the machine's bandwidth (docs/performance.md),
so each format here keeps weights in a layout whose kernel streams them at full speed:

- float32 / bfloat16: oneDNN's prepacked weights (``mkldnn._linear_pointwise``);
- int8: per-output-channel symmetric int8, bfloat16 activations (``_weight_int8pack_mm``);
- int4: groups of 32 with a scale and a zero point each, bfloat16 activations
  (``_weight_int4pack_mm_for_cpu``), the same layout as GGUF's Q4_1; the output head stays int8.

A quantized file runs in its own precision: `WeightFormats` keeps each linear in the format its
tensors are stored in (4-bit GGUF types as int4, wider ones as int8), and the int4 kernel takes the
codes and group scales of GGUF's Q4_0, Q4_1 and Q4_K blocks as stored rather than requantizing the
dequantized floats.

Any architecture gets these by calling `convert_linears` on its modules.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
from collections import Counter
from collections.abc import Callable, Iterator

import numpy as np
import torch
from torch import nn

from influence_core.interfaces import QuantizedTensor, Weights

QUANTIZED_FORMATS = ("int8", "int4")
INT4_GROUP_SIZE = 32
# GGUF block types by the format they run in: the int4 kernel takes the first three as stored (a
# 4-bit code and, per group of 32, a scale and an offset); the other 4-bit-or-less types are
# requantized to int4, and the wider ones to int8 (per-channel int8 cannot hold their group scales).
NATIVE_INT4_KINDS = ("Q4_0", "Q4_1", "Q4_K")
INT4_KINDS = NATIVE_INT4_KINDS + ("Q2_K", "Q3_K")
INT8_KINDS = ("Q5_0", "Q5_1", "Q5_K", "Q6_K", "Q8_0")
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


def _in_row_blocks(rows: int, convert: Callable[[slice], tuple[torch.Tensor, ...]],
                   rows_per_block: int = 4096) -> list[torch.Tensor]:
    """Convert a weight a block of rows at a time (rows are independent), so the temporaries stay
    small even for a 128k-row output head; returns the results concatenated."""
    blocks = []
    for start in range(0, rows, rows_per_block):
        blocks.append(convert(slice(start, start + rows_per_block)))
        if rows > rows_per_block:
            return_freed_memory()
    return [torch.cat(parts) for parts in zip(*blocks)]


def _by_row_blocks(weight: torch.Tensor, quantize) -> list[torch.Tensor]:
    return _in_row_blocks(weight.shape[0], lambda rows: quantize(weight[rows].float()))


def _int8_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # The largest magnitude in one pass, and rounding in place in the one temporary: a quarter
    # less time for the default model's 49k-row output head than abs/amax and fresh tensors.
    scale = (torch.linalg.vector_norm(weight, float("inf"), dim=1) / 127).clamp_(min=1e-10)
    return (weight / scale[:, None]).round_().clamp_(-128, 127).to(torch.int8), scale.to(torch.bfloat16)


def _int4_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    rows, columns = weight.shape
    groups = weight.reshape(rows, columns // INT4_GROUP_SIZE, INT4_GROUP_SIZE)
    low, high = groups.amin(dim=-1, keepdim=True), groups.amax(dim=-1, keepdim=True)
    scale = ((high - low) / 15).clamp(min=1e-10)
    codes = torch.round((groups - low) / scale).clamp(0, 15).to(torch.int32).reshape(rows, columns)
    # The kernel computes (code - 8) * scale + zero, so zero is the group's value at code 8.
    return _int4_pack(codes, scale[..., 0], (low + 8 * scale)[..., 0])


def _int4_pack(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernel's layout for codes 0..15 [rows, columns] and a scale and zero [rows, groups]."""
    return _pack_int4_codes(codes), torch.stack([scale, zero], dim=-1).to(torch.bfloat16)


# Rows the int4 kernel packs together on CPU: per block of 64 rows and per column, 32 bytes, row r
# of the block in the low nibble of byte r and row r + 32 in its high nibble.
INT4_PACK_ROWS = 64


def _pack_int4_codes(codes: torch.Tensor) -> torch.Tensor:
    """Codes 0..15 [rows, columns] packed for `_weight_int4pack_mm_for_cpu`.

    torch's converter takes the codes as int32 (four times their bytes): widening and converting
    them took a third of the time to build the default model's int4 layers, where shifting the
    uint8 codes into place takes a fraction of it. Rows in blocks of 64 are packed here when this
    torch on this CPU lays them out as above (checked once against the converter); anything else
    is left to the converter.
    """
    rows, columns = codes.shape
    if rows % INT4_PACK_ROWS or not _packs_like_torch():
        return torch._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32), 1)
    return _pack_int4_blocks(codes.to(torch.uint8))


def _pack_int4_blocks(codes: torch.Tensor) -> torch.Tensor:
    rows, columns = codes.shape
    blocks = codes.reshape(rows // INT4_PACK_ROWS, 2, INT4_PACK_ROWS // 2, columns)
    return (blocks[:, 0] | (blocks[:, 1] << 4)).transpose(1, 2).reshape(rows, columns // 2)


@functools.cache
def _packs_like_torch() -> bool:
    probe = torch.randint(0, 16, (2 * INT4_PACK_ROWS, 2 * INT4_GROUP_SIZE), dtype=torch.int32,
                          generator=torch.Generator().manual_seed(0))
    expected = torch._convert_weight_to_int4pack_for_cpu(probe, 1)
    return expected.dtype == torch.uint8 and torch.equal(_pack_int4_blocks(probe.to(torch.uint8)), expected)


def _float16(raw: torch.Tensor) -> torch.Tensor:
    """Little-endian float16 values from their two bytes on the last axis."""
    return raw.contiguous().view(torch.float16).float()


def file_int4_groups(tensor: QuantizedTensor, rows: slice = slice(None)) -> tuple[torch.Tensor, ...]:
    """Codes 0..15 [rows, columns] and, per group of 32, the scale and the zero (the value at code
    8) that give back ``rows`` of a Q4_0, Q4_1 or Q4_K tensor exactly as its file defines them."""
    raw = torch.from_numpy(np.require(tensor.blocks[rows], np.uint8, ["C", "W"]))  # a copy of the memory map
    count = raw.shape[0]
    if tensor.kind in ("Q4_0", "Q4_1"):
        # 32 weights a block: a float16 scale d (Q4_1: and an offset m), then 16 bytes of codes,
        # the block's first 16 weights in the low nibbles and its last 16 in the high ones.
        header = 2 if tensor.kind == "Q4_0" else 4
        blocks = raw.view(count, -1, header + 16)
        scale = _float16(blocks[..., :2])[..., 0]
        codes = blocks[..., header:]
        codes = torch.cat([codes & 15, codes >> 4], dim=-1)
        # Q4_0 is d * (code - 8): zero at code 8. Q4_1 is d * code + m.
        zero = torch.zeros_like(scale) if tensor.kind == "Q4_0" else _float16(blocks[..., 2:4])[..., 0] + 8 * scale
    elif tensor.kind == "Q4_K":
        # 256 weights a block: float16 d and dmin, 12 bytes of eight 6-bit scales and mins (one
        # each per 32 weights), then 128 bytes of codes, each 32 bytes holding two groups (low
        # nibbles, then high). A weight is d * scale * code - dmin * min.
        blocks = raw.view(count, -1, 144)
        d, dmin = _float16(blocks[..., 0:2]), _float16(blocks[..., 2:4])
        packed = blocks[..., 4:16].reshape(count, -1, 3, 4)
        low, high, rest = packed[..., 0, :], packed[..., 1, :], packed[..., 2, :]
        scales = torch.cat([low & 63, (rest & 15) | ((low >> 2) & 48)], dim=-1).float()
        mins = torch.cat([high & 63, (rest >> 4) | ((high >> 2) & 48)], dim=-1).float()
        scale = (d * scales).reshape(count, -1)
        zero = 8 * scale - (dmin * mins).reshape(count, -1)
        codes = blocks[..., 16:].reshape(count, -1, 4, 1, 32) >> torch.tensor([0, 4], dtype=torch.uint8)[:, None]
        codes = codes & 15
    else:
        raise ValueError(f"{tensor.kind} blocks do not map onto int4 groups of {INT4_GROUP_SIZE}")
    return codes.reshape(count, -1), scale, zero


def _bias(linear: nn.Linear) -> torch.Tensor | None:
    return None if linear.bias is None else linear.bias.detach().to(torch.bfloat16)


class Int8Linear(nn.Module):
    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        weight, scale = _by_row_blocks(linear.weight.detach(), _int8_rows)
        self.register_buffer("weight", weight)
        self.register_buffer("scale", scale)
        self.register_buffer("bias", _bias(linear))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch._weight_int8pack_mm(x.reshape(-1, x.shape[-1]), self.weight, self.scale)
        y = y.reshape(*x.shape[:-1], -1)
        return y if self.bias is None else y + self.bias


class Int4Linear(nn.Module):
    def __init__(self, packed: torch.Tensor, scales_and_zeros: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.register_buffer("packed_weight", packed)
        # The kernel wants them as [group, row, (scale, zero)].
        self.register_buffer("scales_and_zeros", scales_and_zeros.transpose(0, 1).contiguous())
        self.register_buffer("bias", bias)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "Int4Linear":
        """Requantized from float weights: per group, the codes spanning its minimum to maximum."""
        return cls(*_by_row_blocks(linear.weight.detach(), _int4_rows), _bias(linear))

    @classmethod
    def from_file(cls, tensors: list[QuantizedTensor], linear: nn.Linear) -> "Int4Linear":
        """The file's own codes, scales and offsets, for ``tensors`` stacked by rows (fused q/k/v)."""
        parts = [_in_row_blocks(tensor.shape[0], lambda rows, t=tensor: _int4_pack(*file_int4_groups(t, rows)))
                 for tensor in tensors]
        return cls(*(torch.cat(part) for part in zip(*parts)), _bias(linear))

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
        converted = Int4Linear.from_linear(linear) if Int4Linear.supports(linear) else Int8Linear(linear)
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
    return convert_linear(head, output_head_format(weight_format), device)


def output_head_format(weight_format: str) -> str:
    return "int8" if weight_format == "int4" else weight_format


def convert_linears(module: nn.Module, weight_format: str, device: str) -> None:
    """Replace every nn.Linear below ``module`` (in place)."""
    for name, child in module.named_children():
        if isinstance(child, nn.Linear):
            setattr(module, name, convert_linear(child, weight_format, device))
        else:
            convert_linears(child, weight_format, device)


class WeightFormats:
    """Which format each linear layer of a model runs in, from the requested format and how its
    file stores the layer's tensors, and what the model ran as (`describe`).

    Under int4, tensors the file keeps at more than 4 bits (Q5 to Q8, Q6_K) stay int8, and Q4_0,
    Q4_1 and Q4_K tensors run from their own blocks: `weight` then hands the architecture an
    unallocated stand-in (nothing is dequantized) and `convert` builds the layer from the blocks.
    """

    def __init__(self, weights: Weights, requested: str, device: str) -> None:
        self.requested = requested
        self.device = device
        self._stored = getattr(weights, "quantized", None)  # offered by loaders of quantized files
        self._from_file: dict[tuple[str, ...], list[QuantizedTensor]] = {}
        self._ran: Counter[str] = Counter()
        self._head = requested

    def stored_kind(self, name: str) -> str | None:
        """The quantized type ``name`` is stored in; None for float tensors and float checkpoints."""
        tensor = self._stored(name) if self._stored is not None else None
        return tensor.kind if tensor is not None else None

    def weight(self, names: list[str], take: Callable[[str], torch.Tensor]) -> torch.Tensor:
        """The weight of the linear made of ``names`` stacked by rows: floats from ``take``, or a
        meta-device stand-in where `convert` will build the layer from the file's blocks."""
        tensors = [self._stored(name) for name in names] if self._stored is not None else [None] * len(names)
        kinds = [tensor.kind if tensor is not None else None for tensor in tensors]
        format = self.format_for(kinds)
        if format == "int4" and self.device == "cpu" and all(kind in NATIVE_INT4_KINDS for kind in kinds):
            shape = (sum(tensor.shape[0] for tensor in tensors), tensors[0].shape[1])
            if shape[0] % 16 == 0 and shape[1] % INT4_GROUP_SIZE == 0:  # the kernel's tiling
                self._from_file[tuple(names)] = tensors
                self._ran[f"int4 (from {'/'.join(sorted(set(kinds)))})"] += 1
                return torch.empty(shape, device="meta")
        self._ran[self._label(format, kinds)] += 1
        return torch.cat([take(name) for name in names])

    def format_for(self, kinds: list[str | None]) -> str:
        if self.requested == "int4" and any(kind in INT8_KINDS for kind in kinds):
            return "int8"
        return self.requested

    def convert(self, linear: nn.Linear, names: list[str]) -> nn.Module:
        """The layer as it runs, built from the file's blocks where `weight` chose them."""
        tensors = self._from_file.pop(tuple(names), None)
        if tensors is not None:
            return Int4Linear.from_file(tensors, linear)
        return convert_linear(linear, self.format_for([self.stored_kind(name) for name in names]), self.device)

    def convert_head(self, head: nn.Linear, name: str) -> nn.Module:
        kind = self.stored_kind(name)
        format = output_head_format(self.format_for([kind]))
        self._head = self._label(format, [kind])
        return convert_linear(head, format, self.device)

    def describe(self) -> str:
        """What the weights run as: "int4 (from Q4_1); output head int8 (requantized from Q8_0)"."""
        layers = ", ".join(label if len(self._ran) == 1 else f"{label} x{count}"
                           for label, count in self._ran.most_common())
        return layers if self._head == layers else f"{layers}; output head {self._head}"

    def _label(self, format: str, kinds: list[str | None]) -> str:
        stored = sorted({kind for kind in kinds if kind is not None})
        if not stored:
            return format
        verb = "requantized" if format in QUANTIZED_FORMATS else "dequantized"
        return f"{format} ({verb} from {'/'.join(stored)})"

