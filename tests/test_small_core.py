"""The core is the library: importing it pulls in no application dependency, and the project
installed without extras generates from a local safetensors model."""

from __future__ import annotations

import json
import os
import pkgutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

import influence_core

ROOT = Path(__file__).resolve().parents[1]
# What the shipped plugins' extras bring (serve, ray, hub, onnx, bench), and torch, which the core
# imports only inside the functions that need it.
NOT_IN_THE_CORE = ("fastapi", "uvicorn", "starlette", "prometheus_client", "huggingface_hub", "ray",
                   "onnxruntime", "optimum", "transformers", "llama_cpp", "torch", "rich.progress")
EXTRAS_ONLY = ("fastapi", "uvicorn", "prometheus-client", "huggingface_hub", "ray", "onnxruntime",
               "optimum-onnx", "transformers", "llama-cpp-python")


def core_modules() -> list[str]:
    return sorted(f"influence_core.{module.name}" for module in pkgutil.iter_modules(influence_core.__path__))


@pytest.mark.parametrize("module", ["influence_core", *core_modules()])
def test_importing_the_core_imports_no_application_dependency(module):
    code = (f"import importlib, json, sys; importlib.import_module({module!r}); "
            f"print(json.dumps(sorted(sys.modules)))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    imported = set(json.loads(done.stdout))
    assert not {name for name in NOT_IN_THE_CORE if name in imported}, module


def test_extras_only_dependencies_are_not_installed_by_default():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    required = {dependency.split(";")[0].split("[")[0].split("<")[0].split(">")[0].split("=")[0].strip().lower()
                for dependency in project["dependencies"]}
    assert not required & {name.lower() for name in EXTRAS_ONLY}


# Stands in for an environment where no extra was installed: a None entry in sys.modules makes
# `import fastapi` fail and importlib.util.find_spec("fastapi") answer None, as a missing package
# does, while the rest of this environment serves.
BLOCK_EXTRAS = """
import sys
for name in {blocked!r}:
    sys.modules[name] = None
from influence_core.cli import run
run(sys.argv[1:])
"""


def run_without_extras(*args: str, home: Path) -> subprocess.CompletedProcess:
    blocked = ["fastapi", "uvicorn", "starlette", "prometheus_client", "huggingface_hub", "ray", "onnxruntime",
               "optimum", "transformers", "llama_cpp"]
    env = {**os.environ, "INFLUENCE_HOME": str(home)}
    return subprocess.run([sys.executable, "-c", BLOCK_EXTRAS.format(blocked=blocked), *args],
                          capture_output=True, text=True, timeout=300, env=env)


def test_generate_on_a_local_model_needs_no_extra(tiny_model, tmp_path):
    done = run_without_extras("generate", "hello", "-p", str(tiny_model), "--max-tokens", "4", "--temperature", "0",
                              "--json", home=tmp_path)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["generated_tokens"] == 4
    assert "warning" not in done.stderr.lower(), done.stderr  # no plugin fails to load for want of an extra


@pytest.mark.parametrize(("command", "extra"), [(["serve", "-p", "MODEL"], "serve"),
                                                (["download", "-m", "org/name"], "hub")])
def test_a_command_of_a_missing_extra_names_the_extra(command, extra, tiny_model, tmp_path):
    args = [str(tiny_model) if arg == "MODEL" else arg for arg in command]
    done = run_without_extras(*args, home=tmp_path)
    assert done.returncode == 1, done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and f"influence[{extra}]" in last and "Traceback" not in done.stderr
