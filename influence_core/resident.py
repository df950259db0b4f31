"""Resident models: a loaded model kept in a background process, so that later `influence generate`
runs skip importing torch and loading the weights (as Ollama keeps its models).

A plain `influence generate` that loaded a model in-process (one of at least `MIN_MODEL_BYTES`)
starts a resident for it afterwards: a detached process that loads the same model with the same options and
answers on a Unix socket, INFLUENCE_HOME/run/KEY.sock. KEY (`Spec.key`) hashes everything that
changes the loaded model, so a run with other load options never reaches it. A later run with the
same KEY connects, checks that the model's files are those the resident loaded (`fingerprint`),
sends its prompt and options, and prints the streamed pieces and the result exactly as an in-process
run would. A resident that is gone, stale or broken is bypassed: the run loads in-process as before
and starts a fresh one.

A resident serves one generation at a time (a second client waits its turn); it exits after its
keep-alive without a request (`DEFAULT_KEEP_ALIVE_S`; INFLUENCE_KEEP_ALIVE or --keep-alive; 0
disables residents), when its socket file is removed, and on SIGTERM. At most `MAX_RESIDENTS` run
per INFLUENCE_HOME: starting another stops the least recently used.

The client side imports only the standard library and the core's light modules: never torch.
The wire format is one JSON object per line.
"""

from __future__ import annotations

import json
import os
import select
import socket
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

from .defaults import DEFAULT_KEEP_ALIVE_S

# A model smaller than this is not kept: tiny test models never linger. (Not its load time: that
# counts importing torch, about a second, so a tiny model's crosses any useful bound on a busy machine.)
MIN_MODEL_BYTES = 32 << 20
MAX_RESIDENTS = 2
# How often an idle resident checks its socket file and its expiry.
CHECK_S = 2.0
ANNOUNCEMENT = ("influence: keeping the model loaded for {minutes} so later runs start fast "
                "(influence stop ends it; INFLUENCE_KEEP_ALIVE=0 turns this off)")


def run_dir() -> Path:
    from .artifacts import home

    return home() / "run"


@dataclass(frozen=True)
class Spec:
    """What a resident loads, as `influence_core.api.load` takes it. ``reference``: an absolute path,
    a model name, or None for the default model."""

    reference: Optional[str]
    reference_is_path: bool
    backend: str
    device: str
    dtype: str
    threads: Optional[int]
    backend_options: dict[str, str]

    @classmethod
    def of(cls, reference: Optional[Path | str], backend: str, device: str, dtype: str, threads: Optional[int],
           backend_options: dict[str, str]) -> Spec:
        # As `api.open_source` reads it: a string that exists is a path too.
        is_path = reference is not None and (isinstance(reference, Path) or Path(reference).expanduser().exists())
        named = str(Path(reference).expanduser().resolve()) if is_path else reference
        return cls(named, is_path, backend, device, dtype, threads, dict(backend_options))

    @property
    def key(self) -> str:
        """A hash of everything that changes the loaded model: the model (and its files' fingerprint),
        the load options, this installation and what decides which plugins load."""
        import hashlib

        from . import __version__
        from .artifacts import fingerprint
        from .plugins import LOAD_PLUGINS_ENV
        from .userconfig import config_path

        if self.reference_is_path:
            path = Path(self.reference)
            model = [self.reference, fingerprint(path) if path.exists() else None]
        elif self.reference is None:  # the default model: another one chosen is another key
            from .plugins import get_registry

            model = [None, get_registry().default_model_name()]
        else:
            model = [self.reference, None]
        facts = [model, self.backend, self.device, self.dtype, self.threads, sorted(self.backend_options.items()),
                 __version__, sys.executable, os.environ.get(LOAD_PLUGINS_ENV), str(config_path())]
        return hashlib.sha256(json.dumps(facts).encode()).hexdigest()[:16]

    @property
    def label(self) -> str:
        """The model as `influence ps` shows it: the path or name, or the default model's name."""
        if self.reference is not None:
            return self.reference
        from .plugins import get_registry

        return get_registry().default_model_name() or "(default model)"

    def load(self):
        from .api import load

        reference = Path(self.reference) if self.reference_is_path else self.reference
        return load(reference, backend=self.backend, device=self.device, dtype=self.dtype, threads=self.threads,
                    backend_options=self.backend_options)


