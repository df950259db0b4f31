"""The command line: output modes, and one clear error line (no traceback) for each bad input."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
from cli_helpers import CLI, assert_one_error_line, help_in_a_fresh_process, invoke


def influence(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, input=stdin, timeout=120)


def test_help_and_version_do_not_import_torch():
    help_text, modules = help_in_a_fresh_process()
    assert "torch" not in modules and "onnxruntime" not in modules, "heavy import at start-up"
    assert "generate" in help_text
    version = influence("--version")
    assert version.returncode == 0 and version.stdout.startswith("influence ")



@pytest.mark.parametrize("missing", ["fastapi", "uvicorn", "prometheus_client"])
def test_serve_without_the_serve_extra_names_it(capsys, monkeypatch, missing):
    monkeypatch.setitem(sys.modules, missing, None)  # what find_spec reports for a module that is not installed
    code, out, err = invoke(capsys, "serve", "--port", "8123")
    assert_one_error_line(code, err, f"`influence serve` needs {missing}: pip install 'influence[serve]'")
    assert out == ""

def test_json_output_has_text_tokens_and_timings(capsys, tiny_model):
    code, out, _ = invoke(capsys, "generate", "hello", "-p", str(tiny_model), "--max-tokens", "4", "--json")
    assert code == 0
    data = json.loads(out)
    assert data["finish_reason"] in ("length", "eos") and 1 <= len(data["token_ids"]) <= 4
    for key in ("text", "prompt_tokens", "generated_tokens", "time_to_first_token_s", "prefill_tokens_per_s",
                "decode_tokens_per_s", "backend", "device", "dtype", "seed"):
        assert key in data


def test_streamed_and_unstreamed_text_agree_and_stats_go_to_stderr(capsys, tiny_model):
    args = ("generate", "hello", "-p", str(tiny_model), "--max-tokens", "6", "--temperature", "0")
    _, streamed, _ = invoke(capsys, *args)
    _, whole, err = invoke(capsys, *args, "--no-stream", "--stats")
    assert streamed == whole
    assert "decode" in err and "tok/s" in err


def test_prompt_from_stdin(tiny_model):
    piped = influence("generate", "-", "-p", str(tiny_model), "--max-tokens", "3", "--json", "--raw",
                      "--temperature", "0", stdin="hello")
    direct = influence("generate", "hello", "-p", str(tiny_model), "--max-tokens", "3", "--json", "--raw",
                       "--temperature", "0")
    assert json.loads(piped.stdout)["token_ids"] == json.loads(direct.stdout)["token_ids"]


def corrupt_copy(source, tmp_path, change):
    target = tmp_path / "model"
    shutil.copytree(source, target)
    change(target)
    return target


def truncate_weights(directory):
    path = next(directory.glob("*.safetensors"))
    path.write_bytes(path.read_bytes()[:100])


def pickle_only(directory):
    for path in directory.glob("*.safetensors"):
        path.unlink()
    (directory / "pytorch_model.bin").write_bytes(b"not really a pickle")


def drop_tensor(directory):
    from safetensors.torch import load_file, save_file

    path = next(directory.glob("*.safetensors"))
    tensors = load_file(path)
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, path, metadata={"format": "pt"})


def bad_config(directory):
    (directory / "config.json").write_text("{not json")


def unknown_architecture(directory):
    config = json.loads((directory / "config.json").read_text())
    config.update(model_type="gpt_neox", architectures=["GPTNeoXForCausalLM"])
    (directory / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("change, message", [
    (truncate_weights, "is not a valid safetensors file"),
    (pickle_only, "refuses to unpickle"),
    (drop_tensor, "lacks the tensor 'model.layers.1.mlp.up_proj.weight'"),
    (bad_config, "config.json is not valid JSON"),
    (unknown_architecture, "no installed plugin builds model type 'gpt_neox' for backend 'torch'"),
])
def test_broken_models_give_one_clear_line(capsys, tmp_path, tiny_model, change, message):
    model = corrupt_copy(tiny_model, tmp_path, change)
    code, out, err = invoke(capsys, "generate", "hi", "-p", str(model), "--max-tokens", "2")
    assert code == 1
    assert err.count("\n") == 1 and err.startswith("error: ") and message in err, err


@pytest.mark.parametrize("args, message", [
    (["--model-path", "/no/such/model"], "does not exist"),
    (["--backend", "tensorflow"], "unknown backend 'tensorflow'"),
    (["--dtype", "int3"], "does not support dtype 'int3'"),
    (["--device", "tpu"], "cannot run on 'tpu'"),
    (["--sampler", "nope"], "unknown sampler 'nope'"),
    (["--sampler", "top_k", "-o", "k", "0"], "top_k must be >= 1"),
    (["-o", "k", "3"], "need --sampler"),
    (["-B", "beams=2"], "backend 'torch' has no option 'beams' (its options: tensor_parallel, compiled"),
    (["-B", "compiled=sometimes"], "backend 'torch' option compiled must be true or false, got 'sometimes'"),
    (["-B", "compiled"], "-B 'compiled' needs a key and a value: -B KEY=VALUE"),
    (["--backend", "onnx", "-B", "compiled=true"], "backend 'onnx' has no option 'compiled'"),
])
def test_bad_arguments_give_one_clear_line(capsys, tiny_model, args, message):
    full = ["generate", "hi", "-p", str(tiny_model), *args]
    if "--model-path" in args:
        full = ["generate", "hi", *args]
    code, _, err = invoke(capsys, *full)
    assert code == 1
    assert err.count("\n") == 1 and err.startswith("error: ") and message in err, err


def test_prompt_longer_than_the_context(capsys, tiny_model):
    code, _, err = invoke(capsys, "generate", "hello world " * 200, "--raw", "-p", str(tiny_model))
    assert code == 1 and "the context holds 256" in err and err.count("\n") == 1


def test_cuda_on_a_machine_without_cuda(capsys, tiny_model):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    code, _, err = invoke(capsys, "generate", "hi", "-p", str(tiny_model), "--device", "cuda")
    assert code == 1 and "sees no CUDA device" in err and err.count("\n") == 1
