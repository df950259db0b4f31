"""`influence serve` as a deployment meets it: prefix cache, smooth streams while long prompts come in,
abandoned and failed requests, shutdown, limits, keys, metrics and several models."""

from __future__ import annotations

import concurrent.futures
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families
import test_server
from test_server import CLI, free_port, wait_for_idle
from tiny_models import make_tiny_llama

import influence_core as influence


class Server(test_server.Server):
    """A server started by its arguments alone (-p, -m, --models-dir, or the default model)."""

    def __init__(self, *args: str, env: dict[str, str] | None = None) -> None:
        super().__init__(None, *args, env=env)

    def metrics(self) -> dict[tuple[str, tuple], float]:
        text = httpx.get(f"{self.url}/metrics").text
        return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
                for family in text_string_to_metric_families(text) for sample in family.samples}


@pytest.fixture(scope="module")
def tiny(tiny_model):
    running = Server("-p", str(tiny_model), "--max-batch", "4", "--name", "tiny")
    yield running
    running.stop()


@pytest.fixture(scope="module")
def long_context_model(tmp_path_factory) -> Path:
    """A tiny model with room for a 2,000-token prompt."""
    return make_tiny_llama(tmp_path_factory.mktemp("long") / "long", max_position_embeddings=4096, hidden_size=128,
                           intermediate_size=256, num_hidden_layers=4)


@pytest.fixture(scope="module")
def long(long_context_model):
    running = Server("-p", str(long_context_model), "--max-batch", "4")
    yield running
    running.stop()


def chat_turns(client, model: str, turns: list[str]) -> list[tuple[str, int, int]]:
    """(reply, prompt tokens, cached tokens) of each turn of one greedy conversation."""
    messages, replies = [], []
    for turn in turns:
        messages.append({"role": "user", "content": turn})
        reply = client.chat.completions.create(model=model, messages=messages, max_tokens=24, temperature=0)
        text = reply.choices[0].message.content
        replies.append((text, reply.usage.prompt_tokens, reply.usage.prompt_tokens_details.cached_tokens))
        messages.append({"role": "assistant", "content": text})
    return replies


def test_a_conversation_reports_cached_tokens_and_the_same_text_as_without_the_cache():
    """The default model, as a chat client uses it: every turn resends the whole conversation."""
    turns = ["What is Rust?", "And what is Python?", "Which of the two is faster?"]
    results = {}
    for option in ("--prefix-cache", "--no-prefix-cache"):
        # float32: the int4 kernel rounds differently for a chunk than for a whole prompt, which
        # can flip a greedy pick; the cache itself must change nothing.
        server = Server(option, "--max-batch", "2", "--context-length", "1024", "--dtype", "float32")
        try:
            client = server.client()
            results[option] = chat_turns(client, client.models.list().data[0].id, turns)
        finally:
            server.stop()
    cached, cold = results["--prefix-cache"], results["--no-prefix-cache"]
    assert [text for text, _, _ in cached] == [text for text, _, _ in cold]
    assert [prompt for _, prompt, _ in cached] == [prompt for _, prompt, _ in cold]
    assert [hits for _, _, hits in cold] == [0, 0, 0]
    assert cached[0][2] == 0
    for (_, previous_prompt, _), (_, prompt, hits) in zip(cached, cached[1:]):
        assert previous_prompt <= hits < prompt  # at least the whole previous prompt came from the cache


def test_a_stream_keeps_flowing_while_a_2000_token_prompt_is_admitted(long):
    arrivals: list[float] = []
    admitted = threading.Event()

    def stream() -> None:
        # A stream deep in a long conversation, as the one a newcomer's long prompt would stall.
        with httpx.stream("POST", f"{long.url}/v1/completions", timeout=120, json={
                "prompt": "Rust is a systems programming language. " * 100, "max_tokens": 2000, "temperature": 0,
                "stream": True}) as response:
            for line in response.iter_lines():
                if line.startswith("data:"):
                    arrivals.append(time.perf_counter())
                if admitted.is_set() or line == "data: [DONE]":
                    return

    reader = threading.Thread(target=stream)
    reader.start()
    while len(arrivals) < 20:  # past the stream's start-up
        time.sleep(0.01)
    time.sleep(1.0)  # a stretch of its normal gaps
    sent = time.perf_counter()
    reply = httpx.post(f"{long.url}/v1/completions", timeout=120, json={
        "prompt": "hello world " * 700, "max_tokens": 1, "temperature": 0}).json()
    done = time.perf_counter()
    admitted.set()
    reader.join()
    assert reply["usage"]["prompt_tokens"] >= 2000
    gaps = [(later - earlier, later) for earlier, later in zip(arrivals[20:], arrivals[21:])]
    normal = [gap for gap, at in gaps if at < sent]
    during = [gap for gap, at in gaps if sent < at < done]
    assert len(during) > 20, "the stream ended before the long prompt was admitted"
    # Compared with the same stream's gaps just before, at their longest and at their 90th
    # percentile. On this tiny model a whole 2,000-token prefill takes only tens of milliseconds, and
    # a shared 2-core machine's scheduling adds gaps of that size, so this checks that the stream
    # keeps flowing while the prompt is admitted (with 50 ms of slack at the longest gap); that the
    # prompt goes in chunks between decode steps is counted in tests/test_batching.py.
    print(f"gaps: normal p90 {p90(normal):.4f} max {max(normal):.4f}, during the prompt's admission "
          f"p90 {p90(during):.4f} max {max(during):.4f} s")
    assert max(during) < 3 * max(normal) + 0.05, (max(during), max(normal))
    assert p90(during) < 3 * p90(normal) + 0.01, (p90(during), p90(normal))