def worth_keeping(model) -> bool:
    """Whether a loaded model is big enough to keep resident (`MIN_MODEL_BYTES`)."""
    path = Path(model.source.path)
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    return sum(file.stat().st_size for file in files) >= MIN_MODEL_BYTES


def keep_alive_text(seconds: float) -> str:
    if seconds % 60 == 0:
        return f"{int(seconds // 60)} min"
    return f"{seconds:g} s"


def model_facts(model) -> dict[str, Any]:
    """What `influence generate --json` and --stats say about the loaded model."""
    return {"backend": model.backend, "device": model.device, "dtype": model.dtype,
            "weight_format": model.weight_format, "model": str(model.source.path),
            "load_s": round(model.load_seconds, 6)}


# --- the client side -------------------------------------------------------------------------------

class _Connection:
    """One line-delimited JSON exchange over a Unix socket."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.reader = sock.makefile("rb")

    def send(self, message: dict[str, Any]) -> None:
        self.sock.sendall(json.dumps(message, ensure_ascii=False).encode() + b"\n")

    def receive(self) -> Optional[dict[str, Any]]:
        """The next message, or None when the other side has closed."""
        line = self.reader.readline()
        return json.loads(line) if line else None

    def close(self) -> None:
        self.reader.close()
        self.sock.close()


def _connect(key: str, timeout: Optional[float] = None) -> Optional[tuple[_Connection, dict[str, Any]]]:
    """A connection to KEY's resident and its hello (once it has loaded and is free), or None."""
    path = run_dir() / f"{key}.sock"
    while not path.exists():  # a resident just started binds its socket once Python is up
        state = _read_state(key)
        if state is None or state["loaded"] or not _alive(state):
            return None
        time.sleep(0.05)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(str(path))
    except OSError:  # a socket file left by a resident that died: nothing listens on it
        sock.close()
        return None
    connection = _Connection(sock)
    waited_until = None if timeout is None else time.monotonic() + timeout
    # A resident still loading, or serving another client, answers later: wait while it lives.
    while not select.select([sock], [], [], 0.5)[0]:
        state = _read_state(key)
        if state is None or not _alive(state) or (waited_until is not None and time.monotonic() > waited_until):
            connection.close()
            return None
    try:
        hello = connection.receive()
    except (OSError, ValueError):
        hello = None
    if hello is None:
        connection.close()
        return None
    return connection, hello


class ResidentStream:
    """A generation in a resident, read as `generation.TextStream` is: iterate for the text pieces,
    then read ``result``. An error in the resident is raised here as the in-process run raises it."""

    def __init__(self, connection: _Connection) -> None:
        self.connection = connection
        self.result = None
        self._pieces = self._run()

    def __iter__(self) -> Iterator[str]:
        return self._pieces

    def _run(self) -> Iterator[str]:
        from .errors import InfluenceError
        from .generation import GenerationResult, GenerationStats

        try:
            while True:
                try:
                    message = self.connection.receive()
                except (OSError, ValueError):
                    message = None
                if message is None:
                    raise InfluenceError("the resident model stopped in the middle of the generation "
                                         "(`influence stop` ends it; INFLUENCE_KEEP_ALIVE=0 turns residents off)")
                if "piece" in message:
                    yield message["piece"]
                elif "error" in message:
                    raise InfluenceError(message["error"])
                else:
                    done = message["result"]
                    self.result = GenerationResult(done["text"], done["token_ids"], done["finish_reason"],
                                                   GenerationStats(**done["stats"]), done["seed"], done["settings"])
                    return
        finally:
            self.connection.close()


