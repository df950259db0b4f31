"""What plugins register, and what they hand back to the core.

Each register hook in `hookspecs` registers one of the classes below. Everything that touches
tensors is typed loosely (`Any`) here because the core never imports torch at module level.
"""

from __future__ import annotations

import dataclasses
import secrets
import typing
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol, TypeVar

from .config import ModelConfig
from .errors import BackendError
from .tokenizer import Tokenizer


class Weights(Protocol):
    """A lazy, read-only mapping from Hugging Face tensor names (``model.layers.0.mlp.up_proj.weight``)
    to torch tensors in their stored floating dtype (quantized formats are dequantized to float32).
    Architectures read only the tensors they need, one at a time, so peak memory stays near the
    size of the built model.

    A loader of a quantized format may also offer ``quantized(name) -> QuantizedTensor | None``:
    the tensor as the file stores it (None where it is stored as floats), so that a backend can run
    the file's own codes and scales rather than requantize the dequantized floats."""

    def keys(self) -> Iterator[str]: ...
    def __contains__(self, name: object) -> bool: ...
    def __getitem__(self, name: str) -> Any: ...


@dataclass(frozen=True)
class QuantizedTensor:
    """A 2-D weight as a quantized file stores it: ``blocks`` is a numpy uint8 array with one row of
    blocks per output row (rows in Hugging Face's order), in the block format ``kind`` names (GGUF's
    type names: "Q4_0", "Q4_1", "Q4_K", "Q8_0", ...); ``shape`` is the (rows, columns) it decodes to."""

    kind: str
    shape: tuple[int, ...]
    blocks: Any


@dataclass
class ModelSource:
    """A model a loader recognised: its config, tokenizer and (lazily) weights."""

    path: Path
    format: str  # the loader's name: "safetensors", "gguf", ...
    config: ModelConfig
    tokenizer: Tokenizer
    weights: Callable[[], Weights]
    # A Hugging Face directory holding this model (config.json, tokenizer.json, *.safetensors), for
    # tools that need one, such as the ONNX exporter; None when the source is in another format.
    hf_directory: Path | None = None
    details: dict[str, Any] = field(default_factory=dict)  # format-specific facts for listings


@dataclass(frozen=True)
class ModelLoader:
    """Recognises a model source on disk and opens it.

    ``detect(path)`` must be cheap (look at names and magic bytes, not tensors); ``load(path)``
    returns a `ModelSource` or raises `ModelFormatError` with a one-line reason.
    """

    name: str
    detect: Callable[[Path], bool]
    load: Callable[[Path], ModelSource]
    description: str = ""


def _no_names() -> list[str]:
    return []


def _no_default() -> str | None:
    return None


@dataclass(frozen=True)
class ModelResolver:
    """Finds a model by name: anything given as a model that is not an existing path (an alias, a
    name in a store, ``ORG/NAME`` on a hub, ``ollama:NAME``, ``s3://...``).

    ``resolve(reference, prefer_quantized)`` returns a `Path` that a loader opens (fetching it first
    if need be), or None when ``reference`` is not a name this resolver handles; the core then asks
    the next one. ``reference`` None asks for the default model. A resolver that must adjust what
    it found (settings a file lacks) may open it itself and return the `ModelSource`. It raises
    `ModelNotFoundError` (or another `InfluenceError`) for a name it handles but cannot provide.
    ``prefer_quantized`` is True when the backend will run a quantized format: a resolver holding a
    model both as a quantized file and as a float copy (the bundled model: its Q4_1 GGUF and the
    copy converted into the store) returns the quantized file then, and the float copy otherwise.

    ``names()`` lists the names it resolves without fetching anything (for shell completion);
    ``default_name()`` is the name of the model it gives for None, or None if it gives none.
    """

    name: str
    resolve: Callable[[str | None, bool], Path | ModelSource | None]
    names: Callable[[], list[str]] = _no_names
    default_name: Callable[[], str | None] = _no_default
    description: str = ""


