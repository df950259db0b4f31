"""Bad input at the command line, the API and the server: one `error:` line, the right exit status."""

from __future__ import annotations

import socket
import subprocess

import pytest
from cli_helpers import CLI, assert_one_error_line, invoke

import influence_core as influence
from influence_core.sampling import MAX_SEED


def assert_usage_error(code: int, err: str, message: str) -> None:
    """Exit status 2 and one `error:` line naming the problem, without click's box."""
    assert code == 2 and err.count("\n") == 1 and err.startswith("error: ") and message in err, (code, err)


@pytest.mark.parametrize("args, message", [
    (["generate", "hi", "--max-tokens", "abc"], "Invalid value for '--max-tokens'"),
    (["generate", "hi", "--max-tokens", "0"], "Invalid value for '--max-tokens'"),
    (["generate", "hi", "--threads", "-1"], "Invalid value for '--threads'"),
    (["generate", "hi", "--threads", "0"], "Invalid value for '--threads'"),
    (["generate", "--prompts-file", "prompts.txt", "--max-batch", "-5"], "Invalid value for '--max-batch'"),
    (["generate", "hi", "--temperature", "-1"], "Invalid value for '--temperature'"),
    (["generate", "hi", "--top-p", "0"], "'--top-p': 0.0 is not in (0, 1]"),
    (["generate", "hi", "--top-p", "1.5"], "'--top-p': 1.5 is not in (0, 1]"),
    (["generate", "hi", "--top-p", "nan"], "'--top-p': nan is not in (0, 1]"),
    (["generate", "hi", "--top-k", "-3"], "Invalid value for '--top-k'"),
    (["generate", "hi", "--min-p", "2"], "Invalid value for '--min-p'"),
    (["generate", "hi", "--repetition-penalty", "0"], "'--repetition-penalty': 0.0 is not > 0"),
    (["generate", "hi", "--seed", str(2**64)], "Invalid value for '--seed'"),
    (["generate", "hi", "--seed", "-1"], "Invalid value for '--seed'"),
    (["chat", "--max-tokens", "-2"], "Invalid value for '--max-tokens'"),
    (["chat", "--seed", str(2**70)], "Invalid value for '--seed'"),
    (["compare", "hi", "--max-tokens", "0"], "Invalid value for '--max-tokens'"),
    (["serve", "--port", "99999"], "Invalid value for '--port'"),
    (["serve", "--port", "-1"], "Invalid value for '--port'"),
    (["serve", "--port", "0"], "Invalid value for '--port'"),
    (["serve", "--max-batch", "0"], "Invalid value for '--max-batch'"),
    (["serve", "--max-queue", "0"], "Invalid value for '--max-queue'"),
    (["bench", "--repetitions", "0"], "Invalid value for '--repetitions'"),
    (["bench", "--threads", "-4"], "Invalid value for '--threads'"),
    (["generate", "hi", "--no-such-option"], "No such option: --no-such-option"),
    (["no-such-command"], "No such command 'no-such-command'"),
    (["models", "rm"], "Missing argument"),
])
def test_usage_errors_are_one_line_and_exit_2(capsys, args, message):
    code, out, err = invoke(capsys, *args)
    assert_usage_error(code, err, message)
    assert out == ""


def test_a_usage_error_from_a_real_process_is_one_line():
    done = subprocess.run([*CLI, "generate", "hi", "--max-tokens", "abc"], capture_output=True, text=True, timeout=60)
    assert_usage_error(done.returncode, done.stderr, "Invalid value for '--max-tokens'")
    assert "╭" not in done.stderr and "Usage:" not in done.stderr


def test_help_still_works(capsys):
    code, out, _ = invoke(capsys, "generate", "--help")
    assert code == 0 and "--max-tokens" in out


def test_a_port_in_use_is_one_clear_line(capsys, tiny_model):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code, _, err = invoke(capsys, "serve", "-p", str(tiny_model), "--port", str(port), "--threads", "1")
    assert_one_error_line(code, err, f"cannot listen on 127.0.0.1:{port}: Address already in use")


@pytest.mark.parametrize("seed", [2**64, 2**70, -1, 1.5, "7", True])
def test_the_api_refuses_seeds_outside_the_one_range(tiny_model, seed):
    model = influence.load(tiny_model)
    with pytest.raises(influence.SamplingError, match=r"seed must be an integer in \[0, 2\*\*64 - 1\]"):
        model.generate("hi", max_tokens=1, seed=seed)


def test_the_largest_seed_works_everywhere(capsys, tiny_model):
    import numpy

    model = influence.load(tiny_model)
    first = model.generate("hi", max_tokens=3, temperature=1.0, seed=MAX_SEED).token_ids
    assert model.generate("hi", max_tokens=3, temperature=1.0, seed=numpy.uint64(MAX_SEED)).token_ids == first
    code, _, err = invoke(capsys, "generate", "hi", "-p", str(tiny_model), "--max-tokens", "1", "--seed", str(MAX_SEED))
    assert code == 0, err


def test_an_infinite_temperature_is_refused(capsys, tiny_model):
    code, _, err = invoke(capsys, "generate", "hi", "-p", str(tiny_model), "--temperature", "inf")
    assert_one_error_line(code, err, "temperature must be >= 0 and finite, got inf")


def test_the_server_answers_400_for_a_seed_outside_the_range(tiny_model):
    from fastapi.testclient import TestClient

    from influence_serve.router import EngineSettings, ModelRouter, ModelSpec
    from influence_serve.server import create_app

    router = ModelRouter([ModelSpec("tiny", tiny_model)], lambda spec: influence.load(spec.reference, max_batch=1),
                         EngineSettings(max_queue=1))
    client = TestClient(create_app(router))
    for seed in (2**70, 2**64, -1):
        answer = client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 1, "seed": seed})
        assert answer.status_code == 400, answer.text
        assert answer.json()["error"]["param"] == "seed"


@pytest.mark.parametrize("option", ["threads", "max_batch", "context_length"])
@pytest.mark.parametrize("value", [0, -1, 2.5])
def test_the_api_refuses_sizes_below_one(tiny_model, option, value):
    with pytest.raises(influence.InfluenceError, match=f"{option} must be an integer >= 1"):
        influence.load(tiny_model, **{option: value})


def test_invalid_utf8_on_stdin_is_named_with_its_offset(tiny_model):
    done = subprocess.run([*CLI, "generate", "-", "-p", str(tiny_model), "--max-tokens", "1"],
                          input=b"hello \xff world", capture_output=True, timeout=60)
    assert done.returncode == 1
    assert done.stderr.decode() == "error: stdin is not UTF-8 text: byte 0xff at offset 6 (invalid start byte)\n"


def test_invalid_utf8_in_a_prompts_file_is_named_with_its_offset(capsys, tiny_model, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_bytes("first\nsecond \u00e9\n".encode() + b"\xc3(\n")
    code, _, err = invoke(capsys, "generate", "--prompts-file", str(prompts), "-p", str(tiny_model))
    assert_one_error_line(code, err, f"{prompts} is not UTF-8 text: byte 0xc3 at offset 16 (invalid continuation byte)")


def test_invalid_utf8_in_a_chat_is_one_line(tiny_model):
    done = subprocess.run([*CLI, "chat", "-p", str(tiny_model), "--max-tokens", "1"], input=b"\xff\xfe\n",
                          capture_output=True, timeout=60)
    lines = done.stderr.decode().strip().splitlines()
    assert done.returncode == 1 and lines[-1] == "error: stdin is not UTF-8 text: byte 0xff at offset 0 of the line ''...", \
        done.stderr
