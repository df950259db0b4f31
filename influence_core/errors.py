"""Errors that reach users as one clear line.

Anything a user can cause (a missing file, a bad flag, an unknown backend, a prompt that does not
fit) raises an `InfluenceError`; the CLI prints its message and exits non-zero, without a traceback.
"""


class InfluenceError(Exception):
    """A problem the user can fix; the message says what and, where possible, how."""


class ModelNotFoundError(InfluenceError):
    """No model at the given path or name, or no loader recognises it."""


class ModelFormatError(InfluenceError):
    """The model's files exist but are corrupt, unsupported or refused (pickle weights)."""


class UnsupportedArchitectureError(InfluenceError):
    """No installed plugin builds this architecture for the chosen backend."""


class BackendError(InfluenceError):
    """Unknown backend, or a device or dtype the backend cannot provide on this machine."""


class SamplingError(InfluenceError):
    """An unknown sampler or an invalid sampling parameter."""


class PluginVersionError(InfluenceError):
    """A plugin written for hook specs this core does not provide (see `hookspecs.HOOKSPEC_VERSION`)."""


class ContextLengthError(InfluenceError):
    """The prompt does not fit in the model's context."""
