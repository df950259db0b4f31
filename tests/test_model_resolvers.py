"""Model resolvers (hook spec 1.2): a third party's scheme for model names, asked before ours."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from cli_helpers import CLI, assert_one_error_line, invoke

import influence_core as influence
from influence_core import hookimpl
from influence_core.interfaces import ModelResolver

ARGS = ("--max-tokens", "4", "--temperature", "0", "--json")


@pytest.fixture
def demo(plugin, tiny_models, hub):
    """A plugin resolving ``demo:NAME`` to the tiny model NAME, and giving ``demo:gqa_llama3_rope`` as
    the default model; it records every question it is asked."""
    asked: list[tuple[str | None, bool]] = []

    def resolve(reference: str | None, prefer_quantized: bool) -> Path | None:
        asked.append((reference, prefer_quantized))
        if reference is None:
            return tiny_models["gqa_llama3_rope"]
        scheme, _, name = reference.partition(":")
        return tiny_models.get(name) if scheme == "demo" else None

    class Demo:
        influence_hookspec_version = "1.2"

        @hookimpl
        def register_model_resolvers(self, register):
            register(ModelResolver("demo", resolve, names=lambda: [f"demo:{name}" for name in tiny_models],
                                   default_name=lambda: "demo:gqa_llama3_rope", description="demo:NAME"))

    plugin(Demo(), "demo")
    return asked


def test_a_third_party_name_generates_like_its_path(capsys, demo, tiny_models):
    expected = json.loads(invoke(capsys, "generate", "hello", *ARGS, "-p", str(tiny_models["tied_linear_rope"]))[1])
    code, out, err = invoke(capsys, "generate", "hello", *ARGS, "-m", "demo:tied_linear_rope")
    assert code == 0, err
    result = json.loads(out)
    assert result["token_ids"] == expected["token_ids"] and result["model"] == str(tiny_models["tied_linear_rope"])
    assert ("demo:tied_linear_rope", False) in demo


def test_a_name_no_resolver_knows_is_one_line_naming_them(capsys, demo):
    code, _, err = invoke(capsys, "generate", "hello", "-m", "demo:nope")
    assert_one_error_line(code, err, "model 'demo:nope' does not exist: it is not a path, and no installed model "
                                     "resolver knows it (demo: demo:NAME; store: aliases and names in the store")
    assert "hub: ORG/NAME on the Hugging Face hub" in err


def test_the_first_resolver_gives_the_default_model_and_its_config_table(capsys, demo, tiny_models, tmp_path,
                                                                         monkeypatch):
    config = tmp_path / "config.toml"
    config.write_text('[models."demo:gqa_llama3_rope"]\nmax_tokens = 3\n')
    monkeypatch.setenv("INFLUENCE_CONFIG", str(config))
    code, out, err = invoke(capsys, "generate", "hello", "--temperature", "0", "--json")
    assert code == 0, err
    result = json.loads(out)
    assert result["model"] == str(tiny_models["gqa_llama3_rope"]) and len(result["token_ids"]) == 3


def test_the_default_is_asked_for_a_quantized_file_first_and_again_for_a_float_format(demo, tiny_models):
    model = influence.load(device="cpu")  # auto: a float checkpoint runs as float32
    assert model.dtype == "float32" and demo == [(None, True), (None, False)]
    demo.clear()
    influence.load(device="cpu", dtype="bfloat16")
    assert demo == [(None, False)]


def test_completion_lists_the_resolvers_names(demo):
    from influence_core.cli_options import complete_model_names

    assert complete_model_names("demo:tied") == ["demo:tied_linear_rope"]


def test_a_resolver_that_breaks_is_named(capsys, plugin, hub):
    class Broken:
        influence_hookspec_version = "1.2"

        @hookimpl
        def register_model_resolvers(self, register):
            register(ModelResolver("broken", lambda reference, prefer_quantized: 1 / 0))

    plugin(Broken(), "broken-resolvers")
    code, _, err = invoke(capsys, "generate", "hello", "-m", "anything")
    assert_one_error_line(code, err, "plugin 'broken-resolvers' failed in model resolver 'broken': ZeroDivisionError")


def test_a_resolver_returning_something_else_is_refused(capsys, plugin, hub):
    class Confused:
        influence_hookspec_version = "1.2"

        @hookimpl
        def register_model_resolvers(self, register):
            register(ModelResolver("confused", lambda reference, prefer_quantized: str(reference)))

    plugin(Confused(), "confused-resolver")
    code, _, err = invoke(capsys, "generate", "hello", "-m", "anything")
    assert_one_error_line(code, err, "plugin 'confused-resolver': model resolver 'confused' returned str, not a Path")


@pytest.mark.parametrize("args, message", [
    (["-m", "some-name"], "model 'some-name' does not exist: it is not a path, and no model resolver is installed "
                          "(the influence_models plugin shipped with influence resolves aliases"),
    ([], "no model given, and no model resolver is installed"),
])
def test_without_the_models_plugin_only_paths_load(tmp_path, args, message):
    env = {**os.environ, "INFLUENCE_HOME": str(tmp_path), "INFLUENCE_LOAD_PLUGINS": "torch,safetensors,samplers"}
    done = subprocess.run([*CLI, "generate", "hello", *args], capture_output=True, text=True, timeout=120, env=env)
    assert_one_error_line(done.returncode, done.stderr, message)
