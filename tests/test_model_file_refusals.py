"""Each malformed model file that once ran silently wrong, hung, ate memory or failed with an
"unexpected" error (issue 12) is now refused with one clear line, before anything is sized by it."""

from __future__ import annotations

import json
import math
import resource
import shutil
import struct
import subprocess
import time
import warnings
from pathlib import Path

import gguf
import numpy as np
import pytest
from cli_helpers import CLI, assert_one_error_line, invoke
from model_file_fuzzing import CONFIG, MEMORY_BUDGET, Worker, write_gguf, write_model_directory

import influence_core
from influence_core.api import open_source
from influence_core.errors import ModelFormatError


def refused(path: Path, message: str) -> str:
    """The model at ``path`` is refused with ``message`` in one line, and quickly."""
    started = time.monotonic()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a warning would reach the user's stderr
        with pytest.raises(ModelFormatError, match=message) as refusal:
            influence_core.load(path, device="cpu", dtype="float32")
    assert "\n" not in str(refusal.value)
    assert time.monotonic() - started < 10
    return str(refusal.value)


def patch(path: Path, offset: int, data: bytes) -> Path:
    content = bytearray(path.read_bytes())
    content[offset:offset + len(data)] = data
    path.write_bytes(bytes(content))
    return path


def part_offsets(field) -> list[int]:
    offsets, position = [], field.offset
    for part in field.parts:
        offsets.append(position)
        position += part.nbytes
    return offsets


def gguf_field(path: Path, key: str):
    return gguf.GGUFReader(path).fields[key]


def gguf_tensor(path: Path, name: str):
    return next(tensor for tensor in gguf.GGUFReader(path).tensors if tensor.name == name)


@pytest.fixture
def model_gguf(tmp_path) -> Path:
    return write_gguf(tmp_path / "model.gguf")


def model_directory(tmp_path: Path, **changes) -> Path:
    """The tiny Hugging Face directory, its config.json changed (the weights stay those of CONFIG)."""
    directory = write_model_directory(tmp_path / "model")
    (directory / "config.json").write_text(json.dumps({**CONFIG, **changes}))
    return directory


def test_the_tiny_files_load(model_gguf, tmp_path):
    for path in (model_gguf, model_directory(tmp_path)):
        model = influence_core.load(path, device="cpu", dtype="float32")
        assert model.config.num_hidden_layers == 2


# --- Silent wrong output ------------------------------------------------------------------------


def test_a_gguf_whose_block_count_undercounts_its_layers(tmp_path):
    path = write_gguf(tmp_path / "model.gguf", metadata={"llama.block_count": 1})
    refused(path, "the config says 1 layers, but the weights hold 2")


@pytest.mark.parametrize("value", [-1e-5, math.nan, math.inf, 0.0])
def test_rms_norm_eps_must_be_positive_and_finite(tmp_path, value):
    path = write_gguf(tmp_path / "model.gguf", metadata={"llama.attention.layer_norm_rms_epsilon": value})
    refused(path, "rms_norm_eps")
    refused(model_directory(tmp_path, rms_norm_eps=value), "rms_norm_eps")


@pytest.mark.parametrize("value", [-10000.0, math.nan, math.inf, 0.0])
def test_rope_base_must_be_positive_and_finite(tmp_path, value):
    path = write_gguf(tmp_path / "model.gguf", metadata={"llama.rope.freq_base": value})
    refused(path, "rope_theta")
    refused(model_directory(tmp_path, rope_theta=value), "rope_theta")


def test_linear_rope_scaling_with_factor_zero(tmp_path):
    path = write_gguf(tmp_path / "model.gguf", metadata={"llama.rope.scaling.type": "linear",
                                                         "llama.rope.scaling.factor": 0.0})
    refused(path, "rope_scaling factor should be at least 1, not 0.0")
    refused(model_directory(tmp_path, rope_scaling={"rope_type": "linear", "factor": 0}), "at least 1")


@pytest.mark.parametrize("dtype", ["I32", "U32"])
def test_safetensors_declaring_integers_over_float_weights(tmp_path, dtype):
    directory = model_directory(tmp_path)
    weights = directory / "model.safetensors"
    data = weights.read_bytes()
    length = int.from_bytes(data[:8], "little")
    header = data[8:8 + length].replace(b'"F32"', f'"{dtype}"'.encode(), 1)
    weights.write_bytes(data[:8] + header + data[8 + length:])
    refused(directory, f"is stored as {dtype}; weights must be floating point")


def test_a_tensor_type_id_gguf_does_not_know(model_gguf):
    tensor = gguf_tensor(model_gguf, "output_norm.weight")
    patch(model_gguf, part_offsets(tensor.field)[4], struct.pack("<I", 99))
    refused(model_gguf, "'output_norm.weight' has the unknown type id 99")


