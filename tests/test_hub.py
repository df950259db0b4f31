"""Downloads from the Hugging Face hub, against the stand-in hub on 127.0.0.1 (fake_hub.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from cli_helpers import CLI, assert_one_error_line, help_in_a_fresh_process, invoke
from fake_hub import TOKEN

import influence_core as influence
from influence_core import artifacts
from influence_models import store


def model_files(directory: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in directory.iterdir() if path.is_file()}


@pytest.fixture
def tiny_repo(hub, tiny_model):
    """org/tiny: a tiny Llama as the hub holds it, plus files a download must leave alone."""
    files = model_files(tiny_model)
    files.update({"README.md": b"# tiny\n", "pytorch_model.bin": b"a pickle", "onnx/model.onnx": b"onnx"})
    return hub.add("org/tiny", files)


def test_help_does_not_import_huggingface_hub():
    assert "huggingface_hub" not in help_in_a_fresh_process()[1], "huggingface_hub imported at start-up"


@pytest.mark.parametrize("command", [["download", "-m", "org/tiny"], ["generate", "hello", "-m", "org/tiny"]])
def test_without_the_hub_extra_a_download_says_what_to_install(capsys, hub, tiny_repo, monkeypatch, command):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # import huggingface_hub raises ImportError
    code, _, err = invoke(capsys, *command)
    assert_one_error_line(code, err, "downloading org/tiny needs huggingface_hub, which is not installed: "
                                     "pip install 'influence[hub]'")
    assert not store.models_dir().exists() and hub.requests == []


def test_first_use_downloads_then_later_runs_stay_offline(capsys, hub, tiny_repo, tiny_model):
    args = ("hello", "--max-tokens", "4", "--temperature", "0", "--json")
    code, out, err = invoke(capsys, "generate", *args, "-m", "org/tiny")
    assert code == 0, err
    assert "downloading org/tiny" in err
    expected = json.loads(invoke(capsys, "generate", *args, "-p", str(tiny_model))[1])
    assert json.loads(out)["token_ids"] == expected["token_ids"]

    hub.requests.clear()
    assert invoke(capsys, "generate", *args, "-m", "org/tiny")[0] == 0
    model = influence.load("org/tiny")
    assert model.source.path == store.models_dir() / "org--tiny"
    assert hub.requests == []


def test_download_fetches_what_a_model_needs_and_records_where_from(capsys, hub, tiny_repo, tiny_model):
    code, out, err = invoke(capsys, "download", "-m", "org/tiny")
    assert code == 0, err
    directory = store.models_dir() / "org--tiny"
    assert out.strip() == str(directory)
    expected = model_files(tiny_model)
    assert model_files(directory) == {**expected, artifacts.MANIFEST: (directory / artifacts.MANIFEST).read_bytes()}
    manifest = artifacts.read_manifest(directory)
    assert manifest["repo"] == "org/tiny" and manifest["revision"] == "main" and manifest["commit"] == tiny_repo.sha
    assert manifest["files"] == sorted(expected) and manifest["endpoint"] == hub.url
    assert [p.name for p in store.models_dir().iterdir()] == ["org--tiny"]  # no unfinished download left

    hub.requests.clear()
    code, _, err = invoke(capsys, "download", "-m", "org/tiny", "--revision", tiny_repo.sha)
    assert code == 0 and "up to date" in err
    assert [r.method for r in hub.requests] == ["GET"]  # only the repo info: nothing downloaded again

    code, _, err = invoke(capsys, "download", "-m", "org/tiny", "--include", "*.md",
                          "--exclude", "tokenizer_config.json")
    assert code == 0, err
    assert "README.md" in model_files(directory) and "tokenizer_config.json" not in model_files(directory)


def test_download_a_chosen_gguf_file(capsys, hub):
    hub.add("org/tiny-gguf", {"tiny.Q4_0.gguf": b"GGUF a", "tiny.Q8_0.gguf": b"GGUF b", "README.md": b""})
    code, _, err = invoke(capsys, "download", "-m", "org/tiny-gguf")
    assert_one_error_line(code, err, "--file FILE`: tiny.Q4_0.gguf, tiny.Q8_0.gguf")
    code, _, err = invoke(capsys, "download", "-m", "org/tiny-gguf", "--file", "tiny.Q5_0.gguf")
    assert_one_error_line(code, err, "has no GGUF file 'tiny.Q5_0.gguf'")

    code, out, err = invoke(capsys, "download", "-m", "org/tiny-gguf", "--file", "tiny.Q8_0.gguf")
    assert code == 0, err
    directory = Path(out.strip())
    assert sorted(model_files(directory)) == [artifacts.MANIFEST, "tiny.Q8_0.gguf"]
    assert store.loadable_path(directory) == directory / "tiny.Q8_0.gguf"


def test_an_interrupted_download_resumes_with_a_range_request(capsys, hub, tiny_repo, monkeypatch):
    from huggingface_hub import constants

    # huggingface_hub writes what it receives in chunks of 10 MB; smaller chunks let a tiny file be
    # cut part-way with its first bytes already on disk, as a multi-gigabyte file would be.
    monkeypatch.setattr(constants, "DOWNLOAD_CHUNK_SIZE", 1024)
    weights = tiny_repo.files["model.safetensors"]
    cut = 40 * 1024
    hub.drop_after["model.safetensors"] = cut
    code, _, err = invoke(capsys, "download", "-m", "org/tiny")
    assert_one_error_line(code, err, "failed while downloading org/tiny; run it again: the download resumes")
    assert not (store.models_dir() / "org--tiny").exists()

    code, _, err = invoke(capsys, "download", "-m", "org/tiny")
    assert code == 0, err
    first, second = hub.downloads("model.safetensors")
    assert first.range is None and second.range == f"bytes={cut}-"
    assert (store.models_dir() / "org--tiny" / "model.safetensors").read_bytes() == weights
    assert [p.name for p in store.models_dir().iterdir()] == ["org--tiny"]


def test_a_missing_repo(capsys, hub):
    for args in (["download", "-m", "org/missing"], ["generate", "hi", "-m", "org/missing"]):
        code, _, err = invoke(capsys, *args)
        assert_one_error_line(code, err, f"org/missing was not found on {hub.url}")
        assert err.count("\n") == 1  # nothing announced: the hub said no before anything started


def test_a_gated_repo_needs_hf_token(capsys, hub, tiny_model, monkeypatch):
    hub.add("org/gated", model_files(tiny_model), gated=True)
    code, _, err = invoke(capsys, "download", "-m", "org/gated")
    assert_one_error_line(code, err, f"org/gated is gated: accept its terms at {hub.url}/org/gated, then set HF_TOKEN")
    assert not store.models_dir().exists() or not any(store.models_dir().iterdir())

    monkeypatch.setenv("HF_TOKEN", TOKEN)
    hub.requests.clear()
    code, _, err = invoke(capsys, "download", "-m", "org/gated")
    assert code == 0, err
    assert all(r.authorization == f"Bearer {TOKEN}" for r in hub.requests if "/resolve/" in r.path)


def flip_last_byte(data: bytes) -> bytes:
    return data[:-1] + bytes([data[-1] ^ 1])


@pytest.mark.parametrize("tamper, message", [
    (lambda data: data[:-100], "Consistency check failed: file should be of size"),
    (flip_last_byte, "model.safetensors does not match the hub's hash of it"),
])
def test_a_corrupt_file_leaves_nothing_in_the_store(capsys, hub, tiny_repo, tamper, message):
    hub.tamper["model.safetensors"] = tamper(tiny_repo.files["model.safetensors"])
    code, _, err = invoke(capsys, "download", "-m", "org/tiny")
    assert_one_error_line(code, err, message)
    assert list(store.models_dir().iterdir()) == []

    hub.tamper.clear()
    assert invoke(capsys, "download", "-m", "org/tiny")[0] == 0


def test_a_pickle_only_repo_is_refused_before_downloading(capsys, hub, tiny_model):
    files = {name: data for name, data in model_files(tiny_model).items() if not name.endswith(".safetensors")}
    hub.add("org/pickled", {**files, "pytorch_model.bin": b"a pickle"})
    code, _, err = invoke(capsys, "download", "-m", "org/pickled")
    assert_one_error_line(code, err, "org/pickled has only pickle weights (pytorch_model.bin); Influence refuses")
    assert err.count("\n") == 1
    assert [r.path for r in hub.requests] == ["/api/models/org/pickled"]


def test_offline_mode(capsys, hub, tiny_repo):
    """HF_HUB_OFFLINE=1 is read when huggingface_hub is imported, so these runs are subprocesses."""
    offline = {**os.environ, "HF_HUB_OFFLINE": "1"}
    generate = [*CLI, "generate", "hello", "-m", "org/tiny", "--max-tokens", "2"]
    missing = subprocess.run(generate, env=offline, capture_output=True, text=True, timeout=120)
    assert_one_error_line(missing.returncode, missing.stderr, "org/tiny is not in the store, and HF_HUB_OFFLINE is set")
    assert missing.stderr.count("\n") == 1

    assert invoke(capsys, "download", "-m", "org/tiny")[0] == 0
    hub.requests.clear()
    stored = subprocess.run(generate, env=offline, capture_output=True, text=True, timeout=120)
    assert stored.returncode == 0, stored.stderr
    again = subprocess.run([*CLI, "download", "-m", "org/tiny"], env=offline, capture_output=True, text=True)
    assert again.returncode == 0 and again.stdout.strip() == str(store.models_dir() / "org--tiny")
    assert "HF_HUB_OFFLINE is set, so it was not checked for a newer revision" in again.stderr
    assert hub.requests == []
