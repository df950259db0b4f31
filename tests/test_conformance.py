"""The conformance kit (influence_core.testing): our shipped plugins pass it, and it catches the
mistakes it exists to catch."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from influence_core import hookimpl, testing
from influence_core.interfaces import Architecture, Sampler

BUILT_IN_SAMPLERS = {
    # name: (valid options, options create must reject)
    "repetition_penalty": ({"penalty": 1.3}, [{"penalty": 0}, {"penalty": "high"}]),
    "temperature": ({"temperature": 0.7}, [{"temperature": 0}, {"temperature": -1}]),
    "top_k": ({"k": 5}, [{"k": 0}, {"k": 2.5}]),
    "top_p": ({"p": 0.8}, [{"p": 0}, {"p": 1.5}]),
    "min_p": ({"p": 0.1}, [{"p": -0.1}, {"p": 2}]),
    "argmax": ({}, []),
    "sample": ({}, []),
}


def test_the_torch_llama_conforms(influence_tiny_model):
    testing.check_architecture(influence_tiny_model("llama", attention_bias=True))


def test_the_torch_backend_conforms(influence_tiny_model):
    testing.check_backend("torch", influence_tiny_model())


@pytest.mark.parametrize("name", sorted(BUILT_IN_SAMPLERS))
def test_the_built_in_samplers_conform(name):
    options, bad_options = BUILT_IN_SAMPLERS[name]
    testing.check_sampler(name, options, bad_options=bad_options)


class WindowlessMistral:
    """A Mistral that forgets its sliding window: right until the prompt outgrows the window."""

    @staticmethod
    @hookimpl(tryfirst=True)
    def register_architectures(register):
        def build(config, weights, device, dtype):
            from influence_torch import build_llama

            return build_llama(config, weights, device, dtype)

        register(Architecture("windowless", "torch", ("mistral",), build))


def test_the_kit_catches_an_architecture_that_ignores_the_window(influence_tiny_model, influence_plugin):
    influence_plugin(WindowlessMistral, "windowless")
    with pytest.raises(AssertionError, match="prefill logits on cpu: differs from the reference"):
        testing.check_architecture(influence_tiny_model("mistral", sliding_window=5), devices=["cpu"])


def masks_in_place():
    def process(logits, context):
        logits[logits < 0] = float("-inf")
        return logits
    return process


def masks_with_a_large_negative():
    return lambda logits, context: logits.masked_fill((logits < 0) & logits.isfinite(), -1e9)


def accepts_anything(**options):
    return lambda logits, context: logits


def picks_a_tensor():
    return lambda logits, context: logits.argmax()


@pytest.mark.parametrize("sampler, message", [
    (Sampler("in-place", "processor", masks_in_place), "changed the logits it was given"),
    (Sampler("large-negative", "processor", masks_with_a_large_negative), "finite stand-in for -inf"),
    (Sampler("lenient", "processor", accepts_anything), r"create\(\*\*\{'strength': -1\}\) raised nothing"),
    (Sampler("tensor-picker", "picker", picks_a_tensor), "returned Tensor, not int"),
])
def test_the_kit_catches_a_sampler_breaking_the_contract(sampler, message):
    with pytest.raises(AssertionError, match=message):
        testing.check_sampler(sampler, bad_options=[{"strength": -1}] if sampler.name == "lenient" else [])


def test_the_kit_catches_a_backend_that_accepts_any_device(influence_tiny_model):
    from influence_torch.backend import TorchBackend

    class Agreeable(TorchBackend):
        name = "agreeable"

        def resolve_device(self, requested):
            return "cpu"

    with pytest.raises(AssertionError, match=r"resolve_device\('.*'\) raised nothing"):
        testing.check_backend(Agreeable(), influence_tiny_model())


def test_the_fixtures_come_only_to_a_suite_that_enables_the_kit(tmp_path):
    (tmp_path / "test_uses_the_kit.py").write_text(textwrap.dedent('''
        def test_fixture(influence_plugin):
            class Nothing:
                pass
            influence_plugin(Nothing, "nothing")
    '''))

    def pytest(*options):
        return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *options, str(tmp_path)],
                              capture_output=True, text=True, cwd=tmp_path)

    enabled = pytest("-p", "influence_core.testing")
    assert enabled.returncode == 0, enabled.stdout + enabled.stderr
    assert "1 passed" in enabled.stdout
    # Installing influence adds nothing to other projects' test sessions.
    plain = pytest()
    assert plain.returncode == 1 and "fixture 'influence_plugin' not found" in plain.stdout


def test_the_kit_catches_backend_options_the_core_cannot_validate(influence_tiny_model):
    from dataclasses import dataclass

    from influence_core.interfaces import BackendOptions
    from influence_torch.backend import TorchBackend

    @dataclass(frozen=True)
    class Undocumented(BackendOptions):
        beams: int = 1

    class Sloppy(TorchBackend):
        name = "sloppy"
        options_type = Undocumented

    with pytest.raises(AssertionError, match=r"backend 'sloppy': Undocumented.beams needs a default and help"):
        testing.check_backend(Sloppy(), influence_tiny_model())


class Hollow:
    """What an architecture builds when it forgets most of the TorchCausalLM interface."""

    weight_format = "float32"

    def forward(self, tokens, positions, keys, caches, first_slot=0, last_only=True):
        raise AssertionError("never run")


class HollowLlama:
    @staticmethod
    @hookimpl(tryfirst=True)
    def register_architectures(register):
        register(Architecture("hollow", "torch", ("llama",), lambda config, weights, device, dtype: Hollow()))


def test_a_torch_architecture_building_no_causal_lm_is_one_clear_error(influence_plugin, influence_tiny_model):
    import influence_core as influence
    from influence_core.errors import BackendError

    influence_plugin(HollowLlama, "hollow")
    with pytest.raises(BackendError) as refused:
        influence.load(influence_tiny_model(), device="cpu")
    assert str(refused.value) == ("architecture 'hollow' built a Hollow without __call__, config, new_caches, "
                                  "kv_bytes_per_position: the torch backend runs models with the interface of "
                                  "influence_torch.TorchCausalLM (docs/plugins.md)")