def stream(spec: Spec, prompt: str, options: dict[str, Any],
           keep_alive: float) -> Optional[tuple[ResidentStream, dict[str, Any]]]:
    """Start generating in the resident for ``spec``: its stream and the model's facts (`model_facts`,
    load_s 0: this run loaded nothing), or None where there is no usable resident."""
    from .artifacts import fingerprint

    if not any(run_dir().glob("*.json")):  # the common case without residents: no key to compute
        return None
    connected = _connect(spec.key)
    if connected is None:
        return None
    connection, hello = connected
    model_path = Path(hello["facts"]["model"])
    if not model_path.exists() or fingerprint(model_path) != hello["fingerprint"]:
        connection.send({"op": "stop"})  # its model's files changed: it serves no one again
        connection.close()
        return None
    connection.send({"op": "generate", "prompt": prompt, "options": _wire_options(options), "keep_alive": keep_alive})
    return ResidentStream(connection), {**hello["facts"], "load_s": 0.0}


def _wire_options(options: dict[str, Any]) -> dict[str, Any]:
    wire = dict(options)
    constraint = wire.get("response_format")
    if constraint is not None:
        wire["response_format"] = {"kind": constraint.kind, "value": constraint.value}
    wire["stop"] = list(wire.get("stop") or ())
    return wire


def _options_from_wire(wire: dict[str, Any]) -> dict[str, Any]:
    from .structured import Constraint

    options = dict(wire)
    if options.get("response_format") is not None:
        options["response_format"] = Constraint(**options["response_format"])
    return options


# --- starting, listing and stopping residents ----------------------------------------------------

def start(spec: Spec, keep_alive: float, *, announce: bool = False) -> None:
    """Start a resident for ``spec`` in the background (detached: its own session, its output in
    run/KEY.log), replacing one for the same key that did not answer, and stopping the least
    recently used other one when `MAX_RESIDENTS` already run."""
    import subprocess

    key = spec.key
    directory = run_dir()
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    for state in residents():
        if state["key"] == key:
            stop_resident(state)
    (directory / f"{key}.sock").unlink(missing_ok=True)  # one no process answers on (its resident was killed)
    others = sorted(residents(), key=lambda state: state["last_used"])
    for state in others[:max(0, len(others) - MAX_RESIDENTS + 1)]:
        stop_resident(state)
    environment = dict(os.environ)
    for variable in ("INFLUENCE_HOME", "INFLUENCE_CONFIG"):  # the resident runs in run/, not the caller's directory
        if environment.get(variable):
            environment[variable] = str(Path(environment[variable]).expanduser().resolve())
    arguments = json.dumps({"spec": asdict(spec), "key": key, "keep_alive": keep_alive})
    with open(directory / f"{key}.log", "ab") as log:
        process = subprocess.Popen([sys.executable, "-m", "influence_core.resident", arguments],
                                   stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True, cwd=directory, env=environment)
    # Written here, before its socket exists: whoever finds the socket knows whom to wait for; once
    # the process runs its command, by which `_alive` knows it (Popen may return a moment before).
    state = _loading_state(spec, key, process.pid, keep_alive)
    deadline = time.monotonic() + 2
    while not _alive(state) and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.001)
    _write_state(state)
    if announce:
        print(ANNOUNCEMENT.format(minutes=keep_alive_text(keep_alive)), file=sys.stderr)


