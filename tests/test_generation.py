"""The backend-agnostic loop: stopping, streaming text, context limits and timings."""

from __future__ import annotations

import pytest

import influence_core as influence
from influence_core import ContextLengthError, InfluenceError, hookimpl
from influence_core.generation import StopStringFilter
from influence_core.interfaces import Sampler
from influence_core.tokenizer import IncrementalDecoder


class Scripted:
    """A picker that emits a fixed token sequence, whatever the logits say."""

    script: list[int] = []

    @staticmethod
    @hookimpl
    def register_samplers(register):
        def create():
            tokens = iter(Scripted.script)
            return lambda logits, context: next(tokens)
        register(Sampler("scripted", "picker", create))


@pytest.fixture
def scripted(plugin):
    plugin(Scripted, "scripted")
    return Scripted


def test_stops_on_eos_and_does_not_print_it(tiny_model, scripted):
    model = influence.load(tiny_model, device="cpu")
    hello = model.tokenizer.encode("hello world", add_special_tokens=False)
    scripted.script = hello + [2, 5, 5]
    result = model.generate("x", max_tokens=20, sampler="scripted")
    assert result.finish_reason == "eos"
    assert result.token_ids == hello + [2]
    assert result.text == "hello world"


def test_stops_at_max_tokens(tiny_model):
    result = influence.load(tiny_model, device="cpu").generate([1, 4, 5], max_tokens=7, temperature=0)
    assert result.finish_reason in ("length", "eos")
    assert len(result.token_ids) <= 7
    assert result.stats.generated_tokens == len(result.token_ids)


def test_stop_string_ends_the_text_before_it_even_across_tokens(tiny_model, scripted):
    model = influence.load(tiny_model, device="cpu")
    scripted.script = model.tokenizer.encode("the quick brown fox jumps", add_special_tokens=False)
    pieces = []
    stream = model.stream("x", max_tokens=50, sampler="scripted", stop=["rown f"])
    for piece in stream:
        pieces.append(piece)
    assert "".join(pieces) == stream.result.text == "the quick b"
    assert stream.result.finish_reason == "stop"


def test_stop_string_filter_holds_back_only_possible_starts():
    f = StopStringFilter(["STOP"])
    assert f.push("abc ST") == ("abc ", False)
    assert f.push("ART x") == ("START x", False)
    assert f.push(" ST") == (" ", False)
    assert f.push("OP tail") == ("", True)


def test_streaming_never_splits_a_character(tiny_model):
    model = influence.load(tiny_model, device="cpu")
    text = "Ünïcödé 🦀🚀 中文字符 and emoji 🦀"
    ids = model.tokenizer.encode(text, add_special_tokens=False)
    decoder = IncrementalDecoder(model.tokenizer)
    pieces = [decoder.push(token) for token in ids]
    assert "".join(pieces) + decoder.flush() == text
    assert not any("\ufffd" in piece for piece in pieces)
    assert any(piece == "" for piece in pieces)  # some tokens were half a character and were held back


def test_prompt_longer_than_the_context_is_a_clear_error(tiny_model):
    model = influence.load(tiny_model, device="cpu")
    with pytest.raises(ContextLengthError, match="the prompt has 300 tokens but the context holds 256"):
        model.generate([5] * 300, max_tokens=4)


def test_generation_stops_at_the_end_of_the_context(tiny_model, scripted):
    model = influence.load(tiny_model, device="cpu", context_length=20)
    scripted.script = [7] * 100
    result = model.generate([5] * 16, max_tokens=50, sampler="scripted")
    assert result.finish_reason == "context"
    assert len(result.token_ids) == 5  # positions 16..19 fed back, plus the one picked from the last


def test_empty_prompt_is_a_clear_error(tiny_model):
    with pytest.raises(InfluenceError, match="empty"):
        influence.load(tiny_model, device="cpu").generate([], max_tokens=3)


def test_chat_template_is_applied_unless_raw(tiny_model):
    model = influence.load(tiny_model, device="cpu")
    templated = model.encode_prompt("hi", system="be brief")
    expected = model.tokenizer.encode("<s>system: be brief\n<s>user: hi\n<s>assistant:", add_special_tokens=False)
    assert templated == expected
    assert model.encode_prompt("hi", raw=True) == model.tokenizer.encode("hi")


def test_stats_count_tokens_and_time(tiny_model):
    result = influence.load(tiny_model, device="cpu").generate([1, 2, 3, 4], max_tokens=6, temperature=0)
    stats = result.stats
    assert stats.prompt_tokens == 4 and stats.generated_tokens == len(result.token_ids)
    assert stats.time_to_first_token_s > 0 and stats.prefill_tokens_per_s > 0
    if stats.generated_tokens > 1:
        assert stats.decode_tokens_per_s > 0
