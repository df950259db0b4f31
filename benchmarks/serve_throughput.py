"""Throughput of a running OpenAI-compatible server: N conversations, C at a time, greedy, fixed length.

    influence serve --port 8000 --max-batch 8 &
    python benchmarks/serve_throughput.py http://127.0.0.1:8000 --requests 32 --concurrency 8 --turns 3

Each conversation runs ``--turns`` chat turns, each resending the whole conversation so far, as a
chat client does (the prefix cache serves the earlier turns). Prints one JSON line: completion
tokens per second over the whole run, request latency (median and 90th percentile), the share of
prompt tokens served from the prefix cache, and how many requests each replica answered (Ray
Serve's X-Influence-Replica header; "-" for a plain server).
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
FOLLOW_UPS = ["Tell me more.", "Give an example.", "Summarise that in one sentence."]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("url")
    parser.add_argument("--requests", type=int, default=32, help="conversations")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--turns", type=int, default=1, help="chat turns per conversation")
    args = parser.parse_args()

    def conversation(index: int) -> list[tuple[float, dict, str]]:
        messages, answers = [], []
        for turn in range(args.turns):
            content = PROMPTS[index % len(PROMPTS)] if turn == 0 else FOLLOW_UPS[(turn - 1) % len(FOLLOW_UPS)]
            messages.append({"role": "user", "content": content})
            started = time.perf_counter()
            response = httpx.post(f"{args.url}/v1/chat/completions", timeout=600, json={
                "messages": messages, "max_tokens": args.max_tokens, "temperature": 0})
            response.raise_for_status()
            reply = response.json()
            answers.append((time.perf_counter() - started, reply["usage"],
                            response.headers.get("x-influence-replica", "-")))
            messages.append({"role": "assistant", "content": reply["choices"][0]["message"]["content"]})
        return answers

    started = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(args.concurrency) as pool:
        results = [answer for answers in pool.map(conversation, range(args.requests)) for answer in answers]
    elapsed = time.perf_counter() - started
    latencies = sorted(latency for latency, _, _ in results)
    prompt_tokens = sum(usage["prompt_tokens"] for _, usage, _ in results)
    cached = sum(usage.get("prompt_tokens_details", {}).get("cached_tokens", 0) for _, usage, _ in results)
    print(json.dumps({
        "conversations": args.requests, "turns": args.turns, "concurrency": args.concurrency,
        "seconds": round(elapsed, 2),
        "completion_tokens_per_s": round(sum(usage["completion_tokens"] for _, usage, _ in results) / elapsed, 2),
        "latency_p50_s": round(statistics.median(latencies), 2),
        "latency_p90_s": round(latencies[int(0.9 * (len(latencies) - 1))], 2),
        "prompt_tokens": prompt_tokens, "cached_prompt_tokens": cached,
        "requests_per_replica": dict(collections.Counter(replica for _, _, replica in results)),
    }))


if __name__ == "__main__":
    main()
