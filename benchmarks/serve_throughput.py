"""Throughput of a running OpenAI-compatible server: N requests, C at a time, greedy, fixed length.

    influence serve --port 8000 --max-batch 8 &
    python benchmarks/serve_throughput.py http://127.0.0.1:8000 --requests 32 --concurrency 8

Prints one JSON line: completion tokens per second over the whole run, request latency (median
and 90th percentile), and how many requests each replica answered (Ray Serve's X-Influence-Replica
header; "-" for a plain server).
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures
import json
import statistics
import time

import httpx

PROMPTS = ["What is Rust?", "Name three colours.", "Why is the sky blue?", "Write a haiku about the sea."]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("url")
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=32)
    args = parser.parse_args()

    def request(index: int) -> tuple[float, int, str]:
        started = time.perf_counter()
        response = httpx.post(f"{args.url}/v1/chat/completions", timeout=600, json={
            "messages": [{"role": "user", "content": PROMPTS[index % len(PROMPTS)]}],
            "max_tokens": args.max_tokens, "temperature": 0})
        response.raise_for_status()
        tokens = response.json()["usage"]["completion_tokens"]
        return time.perf_counter() - started, tokens, response.headers.get("x-influence-replica", "-")

    started = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(args.concurrency) as pool:
        results = list(pool.map(request, range(args.requests)))
    elapsed = time.perf_counter() - started
    latencies = sorted(latency for latency, _, _ in results)
    print(json.dumps({
        "requests": args.requests, "concurrency": args.concurrency, "seconds": round(elapsed, 2),
        "completion_tokens_per_s": round(sum(tokens for _, tokens, _ in results) / elapsed, 2),
        "latency_p50_s": round(statistics.median(latencies), 2),
        "latency_p90_s": round(latencies[int(0.9 * (len(latencies) - 1))], 2),
        "requests_per_replica": dict(collections.Counter(replica for _, _, replica in results)),
    }))


if __name__ == "__main__":
    main()