def p90(values: list[float]) -> float:
    return sorted(values)[int(0.9 * (len(values) - 1))]


def test_a_non_streaming_client_that_gives_up_cancels_its_generations(long):
    cancelled = wait_for_idle(long)["cancelled"]
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{long.url}/v1/completions", timeout=1.0,
                   json={"prompt": "hello", "max_tokens": 4000, "temperature": 0, "n": 2})
    health = wait_for_idle(long, timeout=10)
    assert health["active_slots"] == 0 and health["cancelled"] == cancelled + 2


def test_a_request_failing_part_way_cancels_its_other_choices_and_only_it_gets_429(long_context_model):
    server = Server("-p", str(long_context_model), "--max-batch", "1", "--max-queue", "1", "--name", "tiny")
    try:
        with httpx.stream("POST", f"{server.url}/v1/completions", timeout=60, json={
                "prompt": "hello", "max_tokens": 4000, "temperature": 0, "stream": True}) as busy:
            lines = busy.iter_lines()  # held: a dropped line iterator closes the connection
            next(line for line in lines if line.startswith("data:"))  # the one slot is taken
            # Two choices, room for one in the queue: the second is refused, the first must not stay queued.
            refused = httpx.post(f"{server.url}/v1/completions", timeout=30,
                                 json={"prompt": "hi", "max_tokens": 5, "n": 2, "temperature": 1.0})
            assert refused.status_code == 429 and refused.json()["error"]["type"] == "rate_limit_error"
            assert server.health()["queued"] == 0
            # The next request fits in the queue, and is answered once the slot frees.
            with concurrent.futures.ThreadPoolExecutor(1) as pool:
                later = pool.submit(server.client(timeout=60).completions.create, model="tiny", prompt="hi",
                                    max_tokens=5)
                while server.health()["queued"] == 0 and not later.done():
                    time.sleep(0.05)
                busy.close()
                assert later.result().usage.completion_tokens >= 1
        health = wait_for_idle(server)
        assert health["queued"] == 0 and health["active_slots"] == 0
    finally:
        server.stop()


def test_usage_counts_the_prompt_once_with_several_choices(tiny):
    one = tiny.client().completions.create(model="tiny", prompt="the quick brown fox", max_tokens=4)
    two = tiny.client().completions.create(model="tiny", prompt="the quick brown fox", max_tokens=4, n=2)
    assert len(two.choices) == 2 and two.usage.prompt_tokens == one.usage.prompt_tokens
    assert 2 <= two.usage.completion_tokens <= 8
    assert two.usage.total_tokens == two.usage.prompt_tokens + two.usage.completion_tokens


def test_no_max_tokens_means_the_default_not_the_whole_context(long, long_context_model):
    from influence_core.defaults import DEFAULT_MAX_TOKENS

    local = influence.load(long_context_model, device="cpu")
    expected = local.generate("hello", raw=True, temperature=0)
    reply = long.client().completions.create(model="long", prompt="hello", temperature=0)
    assert reply.usage.completion_tokens == len(expected.token_ids) <= DEFAULT_MAX_TOKENS
    assert reply.choices[0].text == expected.text


def test_sigterm_while_a_request_runs_stops_the_server_within_seconds_with_status_0(long_context_model):
    server = Server("-p", str(long_context_model), "--max-batch", "1")
    try:
        with httpx.stream("POST", f"{server.url}/v1/completions", timeout=60, json={
                "prompt": "hello", "max_tokens": 4000, "temperature": 0, "stream": True}) as response:
            lines = response.iter_lines()  # held: a dropped line iterator closes the connection
            next(line for line in lines if line.startswith("data:"))
            assert server.health()["active_slots"] == 1
            started = time.monotonic()
            server.process.send_signal(signal.SIGTERM)
            assert server.process.wait(15) == 0
        assert time.monotonic() - started < 12
    finally:
        server.stop()


