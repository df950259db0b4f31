"""Each sampler's exact effect, checked against transformers' processors where it has one."""

from __future__ import annotations

import pytest
import torch

import influence_core as influence
from influence_core import SamplingError, hookimpl
from influence_core.interfaces import Sampler, SamplingContext
from influence_core.plugins import get_registry
from influence_core.sampling import SamplingParams, build_chain


def create(name, **options):
    return get_registry().sampler(name).create(**options)


def context(token_ids=(), seed=0):
    return SamplingContext(torch.tensor(list(token_ids), dtype=torch.long), torch.Generator().manual_seed(seed))


def kept(logits):
    return torch.isfinite(logits).nonzero().flatten().tolist()


@pytest.fixture
def logits():
    return torch.randn(1000, generator=torch.Generator().manual_seed(1)) * 3


@pytest.mark.parametrize("k", [1, 5, 40, 999])
def test_top_k_keeps_exactly_k(logits, k):
    out = create("top_k", k=k)(logits, context())
    assert len(kept(out)) == k
    assert set(kept(out)) == set(torch.topk(logits, k).indices.tolist())
    assert torch.equal(out[kept(out)], logits[kept(out)])


def test_top_k_keeps_exactly_k_among_ties():
    out = create("top_k", k=2)(torch.tensor([1.0, 3.0, 3.0, 3.0, 0.0]), context())
    assert len(kept(out)) == 2


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = torch.tensor([0.05, 0.5, 0.15, 0.3])
    logits = probs.log()
    assert kept(create("top_p", p=0.8)(logits, context())) == [1, 3]  # 0.5 + 0.3 reaches 0.8
    assert kept(create("top_p", p=0.81)(logits, context())) == [1, 2, 3]
    assert kept(create("top_p", p=0.4)(logits, context())) == [1]
    assert kept(create("top_p", p=1.0)(logits, context())) == [0, 1, 2, 3]


def test_min_p_drops_tokens_below_p_times_the_top():
    probs = torch.tensor([0.5, 0.26, 0.24])
    assert kept(create("min_p", p=0.5)(probs.log(), context())) == [0, 1]


@pytest.mark.parametrize("name, options, reference", [
    ("top_k", {"k": 7}, ("TopKLogitsWarper", {"top_k": 7})),
    ("top_p", {"p": 0.9}, ("TopPLogitsWarper", {"top_p": 0.9})),
    ("min_p", {"p": 0.1}, ("MinPLogitsWarper", {"min_p": 0.1})),
    ("temperature", {"temperature": 0.7}, ("TemperatureLogitsWarper", {"temperature": 0.7})),
])
def test_processors_match_transformers(logits, name, options, reference):
    import transformers

    warper = getattr(transformers, reference[0])(**reference[1])
    expected = warper(torch.zeros(1, 1, dtype=torch.long), logits[None].clone())[0]
    assert torch.equal(torch.isfinite(create(name, **options)(logits, context())), torch.isfinite(expected))
    assert torch.allclose(create(name, **options)(logits, context())[torch.isfinite(expected)],
                          expected[torch.isfinite(expected)])


@pytest.mark.parametrize("penalty", [1.3, 0.7])
def test_repetition_penalty_matches_transformers(logits, penalty):
    from transformers import RepetitionPenaltyLogitsProcessor

    seen = [3, 17, 17, 500, 999, 3]
    expected = RepetitionPenaltyLogitsProcessor(penalty)(torch.tensor([seen]), logits[None].clone())[0]
    assert torch.allclose(create("repetition_penalty", penalty=penalty)(logits, context(seen)), expected)


def test_the_chain_applies_processors_in_transformers_order(logits):
    """temperature before top-k/top-p/min-p: top-p on tempered probabilities keeps a different set."""
    from transformers import (LogitsProcessorList, MinPLogitsWarper, RepetitionPenaltyLogitsProcessor,
                              TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper)

    seen = torch.tensor([[1, 2, 3]])
    reference = LogitsProcessorList([RepetitionPenaltyLogitsProcessor(1.2), TemperatureLogitsWarper(2.0),
                                     TopKLogitsWarper(100), TopPLogitsWarper(0.7), MinPLogitsWarper(0.05)])
    expected = reference(seen, logits[None].clone())[0]
    chain = build_chain(SamplingParams(temperature=2.0, top_k=100, top_p=0.7, min_p=0.05, repetition_penalty=1.2,
                                       seed=0), get_registry(), "cpu")
    out = logits.clone()
    for process in chain.processors:
        out = process(out, context([1, 2, 3]))
    assert torch.equal(torch.isfinite(out), torch.isfinite(expected))
    assert torch.allclose(out[torch.isfinite(out)], expected[torch.isfinite(expected)])


