"""`influence bench` reports every field; speeds are measured, never asserted."""

from __future__ import annotations

import json
import subprocess
import sys

from influence_bench.bench import Case, Measurement, summarise, weight_bytes_per_token
from influence_core.config import ModelConfig

CLI = [sys.executable, "-c", "from influence_core.cli import run; run()"]
FIELDS = {"engine", "dtype", "reference", "compiled", "output_format", "format_overhead_percent", "error", "load_s",
          "pp_tokens_per_s", "pp_spread", "tg_tokens_per_s", "tg_spread", "ttft_ms", "peak_rss_mb", "runtime_rss_mb", "model_rss_vs_weights", "weight_mb_per_token",
          "roofline_percent", "runs", "ratios"}


def test_bench_json_reports_every_field(tiny_model):
    done = subprocess.run([*CLI, "bench", "-p", str(tiny_model), "--dtypes", "float32,int8", "-n", "8", "-g", "4",
                           "-r", "2", "--threads", "1", "--json"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert {"cpu", "threads", "read_bandwidth_gb_s"} <= set(report["machine"])
    assert [(r["engine"], r["dtype"]) for r in report["results"]] == [("torch", "float32"), ("torch", "int8")]
    for row in report["results"]:
        assert set(row) == FIELDS and row["error"] is None
        assert len(row["runs"]["tg"]) == 2 and len(row["runs"]["pp"]) == 2 and len(row["runs"]["ttft_s"]) == 2
        assert row["peak_rss_mb"] > row["runtime_rss_mb"] > 0 and row["model_rss_vs_weights"] > 0
        assert row["load_s"] > 0 and row["weight_mb_per_token"] > 0


def test_bench_format_json_adds_a_row_with_the_mask_share(tiny_model):
    done = subprocess.run([*CLI, "bench", "-p", str(tiny_model), "-n", "8", "-g", "6", "-r", "1", "--threads", "1",
                           "--format", "json", "--json"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    rows = json.loads(done.stdout)["results"]
    assert [(r["engine"], r["output_format"]) for r in rows] == [("torch", None), ("torch", "json")]
    assert rows[0]["format_overhead_percent"] is None
    assert rows[1]["error"] is None and rows[1]["format_overhead_percent"] > 0 and rows[1]["tg_tokens_per_s"] > 0


def test_an_engine_that_fails_is_reported_not_raised(tiny_model):
    done = subprocess.run([*CLI, "bench", "-p", str(tiny_model), "--backends", "nope", "-n", "8", "-g", "2", "-r", "1",
                           "--json"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "unknown backend 'nope'" in json.loads(done.stdout)["results"][0]["error"]


def test_ratios_pair_each_backend_with_its_references():
    def measured(engine, dtype, tg, pp, reference=False):
        return Measurement(Case(engine, dtype, reference), tg_tokens_per_s=[tg], pp_tokens_per_s=[pp],
                           weight_bytes_per_token=1)

    rows = summarise([
        measured("torch", "float32", 40, 400), measured("onnx", "float32", 45, 600),
        measured("transformers", "float32", 20, 100, True), measured("optimum", "float32", 30, 300, True),
        measured("llama.cpp", "gguf", 100, 200, True),
    ], bandwidth=1.0)
    assert rows[0]["ratios"] == {"tg_vs_transformers": 2.0, "pp_vs_transformers": 4.0, "tg_vs_llama.cpp": 0.4,
                                 "pp_vs_llama.cpp": 2.0}
    assert rows[1]["ratios"]["tg_vs_optimum"] == 1.5 and rows[1]["ratios"]["pp_vs_optimum"] == 2.0


def test_weight_bytes_count_linears_and_head():
    config = ModelConfig.from_dict({"vocab_size": 10, "hidden_size": 4, "intermediate_size": 8, "num_hidden_layers": 2,
                                    "num_attention_heads": 2, "num_key_value_heads": 1})
    per_layer = 4 * (2 + 2) * 2 + 2 * 2 * 4 + 3 * 4 * 8
    assert weight_bytes_per_token(config, "float32") == (2 * per_layer + 10 * 4) * 4
    assert weight_bytes_per_token(config, "int8") == 2 * per_layer + 40
    assert weight_bytes_per_token(config, "int4") == (2 * per_layer * 5 + 40 * 8) // 8  # the head stays int8