@dataclass(frozen=True)
class Architecture:
    """Builds one model family for one backend.

    Selected when config.json's ``model_type`` is in ``model_types`` or one of its ``architectures``
    is in ``class_names``. ``build(config, weights, device, dtype)`` returns the backend's model
    object (for the torch backend, a module with the `influence_torch` causal-LM interface).
    """

    name: str
    backend: str
    model_types: tuple[str, ...]
    build: Callable[..., Any]
    class_names: tuple[str, ...] = ()
    description: str = ""

    def matches(self, config: ModelConfig) -> bool:
        return config.model_type in self.model_types or any(c in self.class_names for c in config.architectures)


class Runner(ABC):
    """One loaded model on one device, holding its KV cache; what the generation loop drives.

    The cache has ``max_batch`` slots, each holding one independent sequence. Positions below
    ``start_pos`` must already be in a slot from earlier calls; a call overwrites the slot from
    ``start_pos`` on, so a caller can rewind (reuse a shared prefix) by passing a smaller one.
    """

    context_length: int
    # Where the logits `forward` returns live, as a torch device string ("cpu", "cuda:0", ...): the
    # sampler chain runs there. Not always where the model runs (ONNX Runtime hands logits to the host).
    logits_device: str
    max_batch: int = 1  # cache slots, so sequences that can decode together
    # What the weights run as when it says more than the dtype: "int4 (from Q4_1); output head int8 ...".
    weight_format: str | None = None

    @abstractmethod
    def forward(self, token_ids: Sequence[int], start_pos: int, all_logits: bool = False, slot: int = 0) -> Any:
        """Run ``token_ids`` at positions ``start_pos...`` of cache slot ``slot``; return float32
        logits as a torch tensor: shape [vocab] for the last position, or [len(token_ids), vocab]
        when ``all_logits``."""

    def decode_batch(self, token_ids: Sequence[int], positions: Sequence[int]) -> Any:
        """One decode step for the sequences in slots 0..len(token_ids)-1, each with one new token
        at its own position; returns logits [batch, vocab]. Backends with ``max_batch > 1``
        override this with one batched pass."""
        import torch

        return torch.stack([self.forward([token], position, slot=slot)
                            for slot, (token, position) in enumerate(zip(token_ids, positions))])

    def copy_slot(self, source: int, target: int, length: int | None = None) -> None:
        """Copy positions 0..length-1 (None: every position) of one slot's cache over another: to keep
        active sequences in the first slots, and to start a sequence from another's cached prefix.
        A runner may copy more positions than asked; the target's later positions are rewritten
        before they are read."""
        raise BackendError("this backend's runner holds a single sequence")

    def random_seed(self) -> int:
        """The seed of a generation that was given none. A runner whose model spans processes
        returns the same one in each, so that they all sample the same tokens."""
        return secrets.randbits(63)

    def on_idle(self) -> bool:
        """Called every few seconds by a host that keeps this runner loaded between requests (a
        resident model, `influence_core.resident`) while none runs; returns whether it has more
        to do (False: it is not called again). A runner may use the time to become faster for
        later calls (the torch runner builds its compiled decode step in a low-priority child
        process and switches to it once built), but must return promptly."""
        return False

    def close(self) -> None:
        """Release memory held outside Python's reach (device caches, sessions), and stop what the
        runner runs in the background."""


# Load settings every backend honours; `influence_core.api.load` takes them by name and hands them
# to `Backend.load` in its ``options`` dict. A backend's own options are declared in `BackendOptions`.
GENERIC_LOAD_SETTINGS = ("threads", "context_length", "max_batch")

OPTION_TYPES = {bool: "true or false", int: "an integer", float: "a number", str: "text"}
TRUE_WORDS, FALSE_WORDS = ("true", "yes", "on", "1"), ("false", "no", "off", "0")


def option(default: bool | int | float | str, help: str, *, minimum: int | float | None = None,
           choices: Sequence[str] = ()) -> Any:
    """One field of a `BackendOptions` subclass: its default, a line of help (`influence plugins`
    shows it), and for a number the least value it may take, for text the values it may take."""
    return field(default=default, metadata={"help": help, "minimum": minimum, "choices": tuple(choices)})