def test_temperature_zero_is_argmax(logits):
    chain = build_chain(SamplingParams(temperature=0, top_k=0, top_p=1, min_p=0, repetition_penalty=1),
                        get_registry(), "cpu")
    assert chain(logits, torch.tensor([], dtype=torch.long)) == int(logits.argmax())


def test_seeded_draws_are_reproducible(logits):
    def draws(seed):
        params = SamplingParams(temperature=1.5, top_k=0, top_p=1.0, min_p=0.0, repetition_penalty=1.0, seed=seed)
        chain = build_chain(params, get_registry(), "cpu")
        return [chain(logits, torch.tensor([], dtype=torch.long)) for _ in range(20)]

    assert draws(7) == draws(7)
    assert draws(7) != draws(8)


def test_seeded_generation_is_reproducible(tiny_model):
    model = influence.load(tiny_model, device="cpu")
    first = model.generate("hello", max_tokens=24, temperature=1.0, top_p=0.95, seed=123)
    again = model.generate("hello", max_tokens=24, temperature=1.0, top_p=0.95, seed=123)
    other = model.generate("hello", max_tokens=24, temperature=1.0, top_p=0.95, seed=124)
    assert first.token_ids == again.token_ids and first.seed == 123
    assert first.token_ids != other.token_ids


@pytest.mark.parametrize("params", [
    dict(temperature=-0.1), dict(top_p=0.0), dict(top_p=1.5), dict(top_k=-1), dict(min_p=1.5),
    dict(repetition_penalty=0.0),
])
def test_invalid_parameters_are_clear_errors(tiny_model, params):
    model = influence.load(tiny_model, device="cpu")
    with pytest.raises(SamplingError, match=next(iter(params))):
        model.generate("hello", max_tokens=2, **params)


def test_invalid_sampler_options_are_clear_errors():
    with pytest.raises(SamplingError, match="top_k must be"):
        create("top_k", k="many")
    with pytest.raises(SamplingError, match="unknown sampler 'nope'"):
        get_registry().sampler("nope")


class EveryOther:
    """A third-party picker: the token ``offset`` places after the argmax (mod vocab)."""

    @staticmethod
    @hookimpl
    def register_samplers(register):
        def create(offset=1):
            def pick(logits, context):
                return (int(logits.argmax()) + int(offset)) % logits.shape[-1]
            return pick
        register(Sampler("shifted", "picker", create, "argmax plus an offset"))


def test_a_plugin_sampler_is_selectable_by_name_with_options(tiny_model, plugin):
    plugin(EveryOther, "shifted-sampler")
    model = influence.load(tiny_model, device="cpu")
    greedy = model.generate([1, 5, 9], max_tokens=1, temperature=0)
    shifted = model.generate([1, 5, 9], max_tokens=1, sampler="shifted", sampler_options={"offset": 3})
    assert shifted.token_ids[0] == (greedy.token_ids[0] + 3) % model.config.vocab_size
    with pytest.raises(SamplingError, match="rejected its options"):
        model.generate([1, 5, 9], max_tokens=1, sampler="shifted", sampler_options={"bogus": 1})


class LoudTopK:
    """Replaces the built-in top_k by registering the same name."""

    @staticmethod
    @hookimpl
    def register_samplers(register):
        register(Sampler("top_k", "processor", lambda k=1: (lambda logits, context: logits), "override"))


def test_a_third_party_sampler_overrides_a_builtin_of_the_same_name(plugin):
    plugin(LoudTopK, "override-top-k")
    sampler = get_registry().sampler("top_k")
    assert sampler.description == "override"
    assert get_registry().provided_by(sampler) == "override-top-k"
