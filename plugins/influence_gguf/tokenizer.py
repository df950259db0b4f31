"""A GGUF file's tokenizer (the tokenizer.ggml.* metadata) rebuilt as a `tokenizers.Tokenizer`.

Two kinds exist for Llama models. "gpt2" is byte-level BPE with its merges stored, split into
words first by a pre-tokenizer that llama.cpp picks by name (tokenizer.ggml.pre). "llama" is
SentencePiece BPE: no merges are stored, they follow from the token scores, and bytes missing from
the vocabulary fall back to <0xNN> tokens. transformers.integrations.ggml converts the same
metadata; the tests hold us to its output.
"""

from __future__ import annotations

from typing import Any

from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, processors
from tokenizers import Tokenizer as HFTokenizer

from influence_core.config import ModelConfig
from influence_core.errors import ModelFormatError
from influence_core.tokenizer import Tokenizer

from .reader import GGUFFile

# llama.cpp's token types (tokenizer.ggml.token_type).
UNKNOWN, CONTROL, USER_DEFINED = 2, 3, 4

# Llama 3's split, as its tokenizer.json writes it (llama.cpp spells out the case-insensitive group).
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
SUPPORTED_PRE_TOKENIZERS = ("default", "gpt2", "llama-bpe", "smollm")


def read_tokenizer(file: GGUFFile, config: ModelConfig) -> Tokenizer:
    kind = file.text("tokenizer.ggml.model")
    tokens = file.texts("tokenizer.ggml.tokens")
    if not 0 < len(tokens) <= config.vocab_size:  # fewer is a padded embedding; more, ids it has no row for
        raise ModelFormatError(f"{file.path} has {len(tokens)} tokens (tokenizer.ggml.tokens) for an embedding of "
                               f"{config.vocab_size} rows")
    unknown_id = file.number("tokenizer.ggml.unknown_token_id", None)
    special_ids = [config.bos_token_id, config.pad_token_id, *config.eos_token_ids, unknown_id]
    if any(token_id is not None and (not isinstance(token_id, int) or not 0 <= token_id < len(tokens))
           for token_id in special_ids):
        raise ModelFormatError(f"{file.path} names a special token id outside its {len(tokens)}-token vocabulary")
    if kind not in ("gpt2", "llama"):
        raise ModelFormatError(f"GGUF tokenizer model {kind!r} is not supported (supported: gpt2, llama)")
    try:
        backend = byte_level_bpe(file, tokens) if kind == "gpt2" else sentencepiece_bpe(file, tokens, unknown_id)
    except ModelFormatError:
        raise
    except Exception as error:  # the tokenizers library refuses an inconsistent vocabulary with a plain Exception
        raise ModelFormatError(f"{file.path}: its tokenizer metadata does not make a tokenizer: {error}") from None
    token_types = file.numbers("tokenizer.ggml.token_type", [])
    if token_types and len(token_types) != len(tokens):
        raise ModelFormatError(f"{file.path} has {len(token_types)} token types for {len(tokens)} tokens")
    add_special_tokens(backend, tokens, token_types)
    # SentencePiece models add BOS unless told otherwise; byte-level ones say so when they do.
    add_bos = file.flag("tokenizer.ggml.add_bos_token", kind == "llama")
    add_eos = file.flag("tokenizer.ggml.add_eos_token", False)
    backend.post_processor = add_bos_eos(tokens, config.bos_token_id if add_bos else None,
                                         config.eos_token_ids[0] if add_eos and config.eos_token_ids else None)
    return Tokenizer(backend, bos_token_id=config.bos_token_id, eos_token_ids=config.eos_token_ids,
                     pad_token_id=config.pad_token_id, chat_template=file.text("tokenizer.chat_template", None))


def byte_level_bpe(file: GGUFFile, tokens: list[str]) -> HFTokenizer:
    pre = file.text("tokenizer.ggml.pre", "default")
    merges = [split_merge(merge) for merge in file.texts("tokenizer.ggml.merges")]
    vocab = {token: token_id for token_id, token in enumerate(tokens)}
    # Llama 3 takes a word that is itself a token as it is, before any merge (so does llama.cpp).
    backend = HFTokenizer(models.BPE(vocab, merges, ignore_merges=pre == "llama-bpe"))
    backend.pre_tokenizer = byte_level_pre_tokenizer(pre)
    backend.decoder = decoders.ByteLevel()
    return backend