@dataclass(frozen=True)
class OptionSpec:
    """One option a backend declares, as the core validates it and `influence plugins` lists it."""

    name: str
    type: type  # bool, int, float or str
    default: Any
    help: str
    minimum: int | float | None = None
    choices: tuple[str, ...] = ()

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "type": self.type.__name__, "default": self.default, "help": self.help,
                "minimum": self.minimum, "choices": list(self.choices)}

    def value(self, given: Any, backend: str) -> Any:
        """``given`` as this option's type, or `BackendError` in one line. Text is read as the type
        (the command line's ``-B KEY=VALUE`` gives text); other values must already be of it."""
        value = self._parse(given) if isinstance(given, str) and self.type is not str else given
        if self.type is float and type(value) is int:
            value = float(value)
        of_type = isinstance(value, self.type) and (self.type is bool or not isinstance(value, bool))
        if not (of_type and (not self.choices or value in self.choices)
                and (self.minimum is None or value >= self.minimum)):
            wanted = f"one of {', '.join(self.choices)}" if self.choices else OPTION_TYPES[self.type]
            bound = f" >= {self.minimum}" if self.minimum is not None else ""
            raise BackendError(f"backend {backend!r} option {self.name} must be {wanted}{bound}, got {given!r}")
        return value

    def _parse(self, text: str) -> Any:
        """The text's value, or the text itself where it is not one (refused by `value`)."""
        if self.type is bool:
            word = text.strip().lower()
            return True if word in TRUE_WORDS else False if word in FALSE_WORDS else text
        try:
            return self.type(text)
        except ValueError:
            return text


Options = TypeVar("Options", bound="BackendOptions")


@dataclass(frozen=True)
class BackendOptions:
    """The options a backend takes besides the generic load settings (hook spec 1.2). A backend
    declares them by subclassing this as a frozen dataclass, one `option` field each (typed bool,
    int, float or str)::

        @dataclass(frozen=True)
        class TorchOptions(BackendOptions):
            tensor_parallel: int = option(1, "Split the model across N processes.", minimum=1)

    and naming the subclass in `Backend.options_type`. The core refuses an option the class does
    not declare, or a value of the wrong type or range, before the backend's `load` runs; this base
    class declares none."""

    @classmethod
    def specs(cls) -> list[OptionSpec]:
        """The declared options, in declaration order; `TypeError` for a declaration the core cannot
        validate (a plugin registering such a backend is skipped with a warning)."""
        if not dataclasses.is_dataclass(cls) or "__dataclass_fields__" not in cls.__dict__:
            raise TypeError(f"{cls.__name__} must be a dataclass (@dataclass(frozen=True))")
        hints = typing.get_type_hints(cls)
        specs = []
        for declared in dataclasses.fields(cls):
            kind = hints[declared.name]
            if kind not in OPTION_TYPES:
                raise TypeError(f"{cls.__name__}.{declared.name} is typed {kind!r}; options are bool, int, "
                                "float or str")
            if declared.name in GENERIC_LOAD_SETTINGS:
                raise TypeError(f"{cls.__name__}.{declared.name} is a generic load setting, which every "
                                "backend gets in load()'s options")
            if declared.default is dataclasses.MISSING or "help" not in declared.metadata:
                raise TypeError(f"{cls.__name__}.{declared.name} needs a default and help: declare it "
                                "with option(default, help)")
            specs.append(OptionSpec(declared.name, kind, declared.default, declared.metadata["help"],
                                    declared.metadata.get("minimum"), tuple(declared.metadata.get("choices", ()))))
        return specs

    @classmethod
    def from_values(cls: type[Options], given: Mapping[str, Any], backend: str) -> Options:
        """The options ``given`` names, validated, with every other one at its default."""
        specs = {spec.name: spec for spec in cls.specs()}
        for name in given:
            if name not in specs:
                raise BackendError(f"backend {backend!r} has no option {name!r} "
                                   f"(its options: {', '.join(specs) or 'none'}; `influence plugins` lists them)")
        return cls(**{name: specs[name].value(value, backend) for name, value in given.items()})


