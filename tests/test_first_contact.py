"""One set of defaults everywhere, the config file, shell completion and the chat REPL."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from cli_helpers import CLI, assert_one_error_line, invoke

import influence_core as influence
from influence_core.defaults import BUILTIN_SAMPLING, DEFAULT_MAX_TOKENS, DEFAULT_MODEL


def with_generation_config(tiny_model, tmp_path, **settings):
    """A copy of the tiny model whose generation_config.json states ``settings``."""
    target = tmp_path / "model"
    shutil.copytree(tiny_model, target)
    config = json.loads((target / "generation_config.json").read_text())
    (target / "generation_config.json").write_text(json.dumps({**config, **settings}))
    return target


# --- defaults ---------------------------------------------------------------------------------

def test_a_model_without_sampling_settings_samples_with_the_builtin_ones(tiny_model):
    result = influence.load(tiny_model, device="cpu").generate("hello", max_tokens=3)
    settings = result.settings
    assert (settings["temperature"], settings["top_k"], settings["top_p"], settings["min_p"]) == (
        BUILTIN_SAMPLING.temperature, BUILTIN_SAMPLING.top_k, BUILTIN_SAMPLING.top_p, BUILTIN_SAMPLING.min_p)
    assert settings["max_tokens"] == 3 and settings["sampler"] == "sample"
    assert influence.load(tiny_model, device="cpu").new_generation("hello").max_tokens == DEFAULT_MAX_TOKENS


def test_a_models_own_generation_config_wins(tiny_model, tmp_path):
    sampled = with_generation_config(tiny_model, tmp_path / "a", do_sample=True, temperature=0.6, top_p=0.8)
    settings = influence.load(sampled, device="cpu").generate("hello", max_tokens=2).settings
    assert (settings["temperature"], settings["top_p"], settings["top_k"]) == (0.6, 0.8, 0)
    greedy = with_generation_config(tiny_model, tmp_path / "b", do_sample=False)
    assert influence.load(greedy, device="cpu").generate("hello", max_tokens=2).settings["sampler"] == "argmax"


def test_temperature_zero_is_exact_greedy_against_transformers(capsys, tiny_model):
    import torch
    from transformers import AutoModelForCausalLM

    code, out, _ = invoke(capsys, "generate", "hello world", "--raw", "-p", str(tiny_model), "--max-tokens", "12",
                          "--temperature", "0", "--json")
    data = json.loads(out)
    assert code == 0 and data["settings"]["sampler"] == "argmax" and data["settings"]["top_p"] is None
    model = influence.load(tiny_model, device="cpu")
    prompt = model.encode_prompt("hello world", raw=True)
    reference = AutoModelForCausalLM.from_pretrained(tiny_model, torch_dtype=torch.float32)
    expected = reference.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False,
                                  eos_token_id=None)[0, len(prompt):].tolist()
    assert data["token_ids"] == expected[:len(data["token_ids"])]


def test_cli_and_api_run_the_same_settings(capsys, tiny_model):
    code, out, err = invoke(capsys, "generate", "hello", "-p", str(tiny_model), "--max-tokens", "4", "--json",
                            "--seed", "5")
    assert code == 0, err
    cli_settings = json.loads(out)["settings"]
    api_settings = influence.load(tiny_model, device="cpu").generate("hello", max_tokens=4, seed=5).settings
    assert cli_settings == api_settings


def test_stats_state_the_settings_that_ran(capsys, tiny_model):
    code, _, err = invoke(capsys, "generate", "hello", "-p", str(tiny_model), "--max-tokens", "2", "--stats",
                          "--top-k", "7")
    assert code == 0 and "settings: temperature 0.8, top_k 7," in err


def test_the_bundled_model_ships_its_recommended_settings():
    model = influence.load(device="cpu")
    assert model.config.generation == DEFAULT_MODEL.generation
    settings = model.generate("What is the capital of France?", max_tokens=24, seed=1).settings
    recommended = DEFAULT_MODEL.generation
    assert (settings["temperature"], settings["top_p"], settings["repetition_penalty"]) == (
        recommended.temperature, recommended.top_p, recommended.repetition_penalty)
    greedy = model.generate("What is the capital of France?", max_tokens=8, temperature=0).settings
    assert greedy["repetition_penalty"] == 1.0 and greedy["sampler"] == "argmax"


# --- the config file --------------------------------------------------------------------------

@pytest.fixture
def config_file(tmp_path, monkeypatch):
    path = tmp_path / "config.toml"
    monkeypatch.setenv("INFLUENCE_CONFIG", str(path))
    return path


def test_config_values_apply_and_flags_override_them(capsys, tiny_model, config_file):
    config_file.write_text("[generate]\nmax_tokens = 2\ntemperature = 0\n")
    code, out, _ = invoke(capsys, "generate", "hello", "-p", str(tiny_model), "--json")
    data = json.loads(out)
    assert code == 0 and data["settings"]["max_tokens"] == 2 and data["settings"]["sampler"] == "argmax"
    code, out, _ = invoke(capsys, "generate", "hello", "-p", str(tiny_model), "--json", "--max-tokens", "3",
                          "--temperature", "0.5")
    assert json.loads(out)["settings"]["max_tokens"] == 3 and json.loads(out)["settings"]["temperature"] == 0.5


def test_a_models_table_beats_the_command_table_but_not_flags(capsys, tiny_model, config_file):
    config_file.write_text(f'[generate]\nmax_tokens = 2\n\n[models."{tiny_model.name}"]\nmax_tokens = 3\n'
                           "temperature = 0\n")
    _, out, _ = invoke(capsys, "generate", "hello", "-p", str(tiny_model), "--json")
    assert json.loads(out)["settings"]["max_tokens"] == 3 and json.loads(out)["settings"]["temperature"] == 0
    _, out, _ = invoke(capsys, "generate", "hello", "-p", str(tiny_model), "--json", "--max-tokens", "1")
    assert json.loads(out)["settings"]["max_tokens"] == 1


@pytest.mark.parametrize("text, message", [
    ("[generate]\nmax_tokens = = 3\n", "line 2"),
    ("[generate]\nbogus = 1\n", "[generate] has no setting 'bogus'"),
    ("[generate]\nmax_tokens = 'many'\n", "[generate] max_tokens = 'many'"),
    ("[nonsense]\nx = 1\n", "unknown table [nonsense]"),
    ('[models."m"]\nport = 1\n', "has no setting 'port'"),
])
def test_a_wrong_config_file_is_one_error_naming_it(capsys, tiny_model, config_file, text, message):
    config_file.write_text(text)
    code, _, err = invoke(capsys, "generate", "hello", "-p", str(tiny_model))
    assert_one_error_line(code, err, message)
    assert str(config_file) in err


def test_config_set_show_and_unset_keep_the_users_comments(capsys, config_file):
    config_file.write_text("# my settings\n[serve]\nport = 9000  # the usual one\n")
    assert invoke(capsys, "config", "set", "generate.temperature", "0.7")[0] == 0
    assert invoke(capsys, "config", "set", "models.SmolLM2-1.7B.top_p", "0.9")[0] == 0
    text = config_file.read_text()
    assert "# my settings" in text and "# the usual one" in text
    code, out, _ = invoke(capsys, "config", "show", "--json")
    rows = {row["setting"]: row for row in json.loads(out)["settings"]}
    assert rows["generate.temperature"]["value"] == 0.7 and "[generate]" in rows["generate.temperature"]["from"]
    assert rows["serve.port"]["value"] == 9000 and rows["generate.max_tokens"]["from"] == "built-in"
    assert rows["models.SmolLM2-1.7B.top_p"]["value"] == 0.9
    assert invoke(capsys, "config", "unset", "generate.temperature")[0] == 0
    assert "temperature" not in config_file.read_text()
    code, _, err = invoke(capsys, "config", "set", "generate.max_tokens", "lots")
    assert_one_error_line(code, err, "generate.max_tokens = 'lots'")
    code, _, err = invoke(capsys, "config", "set", "serve.nope", "1")
    assert_one_error_line(code, err, "has no setting 'nope'")



def test_a_serve_table_does_not_break_the_other_commands_without_the_serve_plugin(config_file):
    config_file.write_text("[serve]\nport = 9000\n")
    without_serve = {**os.environ, "INFLUENCE_LOAD_PLUGINS": "torch,samplers,safetensors"}

    def influence(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=60, env=without_serve)

    assert influence("generate", "--help").returncode == 0
    shown = influence("config", "show", "--json")
    assert shown.returncode == 0, shown.stderr
    settings = {row["setting"] for row in json.loads(shown.stdout)["settings"]}
    assert "generate.max_tokens" in settings and not any(setting.startswith("serve.") for setting in settings)
    refused = influence("config", "set", "serve.port", "9001")
    assert_one_error_line(refused.returncode, refused.stderr, "`influence serve` is not installed")
    assert "9000" in config_file.read_text()

# --- completion and chat ----------------------------------------------------------------------

def test_shell_completion_script_and_model_names(tmp_path, tiny_model):
    # Without a shell above it to detect (CI's runner, say), typer takes the shell's name instead.
    undetected = {**os.environ, "_TYPER_COMPLETE_TEST_DISABLE_SHELL_DETECTION": "1"}
    script = subprocess.run([*CLI, "--show-completion", "bash"], capture_output=True, text=True, timeout=60,
                            env=undetected)
    assert script.returncode == 0 and "_influence_completion" in script.stdout, script.stderr
    home = tmp_path / "home"
    shutil.copytree(tiny_model, home / "models" / "my-tiny")
    env = {"INFLUENCE_HOME": str(home), "_INFLUENCE_COMPLETE": "complete_bash",
           "COMP_WORDS": "influence generate -m my", "COMP_CWORD": "3"}
    done = subprocess.run(CLI, capture_output=True, text=True, timeout=60, env={**os.environ, **env})
    assert "my-tiny" in done.stdout.split()


def test_chat_multiline_save_and_load(tiny_model, tmp_path):
    saved = tmp_path / "talk.json"
    script = f'"""\nfirst line\nsecond line\n"""\n/save {saved}\n/frobnicate\n/exit\n'
    done = subprocess.run([*CLI, "chat", "-p", str(tiny_model), "--max-tokens", "3", "--temperature", "0"],
                          input=script, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    messages = json.loads(saved.read_text())["messages"]
    assert messages[0] == {"role": "user", "content": "first line\nsecond line"} and messages[1]["role"] == "assistant"
    assert "unknown command /frobnicate" in done.stderr
    again = subprocess.run([*CLI, "chat", "-p", str(tiny_model), "--max-tokens", "3", "--temperature", "0"],
                           input=f"/load {saved}\n/save {saved}\n", capture_output=True, text=True, timeout=120)
    assert "loaded 2 messages" in again.stderr and f"{saved} exists" in again.stderr


# --- derived artefacts ------------------------------------------------------------------------

def test_models_list_shows_derived_artefacts_and_prune_removes_only_the_stores(capsys, tmp_path, tiny_model,
                                                                               monkeypatch):
    from influence_core import artifacts
    from influence_core.api import open_source
    from influence_core.hf_directory import write_hf_directory
    from influence_models import store

    monkeypatch.setenv("INFLUENCE_HOME", str(tmp_path / "home"))
    model_dir = store.models_dir() / "tiny"
    write_hf_directory(open_source(tiny_model), model_dir)

    def artefact(kind: str, key: str, source: Path, fingerprint: str) -> Path:
        directory = artifacts.exports_dir(kind) / key
        directory.mkdir(parents=True)
        (directory / "model.bin").write_bytes(b"x" * 1000)
        (directory / artifacts.MANIFEST).write_text(json.dumps({"source": str(source), "source_fingerprint": fingerprint}))
        return directory

    current = artefact("onnx", "a", model_dir, artifacts.fingerprint(model_dir))
    stale = artefact("onnx", "b", model_dir, "an older fingerprint")
    orphan = artefact("compiled", "c", tmp_path / "gone", "x")
    foreign = artifacts.exports_dir("onnx") / "not-ours"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("mine")

    code, out, _ = invoke(capsys, "models", "list", "--json")
    listed = {model["name"]: model for model in json.loads(out)}
    assert code == 0 and {(d["kind"], d["current"]) for d in listed["tiny"]["derived"]} == {("onnx", True),
                                                                                           ("onnx", False)}
    code, out, _ = invoke(capsys, "models", "prune")
    assert code == 0 and "(2 artefacts)" in out
    assert current.exists() and not stale.exists() and not orphan.exists() and foreign.exists()
    code, out, _ = invoke(capsys, "models", "prune", "tiny")
    assert code == 0 and not current.exists() and (foreign / "keep.txt").read_text() == "mine"
    assert (model_dir / "config.json").exists()
    code, _, err = invoke(capsys, "models", "prune", "nope")
    assert_one_error_line(code, err, "nope")


def test_cli_api_and_server_run_the_same_settings_when_given_none(capsys, tiny_model):
    import httpx
    from test_server import Server

    def without_seed(settings: dict) -> dict:
        return {key: value for key, value in settings.items() if key != "seed"}

    _, out, _ = invoke(capsys, "generate", "hello", "-p", str(tiny_model), "--json")
    cli = json.loads(out)["settings"]
    api = influence.load(tiny_model, device="cpu").generate("hello").settings
    server = Server(tiny_model)
    try:
        reply = httpx.post(f"{server.url}/v1/chat/completions", timeout=120,
                           json={"messages": [{"role": "user", "content": "hello"}]}).json()
    finally:
        server.stop()
    served = reply["choices"][0]["settings"]
    assert without_seed(cli) == without_seed(api) == without_seed(served)
    assert cli["max_tokens"] == DEFAULT_MAX_TOKENS and cli["temperature"] == BUILTIN_SAMPLING.temperature
