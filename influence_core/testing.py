"""The conformance kit: checks that certify an architecture, a sampler or a backend plugin against
the contracts the core relies on, and pytest fixtures to run them.

    from influence_core import testing

    def test_qwen2_conforms(influence_tiny_model):
        testing.check_architecture(influence_tiny_model("qwen2"))

    def test_my_sampler_conforms():
        testing.check_sampler("typical", {"p": 0.9}, bad_options=[{"p": 0}, {"p": 1.5}])

    def test_my_backend_conforms(influence_tiny_model):
        testing.check_backend("my-backend", influence_tiny_model())

Each check raises AssertionError saying what broke. The fixtures (`influence_tiny_model`,
`influence_plugin`) come with this module as a pytest plugin, which a test suite enables:
``pytest -p influence_core.testing``, or ``pytest_plugins = ["influence_core.testing"]`` in its
top-level conftest.py or in a test module. The architecture checks need transformers (the
reference), and every check needs torch.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from .errors import BackendError, SamplingError
from .interfaces import Backend, BackendOptions, Sampler, SamplingContext

# A tiny random model: big enough for grouped-query attention and two layers, small enough that
# building it and running transformers beside it takes a fraction of a second.
TINY_CONFIG: dict[str, Any] = dict(
    vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5, tie_word_embeddings=False,
    # No EOS, so that greedy runs are never cut short.
    bos_token_id=1, eos_token_id=None, pad_token_id=None,
)
PROMPT_IDS = (1, 17, 250, 33, 98, 5, 77, 210, 12, 64, 200, 9)
DECODE_STEPS = 16
FLOAT32_TOLERANCE = 1e-4
# bfloat16 keeps 8 bits of mantissa: on the tiny models' logits (about ±1) Llama, Qwen2 and Mistral
# differ from float32 by under 0.01, on cpu and on CUDA.
BFLOAT16_TOLERANCE = 0.05


# ---- architectures ----------------------------------------------------------------------------

def check_architecture(model: Path, *, backend: str = "torch", devices: Sequence[str] | None = None) -> None:
    """Certify whichever installed architecture builds ``model`` on ``backend`` against transformers'
    implementation of the same checkpoint (see `make_tiny_model`): float32 prefill and decode logits
    within 1e-4, greedy tokens equal for 16 steps, the KV cache reused, rewound and decoded in a
    batch without changing a logit, and bfloat16 close to float32, on each of ``devices`` (default:
    cpu, and the first CUDA device when there is one)."""
    reference = TransformersReference(model)
    for device in devices or default_devices(backend):
        runner = _load(model, backend, device, "float32").runner
        check_logits_match(runner, reference, device)
        check_greedy_matches(model, backend, device, reference)
        check_cache_reuse_and_rewind(runner, reference, device)
        check_batched_decode(model, backend, device, runner)
        check_bfloat16_close(model, backend, device, reference)


class TransformersReference:
    """transformers' model for a checkpoint, and the greedy continuation of `PROMPT_IDS` it gives."""

    def __init__(self, model: Path) -> None:
        from transformers import AutoModelForCausalLM

        self.model = AutoModelForCausalLM.from_pretrained(model).float().eval()
        ids = list(PROMPT_IDS)
        for _ in range(DECODE_STEPS):  # without a KV cache, so that no cache of theirs is trusted either
            ids.append(int(self.logits(ids)[-1].argmax()))
        self.sequence = ids
        self.sequence_logits = self.logits(ids)

    def logits(self, token_ids: Sequence[int]) -> Any:
        import torch

        with torch.no_grad():
            return self.model(torch.tensor([list(token_ids)])).logits[0].float()


def check_logits_match(runner: Any, reference: TransformersReference, device: str) -> None:
    """Prefill logits at every prompt position, then each decode step's, within 1e-4 in float32."""
    prompt, expected = len(PROMPT_IDS), reference.sequence_logits
    assert_close(runner.forward(list(PROMPT_IDS), 0, all_logits=True), expected[:prompt],
                 f"prefill logits on {device}")
    for position in range(prompt, len(reference.sequence)):
        assert_close(runner.forward([reference.sequence[position]], position), expected[position],
                     f"decode step at position {position} on {device}")


