"""A GGUF file: its metadata as a `ModelConfig`, its tensors under Hugging Face names.

Only Llama-architecture files are understood (llama.cpp writes Mistral-style models as "llama" too).
Tensors stay in the memory map until asked for, then are dequantized to float32 and, for q and k,
put back into Hugging Face's row order.
"""

from __future__ import annotations

import dataclasses
import math
import mmap
import struct
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from influence_core.config import ModelConfig
from influence_core.errors import ModelFormatError
from influence_core.interfaces import QuantizedTensor

from . import GGUF_MAGIC

SUPPORTED_ARCHITECTURES = ("llama",)
# The types we test against gguf-py's dequantization; gguf-py reads more, but these are what
# llama.cpp's common quantizations (Q4_0 ... Q8_0, the K-quants) are made of.
SUPPORTED_TENSOR_TYPES = ("F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0",
                          "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")
FLOAT_TENSOR_TYPES = ("F32", "F16", "BF16")

# blk.N.<name> in GGUF is model.layers.N.<name> in Hugging Face's Llama.
LAYER_TENSORS = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
MODEL_TENSORS = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
# llama.cpp's converter bakes Llama 3's rope scaling into this tensor instead of writing metadata.
ROPE_FREQS = "rope_freqs.weight"

_MISSING = object()


# Every metadata array item the header may hold, all arrays together. The largest real
# vocabularies (262k tokens, with scores and types) need under 1M items; twice that is allowed,
# which bounds what a header can make us build (about 100 bytes of Python objects a string item).
MAX_METADATA_ELEMENTS = 1 << 21
# llama.cpp's GGML_MAX_DIMS.
MAX_TENSOR_DIMS = 4
# The smallest encodings in the GGUF header: a key/value (8-byte key length, 4-byte type, 1-byte
# value) and a tensor info (8-byte name length, 4-byte dimension count, 4-byte type, 8-byte offset).
MIN_KV_BYTES = 13
MIN_TENSOR_INFO_BYTES = 24
SUPPORTED_VERSIONS = (2, 3)
STRING, ARRAY, UINT32 = int(gguf.GGUFValueType.STRING), int(gguf.GGUFValueType.ARRAY), int(gguf.GGUFValueType.UINT32)
# The scalar value types by id, as little-endian numpy dtypes.
SCALAR_TYPES = {int(value_type): np.dtype(dtype).newbyteorder("<")
                for value_type, dtype in gguf.GGUFReader.gguf_scalar_to_np.items()}
_U32, _U64 = struct.Struct("<I"), struct.Struct("<Q")


class GGUFLayoutError(ModelFormatError):
    """A count, length, type or offset in the GGUF header that the file cannot hold or contradicts."""


@dataclasses.dataclass(frozen=True)
class GGUFTensor:
    """One tensor's entry in the header; its data stays in the file's memory map."""

    name: str
    tensor_type: gguf.GGMLQuantizationType
    shape: tuple[int, ...]  # ggml's order: the innermost (row) dimension first
    n_bytes: int
    data: np.ndarray  # float32/float16 values for F32/F16; the blocks' bytes, row by row, otherwise


