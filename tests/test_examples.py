"""The scripts in examples/ run as documented (on a tiny model, to stay fast)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).parent.parent / "examples"


@pytest.mark.parametrize("script, extra", [
    ("generate.py", []),
    ("stream.py", ["--seed", "1"]),
    ("custom_sampler.py", ["--typical-p", "0.5"]),
])
def test_example_runs(tiny_model, script, extra):
    done = subprocess.run([sys.executable, str(EXAMPLES / script), "hello world", "--model-path", str(tiny_model),
                           "--max-tokens", "8", *extra], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip()


def test_custom_sampler_is_reproducible_and_rejects_bad_options(tiny_model):
    def run(*extra):
        return subprocess.run([sys.executable, str(EXAMPLES / "custom_sampler.py"), "hello", "--model-path",
                               str(tiny_model), "--max-tokens", "12", *extra], capture_output=True, text=True)

    assert run("--seed", "5").stdout == run("--seed", "5").stdout
    bad = run("--typical-p", "2")
    assert bad.returncode != 0 and "typical p must be in (0, 1]" in bad.stderr
