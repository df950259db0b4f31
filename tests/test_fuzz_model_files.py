"""Structure-aware fuzzing of model files: every mutated GGUF, safetensors header, config.json and
tokenizer file must load correctly (with finite logits) or be refused with one clean line, within
2 GB and 30 s, and without a warning reaching stderr.

CI runs few examples with a fixed seed; ``make fuzz`` raises INFLUENCE_FUZZ_EXAMPLES for a longer run.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path

import gguf
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from model_file_fuzzing import TIME_BUDGET_S, Worker, write_gguf, write_model_directory

EXAMPLES = int(os.environ.get("INFLUENCE_FUZZ_EXAMPLES", "60"))
# CI's brief run is the same every time; a longer run explores anew (a failure prints its seed).
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize="INFLUENCE_FUZZ_EXAMPLES" not in os.environ,
                database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

INTERESTING = [0, 1, 2, 3, 7, 31, 32, 33, 255, 256, 4095, 65535, 10**6, 10**9, 2**31 - 1, 2**31, 2**32 - 1,
               2**62, 2**63, 2**64 - 1]
FLOATS = [float("nan"), float("inf"), float("-inf"), -1.0, 0.0, 1e-30, 1e30, 0.5]


@pytest.fixture(scope="module")
def worker():
    worker = Worker()
    yield worker
    worker.close()


@pytest.fixture(scope="module")
def originals(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("originals")
    return {"gguf": write_gguf(root / "model.gguf"), "q8_0": write_gguf(root / "q8.gguf", quantization="Q8_0"),
            "directory": write_model_directory(root / "model")}


def assert_clean(worker: Worker, path: Path, mutation: object) -> None:
    result = worker.attempt(path)
    assert result["outcome"] in ("loaded", "refused"), (mutation, result)
    assert result["seconds"] < TIME_BUDGET_S, (mutation, result)


def test_the_originals_load(worker, originals):
    for path in originals.values():
        assert worker.attempt(path)["outcome"] == "loaded", path


# --- GGUF: the numbers in the header, where gguf-py reads them -------------------------------------


def header_slots(path: Path) -> list[tuple[int, int, str]]:
    """(offset, size, kind) of every count, length, type id, scalar value, dimension and tensor
    offset in the GGUF header; kind is "float" for float32 values, else "int"."""
    reader = gguf.GGUFReader(path)
    slots = [(8, 8, "int"), (16, 8, "int")]  # tensor count, metadata count
    for field in list(reader.fields.values())[3:]:
        offsets, position = [], field.offset
        for part in field.parts:
            offsets.append(position)
            position += part.nbytes
        value_type = field.types[0] if field.types else None
        slots += [(offsets[0], 8, "int"), (offsets[2], 4, "int")]  # key length, value type
        if value_type == gguf.GGUFValueType.ARRAY:
            slots += [(offsets[3], 4, "int"), (offsets[4], 8, "int")]  # item type, length
            if len(offsets) > 5:
                slots.append((offsets[5], field.parts[5].nbytes, "int"))  # the first item (or its length)
        elif value_type == gguf.GGUFValueType.STRING:
            slots.append((offsets[3], 8, "int"))
        elif value_type is not None:
            slots.append((offsets[3], field.parts[3].nbytes,
                          "float" if value_type == gguf.GGUFValueType.FLOAT32 else "int"))
    for tensor in reader.tensors:
        field = tensor.field
        position = field.offset
        offsets = []
        for part in field.parts:
            offsets.append(position)
            position += part.nbytes
        slots += [(offsets[0], 8, "int"), (offsets[2], 4, "int"), (offsets[4], 4, "int"), (offsets[5], 8, "int")]
        slots += [(offsets[3] + 8 * i, 8, "int") for i in range(len(tensor.shape))]
    return slots


def overwrite(data: bytearray, offset: int, size: int, kind: str, choice: object) -> None:
    if offset + size > len(data):
        return
    if kind == "float" and size == 4:
        data[offset:offset + 4] = struct.pack("<f", choice)
        return
    data[offset:offset + size] = (int(choice) % (1 << (8 * size))).to_bytes(size, "little")


@st.composite
def gguf_mutations(draw, slots: list[tuple[int, int, str]], length: int):
    mutations = []
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["slot", "slot", "slot", "nudge", "truncate", "bytes"]))
        if kind in ("slot", "nudge"):
            offset, size, value_kind = draw(st.sampled_from(slots))
            if value_kind == "float" and kind == "slot":
                mutations.append(("set", offset, size, "float", draw(st.sampled_from(FLOATS))))
            elif kind == "slot":
                mutations.append(("set", offset, size, "int", draw(st.sampled_from(INTERESTING))))
            else:
                mutations.append(("add", offset, size, "int", draw(st.sampled_from([-64, -32, -1, 1, 16, 32, 4096]))))
        elif kind == "truncate":
            mutations.append(("truncate", draw(st.integers(0, length - 1))))
        else:
            mutations.append(("bytes", draw(st.integers(0, min(length, 8192) - 1)), draw(st.binary(min_size=1, max_size=8))))
    return mutations


def mutate_gguf(original: bytes, mutations: list) -> bytes:
    data = bytearray(original)
    for mutation in mutations:
        if mutation[0] == "set":
            overwrite(data, *mutation[1:])
        elif mutation[0] == "add":
            _, offset, size, _, delta = mutation
            if offset + size <= len(data):
                current = int.from_bytes(data[offset:offset + size], "little")
                overwrite(data, offset, size, "int", current + delta)
        elif mutation[0] == "truncate":
            del data[mutation[1]:]
        else:
            _, offset, replacement = mutation
            data[offset:offset + len(replacement)] = replacement
    return bytes(data)


@pytest.mark.parametrize("original", ["gguf", "q8_0"])
def test_mutated_gguf_headers(worker, originals, tmp_path, original):
    source = originals[original]
    data, slots = source.read_bytes(), header_slots(source)

    @FUZZ
    @given(gguf_mutations(slots, len(data)))
    def case(mutations):
        path = tmp_path / "mutated.gguf"
        path.write_bytes(mutate_gguf(data, mutations))
        assert_clean(worker, path, mutations)

    case()


GGUF_KEYS = ["llama.block_count", "llama.context_length", "llama.embedding_length", "llama.feed_forward_length",
             "llama.attention.head_count", "llama.attention.head_count_kv", "llama.attention.key_length",
             "llama.rope.dimension_count", "llama.attention.layer_norm_rms_epsilon", "llama.rope.freq_base",
             "llama.rope.scaling.type", "llama.rope.scaling.factor", "llama.vocab_size", "llama.expert_count",
             "general.alignment", "split.count", "tokenizer.ggml.model", "tokenizer.ggml.pre",
             "tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.merges", "tokenizer.ggml.scores",
             "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id", "tokenizer.ggml.unknown_token_id",
             "tokenizer.ggml.padding_token_id", "tokenizer.ggml.add_bos_token", "tokenizer.chat_template"]
GGUF_VALUES = st.sampled_from([0, 1, 2, 3, 8, 16, 31, 33, 64, 259, 261, 10**6, 10**9, 2**32 - 1, 2**40, -1, -7,
                               0.0, -1.0, 1e-5, 1e30, float("nan"), float("inf"), True, False, "", "linear",
                               "llama", "gpt2", "yarn", "none", [], [1, 2], ["a", "b"], [0.5], ["h e", "x"]])


@FUZZ
@given(st.dictionaries(st.sampled_from(GGUF_KEYS), GGUF_VALUES, min_size=1, max_size=3))
def test_gguf_metadata_values(worker, tmp_path_factory, metadata):
    path = tmp_path_factory.mktemp("metadata") / "model.gguf"
    try:
        write_gguf(path, metadata=metadata)
    except (ValueError, TypeError):  # a value gguf-py's writer cannot encode (an empty array)
        return
    assert_clean(worker, path, metadata)


# --- safetensors: the JSON header and its length prefix --------------------------------------------


def read_safetensors(path: Path) -> tuple[dict, bytes]:
    data = path.read_bytes()
    length = int.from_bytes(data[:8], "little")
    return json.loads(data[8:8 + length]), data[8 + length:]


SHAPE_CHANGES = ["reverse", "double", "zero", "negative", "huge", "drop", "text"]


@st.composite
def safetensors_mutations(draw, names: list[str]):
    mutations = []
    for _ in range(draw(st.integers(1, 3))):
        name = draw(st.sampled_from(names))
        kind = draw(st.sampled_from(["dtype", "shape", "offsets", "delete", "rename", "prefix", "truncate"]))
        if kind == "dtype":
            value = draw(st.sampled_from(["I32", "U32", "I64", "U8", "BOOL", "F16", "BF16", "F64", "F8_E4M3", "Q4", 5]))
        elif kind == "shape":
            value = draw(st.sampled_from(SHAPE_CHANGES))
        elif kind == "offsets":
            value = (draw(st.sampled_from([-1, 0, 1, 2, 4, -4, 10**12])), draw(st.sampled_from([-4, 0, 1, 4, 10**12])))
        elif kind == "rename":
            value = draw(st.sampled_from(["model.layers.9.self_attn.q_proj.weight", "model.layers.1.mlp.up_proj.weight",
                                          "lm_head.weight", "x"]))
        elif kind == "prefix":
            value = draw(st.sampled_from([0, 1, -1, 2**40, 2**63, 100_000_001]))
        elif kind == "truncate":
            value = draw(st.integers(1, 4096))
        else:
            value = None
        mutations.append((kind, name, value))
    return mutations


def mutate_safetensors(header: dict, body: bytes, mutations: list) -> bytes:
    header = json.loads(json.dumps(header))
    prefix = None
    cut = 0
    for kind, name, value in mutations:
        if name not in header:
            continue
        entry = header[name]
        if kind == "dtype":
            entry["dtype"] = value
        elif kind == "shape":
            shape = entry["shape"]
            if value == "text" or not all(isinstance(d, int) for d in shape):
                entry["shape"] = ["a"]
                continue
            entry["shape"] = {"reverse": shape[::-1], "double": [2 * d for d in shape], "zero": [0] + shape[1:],
                              "negative": [-d for d in shape], "huge": [2**62] * len(shape),
                              "drop": shape[:-1]}[value]
        elif kind == "offsets":
            start, end = entry["data_offsets"]
            entry["data_offsets"] = [start + value[0], end + value[1]]
        elif kind == "delete":
            del header[name]
        elif kind == "rename":
            header[value] = header.pop(name)
        elif kind == "prefix":
            prefix = value
        else:
            cut = value
    encoded = json.dumps(header).encode()
    length = len(encoded) if prefix is None else prefix
    data = (length % (1 << 64)).to_bytes(8, "little") + encoded + body
    return data[:len(data) - cut] if cut else data


def test_mutated_safetensors_headers(worker, originals, tmp_path):
    header, body = read_safetensors(originals["directory"] / "model.safetensors")
    names = sorted(name for name in header if name != "__metadata__")
    directory = tmp_path / "model"
    shutil.copytree(originals["directory"], directory)

    @FUZZ
    @given(safetensors_mutations(names))
    def case(mutations):
        (directory / "model.safetensors").write_bytes(mutate_safetensors(header, body, mutations))
        assert_clean(worker, directory, mutations)

    case()


# --- config.json, generation_config.json and the tokenizer's JSON ----------------------------------

JSON_VALUES = st.sampled_from([
    0, -1, 1, 2, 3, 5, 7, 10**6, 10**9, 2**31, 2**64, 10**30, 0.5, 1.5, 1e-30, 1e30, float("nan"), float("inf"),
    -float("inf"), "abc", "", None, True, False, [], [1, 2], [None], {}, {"content": 5}, {"type": "linear"},
    {"rope_type": "linear", "factor": 0}, {"rope_type": "linear", "factor": "2"},
    {"rope_type": "llama3", "factor": 8.0}, {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 4.0,
                                            "high_freq_factor": 1.0, "original_max_position_embeddings": 64},
    {"rope_type": "yarn", "factor": 2.0}, "</s>", "<s>", "{{ 1 }}", [{"name": "default", "template": 5}],
])
CONFIG_KEYS = ["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
               "num_key_value_heads", "head_dim", "max_position_embeddings", "rms_norm_eps", "rope_theta",
               "rope_scaling", "rope_parameters", "bos_token_id", "eos_token_id", "pad_token_id",
               "tie_word_embeddings", "attention_bias", "mlp_bias", "hidden_act", "model_type", "architectures",
               "torch_dtype"]
TOKENIZER_CONFIG_KEYS = ["eos_token", "bos_token", "chat_template", "added_tokens_decoder", "model_max_length"]
GENERATION_KEYS = ["eos_token_id", "bos_token_id", "temperature", "top_k", "top_p", "do_sample"]
TOKENIZER_PATHS = [("model",), ("model", "type"), ("model", "vocab"), ("model", "merges"), ("pre_tokenizer",),
                   ("decoder",), ("added_tokens",), ("normalizer",), ("post_processor",), ("model", "vocab", "he"),
                   ("model", "unk_token"), ("model", "byte_fallback")]


@st.composite
def json_mutations(draw):
    mutations = []
    for _ in range(draw(st.integers(1, 3))):
        target = draw(st.sampled_from(["config.json", "config.json", "tokenizer_config.json",
                                       "generation_config.json", "tokenizer.json", "truncate"]))
        if target == "truncate":
            mutations.append((target, draw(st.sampled_from(["config.json", "tokenizer.json",
                                                            "tokenizer_config.json"])), draw(st.integers(0, 200))))
            continue
        keys = {"config.json": CONFIG_KEYS, "tokenizer_config.json": TOKENIZER_CONFIG_KEYS,
                "generation_config.json": GENERATION_KEYS, "tokenizer.json": TOKENIZER_PATHS}[target]
        key = draw(st.sampled_from(keys))
        value = draw(st.one_of(JSON_VALUES, st.just("<delete>")))
        mutations.append((target, key, value))
    return mutations


def set_path(data: dict, path: tuple, value: object) -> None:
    for key in path[:-1]:
        if not isinstance(data.get(key), dict):
            return
        data = data[key]
    if value == "<delete>":
        data.pop(path[-1], None)
    else:
        data[path[-1]] = value


def test_mutated_config_and_tokenizer_json(worker, originals, tmp_path):
    directory = tmp_path / "model"

    @FUZZ
    @given(json_mutations())
    def case(mutations):
        shutil.rmtree(directory, ignore_errors=True)
        shutil.copytree(originals["directory"], directory, ignore=shutil.ignore_patterns("*.safetensors"))
        (directory / "model.safetensors").symlink_to(originals["directory"] / "model.safetensors")
        # Truncations last, so that every edit finds JSON to edit.
        for target, key, value in sorted(mutations, key=lambda mutation: mutation[0] == "truncate"):
            path = directory / (key if target == "truncate" else target)
            if target == "truncate":
                path.write_bytes(path.read_bytes()[:value])
                continue
            data = json.loads(path.read_text()) if path.exists() else {}
            set_path(data, key if isinstance(key, tuple) else (key,), value)
            path.write_text(json.dumps(data))
        assert_clean(worker, directory, mutations)

    case()