class GGUFHeader:
    """The metadata and tensor table of a GGUF file, read straight from its memory map.

    gguf-py's GGUFReader builds several numpy objects for every metadata value: on the default
    model's 49k-token vocabulary and 49k merges that took 1.2 s of every run. This reads the same
    layout with `struct`, keeps each string as its bytes (decoded when asked for) and each numeric
    array as one numpy view. gguf-py also trusts the header; here every count, length and offset is
    checked against the file before it is used, so a hostile header is refused instead of sizing
    memory or reads by it.
    """

    def __init__(self, path: Path) -> None:
        with path.open("rb") as handle:
            self._map = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
        self._size = len(self._map)
        self._metadata_elements = 0
        self.fields: dict[str, tuple[int, Any]] = {}  # key -> (value type, value as stored)
        version = self._u32(4)
        if version & 0xFFFF == 0 and version:
            raise GGUFLayoutError("it is a big-endian GGUF, which is not supported")
        if version not in SUPPORTED_VERSIONS:
            raise GGUFLayoutError(f"it has GGUF version {version} (supported: {', '.join(map(str, SUPPORTED_VERSIONS))})")
        tensor_count, kv_count = self._u64(8), self._u64(16)
        offset = self._read_fields(24, kv_count)
        offset, entries = self._read_tensor_infos(offset, tensor_count)
        self.alignment = self._alignment()
        self.data_offset = -(-offset // self.alignment) * self.alignment
        self.tensors = self._tensors(entries)

    def _u32(self, offset: int) -> int:
        return _U32.unpack_from(self._map, offset)[0]

    def _u64(self, offset: int) -> int:
        return _U64.unpack_from(self._map, offset)[0]

    def _string(self, offset: int) -> tuple[bytes, int]:
        """A string's bytes and the offset after it."""
        length = self._u64(offset)
        end = offset + 8 + length
        if end > self._size:
            raise GGUFLayoutError(f"the string at byte {offset} claims {length} bytes, past the end of the file")
        return self._map[offset + 8:end], end

    def _read_fields(self, offset: int, count: int) -> int:
        if count * MIN_KV_BYTES > self._size - offset:
            raise GGUFLayoutError(f"the header claims {count} metadata entries, more than the file can hold")
        for _ in range(count):
            raw_key, offset = self._string(offset)
            key = self._name(raw_key, "metadata key", offset)
            if key in self.fields:
                raise GGUFLayoutError(f"the metadata key {key!r} appears twice")
            value_type = self._u32(offset)
            value, offset = self._value(value_type, offset + 4, key)
            self.fields[key] = (value_type, value)
        return offset

    def _value(self, value_type: int, offset: int, key: str) -> tuple[Any, int]:
        """The value of ``value_type`` at ``offset`` (strings as bytes, arrays as (item type, items)),
        and the offset after it."""
        if value_type == STRING:
            return self._string(offset)
        if value_type == ARRAY:
            return self._array(offset)
        dtype = SCALAR_TYPES.get(value_type)
        if dtype is None:
            raise GGUFLayoutError(f"the metadata value {key!r} has the unknown type {value_type}")
        end = offset + dtype.itemsize
        if end > self._size:
            raise GGUFLayoutError(f"the metadata value {key!r} ends past the end of the file")
        return np.frombuffer(self._map, dtype, 1, offset).tolist()[0], end

    def _array(self, offset: int) -> tuple[tuple[int, Any], int]:
        item_type, length = self._u32(offset), self._u64(offset + 4)
        if item_type == ARRAY:
            raise GGUFLayoutError(f"the metadata array at byte {offset} holds arrays, which GGUF models do not use")
        if item_type == STRING:
            smallest = 8  # a string is at least its 8-byte length
        elif item_type in SCALAR_TYPES:
            smallest = SCALAR_TYPES[item_type].itemsize
        else:
            raise GGUFLayoutError(f"the metadata array at byte {offset} has the unknown item type {item_type}")
        remaining = self._size - offset - 12
        if length * smallest > remaining:
            raise GGUFLayoutError(f"the metadata array at byte {offset} claims {length} items, more than the "
                                  f"{remaining} bytes left in the file can hold")
        self._metadata_elements += length
        if self._metadata_elements > MAX_METADATA_ELEMENTS:
            raise GGUFLayoutError(f"the metadata arrays hold over {MAX_METADATA_ELEMENTS} items, more than any "
                                  "model's vocabulary needs")
        offset += 12
        if item_type != STRING:
            dtype = SCALAR_TYPES[item_type]
            return (item_type, np.frombuffer(self._map, dtype, length, offset)), offset + length * dtype.itemsize
        items = []
        data, size, unpack = self._map, self._size, _U64.unpack_from
        for _ in range(length):  # the token list and merges: the one loop that sees every item
            start = offset + 8
            offset = start + unpack(data, offset)[0]
            if offset > size:
                raise GGUFLayoutError(f"the string at byte {start - 8} runs past the end of the file")
            items.append(data[start:offset])
        return (item_type, items), offset

    def _name(self, raw: bytes, what: str, offset: int) -> str:
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise GGUFLayoutError(f"the {what} ending at byte {offset} is not UTF-8") from None

    def _read_tensor_infos(self, offset: int, count: int) -> tuple[int, list[tuple[str, int, list[int], int]]]:
        if count * MIN_TENSOR_INFO_BYTES > self._size - offset:
            raise GGUFLayoutError(f"the header claims {count} tensors, more than the file can hold")
        entries = []
        for _ in range(count):
            start = offset
            raw_name, offset = self._string(offset)
            name = self._name(raw_name, "tensor name", offset)
            dimensions = self._u32(offset)
            if dimensions > MAX_TENSOR_DIMS:
                raise GGUFLayoutError(f"the tensor info at byte {start} has {dimensions} dimensions "
                                      f"(at most {MAX_TENSOR_DIMS})")
            shape = list(struct.unpack_from(f"<{dimensions}Q", self._map, offset + 4))
            offset += 4 + 8 * dimensions
            type_id, tensor_offset = self._u32(offset), self._u64(offset + 4)
            entries.append((name, type_id, shape, tensor_offset))
            offset += 12
        return offset, entries

    def _alignment(self) -> int:
        value_type, alignment = self.fields.get("general.alignment", (UINT32, gguf.GGUF_DEFAULT_ALIGNMENT))
        if value_type != UINT32:
            raise GGUFLayoutError("general.alignment is not a uint32")
        if alignment == 0 or alignment & (alignment - 1):
            raise GGUFLayoutError(f"general.alignment is {alignment}, not a power of two")
        return alignment

    def _tensors(self, entries: list[tuple[str, int, list[int], int]]) -> list[GGUFTensor]:
        """Each tensor of a known type, its size the product of its shape, and the tensors stored one
        after another from the start of the data section, each at the next multiple of
        general.alignment, the last ending inside the file: the layout llama.cpp requires
        ("tensor ... has offset ..., expected ...")."""
        tensors, names = [], set()
        expected_offset = 0
        for name, type_id, shape, offset in entries:
            if name in names:
                raise GGUFLayoutError(f"the tensor {name!r} appears twice")
            names.add(name)
            if type_id not in gguf.GGMLQuantizationType._value2member_map_:
                raise GGUFLayoutError(f"tensor {name!r} has the unknown type id {type_id}")
            tensor_type = gguf.GGMLQuantizationType(type_id)
            if any(d <= 0 for d in shape):
                raise GGUFLayoutError(f"tensor {name!r} has the shape {shape}, with a dimension that is not positive")
            block_size, type_size = gguf.GGML_QUANT_SIZES[tensor_type]
            if not shape or shape[0] % block_size:
                raise GGUFLayoutError(f"tensor {name!r} has rows of {shape[0] if shape else 0} values, not a whole "
                                      f"number of {tensor_type.name} blocks of {block_size}")
            n_bytes = math.prod(shape) // block_size * type_size
            if offset != expected_offset:
                raise GGUFLayoutError(f"tensor {name!r} has offset {offset}, expected {expected_offset}")
            start = self.data_offset + offset
            if start + n_bytes > self._size:
                raise GGUFLayoutError(f"tensor {name!r} ({tensor_type.name}, shape {shape}) ends at byte "
                                      f"{start + n_bytes}, past the end of the {self._size}-byte file (truncated?)")
            tensors.append(GGUFTensor(name, tensor_type, tuple(shape), n_bytes, self._data(tensor_type, shape, start)))
            expected_offset += -(-n_bytes // self.alignment) * self.alignment
        return tensors

    def _data(self, tensor_type: gguf.GGMLQuantizationType, shape: list[int], start: int) -> np.ndarray:
        """A read-only view of the map: values for F32 and F16, the blocks' bytes for the rest."""
        rows = tuple(reversed(shape))
        if tensor_type == gguf.GGMLQuantizationType.F32:
            return np.frombuffer(self._map, "<f4", math.prod(shape), start).reshape(rows)
        if tensor_type == gguf.GGMLQuantizationType.F16:
            return np.frombuffer(self._map, "<f2", math.prod(shape), start).reshape(rows)
        block_size, type_size = gguf.GGML_QUANT_SIZES[tensor_type]
        byte_rows = (*rows[:-1], rows[-1] // block_size * type_size)
        return np.frombuffer(self._map, np.uint8, math.prod(byte_rows), start).reshape(byte_rows)

    def contents(self, key: str) -> Any:
        """A metadata value as Python data (strings decoded, arrays as lists); None if absent.
        Raises UnicodeDecodeError for a string that is not UTF-8."""
        field = self.fields.get(key)
        if field is None:
            return None
        value_type, value = field
        if value_type == STRING:
            return value.decode("utf-8")
        if value_type != ARRAY:
            return value
        item_type, items = value
        return [item.decode("utf-8") for item in items] if item_type == STRING else items.tolist()


class GGUFFile:
    """An opened GGUF file: typed access to its metadata, and its tensors by GGUF name."""

    def __init__(self, path: Path) -> None:
        self.path = path
        with path.open("rb") as handle:
            head = handle.read(64)
        if head.startswith(b"version https://git-lfs"):
            raise ModelFormatError(f"{path} is a Git LFS pointer, not the model itself; fetch it with `git lfs pull`")
        if not head.startswith(GGUF_MAGIC):
            raise ModelFormatError(f"{path} is not a GGUF file: it does not start with the bytes 'GGUF'")
        try:
            self.header = GGUFHeader(path)
        except GGUFLayoutError as error:
            raise ModelFormatError(f"{path} is not a valid GGUF file: {error}") from None
        except (struct.error, ValueError, OSError) as error:  # a value read past the end of a truncated file
            reason = str(error).splitlines()[0] if str(error) else type(error).__name__
            raise ModelFormatError(f"{path} is not a readable GGUF file (truncated or corrupt?): {reason}") from None
        self.tensors = {tensor.name: tensor for tensor in self.header.tensors}

    def value(self, key: str, default: Any = _MISSING) -> Any:
        if key not in self.header.fields:
            if default is _MISSING:
                raise ModelFormatError(f"{self.path} lacks the GGUF metadata key {key!r}")
            return default
        try:
            return self.header.contents(key)
        except UnicodeDecodeError as error:
            raise ModelFormatError(f"{self.path}: GGUF metadata key {key!r} is unreadable: {error}") from None

    def number(self, key: str, default: Any = _MISSING) -> Any:
        return self._typed(key, default, lambda value: isinstance(value, (int, float)) and not isinstance(value, bool),
                           "a number")

    def count(self, key: str, default: Any = _MISSING) -> Any:
        """A size or count: a positive integer."""
        return self._typed(key, default, lambda value: isinstance(value, int) and not isinstance(value, bool)
                           and value > 0, "a positive integer")

    def text(self, key: str, default: Any = _MISSING) -> Any:
        return self._typed(key, default, lambda value: isinstance(value, str), "a string")

    def flag(self, key: str, default: Any = _MISSING) -> Any:
        return self._typed(key, default, lambda value: isinstance(value, bool), "true or false")

    def texts(self, key: str, default: Any = _MISSING) -> Any:
        return self._typed(key, default, lambda value: isinstance(value, list)
                           and all(isinstance(item, str) for item in value), "an array of strings")

    def numbers(self, key: str, default: Any = _MISSING) -> Any:
        return self._typed(key, default, lambda value: isinstance(value, list) and all(
            isinstance(item, (int, float)) and not isinstance(item, bool) for item in value), "an array of numbers")

    def _typed(self, key: str, default: Any, is_valid: Any, description: str) -> Any:
        value = self.value(key, default)
        if value is not default and not is_valid(value):
            shown = repr(value) if len(repr(value)) < 80 else repr(value)[:77] + "..."
            raise ModelFormatError(f"{self.path}: GGUF metadata key {key!r} should be {description}, not {shown}")
        return value

    def details(self) -> dict[str, Any]:
        counts = Counter(tensor.tensor_type.name for tensor in self.tensors.values())
        bytes_by_type: Counter[str] = Counter()
        for tensor in self.tensors.values():
            bytes_by_type[tensor.tensor_type.name] += int(tensor.n_bytes)
        return {
            "quantization": bytes_by_type.most_common(1)[0][0] if bytes_by_type else None,
            "tensor_types": dict(counts),
            "bytes": self.path.stat().st_size,
        }


def read_config(file: GGUFFile) -> ModelConfig:
    """The model's config, built as the config.json transformers would have written for it, and
    checked against the tensors the file holds."""
    architecture = file.text("general.architecture")
    if architecture not in SUPPORTED_ARCHITECTURES:
        raise ModelFormatError(
            f"GGUF architecture {architecture!r} is not supported (supported: {', '.join(SUPPORTED_ARCHITECTURES)})"
        )
    if file.number("split.count", 1) > 1:
        raise ModelFormatError(f"{file.path} is one part of a split GGUF; merge the parts into one file first "
                               "(llama.cpp's llama-gguf-split --merge)")
    if file.number("llama.expert_count", 0):
        raise ModelFormatError("mixture-of-experts Llama GGUFs (llama.expert_count > 0) are not supported")
    check_tensor_names(file)

    num_heads = file.count("llama.attention.head_count")
    rope_dims = file.count("llama.rope.dimension_count", None)
    eos_ids = [file.number(f"tokenizer.ggml.{name}_token_id", None) for name in ("eos", "eot", "eom")]
    data = {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "vocab_size": file.count("llama.vocab_size", None) or len(file.texts("tokenizer.ggml.tokens")),
        "hidden_size": file.count("llama.embedding_length"),
        "intermediate_size": file.count("llama.feed_forward_length"),
        "num_hidden_layers": file.count("llama.block_count"),
        "num_attention_heads": num_heads,
        "num_key_value_heads": file.count("llama.attention.head_count_kv", num_heads),
        # Unset, the config derives it from hidden_size and the heads (and checks that they divide).
        "head_dim": file.count("llama.attention.key_length", None) or rope_dims,
        "rms_norm_eps": file.number("llama.attention.layer_norm_rms_epsilon"),
        "rope_theta": file.number("llama.rope.freq_base", 10000.0),
        "max_position_embeddings": file.count("llama.context_length"),
        "tie_word_embeddings": "output.weight" not in file.tensors,
        "attention_bias": "blk.0.attn_q.bias" in file.tensors,
        "mlp_bias": "blk.0.ffn_up.bias" in file.tensors,
        "hidden_act": "silu",
        "bos_token_id": file.number("tokenizer.ggml.bos_token_id", None),
        # llama.cpp stops at any end-of-generation token: end of text, of turn, of message.
        "eos_token_id": [token_id for token_id in eos_ids if token_id is not None],
        "pad_token_id": file.number("tokenizer.ggml.padding_token_id", None),
    }
    config = ModelConfig.from_dict(data)
    if rope_dims is not None and rope_dims != config.head_dim:
        raise ModelFormatError(f"partial rotary embeddings (rope over {rope_dims} of {config.head_dim} dimensions) "
                               "are not supported")
    value_length = file.count("llama.attention.value_length", None)
    if value_length is not None and value_length != config.head_dim:
        raise ModelFormatError(f"value heads of {value_length} dimensions with key heads of {config.head_dim} "
                               "are not supported")
    # Recovering Llama 3's scaling needs a valid rope base and head size, which the config has now checked.
    scaling = rope_scaling(file, config.rope_theta, config.head_dim)
    if scaling is not None:
        config = dataclasses.replace(config, rope_scaling=scaling)
        config.validate()
    config.check_tensors({hf_name(name): tuple(reversed(tensor.shape))
                          for name, tensor in file.tensors.items() if name != ROPE_FREQS}, str(file.path))
    return config


def rope_scaling(file: GGUFFile, rope_theta: float, head_dim: int) -> dict[str, Any] | None:
    scaling_type = file.text("llama.rope.scaling.type", "none")
    if ROPE_FREQS in file.tensors:
        if scaling_type != "none":
            raise ModelFormatError(f"{file.path} has both rope scaling {scaling_type!r} and {ROPE_FREQS}")
        factors = dequantize(file.tensors[ROPE_FREQS])
        return llama3_rope_scaling(np.asarray(factors, dtype=np.float64).reshape(-1), rope_theta, head_dim)
    if scaling_type == "none":
        return None
    if scaling_type == "linear":
        return {"rope_type": "linear", "factor": file.number("llama.rope.scaling.factor")}
    return {"rope_type": scaling_type}  # ModelConfig refuses it, naming the types it supports


def dequantize(tensor: Any) -> np.ndarray:
    """A tensor as float32, refused if any value is NaN or infinite, which only ever yields garbage
    text. The check is one pass over what dequantization has just written: 0.05 s for the default
    model's tensors, against 2.25 s to dequantize them."""
    with np.errstate(all="ignore"):  # overflow in a corrupt block's scale is reported below, once
        if tensor.tensor_type == gguf.GGMLQuantizationType.Q8_0:
            values = dequantize_q8_0(tensor.data)
        else:
            values = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        finite = np.isfinite(values).all()
    if not finite:
        raise ModelFormatError(f"tensor {tensor.name!r} holds NaN or infinite values (a corrupt file?)")
    return values


def dequantize_q8_0(data: np.ndarray) -> np.ndarray:
    """Q8_0 blocks (a float16 scale d, then 32 int8 codes q; a weight is d * q) as float32, the
    values gguf-py gives. The default model's embedding and head are Q8_0, dequantized on every
    run; gguf-py's generic path, a Python call per group of rows, took four times as long."""
    blocks = data.reshape(-1, 34)
    scales = blocks[:, :2].copy().view(np.float16).astype(np.float32)
    return (blocks[:, 2:].view(np.int8) * scales).reshape(*data.shape[:-1], -1)


def llama3_rope_scaling(factors: np.ndarray, rope_theta: float, head_dim: int) -> dict[str, Any] | None:
    """Recover Llama 3's rope_scaling from the per-frequency divisors llama.cpp stores instead.

    Llama 3 keeps fast frequencies (divisor 1), slows slow ones by ``factor`` and blends in between,
    where 1/divisor = 1/factor + (1 - 1/factor) * smooth and smooth = (original/wavelength - low) /
    (high - low) is linear in 1/wavelength. Scaling original, low and high together changes nothing,
    so low = 1 and a line through the blended band give the rest; the result must reproduce every
    divisor, or the file is refused rather than run with the wrong positions.
    """
    if not (factors > 0).all():
        raise ModelFormatError(f"{ROPE_FREQS} holds divisors that are not positive")
    if np.allclose(factors, 1.0):
        return None
    wavelengths = 2 * math.pi * rope_theta ** (np.arange(0, head_dim, 2) / head_dim)
    if factors.shape != wavelengths.shape:
        raise ModelFormatError(f"{ROPE_FREQS} has {factors.size} values; head_dim {head_dim} needs {wavelengths.size}")
    factor = float(factors.max())
    blended = ~np.isclose(factors, 1.0, rtol=1e-5) & ~np.isclose(factors, factor, rtol=1e-5)
    unrecognised = ModelFormatError(f"{ROPE_FREQS} does not follow Llama 3's rope scaling, the only kind supported")
    if factor <= 1 or blended.sum() < 2:  # Llama 3 divides slow frequencies by factor > 1
        raise unrecognised
    smooth = (1 / factors[blended] - 1 / factor) / (1 - 1 / factor)
    slope, intercept = np.polyfit(1 / wavelengths[blended], smooth, 1)  # smooth = slope/wavelength + intercept
    if slope <= 0 or intercept >= 0:  # with low = 1 < high, intercept = -1/(high - 1)
        raise unrecognised
    high = 1 - 1 / intercept
    scaling = {"rope_type": "llama3", "factor": factor, "low_freq_factor": 1.0, "high_freq_factor": float(high),
               "original_max_position_embeddings": float(slope * (high - 1))}
    if not np.allclose(llama3_divisors(scaling, wavelengths), factors, rtol=1e-4):
        raise unrecognised
    return scaling


def llama3_divisors(scaling: dict[str, Any], wavelengths: np.ndarray) -> np.ndarray:
    """What llama.cpp's converter writes to rope_freqs.weight for a Llama 3 rope_scaling."""
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    original = scaling["original_max_position_embeddings"]
    smooth = (original / wavelengths - low) / (high - low)
    blended = 1 / ((1 - smooth) / factor + smooth)
    return np.where(wavelengths < original / high, 1.0, np.where(wavelengths > original / low, factor, blended))


def hf_name(gguf_name: str) -> str | None:
    """``blk.3.attn_q.weight`` -> ``model.layers.3.self_attn.q_proj.weight``; None if not a Llama tensor."""
    parts = gguf_name.split(".")
    if parts[-1] not in ("weight", "bias"):
        return None
    if len(parts) == 4 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in LAYER_TENSORS:
        return f"model.layers.{parts[1]}.{LAYER_TENSORS[parts[2]]}.{parts[3]}"
    if len(parts) == 2 and parts[0] in MODEL_TENSORS:
        return f"{MODEL_TENSORS[parts[0]]}.{parts[1]}"
    return None


def check_tensor_names(file: GGUFFile) -> None:
    for name, tensor in file.tensors.items():
        if name != ROPE_FREQS and hf_name(name) is None:
            raise ModelFormatError(f"{file.path} has a tensor {name!r} that a Llama model does not have")
        if tensor.tensor_type.name not in SUPPORTED_TENSOR_TYPES:
            raise ModelFormatError(
                f"tensor {name!r} has type {tensor.tensor_type.name}, which is not supported "
                f"(supported: {', '.join(SUPPORTED_TENSOR_TYPES)})"
            )


def unpermute_rows(values: np.ndarray, heads: int) -> np.ndarray:
    """Undo the row order llama.cpp's converter gives q and k.

    llama.cpp's RoPE rotates adjacent pairs of a head's dimensions, Hugging Face's rotates its two
    halves, so the converter interleaves each head's two halves: rows (h, 2, R/h/2) become
    (h, R/h/2, 2). Reading rows as (h, R/h/2, 2) and swapping the middle axes restores them.
    """
    rows = values.shape[0]
    if rows % (2 * heads):
        raise ModelFormatError(f"a q/k tensor has {rows} rows, which does not split into {heads} heads")
    return values.reshape(heads, rows // heads // 2, 2, *values.shape[1:]).swapaxes(1, 2).reshape(values.shape)


class GGUFWeights:
    """Lazy float32 tensors under Hugging Face names, dequantized (and un-permuted) on access."""

    def __init__(self, file: GGUFFile, config: ModelConfig) -> None:
        self.file = file
        self.names = {hf_name(name): name for name in file.tensors if name != ROPE_FREQS}
        # The heads each permuted tensor was interleaved with: q by all heads, k by the KV heads.
        self.heads = {"attn_q": config.num_attention_heads, "attn_k": config.num_key_value_heads}

    def keys(self) -> Iterator[str]:
        return iter(self.names)

    def __contains__(self, name: object) -> bool:
        return name in self.names

    def __getitem__(self, name: str) -> Any:
        import torch

        gguf_name = self.names[name]
        tensor = self.file.tensors[gguf_name]
        values = self._hf_rows(gguf_name, dequantize(tensor))
        # F32 tensors come back as read-only views of the memory map: copy those, never the rest.
        return torch.from_numpy(np.require(values, np.float32, ["C", "W"]))

    def quantized(self, name: str) -> QuantizedTensor | None:
        """A 2-D tensor's blocks as the file stores them (rows in Hugging Face's order); None for
        float tensors and vectors."""
        gguf_name = self.names[name]
        tensor = self.file.tensors[gguf_name]
        if tensor.tensor_type.name in FLOAT_TENSOR_TYPES or len(tensor.shape) != 2:
            return None
        shape = (tensor.shape[1], tensor.shape[0])  # ggml lists the innermost dimension first
        return QuantizedTensor(tensor.tensor_type.name, shape, self._hf_rows(gguf_name, tensor.data))

    def _hf_rows(self, gguf_name: str, values: np.ndarray) -> np.ndarray:
        heads = self.heads.get(gguf_name.split(".")[-2])
        return values if heads is None else unpermute_rows(values, heads)