def test_a_wrong_but_known_tensor_type_changes_the_layout(model_gguf):
    tensor = gguf_tensor(model_gguf, "token_embd.weight")
    patch(model_gguf, part_offsets(tensor.field)[4], struct.pack("<I", gguf.GGMLQuantizationType.F16))
    refused(model_gguf, r"has offset \d+, expected \d+")


def test_a_tensor_overlapping_another(model_gguf):
    second = gguf.GGUFReader(model_gguf).tensors[1]
    patch(model_gguf, part_offsets(second.field)[5], struct.pack("<Q", 0))
    refused(model_gguf, rf"tensor '{second.name}' has offset 0, expected \d+")


def test_a_misaligned_tensor(model_gguf):
    second = gguf.GGUFReader(model_gguf).tensors[1]
    patch(model_gguf, part_offsets(second.field)[5], struct.pack("<Q", int(second.field.parts[5][0]) + 4))
    refused(model_gguf, rf"tensor '{second.name}' has offset \d+, expected \d+")


def test_a_tensor_past_the_end_of_the_file(model_gguf):
    model_gguf.write_bytes(model_gguf.read_bytes()[:-64])
    refused(model_gguf, "past the end of the")


# --- Hangs and memory bombs ---------------------------------------------------------------------


def array_length_bomb(path: Path) -> Path:
    tokens = gguf_field(path, "tokenizer.ggml.tokens")
    return patch(path, part_offsets(tokens)[4], struct.pack("<Q", 2**62 - 1))


def test_an_array_count_near_2_to_the_62_is_refused_within_the_memory_budget(model_gguf):
    worker = Worker()  # RLIMIT_AS: its size after imports plus 2 GB
    try:
        result = worker.attempt(array_length_bomb(model_gguf))
    finally:
        worker.close()
    assert result["outcome"] == "refused" and "claims 4611686018427387903 items" in result["message"], result
    assert result["seconds"] < 5, result


def test_the_array_count_bomb_through_the_cli(model_gguf):
    def limit_memory():
        limit = (1 << 30) + MEMORY_BUDGET  # torch's own mappings (about 0.7 GB) plus the budget
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    done = subprocess.run([*CLI, "generate", "hi", "--model-path", str(array_length_bomb(model_gguf))],
                          capture_output=True, text=True, timeout=30, preexec_fn=limit_memory)
    assert_one_error_line(done.returncode, done.stderr, "more than the")


@pytest.mark.parametrize("layers", [10**6, 10**9])
def test_huge_layer_counts_are_refused_before_anything_is_built(tmp_path, layers):
    refused(write_gguf(tmp_path / "model.gguf", metadata={"llama.block_count": layers}), "num_hidden_layers")
    refused(model_directory(tmp_path, num_hidden_layers=layers), f"num_hidden_layers is {layers}")


def test_an_absurd_context_length_is_refused(tmp_path):
    refused(write_gguf(tmp_path / "model.gguf", metadata={"llama.context_length": 10**8}),
            "max_position_embeddings is 100000000, beyond")
    refused(model_directory(tmp_path, max_position_embeddings=10**8), "max_position_embeddings")


def test_a_header_claiming_more_tensors_or_entries_than_the_file_holds(model_gguf):
    original = model_gguf.read_bytes()
    refused(patch(model_gguf, 8, struct.pack("<Q", 2**62)), "claims 4611686018427387904 tensors")
    model_gguf.write_bytes(original)
    refused(patch(model_gguf, 16, struct.pack("<Q", 2**40)), "claims 1099511627776 metadata entries")


# --- Errors that were not one clean line --------------------------------------------------------


def test_linear_rope_scaling_without_a_factor(tmp_path):
    refused(model_directory(tmp_path, rope_scaling={"type": "linear"}), "rope_scaling factor should be a finite number")


@pytest.mark.parametrize("value", [0, -2, "2", 2.5, None, True])
def test_num_hidden_layers_not_a_positive_integer(tmp_path, value):
    refused(model_directory(tmp_path, num_hidden_layers=value),
            f"num_hidden_layers should be a positive integer, not {value!r}")


def test_a_transposed_embedding(tmp_path):
    from safetensors.numpy import load_file, save_file

    directory = model_directory(tmp_path)
    weights = load_file(directory / "model.safetensors")
    weights["model.embed_tokens.weight"] = weights["model.embed_tokens.weight"].T.copy()
    save_file(weights, directory / "model.safetensors")
    refused(directory, r"'model.embed_tokens.weight' has shape \(32, 260\), but the config implies \(260, 32\) "
                       r"\(transposed\?\)")


