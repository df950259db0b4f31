from __future__ import annotations

import atexit
import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from fake_hub import FakeHub  # noqa: E402
from tiny_models import TINY_VARIANTS, make_tiny_llama  # noqa: E402

# The conformance kit's fixtures (influence_tiny_model, influence_plugin), as plugin authors enable them.
pytest_plugins = ["influence_core.testing"]


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny")
    return {name: make_tiny_llama(root / name, **overrides) for name, overrides in TINY_VARIANTS.items()}


@pytest.fixture(scope="session")
def tiny_model(tiny_models) -> Path:
    return tiny_models["gqa_llama3_rope"]


@pytest.fixture
def plugin(request):
    """Register plugin objects for one test: ``plugin(obj, name)``; unregistered afterwards."""
    from influence_core import register_plugin, unregister_plugin

    names = []

    def add(obj, name):
        register_plugin(obj, name=name)
        names.append(name)

    yield add
    for name in names:
        unregister_plugin(name)


# Downloads in tests go to a stand-in for the Hugging Face hub on 127.0.0.1 (fake_hub.py), never to
# the internet. huggingface_hub reads these variables once, when it is first imported, so they are
# set here, before any test imports it; subprocesses inherit them.
HUB = FakeHub()
HUB.start()
_hf_home = tempfile.mkdtemp(prefix="influence-tests-hf-")
atexit.register(shutil.rmtree, _hf_home, ignore_errors=True)
os.environ.update(HF_ENDPOINT=HUB.url, HF_HOME=_hf_home, HF_HUB_DISABLE_PROGRESS_BARS="1",
                  HF_HUB_DISABLE_TELEMETRY="1")
# The user's own config file (~/.config/influence/config.toml) must not change what tests run;
# tests that exercise one point INFLUENCE_CONFIG at their own.
os.environ["INFLUENCE_CONFIG"] = os.path.join(_hf_home, "no-config.toml")
# No test leaves a resident model behind (influence_core/resident.py); tests/test_resident.py opts in.
os.environ["INFLUENCE_KEEP_ALIVE"] = "0"
for _variable in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE",
                  "HF_HUB_ENABLE_HF_TRANSFER"):
    os.environ.pop(_variable, None)


@pytest.fixture
def hub(monkeypatch, tmp_path) -> FakeHub:
    """The stand-in hub, emptied, with INFLUENCE_HOME in a fresh temporary directory."""
    HUB.reset()
    monkeypatch.setenv("INFLUENCE_HOME", str(tmp_path / "home"))
    return HUB
