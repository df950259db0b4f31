"""Running the `influence` CLI from tests: in-process, or as a subprocess as a user would."""

from __future__ import annotations

import json
import subprocess
import sys

from influence_core.cli import run

CLI = [sys.executable, "-c", "from influence_core.cli import run; run()"]


def invoke(capsys, *args: str) -> tuple[int, str, str]:
    """Run the CLI in-process (faster than a subprocess) and return (exit code, stdout, stderr)."""
    try:
        run(list(args))
        code = 0
    except SystemExit as exit:
        code = exit.code or 0
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_error_line(code: int, err: str, message: str) -> None:
    """Exit status 1, and the error is one line, the last on stderr (progress lines may precede
    it), with no traceback."""
    lines = err.strip().splitlines()
    assert code == 1 and lines[-1].startswith("error: ") and message in lines[-1], err
    assert sum(line.startswith("error") for line in lines) == 1 and "Traceback" not in err, err


def help_in_a_fresh_process() -> tuple[str, set[str]]:
    """`influence --help` run in a new interpreter: (its output, every module it imported)."""
    code = ("import json, sys; from influence_core.cli import run\n"
            "try: run(['--help'])\nexcept SystemExit: pass\n"
            "print(json.dumps(sorted(sys.modules)))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    help_text, _, modules = done.stdout.rstrip("\n").rpartition("\n")
    return help_text, set(json.loads(modules))