def check_greedy_matches(model: Path, backend: str, device: str, reference: TransformersReference) -> None:
    """Greedy generation through the public API picks transformers' tokens (up to an EOS)."""
    loaded = _load(model, backend, device, "float32")
    ours = loaded.generate(list(PROMPT_IDS), max_tokens=DECODE_STEPS, temperature=0).token_ids
    theirs = reference.sequence[len(PROMPT_IDS):]
    eos = [i for i, token in enumerate(theirs) if token in loaded.config.eos_token_ids]
    expected = theirs[:eos[0] + 1] if eos else theirs
    assert ours == expected, f"greedy tokens on {device}: {ours}, transformers: {expected}"


def check_cache_reuse_and_rewind(runner: Any, reference: TransformersReference, device: str) -> None:
    """Continuing from a cached prefix, and rewinding over a longer cached run to take another
    branch, give the logits of a fresh run: stale cache entries past the new end never leak in."""
    sequence, expected = reference.sequence, reference.sequence_logits
    runner.forward(sequence[:5], 0)
    assert_close(runner.forward(sequence[5:], 5, all_logits=True), expected[5:],
                 f"logits continuing from a cached 5-token prefix on {device}")

    runner.forward(sequence, 0)
    branch = sequence[:7] + [3, 141, 59, 26, 53, 58]
    branch_expected = reference.logits(branch)
    assert_close(runner.forward(branch[7:], 7, all_logits=True), branch_expected[7:],
                 f"logits after rewinding to position 7 on {device}")
    assert_close(runner.forward([branch[7]], 7), branch_expected[7],
                 f"a decode step after rewinding to position 7 on {device}")


def check_batched_decode(model: Path, backend: str, device: str, single: Any) -> None:
    """`Runner.decode_batch` over sequences at different positions gives each the logits it gets
    alone, and `copy_slot` carries a sequence's cache to another slot."""
    prompts = [list(PROMPT_IDS[:4]), list(PROMPT_IDS[2:]), [1, 200, 201, 202, 203, 204, 205, 12]]
    batched = _load(model, backend, device, "float32", max_batch=len(prompts)).runner
    assert batched.max_batch >= len(prompts), (
        f"asked for max_batch={len(prompts)}, the runner has max_batch={batched.max_batch}")
    histories = [list(prompt) for prompt in prompts]
    tokens = [int(batched.forward(prompt, 0, slot=slot).argmax()) for slot, prompt in enumerate(prompts)]
    for _ in range(6):
        logits = batched.decode_batch(tokens, [len(history) for history in histories])
        assert logits.shape[0] == len(prompts), f"decode_batch of {len(prompts)} returned shape {tuple(logits.shape)}"
        for row, history in enumerate(histories):
            history.append(tokens[row])
            assert_close(logits[row], single.forward(history, 0), f"batched decode row {row} on {device}")
        tokens = [int(row.argmax()) for row in logits]

    batched.copy_slot(2, 0)
    moved = batched.decode_batch([tokens[2]], [len(histories[2])])[0]
    histories[2].append(tokens[2])
    assert_close(moved, single.forward(histories[2], 0), f"decode after copy_slot(2, 0) on {device}")


def check_bfloat16_close(model: Path, backend: str, device: str, reference: TransformersReference) -> None:
    """bfloat16 weights still give float32 logits, close to the float32 reference."""
    logits = _load(model, backend, device, "bfloat16").runner.forward(reference.sequence, 0, all_logits=True)
    assert str(logits.dtype) == "torch.float32", f"bfloat16 run on {device} returned {logits.dtype} logits"
    assert_close(logits, reference.sequence_logits, f"bfloat16 logits on {device}", BFLOAT16_TOLERANCE)


def default_devices(backend: str) -> list[str]:
    """cpu, plus the first CUDA device when the backend has one here."""
    from .plugins import get_registry

    available = get_registry().backend(backend).available_devices()
    cuda = [device for device in available if device.startswith("cuda")]
    return ["cpu", *cuda[:1]]


# ---- samplers ---------------------------------------------------------------------------------

