"""Influence: hackable local LLM inference with plugins for loaders, architectures, samplers and backends.

The public API is `load` and the `Model` it returns; plugins use `hookimpl` and the classes in
`influence_core.interfaces`. Nothing here imports torch: backends import it when they load a model.
The API's modules are imported on first use, so that ``influence --help`` and plugin discovery stay
quick.
"""

from importlib import import_module
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from .errors import (
    BackendError,
    ContextLengthError,
    InfluenceError,
    ModelFormatError,
    ModelNotFoundError,
    PluginVersionError,
    SamplingError,
    UnsupportedArchitectureError,
)

try:
    __version__ = version("influence")
except PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0+unknown"

_LAZY = {
    "Model": "api", "load": "api",
    "GenerationResult": "generation", "GenerationStats": "generation",
    "hookimpl": "plugins", "register_plugin": "plugins", "unregister_plugin": "plugins",
    "Constraint": "structured",
}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'influence_core' has no attribute {name!r}")
    value = getattr(import_module(f".{_LAZY[name]}", __name__), name)
    globals()[name] = value
    return value


__all__ = [
    "BackendError", "Constraint", "ContextLengthError", "GenerationResult", "GenerationStats", "InfluenceError", "Model",
    "ModelFormatError", "ModelNotFoundError", "PluginVersionError", "SamplingError", "UnsupportedArchitectureError",
    "hookimpl", "load", "register_plugin", "unregister_plugin", "__version__",
]
