"""Influence: hackable local LLM inference with plugins for loaders, architectures, samplers and backends.

The public API is `load` and the `Model` it returns; plugins use `hookimpl` and the classes in
`influence_core.interfaces`. Nothing here imports torch: backends import it when they load a model.
"""

from importlib.metadata import PackageNotFoundError, version

from .api import Model, load
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
from .generation import GenerationResult, GenerationStats
from .plugins import hookimpl, register_plugin, unregister_plugin
from .structured import Constraint

try:
    __version__ = version("influence")
except PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0+unknown"

__all__ = [
    "BackendError", "Constraint", "ContextLengthError", "GenerationResult", "GenerationStats", "InfluenceError", "Model",
    "ModelFormatError", "ModelNotFoundError", "PluginVersionError", "SamplingError", "UnsupportedArchitectureError",
    "hookimpl", "load", "register_plugin", "unregister_plugin", "__version__",
]
