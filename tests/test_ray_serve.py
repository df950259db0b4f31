"""`influence serve --ray`: two Ray Serve replicas of the default model behind the OpenAI API, on a
local Ray instance this module starts. Skipped where the ray extra is not installed."""

from __future__ import annotations

import concurrent.futures
import json
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

ray = pytest.importorskip("ray", reason="needs the ray extra: pip install 'influence[ray]'")

pytestmark = [pytest.mark.ray, pytest.mark.timeout(420)]

CLI = [sys.executable, "-c", "from influence_core.cli import run; run()"]
PROMPTS = ["What is Rust?", "Name a colour.", "What is 2 + 2?", "Say hello.", "Name a fruit.", "What is Python?"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def expected() -> dict[str, str]:
    """Each prompt's greedy answer from the default model in this process. float32 here and in the
    replicas: the int4 kernel's rounding depends on the thread count, which differs between them."""
    model = influence.load(device="cpu", dtype="float32")
    answers = {prompt: model.generate(prompt, max_tokens=12, temperature=0).text for prompt in PROMPTS}
    model.close()
    return answers


@pytest.fixture(scope="module")
def replicas(expected):
    from ray import serve

    from influence_serve import ray_serve

    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    # Small on purpose: two replicas of one thread each share this machine's cores.
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=100 * 2**20, log_to_driver=False)
    port = free_port()
    app = ray_serve.deployment(None, "smollm2", dict(device="cpu", dtype="float32", threads=1, max_batch=4), max_queue=64, replicas=2)
    try:
        ray_serve.run(app, "127.0.0.1", port, blocking=False)
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


def ask(url: str, prompt: str, **client_options) -> tuple[str, str]:
    """(the answer, the replica that gave it)"""
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", timeout=120, **client_options)
    raw = client.chat.completions.with_raw_response.create(
        model="smollm2", messages=[{"role": "user", "content": prompt}], max_tokens=12, temperature=0)
    return raw.parse().choices[0].message.content, raw.headers["x-influence-replica"]


def test_the_replicas_answer_correctly_and_share_the_requests(replicas, expected):
    with concurrent.futures.ThreadPoolExecutor(len(PROMPTS)) as pool:
        answers = list(pool.map(lambda prompt: ask(replicas, prompt, max_retries=0), PROMPTS))
    assert [text for text, _ in answers] == [expected[prompt] for prompt in PROMPTS]
    assert len({replica for _, replica in answers}) == 2
    assert httpx.get(f"{replicas}/health").json()["status"] == "ok"


def test_killing_a_replica_loses_no_request_that_is_retried(replicas, expected):
    from ray import serve

    _, victim = ask(replicas, PROMPTS[0])
    failed_attempts = []

    def record(response: httpx.Response) -> None:
        if response.status_code >= 500:
            failed_attempts.append(response.status_code)

    http_client = httpx.Client(event_hooks={"response": [record]})
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(ask, replicas, PROMPTS[i % len(PROMPTS)], max_retries=5, http_client=http_client)
                   for i in range(8)]
        time.sleep(2)  # the requests are in the replicas, decoding
        ray.kill(ray.get_actor(victim, namespace="serve"))
        answers = [future.result() for future in futures]
    assert [text for text, _ in answers] == [expected[PROMPTS[i % len(PROMPTS)]] for i in range(8)]
    print(f"{len(failed_attempts)} attempt(s) failed with the replica and were retried: {failed_attempts}")
    # Ray Serve starts a replica in its place.
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        states = serve.status().applications["influence"].deployments["InfluenceReplica"].replica_states
        if states.get("RUNNING") == 2:
            break
        time.sleep(1)
    assert states.get("RUNNING") == 2, states


def test_the_throughput_benchmark_counts_requests_per_replica(replicas):
    script = Path(__file__).parent.parent / "benchmarks" / "serve_throughput.py"
    done = subprocess.run([sys.executable, str(script), replicas, "--requests", "4", "--concurrency", "4",
                           "--max-tokens", "4"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["completion_tokens_per_s"] > 0
    assert sum(report["requests_per_replica"].values()) == 4
    assert all(replica.startswith("SERVE_REPLICA::influence#InfluenceReplica#")
               for replica in report["requests_per_replica"])


def test_bad_autoscaling_json_is_a_clear_error():
    done = subprocess.run([*CLI, "serve", "--ray", "--autoscaling", "{min_replicas: 1}"], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 1
    assert done.stderr.startswith("error: --autoscaling is not JSON")
