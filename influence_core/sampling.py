"""Sampling parameters and the sampler chain the generation loop applies to each token's logits.

Order (the same as transformers, with the grammar mask and OpenAI's penalties first): the grammar
mask of a `Constraint`, presence and frequency penalties, repetition penalty, temperature, top-k,
top-p, min-p, then one picker: argmax when the temperature is 0, otherwise a seeded draw from the softmax. A sampler named
with ``--sampler`` replaces the picker if it is one, or runs after the built-in processors if not.
"""

from __future__ import annotations

import math
import numbers
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from .config import GenerationDefaults
from .defaults import BUILTIN_SAMPLING
from .errors import InfluenceError, SamplingError
from .interfaces import SamplingContext
from .plugins import Registry, call_plugin
from .structured import Constraint
from .tokenizer import Tokenizer

# Seeds are refused outside [0, MAX_SEED] (the range torch.Generator takes without wrapping), in
# the API, the CLI and the server alike, rather than reduced: two different seeds never collide.
MAX_SEED = 2**64 - 1
PENALTY_RANGE = 2.0  # OpenAI's presence_penalty and frequency_penalty lie in [-2, 2]


@dataclass(frozen=True)
class SamplingParams:
    """None means "the model's generation_config.json default, else off" (greedy for temperature)."""

    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    seed: int | None = None
    constraint: Constraint | None = None
    sampler: str | None = None
    sampler_options: dict[str, Any] = field(default_factory=dict)

    def with_defaults(self, model_defaults: GenerationDefaults) -> SamplingParams:
        """Fill unset fields from the model's generation_config.json, or from `BUILTIN_SAMPLING`
        when the model states no sampling settings (`sampling_defaults`)."""
        defaults = sampling_defaults(model_defaults)
        sampling_default = bool(defaults.do_sample)
        return replace(
            self,
            temperature=_first(self.temperature, defaults.temperature if sampling_default else None,
                               1.0 if sampling_default else 0.0),
            top_k=_first(self.top_k, defaults.top_k if sampling_default else None, 0),
            top_p=_first(self.top_p, defaults.top_p if sampling_default else None, 1.0),
            min_p=_first(self.min_p, defaults.min_p if sampling_default else None, 0.0),
            # Asking for temperature 0 asks for exact greedy decoding: no default penalty on top.
            repetition_penalty=_first(self.repetition_penalty, defaults.repetition_penalty if self.temperature != 0
                                      else None, 1.0),
        )

    def validate(self) -> None:
        if self.temperature is not None and not 0 <= self.temperature < math.inf:
            raise SamplingError(f"temperature must be >= 0 and finite, got {self.temperature}")
        if self.top_k is not None and self.top_k < 0:
            raise SamplingError(f"top_k must be >= 0 (0 turns it off), got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise SamplingError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.min_p is not None and not 0 <= self.min_p <= 1:
            raise SamplingError(f"min_p must be in [0, 1], got {self.min_p}")
        if self.repetition_penalty is not None and not self.repetition_penalty > 0:
            raise SamplingError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if self.seed is not None and not (_is_integer(self.seed) and 0 <= self.seed <= MAX_SEED):
            raise SamplingError(f"seed must be an integer in [0, 2**64 - 1], got {self.seed!r}")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if value is not None and not -PENALTY_RANGE <= value <= PENALTY_RANGE:
                raise SamplingError(f"{name} must be in [-2, 2], got {value}")


def _is_integer(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def sampling_defaults(model_defaults: GenerationDefaults) -> GenerationDefaults:
    """What a run samples with when it sets nothing itself.

    A model that says ``do_sample: false`` decodes greedily; one that states sampling values
    samples with them (with or without ``do_sample: true``: the intent is plain, although
    transformers would ignore them); one that states nothing gets `BUILTIN_SAMPLING`, keeping its
    own repetition penalty if it has one.
    """
    if model_defaults.do_sample is False:
        return model_defaults
    if model_defaults.do_sample or any(getattr(model_defaults, name) is not None for name in SAMPLING_FIELDS):
        return replace(model_defaults, do_sample=True)
    return replace(BUILTIN_SAMPLING, repetition_penalty=model_defaults.repetition_penalty)


SAMPLING_FIELDS = ("temperature", "top_k", "top_p", "min_p")


def _first(*values: Any) -> Any:
    return next(value for value in values if value is not None)


class SamplerChain:
    """Processors then a picker, with the seeded generator they share."""

    def __init__(self, processors: list[Callable[..., Any]], picker: Callable[..., int], seed: int,
                 device: str, settings: dict[str, Any] | None = None) -> None:
        import torch

        self.processors = processors
        self.picker = picker
        self.seed = seed
        self.settings = settings or {}  # what the chain was built from, as results report it
        self.generator = torch.Generator(device=device).manual_seed(seed)

    def __call__(self, logits: Any, token_ids: Any, prompt_length: int = 0) -> int:
        return self.choose(logits, token_ids, prompt_length)[0]

    def choose(self, logits: Any, token_ids: Any, prompt_length: int = 0) -> tuple[int, Any]:
        """The picked token and the processed logits it was picked from (for logprobs)."""
        context = SamplingContext(token_ids=token_ids, generator=self.generator, prompt_length=prompt_length)
        for process in self.processors:
            logits = process(logits, context)
        return self.picker(logits, context), logits


def build_chain(params: SamplingParams, registry: Registry, device: str, tokenizer: Tokenizer | None = None,
                eos_token_ids: tuple[int, ...] = (), vocab_size: int = 0) -> SamplerChain:
    """``params`` must already have defaults filled in (`SamplingParams.with_defaults`); a
    constraint needs the tokenizer, the EOS ids and the logits' width."""
    params.validate()

    def create(name: str, **options: Any) -> Callable[..., Any]:
        sampler = registry.sampler(name)
        try:
            return call_plugin(registry, sampler, f"sampler {name!r}", sampler.create, **options)
        except InfluenceError as error:
            if isinstance(error.__cause__, TypeError):  # options the sampler's create() does not take
                raise SamplingError(f"sampler {name!r} rejected its options {sorted(options)}: "
                                    f"{error.__cause__}") from None
            raise

    processors = []
    if params.constraint is not None:
        if tokenizer is None:
            raise SamplingError("a constraint needs the model's tokenizer")
        processors.append(create("grammar", constraint=params.constraint, tokenizer=tokenizer,
                                 eos_token_ids=eos_token_ids, vocab_size=vocab_size))
    if params.presence_penalty:
        processors.append(create("presence_penalty", penalty=params.presence_penalty))
    if params.frequency_penalty:
        processors.append(create("frequency_penalty", penalty=params.frequency_penalty))
    if params.repetition_penalty != 1.0:
        processors.append(create("repetition_penalty", penalty=params.repetition_penalty))
    greedy = params.temperature == 0
    if not greedy:
        if params.temperature != 1.0:
            processors.append(create("temperature", temperature=params.temperature))
        if params.top_k:
            processors.append(create("top_k", k=params.top_k))
        if params.top_p < 1.0:
            processors.append(create("top_p", p=params.top_p))
        if params.min_p > 0.0:
            processors.append(create("min_p", p=params.min_p))
    picker = create("argmax" if greedy else "sample")
    if params.sampler:
        chosen = create(params.sampler, **params.sampler_options)
        if registry.sampler(params.sampler).kind == "picker":
            picker = chosen
        else:
            processors.append(chosen)
    elif params.sampler_options:
        raise SamplingError("sampler options (-o) need --sampler NAME to say which sampler they are for")
    seed = int(params.seed) if params.seed is not None else secrets.randbits(63)  # int: numpy's too
    # Greedy decoding ignores the warpers, so they are reported as absent rather than as in force.
    settings = {"temperature": params.temperature, "top_k": None if greedy else params.top_k,
                "top_p": None if greedy else params.top_p, "min_p": None if greedy else params.min_p,
                "repetition_penalty": params.repetition_penalty, "seed": seed,
                "sampler": params.sampler or ("argmax" if greedy else "sample")}
    settings.update({name: value for name, value in (("presence_penalty", params.presence_penalty),
                                                     ("frequency_penalty", params.frequency_penalty),
                                                     ("sampler_options", params.sampler_options)) if value})
    if params.constraint is not None:
        settings["constraint"] = params.constraint.kind
    return SamplerChain(processors, picker, seed, device, settings)