def check_sampler(sampler: str | Sampler, options: dict[str, Any] | None = None, *,
                  bad_options: Sequence[dict[str, Any]] = ()) -> None:
    """Certify a sampler (a registered name, or the `Sampler` itself) against the sampler contract:
    ``create(**options)`` gives a function that leaves its inputs alone and is deterministic under a
    seeded generator; a processor returns float32 logits of the input's shape, removing tokens only
    by setting them to -inf; a picker returns a Python int naming an unmasked token. Every entry of
    ``bad_options``, and an unknown option, is rejected with `SamplingError` when created."""
    import torch

    if isinstance(sampler, str):
        from .plugins import get_registry

        sampler = get_registry().sampler(sampler)
    assert sampler.kind in ("processor", "picker"), f"sampler {sampler.name!r} has kind {sampler.kind!r}"
    for bad in bad_options:
        expect_error(SamplingError, lambda: sampler.create(**bad), f"{sampler.name}.create(**{bad!r})")
    # The core reports a TypeError from create (an unexpected keyword) as a SamplingError.
    expect_error((SamplingError, TypeError), lambda: sampler.create(no_such_option=1),
                 f"{sampler.name}.create(no_such_option=1)")

    function = sampler.create(**(options or {}))
    assert callable(function), f"{sampler.name}.create returned {function!r}, not a function"
    for seed in range(5):
        logits, context = _sampling_inputs(seed)
        logits_before, history_before = logits.clone(), context.token_ids.clone()
        output = function(logits, context)
        assert torch.equal(logits, logits_before), f"sampler {sampler.name!r} changed the logits it was given"
        assert torch.equal(context.token_ids, history_before), f"sampler {sampler.name!r} changed token_ids"
        repeat = function(logits, _sampling_inputs(seed)[1])  # a fresh generator with the same seed
        if sampler.kind == "processor":
            _check_processed(sampler.name, logits, output)
            assert torch.equal(output, repeat), f"processor {sampler.name!r} is not deterministic under a seed"
        else:
            _check_picked(sampler.name, logits, output)
            assert output == repeat, f"picker {sampler.name!r} picked {output}, then {repeat} under the same seed"