def wait_ready(key: str, timeout: float) -> bool:
    """Whether KEY's resident has loaded its model and answers, within ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        connected = _connect(key, timeout=max(0.0, deadline - time.monotonic()))
        if connected is not None:
            connection, _ = connected
            connection.send({"op": "ping"})
            connection.close()
            return True
        time.sleep(0.1)
    return False


def residents() -> list[dict[str, Any]]:
    """The running residents' states (run/KEY.json), oldest first; those of dead processes are
    cleared away."""
    directory = run_dir()
    if not directory.is_dir():
        return []
    found = []
    for path in sorted(directory.glob("*.json")):
        state = _read_state(path.stem)
        if state is None:
            continue
        if not _alive(state):
            _remove_files(path.stem)
            continue
        found.append(state)
    return found


def stop_resident(state: dict[str, Any], wait_s: float = 15.0) -> None:
    """Stop a resident: SIGTERM, so that it ends what it runs (a background build, `Runner.close`)
    and removes its files; one still alive after ``wait_s`` is killed. It never outlives a stop."""
    import signal

    for signum, wait in ((signal.SIGTERM, wait_s), (signal.SIGKILL, 5.0)):
        if not _alive(state):
            break
        try:
            os.kill(state["pid"], signum)
        except ProcessLookupError:
            break
        deadline = time.monotonic() + wait
        while _alive(state) and time.monotonic() < deadline:
            time.sleep(0.05)
    if not _alive(state):
        _remove_files(state["key"])


def memory_rss(pid: int) -> Optional[int]:
    """A process's resident memory in bytes, where the system says."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    import subprocess

    try:
        out = subprocess.run(["ps", "-o", "rss=", "-p", str(pid)], capture_output=True, text=True, timeout=5).stdout
        return int(out.strip()) * 1024
    except (OSError, ValueError, subprocess.SubprocessError):
        return None


def _loading_state(spec: Spec, key: str, pid: int, keep_alive: float) -> dict[str, Any]:
    now = time.time()
    return {"key": key, "pid": pid, "model": spec.label, "backend": spec.backend, "device": spec.device,
            "dtype": spec.dtype, "keep_alive": keep_alive, "started": now, "last_used": now, "loaded": False}


def _write_state(state: dict[str, Any]) -> dict[str, Any]:
    path = run_dir() / f"{state['key']}.json"
    partial = path.with_name(f".{path.name}.partial-{os.getpid()}")
    partial.write_text(json.dumps(state), encoding="utf-8")
    partial.replace(path)
    return state