def byte_level_pre_tokenizer(pre: str) -> Any:
    gpt2_words = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in ("default", "gpt2"):
        # llama.cpp's "default" adds punctuation and digit splits of its own; GPT-2's split is what
        # the tokenizer.json these files come from (and transformers) use.
        return gpt2_words
    if pre == "smollm":
        # Each digit on its own, then GPT-2's split: SmolLM's tokenizer.json, and llama.cpp's "\p{N}" pass.
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), gpt2_words])
    if pre == "llama-bpe":
        return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
                                        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    raise ModelFormatError(f"GGUF pre-tokenizer {pre!r} (tokenizer.ggml.pre) is not supported "
                           f"(supported: {', '.join(SUPPORTED_PRE_TOKENIZERS)})")


def split_merge(merge: str) -> tuple[str, str]:
    # As llama.cpp reads them: split at the first space after the first character.
    space = merge.find(" ", 1)
    if space < 0:
        raise ModelFormatError(f"GGUF tokenizer merge {merge!r} is not two tokens separated by a space")
    return merge[:space], merge[space + 1:]


def sentencepiece_bpe(file: GGUFFile, tokens: list[str], unknown_id: int | None) -> HFTokenizer:
    scores = file.numbers("tokenizer.ggml.scores")
    if len(scores) != len(tokens):
        raise ModelFormatError(f"{file.path} has {len(scores)} token scores for {len(tokens)} tokens")
    vocab = {token: token_id for token_id, token in enumerate(tokens)}
    backend = HFTokenizer(models.BPE(vocab, merges_from_scores(tokens, scores),
                                     unk_token=tokens[unknown_id] if unknown_id is not None else None,
                                     fuse_unk=True, byte_fallback=True))
    # SentencePiece writes spaces as "▁" and, unless told not to, starts the text with one.
    add_space_prefix = file.flag("tokenizer.ggml.add_space_prefix", True)
    prefix = [normalizers.Prepend("▁")] if add_space_prefix else []
    backend.normalizer = normalizers.Sequence([*prefix, normalizers.Replace(" ", "▁")])
    strip = [decoders.Strip(" ", 1, 0)] if add_space_prefix else []
    backend.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Fuse(), decoders.Replace("▁", " "),
                                         *strip])
    return backend


def merges_from_scores(tokens: list[str], scores: list[float]) -> list[tuple[str, str]]:
    """SentencePiece joins the adjacent pair whose joined piece scores best. As BPE merges: every
    split of a token into two tokens, ordered by the joined token's score (then by the halves')."""
    score_of = {token: score for token, score in zip(tokens, scores)}
    ranked: list[tuple[float, tuple[str, str]]] = []
    for token, score in zip(tokens, scores):
        splits = [(token[:i], token[i:]) for i in range(1, len(token))
                  if token[:i] in score_of and token[i:] in score_of]
        splits.sort(key=lambda pair: (score_of[pair[0]], score_of[pair[1]]), reverse=True)
        ranked += [(score, pair) for pair in splits]
    ranked.sort(key=lambda item: item[0], reverse=True)  # stable: ties keep token order
    return [pair for _, pair in ranked]


def add_special_tokens(backend: HFTokenizer, tokens: list[str], token_types: list[int]) -> None:
    """Control tokens (chat markup such as <|im_start|>) must encode as one id and are skipped when
    decoding; user-defined ones also encode as one id but are text, shown when decoding (as llama.cpp does)."""
    special = [token for token, kind in zip(tokens, token_types) if kind in (CONTROL, UNKNOWN)]
    user_defined = [token for token, kind in zip(tokens, token_types) if kind == USER_DEFINED]
    backend.add_special_tokens([AddedToken(token, special=True, normalized=False) for token in special])
    backend.add_tokens([AddedToken(token, special=False, normalized=False) for token in user_defined])


def add_bos_eos(tokens: list[str], bos_id: int | None, eos_id: int | None) -> Any:
    bos = [tokens[bos_id]] if bos_id is not None else []
    eos = [tokens[eos_id]] if eos_id is not None else []
    marks = [(tokens[token_id], token_id) for token_id in (bos_id, eos_id) if token_id is not None]
    return processors.TemplateProcessing(single=[*bos, "$A", *eos], special_tokens=marks)
