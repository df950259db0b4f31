"""How a running stream fares while a long prompt is admitted (chunked prefill), against a server.

    influence serve --port 8000 --max-batch 4 &
    python benchmarks/serve_stream_gaps.py http://127.0.0.1:8000 --prompt-words 1500

One greedy stream runs; after a stretch of normal decoding, a second request sends a prompt of
``--prompt-words`` words. Prints one JSON line: the stream's gaps between chunks (median and
longest) before and while the long prompt is prefilled, and how long that prompt took to its
first token.
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time

import httpx


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("url")
    parser.add_argument("--prompt-words", type=int, default=1500)
    parser.add_argument("--normal-seconds", type=float, default=5.0)
    args = parser.parse_args()
    arrivals: list[float] = []
    admitted = threading.Event()

    def stream() -> None:
        with httpx.stream("POST", f"{args.url}/v1/chat/completions", timeout=600, json={
                "messages": [{"role": "user", "content": "Write a long story about a lighthouse keeper."}],
                "max_tokens": 4000, "temperature": 0, "stream": True}) as response:
            for line in response.iter_lines():
                if line.startswith("data:"):
                    arrivals.append(time.perf_counter())
                if admitted.is_set() or line == "data: [DONE]":
                    return

    reader = threading.Thread(target=stream)
    reader.start()
    while len(arrivals) < 5:
        time.sleep(0.01)
    time.sleep(args.normal_seconds)
    sent = time.perf_counter()
    long_prompt = "Summarise: " + "the quick brown fox jumps " * (args.prompt_words // 5)
    reply = httpx.post(f"{args.url}/v1/chat/completions", timeout=600, json={
        "messages": [{"role": "user", "content": long_prompt}], "max_tokens": 1, "temperature": 0}).json()
    done = time.perf_counter()
    admitted.set()
    reader.join()
    gaps = [(later - earlier, later) for earlier, later in zip(arrivals[5:], arrivals[6:])]
    normal = [gap for gap, at in gaps if at < sent]
    during = [gap for gap, at in gaps if sent < at < done]
    print(json.dumps({
        "long_prompt_tokens": reply["usage"]["prompt_tokens"], "long_prompt_first_token_s": round(done - sent, 2),
        "normal_gap_median_s": round(statistics.median(normal), 4), "normal_gap_max_s": round(max(normal), 4),
        "admission_gap_median_s": round(statistics.median(during), 4) if during else None,
        "admission_gap_max_s": round(max(during), 4) if during else None,
        "stream_chunks_during_admission": len(during),
    }))


if __name__ == "__main__":
    main()