def error_of(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    error = response.json()["error"]
    assert error["message"] and error["type"]
    return error


def test_every_error_is_an_openai_shaped_json_body(tiny):
    url = tiny.url
    assert error_of(httpx.get(f"{url}/v1/nothing-here"), 404)["code"] == "not_found"
    error_of(httpx.get(f"{url}/v1/completions"), 405)
    error_of(httpx.post(f"{url}/v1/completions", content=b"{not json", headers={"content-type": "application/json"}),
             400)
    error_of(httpx.post(f"{url}/v1/completions", json={"prompt": "hi", "seed": 2**70}), 400)
    error_of(httpx.post(f"{url}/v1/completions", content=b'{"prompt": "hi \\ud800"}',
                        headers={"content-type": "application/json"}), 400)
    error_of(httpx.post(f"{url}/v1/chat/completions", content=b'{"messages": [{"role": "user", "content": "\\ud800"}]}',
                        headers={"content-type": "application/json"}), 400)
    unknown = error_of(httpx.post(f"{url}/v1/completions", json={"model": "gpt-4o", "prompt": "hi"}), 404)
    assert unknown["code"] == "model_not_found" and unknown["param"] == "model"
    with pytest.raises(openai.NotFoundError):
        tiny.client().chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    assert tiny.process.poll() is None
    assert "Traceback" not in read_available(tiny.process.stderr)


def read_available(stream) -> str:
    os.set_blocking(stream.fileno(), False)
    try:
        return stream.read() or ""
    finally:
        os.set_blocking(stream.fileno(), True)


def test_a_body_over_the_cap_gets_413_and_the_server_stays_responsive(tiny_model):
    server = Server("-p", str(tiny_model), "--max-body-bytes", "100000")
    try:
        big = {"prompt": "hello " * 50000, "max_tokens": 1}
        error_of(httpx.post(f"{server.url}/v1/completions", json=big, timeout=30), 413)

        def chunked():
            yield b'{"prompt": "'
            for _ in range(100):
                yield b"hello " * 1000
            yield b'"}'

        error_of(httpx.post(f"{server.url}/v1/completions", content=chunked(), timeout=30,
                            headers={"content-type": "application/json"}), 413)
        reply = httpx.post(f"{server.url}/v1/completions", json={"prompt": "hi", "max_tokens": 2}, timeout=30)
        assert reply.status_code == 200
    finally:
        server.stop()


def test_an_api_key_guards_every_route_but_health(tiny_model):
    server = Server("-p", str(tiny_model), "--name", "tiny", env={"INFLUENCE_API_KEY": "sesame"})
    try:
        assert httpx.get(f"{server.url}/health").status_code == 200
        error = error_of(httpx.get(f"{server.url}/v1/models"), 401)
        assert error["code"] == "invalid_api_key"
        error_of(httpx.get(f"{server.url}/metrics"), 401)
        with pytest.raises(openai.AuthenticationError):
            server.client(api_key="wrong").completions.create(model="tiny", prompt="hi", max_tokens=2)
        reply = server.client(api_key="sesame").completions.create(model="tiny", prompt="hi", max_tokens=2)
        assert reply.usage.completion_tokens >= 1
    finally:
        server.stop()


def wait_until_healthy(url: str) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/health").status_code == 200:
                return
        except httpx.HTTPError:
            time.sleep(0.2)
    raise AssertionError(f"{url} never became healthy")


def test_listening_beyond_loopback_without_a_key_warns_once(tiny_model):
    port = free_port()
    process = subprocess.Popen([*CLI, "serve", "-p", str(tiny_model), "--host", "0.0.0.0", "--port", str(port),
                                "--threads", "1"], stderr=subprocess.PIPE, text=True)
    try:
        lines = [process.stderr.readline() for _ in range(2)]
        wait_until_healthy(f"http://127.0.0.1:{port}")
    finally:
        process.terminate()
        assert process.wait(20) == 0
    warnings = [line for line in lines if "warning" in line]
    assert len(warnings) == 1 and "--api-key" in warnings[0]


def test_metrics_parse_and_count_the_requests_sent(tiny_model):
    server = Server("-p", str(tiny_model), "--name", "tiny", "--max-batch", "2")
    try:
        client = server.client()
        replies = [client.completions.create(model="tiny", prompt=f"hello {i}", max_tokens=3 + i) for i in range(5)]
        streamed = list(client.completions.create(model="tiny", prompt="hello", max_tokens=4, stream=True))
        assert streamed
        httpx.post(f"{server.url}/v1/completions", json={"prompt": "hi", "temperature": 9})
        wait_for_idle(server)
        metrics = server.metrics()

        def value(name: str, **labels: str) -> float:
            return metrics.get((name, tuple(sorted(labels.items()))), 0.0)

        assert value("influence_requests_total", route="/v1/completions", status="200") == 6
        assert value("influence_requests_total", route="/v1/completions", status="400") == 1
        generated = sum(r.usage.completion_tokens for r in replies)
        assert value("influence_generation_tokens_total", model="tiny") >= generated + 1
        prompts = sum(r.usage.prompt_tokens for r in replies)
        assert value("influence_prompt_tokens_total", model="tiny") >= prompts
        assert value("influence_time_to_first_token_seconds_count", model="tiny") == 6
        assert value("influence_inter_token_latency_seconds_count", model="tiny") >= generated - 5
        assert value("influence_queue_depth", model="tiny") == 0
        assert value("influence_active_slots", model="tiny") == 0
        assert ("influence_prompt_cached_tokens_total", (("model", "tiny"),)) in metrics
    finally:
        server.stop()


def test_two_models_served_routed_and_swapped_within_max_loaded(tiny_models):
    first, second = tiny_models["gqa_llama3_rope"], tiny_models["tied_linear_rope"]
    server = Server("-p", str(first), "-p", str(second), "--max-loaded", "1")
    try:
        client = server.client()
        names = [m.id for m in client.models.list().data]
        assert names == [first.name, second.name]
        for path in (first, second, first):
            local = influence.load(path, device="cpu")
            reply = client.completions.create(model=path.name, prompt="hello world", max_tokens=8, temperature=0)
            assert reply.choices[0].text == local.generate("hello world", raw=True, max_tokens=8, temperature=0).text
            assert reply.model == path.name
            assert server.health()["loaded"] == [path.name]
        with pytest.raises(openai.NotFoundError):
            client.completions.create(model="gpt-4o", prompt="hi", max_tokens=2)
    finally:
        server.stop()


def test_a_models_directory_serves_each_entry(tiny_model):
    directory = tiny_model.parent
    server = Server("--models-dir", str(directory))
    try:
        names = [m.id for m in server.client().models.list().data]
        assert names == sorted(entry.name for entry in directory.iterdir() if entry.is_dir())
        assert server.health()["loaded"] == names[:1]  # the others load on first use
    finally:
        server.stop()


def test_load_300_requests_32_at_a_time_with_aborts_keeps_memory_flat(tiny_model):
    server = Server("-p", str(tiny_model), "--max-batch", "8", "--max-queue", "64", "--name", "tiny")
    try:
        prompts = ["hello", "the quick brown fox", "Rust is", "def main():"]
        local = influence.load(tiny_model, device="cpu")
        expected = {p: local.generate(p, raw=True, max_tokens=10, temperature=0).text for p in prompts}

        def request(i: int) -> bool:
            prompt = prompts[i % len(prompts)]
            if i % 3 == 0:  # abort after the first chunk
                with httpx.stream("POST", f"{server.url}/v1/completions", timeout=120,
                                  json={"prompt": prompt, "max_tokens": 200, "temperature": 0, "stream": True}) as r:
                    next(line for line in r.iter_lines() if line.startswith("data:"))
                return True
            reply = server.client(timeout=120).completions.create(model="tiny", prompt=prompt, max_tokens=10,
                                                                 temperature=0, stream=i % 2 == 0)
            text = "".join(c.choices[0].text for c in reply) if i % 2 == 0 else reply.choices[0].text
            return text == expected[prompt]

        with concurrent.futures.ThreadPoolExecutor(32) as pool:
            assert all(pool.map(request, range(64)))  # warm-up
            wait_for_idle(server)
            warm_rss = server.rss_mb()
            started = time.monotonic()
            assert all(pool.map(request, range(300)))
        assert time.monotonic() - started < 240
        health = wait_for_idle(server)
        assert health["active_slots"] == 0 and health["queued"] == 0
        print(f"RSS after warm-up {warm_rss:.0f} MB, after 300 more requests {server.rss_mb():.0f} MB, "
              f"{time.monotonic() - started:.1f} s")
        assert server.rss_mb() < 1.3 * warm_rss, (server.rss_mb(), warm_rss)
    finally:
        server.stop()
