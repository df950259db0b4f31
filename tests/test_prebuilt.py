"""The model built from a quantized GGUF is kept in the store (`influence_torch.prebuilt`): later
loads take it from there and give the same logits, and one that is stale, damaged, foreign or
another model's is rebuilt, never used."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from model_file_fuzzing import write_gguf

import influence_core as influence
from influence_core.api import open_source
from influence_core.artifacts import derived_artifacts
from influence_core.config import GenerationDefaults
from influence_torch import llama, prebuilt

PROMPT_IDS = [1, 17, 250, 33, 98, 5, 77, 31, 12, 64, 200, 9]


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("INFLUENCE_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


@pytest.fixture
def q4_gguf(tmp_path) -> Path:
    return write_gguf(tmp_path / "model.gguf", quantization="Q4_1")


@pytest.fixture
def builds(monkeypatch) -> list[int]:
    """How many times the Llama was built (rather than loaded)."""
    calls = []
    build = llama.build_llama

    def counted(*args, **kwargs):
        calls.append(1)
        return build(*args, **kwargs)

    monkeypatch.setattr(llama, "build_llama", counted)
    return calls


def load(path: Path) -> influence.Model:
    return influence.load(path, device="cpu", dtype="int4")


def kept_directory() -> Path:
    (directory,) = [path for path in prebuilt.built_dir().iterdir() if path.is_dir()]
    return directory


def test_the_kept_model_is_loaded_instead_of_built_and_gives_the_same_logits(home, q4_gguf, builds, capsys):
    built = load(q4_gguf)
    assert "the model built for this CPU takes" in capsys.readouterr().err
    loaded = load(q4_gguf)
    assert len(builds) == 1 and capsys.readouterr().err == ""
    assert loaded.weight_format == built.weight_format == "int4 (from Q4_1); output head int8 (requantized from Q4_1)"
    assert torch.equal(loaded.logits(PROMPT_IDS), built.logits(PROMPT_IDS))
    assert (loaded.generate("hello", max_tokens=8, temperature=0).token_ids
            == built.generate("hello", max_tokens=8, temperature=0).token_ids)
    (kept,) = derived_artifacts()
    assert kept.kind == "built" and kept.current and kept.source == str(q4_gguf.resolve())


def test_one_file_opened_with_two_configs_keeps_a_build_for_each(home, q4_gguf, builds, capsys):
    # The bundled default model is opened with its converted copy's generation defaults, and the
    # same GGUF by path without them: each finds its own build, neither replaces the other's.
    plain = open_source(q4_gguf)
    with_defaults = dataclasses.replace(plain, config=dataclasses.replace(
        plain.config, generation=GenerationDefaults(temperature=0.6)))
    for source in (plain, with_defaults, plain, with_defaults):
        model = influence.load(source, device="cpu", dtype="int4")
        assert model.runner.model.config == source.config
    assert len(builds) == 2 and "not this model's" not in capsys.readouterr().err


def test_only_quantized_ggufs_are_kept(home, q4_gguf, tiny_model):
    influence.load(q4_gguf, device="cpu", dtype="float32")
    influence.load(tiny_model, device="cpu", dtype="int4")  # a safetensors checkpoint
    assert not prebuilt.built_dir().exists() or not any(prebuilt.built_dir().iterdir())


def test_a_model_kept_for_another_torch_or_plugin_version_is_replaced(home, q4_gguf, builds):
    load(q4_gguf)
    current = kept_directory()
    saved = json.loads((current / prebuilt.KEY_FILE).read_text())
    older = {**saved["key"], "torch": "2.0.0"}
    stale = prebuilt.artifact_path(older)
    current.rename(stale)
    (stale / prebuilt.KEY_FILE).write_text(json.dumps({**saved, "key": older}))
    load(q4_gguf)
    assert len(builds) == 2 and current.is_dir() and not stale.exists()


@pytest.mark.parametrize("damage", ["garbage of the same size", "truncated", "key file unreadable"])
def test_a_damaged_kept_model_is_rebuilt(home, q4_gguf, builds, capsys, damage):
    expected = load(q4_gguf).logits(PROMPT_IDS)
    model_file = kept_directory() / prebuilt.MODEL_FILE
    if damage == "garbage of the same size":
        model_file.write_bytes(os.urandom(model_file.stat().st_size))
    elif damage == "truncated":
        model_file.write_bytes(model_file.read_bytes()[:-100])
    else:
        (kept_directory() / prebuilt.KEY_FILE).write_text("{")
    capsys.readouterr()
    assert torch.equal(load(q4_gguf).logits(PROMPT_IDS), expected)
    err = capsys.readouterr().err
    assert len(builds) == 2 and ("does not load" in err) == (damage == "garbage of the same size")
    assert torch.equal(load(q4_gguf).logits(PROMPT_IDS), expected) and len(builds) == 2


class Planted:
    """What a hostile file would unpickle: a call that leaves a file behind."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return Path.touch, (self.marker,)


