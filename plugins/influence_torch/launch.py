"""Tensor-parallel runs: N processes, one per rank, started here or by torchrun.

`influence tensor-parallel N COMMAND ...` runs ``influence COMMAND ... -B tensor_parallel=N`` N times
with the environment torchrun would give each worker (RANK, WORLD_SIZE, LOCAL_RANK,
LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT), then watches them: the moment one fails, the others
are stopped, so none is left blocked in a collective waiting for a peer that is gone. Rank 0's
output is the run's; the other ranks' stdout is dropped, and their stderr is shown only if they fail.

No torch here: the backend joins the process group (see tensor_parallel.py).
"""

from __future__ import annotations

import collections
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import IO

from influence_core.config import ModelConfig
from influence_core.errors import BackendError, InfluenceError

POLL_S = 0.1
STOP_GRACE_S = 5
STDERR_TAIL_LINES = 20  # of a failed rank other than 0, shown after it fails


def check_splittable(config: ModelConfig, world_size: int) -> None:
    """Each rank takes an equal share of the attention heads, the key-value heads and the MLP's
    intermediate units, so all three must divide by the number of ranks."""
    for what, count in (("attention heads", config.num_attention_heads),
                        ("key-value heads", config.num_key_value_heads),
                        ("intermediate size", config.intermediate_size)):
        if count % world_size:
            raise BackendError(f"tensor_parallel {world_size} cannot split this model: its {what} ({count}) "
                               f"do not divide by {world_size}")


def launch(world_size: int, argv: list[str]) -> None:
    """Run ``influence ARGV`` as ranks 0..world_size-1 on this machine; return when all succeed,
    raise `InfluenceError` naming the first rank that failed (after stopping the rest)."""
    port = _free_port()
    # Stopped with SIGTERM, the launcher stops its ranks too (through the finally below).
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    # The ranks share this machine's cores; torch would otherwise give each rank all of them.
    threads = str(max(1, (os.cpu_count() or 1) // world_size))
    workers, tails = [], []
    for rank in range(world_size):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world_size),
               "LOCAL_WORLD_SIZE": str(world_size), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        env.setdefault("OMP_NUM_THREADS", threads)
        command = [sys.executable, "-c", "from influence_core.cli import run; run()", *argv]
        secondary = rank != 0
        workers.append(subprocess.Popen(command, env=env, stdin=subprocess.DEVNULL,
                                        stdout=subprocess.DEVNULL if secondary else None,
                                        stderr=subprocess.PIPE if secondary else None))
        tails.append(_keep_tail(workers[-1].stderr) if secondary else None)
    try:
        failed = _first_failure(workers)
    finally:
        _stop(workers)
    if failed is not None:
        if tails[failed] is not None:
            lines, reader = tails[failed]
            reader.join(STOP_GRACE_S)  # the rest of what it wrote before it exited
            sys.stderr.writelines(f"[rank {failed}] {line}" for line in lines)
        code = workers[failed].returncode
        how = f"was killed by {signal.Signals(-code).name}" if code < 0 else f"exited with status {code}"
        raise InfluenceError(f"tensor-parallel rank {failed} {how}; stopped the other ranks")


def _keep_tail(stream: IO[bytes]) -> tuple[collections.deque[str], threading.Thread]:
    """The last lines a rank writes to ``stream``, read as it writes them (so that it never blocks
    on a full pipe), and the thread reading them."""
    tail: collections.deque[str] = collections.deque(maxlen=STDERR_TAIL_LINES)

    def read() -> None:
        for line in stream:
            tail.append(line.decode("utf-8", "replace"))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    return tail, reader


def _first_failure(workers: list[subprocess.Popen]) -> int | None:
    """Wait until every worker succeeded (None) or one failed (its rank)."""
    while True:
        codes = [worker.poll() for worker in workers]
        failed = next((rank for rank, code in enumerate(codes) if code not in (None, 0)), None)
        if failed is not None or all(code == 0 for code in codes):
            return failed
        time.sleep(POLL_S)


def _stop(workers: list[subprocess.Popen]) -> None:
    for worker in workers:
        if worker.poll() is None:
            worker.terminate()
    for worker in workers:
        try:
            worker.wait(STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.wait()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
