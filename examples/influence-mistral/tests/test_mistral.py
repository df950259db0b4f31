"""influence-mistral against transformers' Mistral (through the conformance kit), and installed the
way users install it. The kit's fixtures are a pytest plugin, enabled below."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

import influence_core as influence
from influence_core import testing
from influence_core.plugins import get_registry

# The conformance kit is a pytest plugin that a suite enables (docs/plugins.md).
pytest_plugins = ["influence_core.testing"]

INFLUENCE = [sys.executable, "-c", "from influence_core.cli import run; run()"]
# Shorter than the kit's 12-token prompt, so the window bites in prefill, in decode and in batches.
WINDOW = 5


def test_mistral_with_a_window_shorter_than_the_prompt_conforms(influence_tiny_model):
    testing.check_architecture(influence_tiny_model("mistral", sliding_window=WINDOW))


def test_mistral_without_a_window_matches_transformers(influence_tiny_model):
    path = influence_tiny_model("mistral", sliding_window=None)
    runner = influence.load(path, device="cpu", dtype="float32").runner
    testing.check_logits_match(runner, testing.TransformersReference(path), "cpu")


def test_installing_the_package_is_all_it_takes(influence_tiny_model):
    listing = subprocess.run([*INFLUENCE, "plugins", "--json"], capture_output=True, text=True, check=True)
    mistral = next(plugin for plugin in json.loads(listing.stdout) if plugin["name"] == "mistral")
    assert mistral["distribution"] == "influence-mistral" and mistral["provides"] == ["architecture:mistral"]

    path = influence_tiny_model("mistral", sliding_window=WINDOW)
    run = subprocess.run([*INFLUENCE, "generate", "--model-path", str(path), "--raw", "t5 t6 t7",
                          "--max-tokens", "4", "--json"], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert len(json.loads(run.stdout)["token_ids"]) == 4


def test_runs_on_the_onnx_backend(influence_tiny_model, tmp_path, monkeypatch):
    if "onnx" not in {backend.name for backend in get_registry().backends}:
        pytest.skip("the onnx backend is not installed")
    monkeypatch.setenv("INFLUENCE_HOME", str(tmp_path))  # the export goes to the store
    path = influence_tiny_model("mistral", sliding_window=WINDOW)
    runner = influence.load(path, backend="onnx", device="cpu", dtype="float32").runner
    testing.check_logits_match(runner, testing.TransformersReference(path), "cpu")
