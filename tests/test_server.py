"""`influence serve`, driven by the official openai client."""

from __future__ import annotations

import concurrent.futures
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest

import influence_core as influence

CLI = [sys.executable, "-c", "from influence_core.cli import run; run()"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`influence serve` in a subprocess: of ``model`` (None: as ``args`` say, or the default model)."""

    def __init__(self, model: Path | None, *args: str, env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        serving = ["-p", str(model)] if model is not None else []
        self.process = subprocess.Popen([*CLI, "serve", *serving, "--port", str(self.port), "--threads", "1", *args],
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                        env={**os.environ, **(env or {})})
        self.url = f"http://127.0.0.1:{self.port}"
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and self.process.poll() is None:
            try:
                if httpx.get(f"{self.url}/health").status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"server did not start: {self.process.stderr.read()}")

    def health(self) -> dict:
        return httpx.get(f"{self.url}/health").json()

    def rss_mb(self) -> float:
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return 0.0

    def client(self, **kwargs) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=kwargs.pop("api_key", "unused"), max_retries=0,
                             **kwargs)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            self.process.wait(20)


@pytest.fixture(scope="module")
def server(tiny_model):
    running = Server(tiny_model, "--max-batch", "4", "--max-queue", "64", "--name", "tiny")
    yield running
    running.stop()


@pytest.fixture(scope="module")
def local(tiny_model):
    return influence.load(tiny_model, device="cpu")


def test_models_and_health(server):
    assert [m.id for m in server.client().models.list().data] == ["tiny"]
    assert server.health()["status"] == "ok"


def test_completion_matches_local_greedy_generation(server, local):
    reply = server.client().completions.create(model="tiny", prompt="hello world", max_tokens=10, temperature=0)
    expected = local.generate("hello world", raw=True, max_tokens=10, temperature=0)
    assert reply.choices[0].text == expected.text
    assert reply.choices[0].finish_reason == ("length" if expected.finish_reason == "length" else "stop")
    assert reply.usage.completion_tokens == len(expected.token_ids)
    assert reply.usage.prompt_tokens == len(local.encode_prompt("hello world", raw=True))


def test_chat_completion_uses_the_chat_template(server, local):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    reply = server.client().chat.completions.create(model="tiny", messages=messages, max_tokens=8, temperature=0)
    expected = local.generate(messages, max_tokens=8, temperature=0)
    assert reply.choices[0].message.role == "assistant"
    assert reply.choices[0].message.content == expected.text


def test_streaming_gives_the_same_text_in_chunks_then_done(server, local):
    client = server.client()
    chunks = list(client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hello"}],
                                                 max_tokens=12, temperature=0, stream=True,
                                                 stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == local.generate([{"role": "user", "content": "hello"}], max_tokens=12, temperature=0).text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("stop", "length")
    assert chunks[-1].usage.completion_tokens >= 1
    streamed = client.completions.create(model="tiny", prompt="the quick", max_tokens=6, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == local.generate("the quick", raw=True, max_tokens=6,
                                                                           temperature=0).text


def test_stop_strings(server, local):
    full = local.generate("the quick brown", raw=True, max_tokens=16, temperature=0).text
    stop = full[4:7]
    reply = server.client().completions.create(model="tiny", prompt="the quick brown", max_tokens=16,
                                               temperature=0, stop=[stop])
    assert reply.choices[0].text == full[:full.index(stop)]
    assert reply.choices[0].finish_reason == "stop"


def test_seeded_sampling_is_reproducible_and_n_gives_several_choices(server):
    client = server.client()

    def sample(seed):
        return client.completions.create(model="tiny", prompt="hello", max_tokens=12, temperature=1.0, seed=seed)

    assert sample(5).choices[0].text == sample(5).choices[0].text
    several = client.completions.create(model="tiny", prompt="hello", max_tokens=12, temperature=1.0, seed=5, n=3)
    assert len(several.choices) == 3 and [c.index for c in several.choices] == [0, 1, 2]


@pytest.mark.parametrize("call", [
    lambda c: c.completions.create(model="tiny", prompt="hi", max_tokens=0),
    lambda c: c.completions.create(model="tiny", prompt="hi", temperature=3.0),
    lambda c: c.completions.create(model="tiny", prompt="hi", top_p=0.0),
    lambda c: c.chat.completions.create(model="tiny", messages=[]),
    lambda c: c.chat.completions.create(model="tiny", messages=[{"role": "wizard", "content": "hi"}]),
    lambda c: c.completions.create(model="tiny", prompt="hello " * 400),
])
def test_invalid_requests_get_400_with_an_openai_error(server, call):
    with pytest.raises(openai.BadRequestError) as raised:
        call(server.client())
    assert raised.value.status_code == 400
    assert raised.value.body["type"] == "invalid_request_error" and raised.value.body["message"]


def test_a_full_queue_answers_429_with_retry_after(tiny_model):
    busy = Server(tiny_model, "--max-batch", "1", "--max-queue", "1")
    try:
        def slow():
            return httpx.post(f"{busy.url}/v1/completions", json={"prompt": "hi", "max_tokens": 200,
                                                                  "temperature": 1.0}, timeout=60)

        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            responses = list(pool.map(lambda _: slow(), range(8)))
        refused = [r for r in responses if r.status_code == 429]
        assert refused and all(r.headers["retry-after"] == "1" for r in refused)
        assert refused[0].json()["error"]["type"] == "rate_limit_error"
        assert any(r.status_code == 200 for r in responses)
    finally:
        busy.stop()


def wait_for_idle(server, timeout=30.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        health = server.health()
        if health["active_slots"] == 0 and health["queued"] == 0:
            return health
        time.sleep(0.1)
    return server.health()


def test_a_client_that_disconnects_mid_stream_frees_its_slot(server, local):
    # Greedy from this prompt runs to the end of the context without an EOS: long enough to abandon.
    assert local.generate("hello", raw=True, max_tokens=250, temperature=0).finish_reason != "eos"
    cancelled = wait_for_idle(server)["cancelled"]
    with httpx.stream("POST", f"{server.url}/v1/completions",
                      json={"prompt": "hello", "max_tokens": 250, "temperature": 0, "stream": True}) as response:
        next(line for line in response.iter_lines() if line.startswith("data:"))
    health = wait_for_idle(server)
    assert health["active_slots"] == 0 and health["cancelled"] == cancelled + 1


def test_load_200_requests_16_at_a_time_with_aborted_streams(server, local):
    prompts = ["hello", "the quick brown fox", "Rust is", "def main():"]
    expected = {p: local.generate(p, raw=True, max_tokens=10, temperature=0).text for p in prompts}
    wait_for_idle(server)
    baseline_rss = server.rss_mb()

    def request(i: int) -> bool:
        prompt = prompts[i % len(prompts)]
        if i % 4 == 0:  # abort this stream after its first chunk
            with httpx.stream("POST", f"{server.url}/v1/completions", timeout=60,
                              json={"prompt": prompt, "max_tokens": 200, "temperature": 0, "stream": True}) as r:
                next(line for line in r.iter_lines() if line.startswith("data:"))
            return True
        reply = server.client(timeout=60).completions.create(model="tiny", prompt=prompt, max_tokens=10,
                                                             temperature=0, stream=i % 3 == 0)
        text = "".join(c.choices[0].text for c in reply) if i % 3 == 0 else reply.choices[0].text
        return text == expected[prompt]

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        outcomes = list(pool.map(request, range(200)))
    assert all(outcomes)
    health = wait_for_idle(server)
    assert health["status"] == "ok" and health["active_slots"] == 0 and health["queued"] == 0
    assert server.rss_mb() - baseline_rss < 64, "memory grew under load"
    assert os.path.exists(f"/proc/{server.process.pid}")
