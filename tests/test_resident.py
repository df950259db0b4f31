"""Resident models (influence_core/resident.py): later `influence generate` runs reuse a loaded model.

conftest.py turns residents off for every other test (INFLUENCE_KEEP_ALIVE=0); these tests turn
them on in a private INFLUENCE_HOME and stop every resident they start, pass or fail.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from cli_helpers import CLI
from influence_core import resident
from influence_core.resident import Spec

TINY = ["--device", "cpu", "--dtype", "float32"]


@pytest.fixture
def home(monkeypatch):
    """A private INFLUENCE_HOME with residents on; every resident in it is stopped afterwards. Short,
    under /tmp: a Unix socket's path has a length limit (~104 bytes)."""
    directory = Path(tempfile.mkdtemp(prefix="infl-res-", dir="/tmp"))
    monkeypatch.setenv("INFLUENCE_HOME", str(directory))
    monkeypatch.setenv("INFLUENCE_KEEP_ALIVE", "300")
    yield directory
    for state in resident.residents():
        stop_resident_for_sure(state)
    shutil.rmtree(directory, ignore_errors=True)


def stop_resident_for_sure(state: dict) -> None:
    resident.stop_resident(state)
    try:
        os.kill(state["pid"], signal.SIGKILL)
    except ProcessLookupError:
        pass


def tiny_spec(model: Path) -> Spec:
    return Spec.of(model, "torch", "cpu", "float32", None, {})


def start_and_wait(spec: Spec, keep_alive: float = 300) -> dict:
    resident.start(spec, keep_alive)
    assert resident.wait_ready(spec.key, timeout=120), (resident.run_dir() / f"{spec.key}.log").read_text()
    (state,) = [state for state in resident.residents() if state["key"] == spec.key]
    return state


def cli(*args: str, keep_alive: str = "300", timeout: float = 120) -> subprocess.CompletedProcess:
    environment = {**os.environ, "INFLUENCE_KEEP_ALIVE": keep_alive}
    return subprocess.run([*CLI, "generate", *args], capture_output=True, text=True, timeout=timeout,
                          env=environment)


def wait_until(condition, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.2)
    return condition()


def test_reuse_prints_what_an_in_process_run_prints(home, tiny_model):
    args = ["-p", str(tiny_model), *TINY, "--raw", "--temperature", "0", "--max-tokens", "24", "hello world"]
    in_process = [cli(*args, *extra, keep_alive="0") for extra in ([], ["--json"], ["--stats"])]
    state = start_and_wait(tiny_spec(tiny_model))
    reused = [cli(*args, *extra) for extra in ([], ["--json"], ["--stats"])]
    for done in in_process + reused:
        assert done.returncode == 0, done.stderr
    assert reused[0].stdout == in_process[0].stdout and reused[0].stderr == in_process[0].stderr == ""
    here, there = json.loads(in_process[1].stdout), json.loads(reused[1].stdout)
    assert list(there) == list(here)
    assert there["text"] == here["text"] and there["token_ids"] == here["token_ids"]
    for key in ("finish_reason", "backend", "device", "dtype", "weight_format", "model", "prompt_tokens",
                "cached_prompt_tokens", "generated_tokens"):
        assert there[key] == here[key], key
    assert {k: v for k, v in there["settings"].items() if k != "seed"} == \
           {k: v for k, v in here["settings"].items() if k != "seed"}
    assert there["load_s"] == 0.0 < here["load_s"]  # nothing was loaded: the resident served it
    assert reused[2].stdout == in_process[2].stdout
    assert reused[2].stderr.splitlines()[0].split("|")[-1] == in_process[2].stderr.splitlines()[0].split("|")[-1]
    assert [s["pid"] for s in resident.residents()] == [state["pid"]]


def test_a_given_seed_samples_as_in_process(home, tiny_model):
    args = ["-p", str(tiny_model), *TINY, "--raw", "--seed", "7", "--temperature", "1.3", "--max-tokens", "16",
            "--json", "hi"]
    here = json.loads(cli(*args, keep_alive="0").stdout)
    start_and_wait(tiny_spec(tiny_model))
    there = json.loads(cli(*args).stdout)
    assert (there["token_ids"], there["seed"], there["settings"]) == (here["token_ids"], here["seed"], here["settings"])


def test_errors_come_back_as_one_line(home, tiny_model):
    start_and_wait(tiny_spec(tiny_model))
    for extra in (["--raw", " ".join(["word"] * 400)],  # longer than the context (256)
                  ["--sampler", "no-such-sampler", "hi"],
                  ["--system", "be brief", "--raw", "hi"]):
        args = ["-p", str(tiny_model), *TINY, *extra]
        here, there = cli(*args, keep_alive="0"), cli(*args)
        assert there.returncode == here.returncode == 1, (here.stderr, there.stderr)
        assert there.stderr == here.stderr and there.stderr.startswith("error: ") and len(there.stderr.splitlines()) == 1
    assert len(resident.residents()) == 1  # errors leave it serving


