"""influence-qwen2 against transformers' Qwen2 (through the conformance kit), and installed the way
users install it. The kit's fixtures are a pytest plugin, enabled below."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

import influence_core as influence
from influence_core import testing
from influence_core.errors import ModelFormatError
from influence_core.plugins import get_registry

# The conformance kit is a pytest plugin that a suite enables (docs/plugins.md).
pytest_plugins = ["influence_core.testing"]

INFLUENCE = [sys.executable, "-c", "from influence_core.cli import run; run()"]


def test_qwen2_conforms(influence_tiny_model):
    testing.check_architecture(influence_tiny_model("qwen2"))


def test_tied_embeddings_and_a_window_on_every_layer_match_transformers(influence_tiny_model):
    # max_window_layers=0: every layer slides; the window is shorter than the prompt.
    path = influence_tiny_model("qwen2", tie_word_embeddings=True, use_sliding_window=True, sliding_window=5,
                                max_window_layers=0)
    runner = influence.load(path, device="cpu", dtype="float32").runner
    testing.check_logits_match(runner, testing.TransformersReference(path), "cpu")


def test_a_window_on_only_some_layers_is_refused(influence_tiny_model):
    path = influence_tiny_model("qwen2", use_sliding_window=True, sliding_window=5, max_window_layers=1)
    with pytest.raises(ModelFormatError, match="sliding-window attention on 1 of its 2 layers"):
        influence.load(path, device="cpu")


def test_installing_the_package_is_all_it_takes(influence_tiny_model):
    listing = subprocess.run([*INFLUENCE, "plugins", "--json"], capture_output=True, text=True, check=True)
    qwen2 = next(plugin for plugin in json.loads(listing.stdout) if plugin["name"] == "qwen2")
    assert qwen2["distribution"] == "influence-qwen2" and qwen2["provides"] == ["architecture:qwen2"]

    path = influence_tiny_model("qwen2")
    run = subprocess.run([*INFLUENCE, "generate", "--model-path", str(path), "--raw", "t5 t6 t7",
                          "--max-tokens", "4", "--json"], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert len(json.loads(run.stdout)["token_ids"]) == 4


def test_runs_on_the_onnx_backend(influence_tiny_model, tmp_path, monkeypatch):
    if "onnx" not in {backend.name for backend in get_registry().backends}:
        pytest.skip("the onnx backend is not installed")
    monkeypatch.setenv("INFLUENCE_HOME", str(tmp_path))  # the export goes to the store
    path = influence_tiny_model("qwen2")
    runner = influence.load(path, backend="onnx", device="cpu", dtype="float32").runner
    testing.check_logits_match(runner, testing.TransformersReference(path), "cpu")
