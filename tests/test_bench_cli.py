"""`influence bench --cli`: whole processes timed, alternating, beside a reference process (the
structure of what it reports; speed is measured in docs/performance.md, not here)."""

from __future__ import annotations

import json
import sys

from cli_helpers import assert_one_error_line, invoke

from influence_bench import bench


def test_bench_cli_times_whole_generate_processes(tiny_model, capsys):
    code, out, err = invoke(capsys, "bench", "--cli", "-p", str(tiny_model), "--dtypes", "auto,int8", "-g", "8",
                            "-r", "2", "--threads", "1", "--json")
    assert code == 0, err
    report = json.loads(out)
    assert report["prompt"] == bench.CLI_PROMPT and report["repetitions"] == 2
    auto, int8 = report["results"]
    assert auto["case"] == "influence generate --backend torch --dtype auto" and not auto["error"]
    assert int8["weight_format"] == "int8"
    for row in (auto, int8):
        assert len(row["runs"]["wall_s"]) == 2 and len(row["generated_tokens"]) == 2
        assert row["wall_s"] > 0 and row["peak_rss_mb"] > 0 and row["ttft_ms"] > 0
        assert 0 < max(row["generated_tokens"]) <= 8
        assert row["ratios"] == {}  # no reference asked for
    # Warm-up first, then the cases alternate round by round.
    steps = [line for line in err.splitlines() if line.startswith("influence bench: ") and "s wall" not in line]
    assert [step.split(": ", 2)[1] for step in steps] == ["warm-up"] * 2 + ["round 1/2"] * 2 + ["round 2/2"] * 2


def fake_process(label: str, wall_sleep: float, decode: float, reference: bool = False) -> bench.ProcessCase:
    script = (f"import json, time; time.sleep({wall_sleep}); bytearray(20 << 20); print(json.dumps("
              f"{{'generated_tokens': 5, 'time_to_first_token_s': 0.1, 'decode_tokens_per_s': {decode}}}))")
    return bench.ProcessCase(label, [sys.executable, "-c", script], reference=reference)


def test_ratios_are_to_the_reference_process_of_the_same_rounds():
    rows = bench.measure_processes([fake_process("ours", 0.0, 30.0), fake_process("llama.cpp", 0.0, 60.0, True),
                                    bench.ProcessCase("broken", [sys.executable, "-c", "raise SystemExit(3)"])], 1)
    ours, reference, broken = rows
    assert ours["ratios"]["decode_vs_llama_cpp"] == 0.5 and ours["ratios"]["ttft_vs_llama_cpp"] == 1.0
    assert set(ours["ratios"]) == {"wall_vs_llama_cpp", "decode_vs_llama_cpp", "ttft_vs_llama_cpp",
                                   "peak_rss_vs_llama_cpp"}
    assert reference["ratios"] == {} and reference["peak_rss_mb"] > 20
    assert broken["error"].startswith("broken failed") and "wall_s" not in broken


def test_bench_cli_refuses_options_it_does_not_use(tiny_model, capsys):
    code, _, err = invoke(capsys, "bench", "--cli", "-p", str(tiny_model), "--prompt-tokens", "64")
    assert_one_error_line(code, err, "--prompt-tokens")
    code, _, err = invoke(capsys, "bench", "-p", str(tiny_model), "--reference-python", sys.executable)
    assert_one_error_line(code, err, "--reference-python applies to --cli only")
    code, _, err = invoke(capsys, "bench", "--cli", "-p", str(tiny_model), "--reference")
    assert_one_error_line(code, err, "--reference needs a GGUF")