class Backend(ABC):
    """An execution engine. Subclasses set the class attributes and implement `load`."""

    name: str
    devices: tuple[str, ...]  # device kinds this backend can drive: "cpu", "cuda", "mps"
    dtypes: tuple[str, ...]  # dtypes accepted by --dtype, besides "auto"
    description: str = ""
    # False for backends that run an exported graph (ONNX) and so need no architecture plugin.
    uses_architectures: bool = True
    # This backend's own options (1.2). A backend that declares some receives them in `load` as
    # ``backend_options``, an instance of this class; one that declares none is called without.
    options_type: type[BackendOptions] = BackendOptions

    @abstractmethod
    def available_devices(self) -> list[str]:
        """The devices usable now on this machine, best first (e.g. ["cuda:0", "cpu"])."""

    def resolve_device(self, requested: str) -> str:
        """Map ``auto``/``cuda``/``cuda:N``/... to a concrete device, or raise `BackendError`."""
        available = self.available_devices()
        if requested == "auto":
            return available[0]
        kind = requested.split(":", 1)[0]
        if kind not in self.devices:
            raise BackendError(
                f"backend {self.name!r} cannot run on {requested!r} (it supports: {', '.join(self.devices)})"
            )
        wanted = f"{requested}:0" if requested in ("cuda",) else requested
        if wanted not in available:
            raise BackendError(
                f"device {requested!r} is not available on this machine for backend {self.name!r} "
                f"(available: {', '.join(available)})"
            )
        return wanted

    def resolve_dtype(self, requested: str, device: str, source: ModelSource | None = None) -> str:
        """Map ``auto`` to this device's best dtype for ``source`` (when given) and check the rest."""
        if requested == "auto":
            return "float32" if device == "cpu" else "bfloat16"
        if requested not in self.dtypes:
            raise BackendError(
                f"backend {self.name!r} does not support dtype {requested!r} "
                f"(supported: auto, {', '.join(self.dtypes)})"
            )
        return requested

    @abstractmethod
    def load(self, source: ModelSource, architecture: Architecture | None, device: str, dtype: str,
             options: dict[str, Any]) -> Runner:
        """Build a `Runner` for ``source``. ``options`` holds the generic settings that were given
        (`GENERIC_LOAD_SETTINGS`: threads, context_length, max_batch; absent when not given). A
        backend with its own `options_type` takes them as a further parameter, ``backend_options``,
        defaulting to ``options_type()``, already validated by the core."""


@dataclass
class SamplingContext:
    """What a sampler may look at besides the logits."""

    token_ids: Any  # torch.LongTensor on the logits' device: prompt and output so far
    generator: Any  # torch.Generator on the logits' device, seeded for reproducible draws
    prompt_length: int = 0  # token_ids[prompt_length:] is the output so far


@dataclass(frozen=True)
class Sampler:
    """A named sampling step.

    ``create(**options)`` validates its options (raising `SamplingError`) and returns a callable:
    for a ``processor``, ``fn(logits, context) -> logits`` (mask with -inf, never renormalise);
    for a ``picker``, ``fn(logits, context) -> int``, the chosen token id. Logits are a 1-D float32
    torch tensor over the vocabulary.
    """

    name: str
    kind: Literal["processor", "picker"]
    create: Callable[..., Callable[..., Any]]
    description: str = ""


@dataclass(frozen=True)
class ToolParser:
    """One chat-template family's tool-call syntax (Hermes/Qwen ``<tool_call>{...}</tool_call>``, ...).

    ``matches(chat_template)`` says whether a model's template is of this family. ``parse(text)``
    splits a reply into its content (None when there is none) and its `ToolCall`s; text that is no
    valid call stays content. ``call_grammar(functions, parallel, optional)`` is a `Constraint`
    whose every match is one call (several when ``parallel``) of one of ``functions`` (OpenAI's
    ``function`` objects: name, description, parameters) with arguments valid against its
    parameters; when ``optional``, text that opens no call matches too. ``system_prompt(functions)``
    describes the tools and the syntax, for templates that cannot render tools themselves;
    ``render_call(call)`` writes a past call in the syntax, for those templates' history.
    ``call_start`` is the text that opens a call, so a stream holds back what may start one.
    """

    name: str
    matches: Callable[[str], bool]
    parse: Callable[[str], tuple[Any, list[Any]]]
    call_grammar: Callable[[list[dict[str, Any]], bool, bool], Any]
    system_prompt: Callable[[list[dict[str, Any]]], str]
    render_call: Callable[[Any], str]
    call_start: str
    description: str = ""