def replace_kept_model(directory: Path, content: object) -> None:
    torch.save(content, directory / prebuilt.MODEL_FILE)
    saved = json.loads((directory / prebuilt.KEY_FILE).read_text())
    saved["bytes"] = (directory / prebuilt.MODEL_FILE).stat().st_size
    (directory / prebuilt.KEY_FILE).write_text(json.dumps(saved))


def test_a_kept_file_holding_anything_but_a_built_llama_runs_nothing_and_is_rebuilt(home, q4_gguf, builds, tmp_path,
                                                                                   capsys):
    load(q4_gguf)
    marker = tmp_path / "planted"
    replace_kept_model(kept_directory(), Planted(marker))
    load(q4_gguf)
    assert not marker.exists() and len(builds) == 2 and "does not load" in capsys.readouterr().err


def test_another_models_build_under_this_key_is_rebuilt(home, q4_gguf, tmp_path, builds, capsys):
    other = write_gguf(tmp_path / "other.gguf", metadata={"llama.rope.freq_base": 5000.0}, quantization="Q4_1")
    expected = load(q4_gguf).logits(PROMPT_IDS)
    target = kept_directory()
    replace_kept_model(target, load(other).runner.model)
    capsys.readouterr()
    assert torch.equal(load(q4_gguf).logits(PROMPT_IDS), expected)
    assert "is not this model's" in capsys.readouterr().err and len(builds) == 3


def test_a_store_that_cannot_be_written_still_runs_the_model(tmp_path, q4_gguf, monkeypatch, capsys):
    not_a_directory = tmp_path / "file"
    not_a_directory.write_text("")
    monkeypatch.setenv("INFLUENCE_HOME", str(not_a_directory / "home"))
    assert len(load(q4_gguf).generate("hello", max_tokens=4, temperature=0).token_ids) == 4
    assert "could not keep the built model" in capsys.readouterr().err


RACER = """
import sys, time
from influence_torch import llama
build = llama.build_llama
def slow(*args, **kwargs):
    time.sleep(2)  # both processes are then inside the build at once, unless the lock keeps one out
    return build(*args, **kwargs)
llama.build_llama = slow
import influence_core
model = influence_core.load(sys.argv[1], device="cpu", dtype="int4")
print(float(model.logits([1, 17, 250]).sum()))
"""


def test_two_processes_starting_at_once_build_it_once(home, q4_gguf):
    env = {**os.environ, "INFLUENCE_HOME": str(home)}
    racers = [subprocess.Popen([sys.executable, "-c", RACER, str(q4_gguf)], env=env, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(2)]
    results = [racer.communicate(timeout=120) for racer in racers]
    assert all(racer.returncode == 0 for racer in racers), results
    assert results[0][0] == results[1][0]
    assert sum("the model built for this CPU takes" in err for _, err in results) == 1, results
    assert kept_directory().is_dir() and not list(prebuilt.built_dir().glob(".*partial*"))
    shutil.rmtree(home)