def test_a_changed_model_is_not_served_stale(home, tiny_model, tmp_path, monkeypatch):
    model = Path(shutil.copytree(tiny_model, tmp_path / "model"))
    spec = tiny_spec(model)
    state = start_and_wait(spec)
    old_key = spec.key
    weights = next(model.glob("*.safetensors"))
    os.utime(weights, ns=(time.time_ns(), time.time_ns() + 10**9))
    assert tiny_spec(model).key != old_key  # a path's fingerprint is part of its key
    done = cli("-p", str(model), *TINY, "--raw", "--max-tokens", "4", "--json", "hi")
    assert done.returncode == 0 and json.loads(done.stdout)["load_s"] > 0  # loaded in-process
    # A name keeps its key while its files change: the resident's hello says what it loaded.
    monkeypatch.setattr(Spec, "key", property(lambda self: old_key))
    assert resident.stream(spec, "hi", {}, 300) is None
    assert wait_until(lambda: not resident._alive(state), 30)  # told to stop: it serves no one again


def test_keep_alive_zero_never_starts_one_and_a_real_model_does(home):
    """On the bundled model (over `MIN_MODEL_BYTES`): the first run starts a resident, which the
    second reuses with the same greedy output."""
    from influence_models.store import installed_default_gguf

    if installed_default_gguf() is None:
        pytest.skip("the bundled model is not installed")
    args = ["What is the capital of France?", "--temperature", "0", "--max-tokens", "12", "--json"]
    off = cli(*args, keep_alive="0", timeout=300)
    assert off.returncode == 0, off.stderr
    assert not (home / "run").exists()
    first = cli(*args, timeout=300)
    assert first.returncode == 0 and first.stderr == ""  # no announcement off a terminal
    assert [state["model"] for state in resident.residents()] == ["smollm2-135m-instruct"]
    for state in resident.residents():
        resident.stop_resident(state)
    announced = on_a_terminal(*args)
    assert announced == ("influence: keeping the model loaded for 5 min so later runs start fast "
                         "(influence stop ends it; INFLUENCE_KEEP_ALIVE=0 turns this off)")
    (state,) = resident.residents()
    assert resident.wait_ready(state["key"], timeout=300)
    second = cli(*args, timeout=300)
    here, there = json.loads(off.stdout), json.loads(second.stdout)
    assert there["load_s"] == 0.0 and (there["text"], there["token_ids"]) == (here["text"], here["token_ids"])
    assert list(there) == list(here) and there["model"] == here["model"]


def on_a_terminal(*args: str) -> str:
    """What `influence generate ARGS` prints on stderr when stderr is a terminal."""
    import pty

    leader, follower = pty.openpty()
    try:
        done = subprocess.run([*CLI, "generate", *args], stdout=subprocess.PIPE, stderr=follower, timeout=300,
                              env={**os.environ, "INFLUENCE_KEEP_ALIVE": "300"})
        assert done.returncode == 0
        import select

        written = select.select([leader], [], [], 5)[0]  # nothing written must not block the read forever
        return os.read(leader, 65536).decode().strip() if written else ""
    finally:
        os.close(follower)
        os.close(leader)


def test_a_run_waits_for_a_resident_still_loading(home, tiny_model):
    spec = tiny_spec(tiny_model)
    resident.start(spec, 300)
    assert resident._read_state(spec.key)["loaded"] is False  # known before its socket exists
    done = cli("-p", str(tiny_model), *TINY, "--raw", "--max-tokens", "4", "--json", "hi")
    assert done.returncode == 0 and json.loads(done.stdout)["load_s"] == 0.0, done.stderr


def test_idle_timeout_ends_it(home, tiny_model):
    state = start_and_wait(tiny_spec(tiny_model), keep_alive=1)
    assert wait_until(lambda: not resident._alive(state), 30)
    assert resident.residents() == [] and not list((home / "run").glob("*.sock"))


def test_removing_its_socket_ends_it(home, tiny_model):
    state = start_and_wait(tiny_spec(tiny_model))
    (home / "run" / f"{state['key']}.sock").unlink()
    assert wait_until(lambda: not resident._alive(state), 30)


def test_a_client_that_goes_away_frees_it(home, tiny_model):
    state = start_and_wait(tiny_spec(tiny_model))
    environment = {**os.environ, "INFLUENCE_KEEP_ALIVE": "300"}
    client = subprocess.Popen([*CLI, "generate", "-p", str(tiny_model), *TINY, "--raw", "--temperature", "0",
                               "--max-tokens", "250", "hi"], stdout=subprocess.PIPE, env=environment)
    assert client.stdout.read(1)  # it is generating
    client.send_signal(signal.SIGINT)
    assert client.wait(timeout=30) == 130
    client.stdout.close()
    done = cli("-p", str(tiny_model), *TINY, "--raw", "--max-tokens", "4", "--json", "hi", timeout=60)
    assert done.returncode == 0 and json.loads(done.stdout)["load_s"] == 0.0
    assert resident._alive(state)


