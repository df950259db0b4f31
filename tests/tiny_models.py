"""Tiny random Llama models written the way transformers writes real ones, for fast exact tests."""

from __future__ import annotations

import json
from pathlib import Path

TRAINING_TEXT = [
    "hello world, the quick brown fox jumps over the lazy dog.",
    "Rust is a systems programming language. def main(): return 42",
    "Ünïcödé text, emoji 🦀🚀 and 中文字符 with    runs of spaces\n\tand tabs.",
] * 40

CHAT_TEMPLATE = (
    "{% for message in messages %}<s>{{ message['role'] }}: {{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant:{% endif %}"
)


def write_tokenizer(directory: Path, vocab_size: int) -> None:
    """A byte-level BPE tokenizer (like Llama 3's and SmolLM's) with <unk>, <s>, </s> as ids 0-2."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(TRAINING_TEXT, trainer)
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tokenizer.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "chat_template": CHAT_TEMPLATE}))


def make_tiny_llama(directory: Path, *, seed: int = 0, max_shard_size: str | None = None, **overrides) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    settings = dict(
        vocab_size=400, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, rope_theta=10000.0, tie_word_embeddings=False,
        bos_token_id=1, eos_token_id=2, rms_norm_eps=1e-5,
    )
    settings.update(overrides)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**settings))
    # Random init leaves norms at 1 and biases at 0; perturb them so every weight is exercised.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith(".bias"):
                param.add_(torch.randn_like(param) * 0.1)
    directory.mkdir(parents=True, exist_ok=True)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(directory, safe_serialization=True, **kwargs)
    write_tokenizer(directory, settings["vocab_size"])
    return directory


TINY_VARIANTS = {
    # GQA, untied head, Llama 3.1 rope scaling.
    "gqa_llama3_rope": dict(rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                          "high_freq_factor": 4.0, "original_max_position_embeddings": 64}),
    # Multi-head attention, tied embeddings, linear rope scaling.
    "tied_linear_rope": dict(num_key_value_heads=4, tie_word_embeddings=True,
                             rope_scaling={"rope_type": "linear", "factor": 2.0}),
    # Biases everywhere, an explicit head_dim different from hidden/heads, sharded checkpoint.
    "bias_headdim_sharded": dict(attention_bias=True, mlp_bias=True, head_dim=32, num_attention_heads=4,
                                 num_key_value_heads=1, max_shard_size="60KB"),
}