@pytest.mark.parametrize("setting, message", [
    ({"eos_token": 5}, "eos_token should be the token's text, not 5"),
    ({"bos_token": {"content": ["<s>"]}}, "bos_token should be the token's text"),
    ({"chat_template": 7}, "chat_template should be a string"),
    ({"chat_template": [{"name": "default"}]}, "chat_template should list objects"),
])
def test_malformed_tokenizer_config(tmp_path, setting, message):
    directory = model_directory(tmp_path)
    path = directory / "tokenizer_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **setting}))
    refused(directory, message)


@pytest.mark.parametrize("content, message", [(b"[1, 2]", "does not hold a JSON object"),
                                              (b"\xff\xfe", "is not valid JSON"),
                                              (b"[" * 100000, "nests its JSON too deeply")])
def test_unreadable_json_files(tmp_path, content, message):
    for name in ("config.json", "tokenizer_config.json"):
        directory = model_directory(tmp_path)
        (directory / name).write_bytes(content)
        refused(directory, message)
        shutil.rmtree(directory)


def test_a_malformed_tokenizer_json(tmp_path):
    directory = model_directory(tmp_path)
    (directory / "tokenizer.json").write_text(json.dumps({"model": {"type": "BPE", "vocab": {"a": "x"}}}))
    refused(directory, "tokenizer.json could not be read")


@pytest.mark.parametrize("change, message", [
    ({"eos_token_id": 260}, "eos_token_id 260 is outside the vocabulary of 260 tokens"),
    ({"bos_token_id": -1}, "bos_token_id -1 is outside"),
    ({"eos_token_id": "2"}, "eos_token_id should be an integer token id, not '2'"),
    ({"bos_token_id": 1.0}, "bos_token_id should be an integer"),
    ({"hidden_size": 30}, r"hidden_size \(30\) is not a multiple of num_attention_heads \(4\)"),
    ({"num_key_value_heads": 3}, "not a multiple of num_key_value_heads"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 4.0, "high_freq_factor": 1.0,
                       "original_max_position_embeddings": 64}}, "low_freq_factor < high_freq_factor"),
    ({"rope_scaling": "linear"}, "rope_scaling should be an object"),
    ({"tie_word_embeddings": "yes"}, "tie_word_embeddings should be true or false"),
])
def test_inconsistent_configs(tmp_path, change, message):
    refused(model_directory(tmp_path, **change), message)


def test_garbage_weights_are_refused_without_a_numpy_warning(tmp_path):
    """A Q8_0 block whose scale is infinite dequantizes to inf and NaN; numpy's RuntimeWarning about
    it must not reach stderr, and the model must not run."""
    path = write_gguf(tmp_path / "model.gguf", quantization="Q8_0")
    tensor = gguf_tensor(path, "blk.0.attn_q.weight")
    patch(path, tensor.data_offset, np.float16(np.inf).tobytes())  # the first block's scale
    refused(path, "'blk.0.attn_q.weight' holds NaN or infinite values")


def test_a_refusal_through_the_cli_is_one_line(tmp_path, capsys):
    path = write_gguf(tmp_path / "model.gguf", metadata={"llama.block_count": 1})
    code, _, err = invoke(capsys, "generate", "hi", "--model-path", str(path))
    assert_one_error_line(code, err, "the config says 1 layers, but the weights hold 2")


def test_open_source_refuses_as_load_does(tmp_path):
    with pytest.raises(ModelFormatError, match="num_hidden_layers"):
        open_source(model_directory(tmp_path, num_hidden_layers=0))


@pytest.mark.parametrize("weight_map, message", [
    ({"lm_head.weight": "../elsewhere.safetensors"}, "not a .safetensors file in the model's directory"),
    ({"lm_head.weight": "model.safetensors", "model.extra.weight": "model.safetensors"},
     "puts 'model.extra.weight' in model.safetensors, which does not hold it"),
    ([1, 2], "weight_map should map tensor names to file names"),
])
def test_a_safetensors_index_that_disagrees_with_its_shards(tmp_path, weight_map, message):
    directory = model_directory(tmp_path)
    (directory / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    refused(directory, message)


def test_a_tokenizer_with_ids_beyond_the_embedding(tmp_path):
    directory = model_directory(tmp_path)
    path = directory / "tokenizer.json"
    tokenizer = json.loads(path.read_text())
    tokenizer["model"]["vocab"]["he"] = 1000000
    path.write_text(json.dumps(tokenizer))
    refused(directory, "has the token id 1000000, beyond the 260 rows of the embedding")


def test_value_heads_of_another_size_than_key_heads(tmp_path):
    path = write_gguf(tmp_path / "model.gguf", metadata={"llama.attention.value_length": 16})
    refused(path, "value heads of 16 dimensions with key heads of 8 are not supported")