def _sampling_inputs(seed: int) -> tuple[Any, SamplingContext]:
    """Random float32 logits over 64 tokens with a few already masked, a token history, and a
    generator seeded with ``seed``."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(64, generator=generator) * 3
    logits[torch.randperm(64, generator=generator)[:8]] = float("-inf")
    history = torch.randint(0, 64, (10,), generator=generator)
    return logits, SamplingContext(token_ids=history, generator=torch.Generator().manual_seed(1234))


def _check_processed(name: str, logits: Any, output: Any) -> None:
    import torch

    assert isinstance(output, torch.Tensor), f"processor {name!r} returned {type(output).__name__}, not a tensor"
    assert output.shape == logits.shape and output.dtype == torch.float32, (
        f"processor {name!r} returned {output.dtype} {tuple(output.shape)} for float32 {tuple(logits.shape)}")
    assert not output.isnan().any() and not (output == float("inf")).any(), f"processor {name!r} returned NaN or +inf"
    assert (output[logits == float("-inf")] == float("-inf")).all(), f"processor {name!r} revived a masked token"
    assert output.isfinite().any(), f"processor {name!r} masked every token"
    # -1e9 or float32's minimum in place of -inf turns into a real probability after other processors.
    assert (output[output.isfinite()] > -1e6).all(), f"processor {name!r} masks with a finite stand-in for -inf"


def _check_picked(name: str, logits: Any, picked: Any) -> None:
    assert type(picked) is int, f"picker {name!r} returned {type(picked).__name__}, not int"
    assert 0 <= picked < logits.shape[-1], f"picker {name!r} picked {picked}, outside the vocabulary"
    assert logits[picked] != float("-inf"), f"picker {name!r} picked the masked token {picked}"


# ---- backends ---------------------------------------------------------------------------------

def check_backend(backend: str | Backend, model: Path) -> None:
    """Certify a backend against the backend contract on ``model`` (a tiny model from
    `make_tiny_model` in a format it reads): it declares device kinds and dtypes, resolves ``auto``
    to a device it has, refuses devices and dtypes it cannot provide with `BackendError`, declares
    its own options as the core can validate them (`check_backend_options`), and its runner
    returns float32 logits of the documented shapes, rewinds, and decodes a batch of one as
    `forward` does."""
    import torch

    from .api import open_source
    from .plugins import get_registry

    registry = get_registry()
    if isinstance(backend, str):
        backend = registry.backend(backend)
    name = backend.name
    assert backend.devices and all(isinstance(kind, str) for kind in backend.devices), (
        f"backend {name!r} declares devices {backend.devices!r}")
    assert backend.dtypes and "auto" not in backend.dtypes, f"backend {name!r} declares dtypes {backend.dtypes!r}"

    available = backend.available_devices()
    assert available, f"backend {name!r} has no available device, not even one to fall back on"
    for device in available:
        assert device.split(":")[0] in backend.devices, (
            f"backend {name!r} offers {device!r}, a kind it does not declare")
    device = backend.resolve_device("auto")
    assert device in available, f"backend {name!r} resolved 'auto' to {device!r}, not one of {available}"
    missing = [kind for kind in backend.devices if not any(d.split(":")[0] == kind for d in available)]
    for requested in [*missing, "no-such-device"]:
        expect_error(BackendError, lambda: backend.resolve_device(requested), f"resolve_device({requested!r})")
    assert backend.resolve_dtype("auto", device) in backend.dtypes, f"backend {name!r}: 'auto' dtype is not declared"
    expect_error(BackendError, lambda: backend.resolve_dtype("float7", device), "resolve_dtype('float7')")
    check_backend_options(backend)

    source = open_source(model)
    dtype = "float32" if "float32" in backend.dtypes else backend.resolve_dtype("auto", device)
    tolerance = FLOAT32_TOLERANCE if dtype == "float32" else BFLOAT16_TOLERANCE
    architecture = registry.architecture_for(source.config, name) if backend.uses_architectures else None
    declared = {} if backend.options_type is BackendOptions else {"backend_options": backend.options_type()}
    runner = backend.load(source, architecture, device, dtype, {}, **declared)
    assert runner.context_length > 0 and runner.max_batch >= 1, (
        f"runner has context_length {runner.context_length} and max_batch {runner.max_batch}")
    vocab = source.config.vocab_size

    ids = list(PROMPT_IDS)
    full = runner.forward(ids, 0, all_logits=True)
    assert isinstance(full, torch.Tensor) and full.dtype == torch.float32, "Runner.forward must return float32 logits"
    assert tuple(full.shape) == (len(ids), vocab), f"forward(all_logits=True) returned shape {tuple(full.shape)}"
    last = runner.forward(ids, 0)
    assert tuple(last.shape) == (vocab,), f"forward returned shape {tuple(last.shape)}, expected ({vocab},)"
    assert_close(last, full[-1], "last-position logits against all_logits", tolerance)

    runner.forward([7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20], 0)  # a longer, different run to rewind over
    runner.forward(ids[:5], 0)
    assert_close(runner.forward(ids[5:], 5, all_logits=True), full[5:], "logits after rewinding", tolerance)
    runner.forward(ids[:-1], 0)
    batch = runner.decode_batch([ids[-1]], [len(ids) - 1])
    assert tuple(batch.shape) == (1, vocab), f"decode_batch returned shape {tuple(batch.shape)}"
    assert_close(batch[0], full[-1], "decode_batch of one sequence against forward", tolerance)
    runner.close()


def check_backend_options(backend: Backend) -> None:
    """A backend's own options (`Backend.options_type`) are declared so that the core can validate
    them: each typed bool, int, float or str with a default of its type and a line of help; an
    undeclared one, and a value of the wrong type, are refused with `BackendError`."""
    name = backend.name
    options_type = backend.options_type
    assert isinstance(options_type, type) and issubclass(options_type, BackendOptions), (
        f"backend {name!r}: options_type {options_type!r} is not a BackendOptions subclass")
    try:
        specs = options_type.specs()
    except TypeError as error:
        raise AssertionError(f"backend {name!r}: {error}") from None
    for spec in specs:
        assert spec.help.strip(), f"backend {name!r}: option {spec.name} has no help"
        assert spec.value(spec.default, name) == spec.default, (
            f"backend {name!r}: option {spec.name}'s default {spec.default!r} is not a valid value of it")
        wrong = "not a number" if spec.type is not str else 12
        expect_error(BackendError, lambda: options_type.from_values({spec.name: wrong}, name),
                     f"option {spec.name}={wrong!r}")
    expect_error(BackendError, lambda: options_type.from_values({"no_such_option": 1}, name),
                 "the option no_such_option")


# ---- tiny models ------------------------------------------------------------------------------

def make_tiny_model(directory: Path, model_type: str = "llama", *, seed: int = 0, **config: Any) -> Path:
    """Write a tiny random ``model_type`` model the way transformers writes real ones (config.json,
    model.safetensors) with a tokenizer.json, and return ``directory``. ``config`` overrides
    `TINY_CONFIG` or sets family-specific fields (``sliding_window=4``, ``attention_bias=True``)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    settings = {**TINY_CONFIG, **config}
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **settings))
    # Random init leaves norms at 1 and biases at 0; perturb them so that every weight is exercised.
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith(".bias"):
                parameter.add_(torch.randn_like(parameter) * 0.1)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory, safe_serialization=True)
    _write_tokenizer(directory, settings["vocab_size"])
    return directory