def test_ps_and_stop(home, tiny_model, tiny_models):
    from cli_helpers import invoke

    state = start_and_wait(tiny_spec(tiny_model))
    listed = json.loads(subprocess.run([*CLI, "ps", "--json"], capture_output=True, text=True, timeout=60).stdout)
    assert [(row["key"], row["model"], row["dtype"], row["device"]) for row in listed] == \
           [(state["key"], str(tiny_model), "float32", "cpu")]
    assert listed[0]["rss_bytes"] > 0 and 0 < listed[0]["expires_in_s"] <= 300
    table = subprocess.run([*CLI, "ps"], capture_output=True, text=True, timeout=60).stdout
    assert state["key"] in table and "float32" in table
    stopped = subprocess.run([*CLI, "stop", state["key"][:6]], capture_output=True, text=True, timeout=60)
    assert stopped.returncode == 0 and stopped.stdout == f"stopped 1 resident model ({tiny_model})\n"
    assert not resident._alive(state) and resident.residents() == []
    nothing = subprocess.run([*CLI, "stop", "--all"], capture_output=True, text=True, timeout=60)
    assert nothing.stdout == "no resident model is running\n"
    unknown = subprocess.run([*CLI, "stop", "nope"], capture_output=True, text=True, timeout=60)
    assert unknown.returncode == 1


def test_at_most_two_residents(home, tiny_models):
    first, second, third = (tiny_spec(tiny_models[name]) for name in list(tiny_models)[:3])
    states = [start_and_wait(first), start_and_wait(second)]
    start_and_wait(third)
    assert {s["key"] for s in resident.residents()} == {second.key, third.key}
    assert not resident._alive(states[0])


def test_a_reusing_client_imports_no_torch(home, tiny_model):
    start_and_wait(tiny_spec(tiny_model))
    code = ("import json, sys\nfrom influence_core.cli import run\n"
            f"try: run(['generate', '-p', {str(tiny_model)!r}, '--device', 'cpu', '--dtype', 'float32', "
            "'--raw', '--max-tokens', '4', '--json', 'hi'])\nexcept SystemExit: pass\n"
            "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'numpy', 'safetensors'))))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "INFLUENCE_KEEP_ALIVE": "300"})
    result, heavy = done.stdout.strip().splitlines()
    assert json.loads(result)["load_s"] == 0.0, done.stderr
    assert json.loads(heavy) == []


def test_bench_cli_times_the_resident_path_only_where_a_resident_served_it(home, tiny_model, capsys):
    """A tiny model is under `MIN_MODEL_BYTES`, so none is kept: the resident case says so rather
    than timing in-process runs under its name."""
    from cli_helpers import invoke

    code, out, err = invoke(capsys, "bench", "--cli", "-p", str(tiny_model), "-g", "4", "-r", "1", "--threads", "1",
                            "--resident", "--json")
    assert code == 0, err
    in_process, kept = json.loads(out)["results"]
    assert not in_process["error"] and in_process["wall_s"] > 0
    assert kept["case"] == in_process["case"] + ", resident model"
    assert "no resident model served it" in kept["error"]
    assert not (home / "run").exists()


def test_a_resident_gives_its_runner_idle_time_and_says_when_it_is_done_preparing(home, tiny_model):
    state = start_and_wait(tiny_spec(tiny_model))
    # A float32 model has nothing to prepare: done at the first idle tick.
    assert wait_until(lambda: resident._read_state(state["key"])["preparing"] is False, timeout=60)
    listed = subprocess.run([*CLI, "ps", "--json"], capture_output=True, text=True, timeout=60)
    (row,) = json.loads(listed.stdout)
    assert row["preparing"] is False and row["loaded"] is True


def test_a_runner_that_fails_while_idle_keeps_serving_and_is_not_asked_again(home, capsys):
    class Failing:
        def on_idle(self):
            raise RuntimeError("broken")

    runner, state = Failing(), {"key": "k" * 16, "pid": os.getpid(), "preparing": True}
    resident.run_dir().mkdir(parents=True)
    assert resident._idle_work(runner, runner.on_idle, state) is None
    assert state["preparing"] is False and resident._read_state(state["key"])["preparing"] is False
    assert "Failing.on_idle failed (RuntimeError: broken); serving on without it" in capsys.readouterr().err

    class Building:
        calls = 0

        def on_idle(self):
            self.calls += 1
            return self.calls < 2

    runner, state = Building(), {"key": "b" * 16, "pid": os.getpid(), "preparing": True}
    assert resident._idle_work(runner, runner.on_idle, state) == runner.on_idle and state["preparing"]
    assert resident._idle_work(runner, runner.on_idle, state) is None and not state["preparing"]


def test_a_resident_that_does_not_end_on_sigterm_is_killed(home):
    key = "deafdeafdeafdeaf"
    stubborn = subprocess.Popen([sys.executable, "-c", "import signal, time; signal.signal(signal.SIGTERM, "
                                 "signal.SIG_IGN); print('ready', flush=True); time.sleep(120)", key],
                                stdout=subprocess.PIPE)
    try:
        assert stubborn.stdout.readline() == b"ready\n"
        state = {"key": key, "pid": stubborn.pid}
        assert resident._alive(state)
        resident.stop_resident(state, wait_s=0.5)
        assert stubborn.wait(timeout=10) == -signal.SIGKILL
    finally:
        stubborn.kill()
        stubborn.wait()
