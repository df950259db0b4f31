from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from tiny_models import TINY_VARIANTS, make_tiny_llama  # noqa: E402


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