def _write_tokenizer(directory: Path, vocab_size: int) -> None:
    """A word-level tokenizer over ``<unk> <s> </s> t3 t4 ...``: the checks work in token ids, but
    loaders need a tokenizer.json."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"t{i}": i for i in range(3, vocab_size)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>"}))


# ---- shared helpers ---------------------------------------------------------------------------

def assert_close(actual: Any, expected: Any, what: str, tolerance: float = FLOAT32_TOLERANCE) -> None:
    """``actual`` has ``expected``'s shape and differs from it by at most ``tolerance`` anywhere."""
    assert tuple(actual.shape) == tuple(expected.shape), (
        f"{what}: shape {tuple(actual.shape)}, expected {tuple(expected.shape)}")
    difference = float((actual.float().cpu() - expected.float().cpu()).abs().max())
    assert difference <= tolerance, (
        f"{what}: differs from the reference by up to {difference:.2e} (allowed {tolerance:.0e})")


def expect_error(error: type[Exception] | tuple[type[Exception], ...], call: Callable[[], Any], what: str) -> None:
    """``call()`` raises ``error``; anything else fails with an AssertionError naming ``what``."""
    try:
        call()
    except error:
        return
    except Exception as other:
        raise AssertionError(f"{what} raised {type(other).__name__}: {other}, expected {_names(error)}") from other
    raise AssertionError(f"{what} raised nothing, expected {_names(error)}")


def _names(error: type[Exception] | tuple[type[Exception], ...]) -> str:
    return " or ".join(e.__name__ for e in (error if isinstance(error, tuple) else (error,)))


def _load(model: Path, backend: str, device: str, dtype: str, **options: Any) -> Any:
    from .api import load

    return load(model, backend=backend, device=device, dtype=dtype, **options)


# ---- pytest fixtures --------------------------------------------------------------------------

@pytest.fixture(scope="session")
def influence_tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """``influence_tiny_model(model_type="llama", **config)``: a tiny random model (see
    `make_tiny_model`), built once per session for each distinct set of arguments."""
    made: dict[str, Path] = {}

    def make(model_type: str = "llama", **config: Any) -> Path:
        key = json.dumps([model_type, config], sort_keys=True)
        if key not in made:
            made[key] = make_tiny_model(tmp_path_factory.mktemp(f"tiny-{model_type}"), model_type, **config)
        return made[key]

    return make


@pytest.fixture
def influence_plugin() -> Iterator[Callable[[object, str], None]]:
    """``influence_plugin(plugin, name)`` registers a plugin object in-process for one test."""
    from .plugins import register_plugin, unregister_plugin

    names: list[str] = []

    def register(plugin: object, name: str) -> None:
        register_plugin(plugin, name=name)
        names.append(name)

    yield register
    for name in names:
        unregister_plugin(name)