def _read_state(key: str) -> Optional[dict[str, Any]]:
    try:
        return json.loads((run_dir() / f"{key}.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _alive(state: dict[str, Any]) -> bool:
    """Whether the state's process still runs and is that resident (not a reused process id)."""
    try:
        os.kill(state["pid"], 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process now holds the id
        return False
    try:
        with open(f"/proc/{state['pid']}/cmdline", "rb") as cmdline:
            return state["key"].encode() in cmdline.read()
    except FileNotFoundError:
        return not os.path.isdir("/proc")  # no /proc (macOS): the id alone has to do
    except OSError:
        return True


def _remove_files(key: str, inode: Optional[int] = None, keep_log: bool = False) -> None:
    """KEY's socket, state and log (``keep_log``: not the log, which says why a resident failed);
    with ``inode``, the socket only if it is still that one (a replacement may have bound the name since)."""
    directory = run_dir()
    socket_path = directory / f"{key}.sock"
    try:
        if inode is None or os.stat(socket_path).st_ino == inode:
            socket_path.unlink()
    except OSError:
        pass
    for suffix in (".json",) if keep_log else (".json", ".log"):
        try:
            (directory / f"{key}{suffix}").unlink()
        except OSError:
            pass


# --- the resident process ----------------------------------------------------------------------

class _Stopped(BaseException):
    """SIGTERM: a BaseException, so that a generation's error handling does not take it for a failure."""


def serve(spec: Spec, key: str, keep_alive: float) -> None:
    """The resident's life: bind the socket (so that clients queue while the model loads), load,
    then answer one client at a time until the keep-alive runs out, the socket file goes, or a stop."""
    import signal

    stop_requested = []

    def terminate(signum, frame):
        stop_requested.append(signum)  # checked between requests too: library code may swallow the raise
        raise _Stopped

    signal.signal(signal.SIGTERM, terminate)
    directory = run_dir()
    socket_path = directory / f"{key}.sock"
    state = _read_state(key)  # as `start` wrote it, if it was first
    if state is None or state["pid"] != os.getpid():
        state = _write_state(_loading_state(spec, key, os.getpid(), keep_alive))
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    previous_umask = os.umask(0o177)  # the socket file is the owner's only (0600)
    try:
        listener.bind(str(socket_path))
    finally:
        os.umask(previous_umask)
    inode = os.stat(socket_path).st_ino
    listener.listen(16)
    failed, model = True, None
    try:
        model = spec.load()
        from .artifacts import fingerprint

        facts = model_facts(model)
        hello = {"facts": facts, "fingerprint": fingerprint(model.source.path), "pid": os.getpid()}
        on_idle = getattr(model.runner, "on_idle", None)  # a runner written before hook spec 1.2 has none
        state.update(loaded=True, backend=facts["backend"], device=facts["device"], dtype=facts["dtype"],
                     weight_format=facts["weight_format"], model_path=facts["model"], last_used=time.time(),
                     preparing=on_idle is not None)
        _write_state(state)
        listener.settimeout(CHECK_S)
        while not stop_requested:
            try:
                sock, _ = listener.accept()
            except socket.timeout:
                if not _socket_is_ours(socket_path, inode) or time.time() - state["last_used"] > state["keep_alive"]:
                    failed = False
                    return
                on_idle = _idle_work(model.runner, on_idle, state)
                continue
            with sock:
                outcome = _answer(model, _Connection(sock), hello)
            if outcome == "stop":
                failed = False
                return
            if outcome is not None:
                state.update(last_used=time.time(), keep_alive=outcome)
                _write_state(state)
        failed = False  # a stop that library code swallowed ends the loop all the same
    except _Stopped:
        failed = False
    finally:
        listener.close()
        _remove_files(key, inode, keep_log=failed)
        if model is not None:
            model.close()  # and what it runs in the background (`Runner.close`)


def _idle_work(runner, on_idle, state: dict[str, Any]):
    """Give the runner its idle time (`Runner.on_idle`), and the on_idle to call next time: None
    once it has nothing more to do, or failed there (it keeps serving as it is; the failure goes to
    this resident's log). The state says whether it is still preparing (`influence ps`)."""
    if on_idle is None:
        return None
    try:
        more = on_idle()
    except Exception as error:
        print(f"influence: {type(runner).__name__}.on_idle failed ({type(error).__name__}: {error}); "
              "serving on without it", file=sys.stderr, flush=True)
        more = False
    if not more:
        state["preparing"] = False
        _write_state(state)
    return on_idle if more else None


def _socket_is_ours(path: Path, inode: int) -> bool:
    try:
        return os.stat(path).st_ino == inode
    except OSError:
        return False


def _answer(model, connection: _Connection, hello: dict[str, Any]) -> Optional[float | str]:
    """Serve one client: "stop", its keep-alive after a generation, or None (a ping, or a client
    that left before asking)."""
    from .errors import InfluenceError

    request = None
    try:
        connection.send(hello)
        connection.sock.settimeout(30)  # a client that connects and never asks must not hold the resident
        request = connection.receive()
        connection.sock.settimeout(None)
        if request is None or request.get("op") == "ping":
            return None
        if request.get("op") == "stop":
            return "stop"
        model.cache.token_ids = []  # as a fresh process: no prompt tokens reused from an earlier client
        try:
            stream = model.stream(request["prompt"], **_options_from_wire(request["options"]))
            for piece in stream:
                connection.send({"piece": piece})
            result = stream.result
            connection.send({"result": {"text": result.text, "token_ids": result.token_ids,
                                        "finish_reason": result.finish_reason, "seed": result.seed,
                                        "settings": result.settings, "stats": asdict(result.stats)}})
        except InfluenceError as error:
            connection.send({"error": str(error)})
        except OSError:
            raise
        except Exception as error:  # as the CLI reports what it did not expect
            connection.send({"error": f"unexpected {type(error).__name__}: {error} "
                                      "(INFLUENCE_DEBUG=1 shows the traceback)"})
    except (OSError, ValueError):  # the client went away (Ctrl-C): the generation ends with it
        pass
    finally:
        connection.close()
    return float(request.get("keep_alive", DEFAULT_KEEP_ALIVE_S)) if isinstance(request, dict) else None


def main(argv: list[str]) -> None:
    arguments = json.loads(argv[0])
    serve(Spec(**arguments["spec"]), arguments["key"], float(arguments["keep_alive"]))


if __name__ == "__main__":
    main(sys.argv[1:])
