"""The torch backend's decode step: its KV cache sizing, and the compiled step kept in the store."""

from __future__ import annotations

import json
import os
import threading
import time

import pytest
import torch

import influence_core as influence
from influence_core.errors import ContextLengthError
from influence_torch import compiled
from tiny_models import make_tiny_llama

PROMPT = [1, 17, 250, 33, 98, 5, 77, 310]


@pytest.fixture
def store(tmp_path, monkeypatch):
    monkeypatch.setenv("INFLUENCE_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def test_kv_cache_starts_small_and_grows_in_powers_of_two(tiny_model):
    runner = influence.load(tiny_model, device="cpu", dtype="float32").runner
    assert runner.capacity == 256 and runner.context_length == 256
    small = influence.load(tiny_model, device="cpu", dtype="float32").runner
    small.context_length = 100  # as -b context_length 100 would
    with pytest.raises(ContextLengthError):
        small.forward(list(range(3, 104)), 0)


def test_an_advertised_context_beyond_memory_is_capped_with_a_notice(tmp_path, capsys):
    # 2**24 positions (the most any config may advertise) of 16 KB of keys and values each: 275 GB.
    path = make_tiny_llama(tmp_path / "huge-context", max_position_embeddings=2**24, head_dim=512)
    model = influence.load(path, device="cpu", dtype="float32")
    assert "this run holds" in capsys.readouterr().err
    runner = model.runner
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    assert runner.context_length * runner.model.kv_bytes_per_position() <= memory / 2
    assert runner.capacity == 256  # nothing sized to the context up front
    first = model.generate(PROMPT, max_tokens=4, temperature=0)
    assert len(first.token_ids) == 4


def test_a_large_context_that_fits_allocates_nothing_up_front(tmp_path, capsys):
    path = make_tiny_llama(tmp_path / "long-context", max_position_embeddings=10**7)
    runner = influence.load(path, device="cpu", dtype="float32").runner
    assert runner.context_length == 10**7 and runner.capacity == 256
    assert capsys.readouterr().err == ""
    runner.forward(list(range(3, 303)), 0)
    assert runner.capacity == 512


def test_growing_the_cache_keeps_what_it_holds(tiny_model):
    grown = influence.load(tiny_model, device="cpu", dtype="float32", max_batch=2).runner
    grown.forward(PROMPT, 0, slot=1)
    grown._grow(512)
    fresh = influence.load(tiny_model, device="cpu", dtype="float32", max_batch=2).runner
    fresh.forward(PROMPT, 0, slot=1)
    assert torch.equal(grown.forward([5], len(PROMPT), slot=1), fresh.forward([5], len(PROMPT), slot=1))


def test_copy_slot_copies_only_the_positions_in_use(tiny_model):
    runner = influence.load(tiny_model, device="cpu", dtype="float32", max_batch=2).runner
    runner.forward(PROMPT, 0, slot=1)
    for cache in runner.caches:
        cache.k[1, :, len(PROMPT):] = 7.0
    runner.copy_slot(1, 0)
    for cache in runner.caches:
        assert torch.equal(cache.k[0, :, :len(PROMPT)], cache.k[1, :, :len(PROMPT)])
        assert not (cache.k[0, :, len(PROMPT):] == 7.0).any()
    assert runner.slot_lengths[0] == len(PROMPT)


def test_the_artifact_key_changes_with_what_the_step_depends_on(monkeypatch):
    key = compiled.step_key("abc", "int8", "cpu")
    assert compiled.step_key("abc", "int8", "cpu") == key
    assert compiled.step_key("abd", "int8", "cpu") != key
    assert compiled.step_key("abc", "int4", "cpu") != key
    monkeypatch.setattr(torch, "__version__", "0.0.1")
    assert compiled.step_key("abc", "int8", "cpu") != key
    assert compiled.artifact_path(compiled.step_key("abc", "int8", "cpu")) != compiled.artifact_path(key)


class FakePackage:
    """Stands in for a loaded AOTInductor package where the test is about the store, not compiling."""

    def __init__(self, path: str) -> None:
        if open(path, "rb").read() != b"package":
            raise RuntimeError("not a package")
        self.loader = self

    def boxed_run(self, inputs):
        return [inputs[0]]


def fake_build(builds: list[float]):
    def build(model, key, device, caches, label):
        builds.append(time.monotonic())
        time.sleep(0.3)  # long enough for a second process to find the lock taken
        from influence_core.artifacts import atomic_directory

        with atomic_directory(compiled.artifact_path(key)) as partial:
            (partial / compiled.PACKAGE).write_bytes(b"package")
            (partial / compiled.KEY_FILE).write_text(json.dumps(key, sort_keys=True))
    return build


def test_two_builders_at_once_build_once(store, monkeypatch, capsys):
    builds: list[float] = []
    monkeypatch.setattr(compiled, "_build", fake_build(builds))
    monkeypatch.setattr(torch._inductor, "aoti_load_package", FakePackage)
    key = compiled.step_key("model", "int8", "cpu")
    steps = []
    threads = [threading.Thread(target=lambda: steps.append(compiled.prepare_step(None, key, "cpu", None, "m")))
               for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(builds) == 1 and len(steps) == 2
    assert "another process is compiling" in capsys.readouterr().err


def test_a_broken_or_foreign_artifact_is_rebuilt_not_trusted(store, monkeypatch, capsys):
    builds: list[float] = []
    monkeypatch.setattr(compiled, "_build", fake_build(builds))
    monkeypatch.setattr(torch._inductor, "aoti_load_package", FakePackage)
    key = compiled.step_key("model", "int8", "cpu")
    compiled.prepare_step(None, key, "cpu", None, "m")
    directory = compiled.artifact_path(key)
    (directory / compiled.PACKAGE).write_bytes(b"truncated")
    assert compiled.load_step(key, "cpu") is None
    assert "does not load" in capsys.readouterr().err
    compiled.prepare_step(None, key, "cpu", None, "m")
    assert len(builds) == 2
    (directory / compiled.KEY_FILE).write_text(json.dumps({**key, "torch": "another"}))
    assert compiled.load_step(key, "cpu") is None  # a key file that does not match is never loaded
    (directory / compiled.KEY_FILE).unlink()
    assert compiled.load_step(key, "cpu") is None  # an unfinished build


def test_a_built_step_gives_the_eager_logits_and_later_runs_load_it(tiny_models, tmp_path, store):
    """A real AOTInductor build of a tiny model (about 15 s of CPU), then a reload and an
    invalidation by changed weights."""
    path = make_tiny_llama(tmp_path / "model", **{"num_hidden_layers": 1})
    built = influence.load(path, device="cpu", dtype="float32", max_batch=3, backend_options={"compiled": True})
    assert built.runner.graph_step is not None
    eager = influence.load(path, device="cpu", dtype="float32", max_batch=3)
    eager.runner.graph_step = None
    for runner in (built.runner, eager.runner):
        runner.forward(PROMPT, 0)
        runner.forward(PROMPT[:5], 0, slot=1)
        runner.forward(PROMPT[:2], 0, slot=2)
    for position in range(len(PROMPT), len(PROMPT) + 6):
        assert torch.allclose(built.runner.forward([position], position),
                              eager.runner.forward([position], position), atol=1e-5, rtol=0)
    # On CPU the package is built for single sequences (batches were no faster compiled): a batch
    # runs eager, beside the package's cache slot.
    assert built.runner.graph_step.max_batch == 1
    assert torch.allclose(built.runner.decode_batch([4, 5, 6], [len(PROMPT) + 6, 5, 2]),
                          eager.runner.decode_batch([4, 5, 6], [len(PROMPT) + 6, 5, 2]), atol=1e-5, rtol=0)

    # A plain run starts eager (loading a package costs more than one short run saves); asked
    # for, the package is loaded from the store, not built again.
    assert influence.load(path, device="cpu", dtype="float32").runner.graph_step is None
    assert load_step_of(path, "float32") is not None
    weights = path / "model.safetensors"
    os.utime(weights, ns=(time.time_ns(), time.time_ns() + 10**9))  # new weights: a new key
    assert load_step_of(path, "float32") is None


def load_step_of(path, dtype):
    from influence_core.artifacts import fingerprint

    return compiled.load_step(compiled.step_key(f"llama {fingerprint(path)}", dtype, "cpu"), "cpu")


@pytest.fixture
def any_size(monkeypatch):
    """Tiny models get background builds too (real models only, unasked)."""
    from influence_torch import backend

    monkeypatch.setattr(backend, "MIN_BACKGROUND_BUILD_PARAMETERS", 0)


def test_a_small_model_or_a_batched_runner_is_not_compiled_unasked(tiny_model):
    assert influence.load(tiny_model, device="cpu", dtype="int8").runner.background_build is None
    assert influence.load(tiny_model, device="cpu", dtype="int8", max_batch=4).runner.background_build is None


def wait_for_background_build(runner, seconds=600):
    deadline = time.monotonic() + seconds
    while runner.background_build is not None and time.monotonic() < deadline:
        runner.on_idle()
        time.sleep(0.2)
    assert runner.background_build is None, "the background build did not finish"


def test_a_runner_kept_loaded_builds_its_step_in_the_background_and_switches_to_it(tmp_path, store, any_size):
    """What a resident model does while idle: a real build in a low-priority child process (about
    15 s of CPU), the switch to the package, and the next runner loading it without building."""
    path = make_tiny_llama(tmp_path / "model", **{"num_hidden_layers": 1})
    model = influence.load(path, device="cpu", dtype="int8")
    runner = model.runner
    assert runner.graph_step is None and runner.background_build is not None
    eager = influence.load(path, device="cpu", dtype="int8").runner
    runner.on_idle()
    process = runner.background_build.process
    assert process is not None and runner.graph_step is None  # serving eager meanwhile
    wait_for_background_build(runner)
    assert process.returncode == 0 and runner.graph_step is not None
    for each in (runner, eager):
        each.forward(PROMPT, 0)
    for position in range(len(PROMPT), len(PROMPT) + 4):
        assert torch.allclose(runner.forward([position], position), eager.forward([position], position),
                              atol=2e-2, rtol=0)  # the same int8 weights; bfloat16 activations round differently
    again = influence.load(path, device="cpu", dtype="int8").runner
    again.on_idle()  # found in the store: loaded at once, nothing started
    assert again.graph_step is not None and again.background_build is None
    assert not list((store / "exports" / "compiled").glob("*.log"))  # a build that succeeded leaves no log


def test_a_background_build_that_fails_is_noted_and_not_retried_unasked(tmp_path, store, any_size):
    path = make_tiny_llama(tmp_path / "model", **{"num_hidden_layers": 1})
    runner = influence.load(path, device="cpu", dtype="int8").runner
    runner.background_build.source = tmp_path / "gone"  # the child cannot open the model
    wait_for_background_build(runner, seconds=120)
    assert runner.graph_step is None
    notes = list((store / "exports" / "compiled").glob("*.failed"))
    assert len(notes) == 1 and "exited with status 1" in notes[0].read_text()
    assert "gone" in notes[0].with_suffix(".log").read_text()  # the child's own error, kept
    later = influence.load(path, device="cpu", dtype="int8").runner
    later.on_idle()
    assert later.background_build is None and later.graph_step is None  # not tried again


def test_closing_a_runner_stops_its_background_build(tmp_path, store, any_size):
    path = make_tiny_llama(tmp_path / "model", **{"num_hidden_layers": 1})
    model = influence.load(path, device="cpu", dtype="int8")
    model.runner.on_idle()
    process = model.runner.background_build.process
    model.close()
    assert process.poll() is not None


def test_float32_is_compiled_unasked_only_where_its_memory_fits():
    from influence_torch import backend

    class Source:
        def __init__(self, parameters):
            self.config = type("Config", (), {"parameter_count": lambda config: parameters})()

    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    fits = int(memory * backend.COMPILED_MEMORY_SHARE / (4 * backend.COMPILED_FLOAT32_MEMORY_FACTOR))
    assert backend.worth_compiling(Source(fits - 1), "float32")
    assert not backend.worth_compiling(Source(fits * 2), "float32")
    assert backend.worth_compiling(Source(fits * 2), "int4")  # its package is a fraction of the float weights
    assert not backend.worth_compiling(Source(10**6), "int4")  # too small to be worth a build
    assert not backend.worth_compiling(Source(10**8), "bfloat16")  # unmeasured: stays eager


def test_a_background_build_pauses_while_its_runner_serves(tmp_path, store, any_size):
    path = make_tiny_llama(tmp_path / "model", **{"num_hidden_layers": 1})
    model = influence.load(path, device="cpu", dtype="int8")
    runner = model.runner
    runner.on_idle()
    build = runner.background_build
    runner.forward(PROMPT, 0)  # a request: the build stops where it is
    assert build.paused and process_state(build.process.pid) == "T"
    runner.decode_batch([5], [len(PROMPT)])
    assert build.paused
    runner.on_idle()  # idle again: it goes on
    assert not build.paused and process_state(build.process.pid) != "T"
    runner.forward([5], len(PROMPT) + 1)
    assert build.paused
    model.close()  # a paused build is stopped too, not left behind
    assert build.process.poll() is not None


def process_state(pid: int) -> str:
    with open(f"/proc/{pid}/stat", encoding="ascii") as stat:
        return stat.read().rsplit(")", 1)[1].split()[0]
