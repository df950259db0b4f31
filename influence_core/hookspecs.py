"""The hooks a plugin can implement.

Every hook here is a *register-callback* hook: the plugin calls ``register(thing)`` once per thing
it provides, and the core collects them. Implementations are called newest-registered first, with
``tryfirst``/``trylast`` adjusting the order; when two plugins register the same name, the one
called first wins. Our shipped plugins mark their implementations ``trylast``, so any installed
third-party plugin can replace a built-in by registering the same name.

A plugin is a module (or object) with functions decorated by `influence_core.hookimpl`, exposed
through the ``influence`` entry-point group::

    [project.entry-points.influence]
    my_plugin = "my_plugin_module"

Implementations may accept fewer arguments than the spec; new arguments may be added to specs
without breaking existing plugins.

The hook specs carry a version, `HOOKSPEC_VERSION` ("MAJOR.MINOR"). A minor release only adds
(hooks, arguments, fields on the registered classes), so a plugin written for 1.0 keeps working on
1.3; a major release changes or removes something. A plugin states the version it was written for
with a module attribute::

    influence_hookspec_version = "1.0"

and the core refuses it, naming both versions, unless the majors are equal and the plugin's minor
is no newer than the core's. A plugin that states nothing is taken to be written for 1.0.
"""

from __future__ import annotations

from collections.abc import Callable

import pluggy

HOOKSPEC_VERSION = "1.2"  # 1.1 added register_tool_parsers; 1.2 register_model_resolvers, Backend.options_type
# and Runner.on_idle

hookspec = pluggy.HookspecMarker("influence")


@hookspec
def register_model_loaders(register: Callable[..., None]) -> None:
    """Register model loaders: ``register(ModelLoader(name, detect, load))``.

    A loader recognises a model source on disk (``detect(path) -> bool``: a Hugging Face
    safetensors directory, a GGUF file, ...) and opens it (``load(path) -> ModelSource``: typed
    config, tokenizer, and a lazy mapping of weights under Hugging Face tensor names). The core asks
    loaders in call order and uses the first whose ``detect`` says yes.
    """


@hookspec
def register_architectures(register: Callable[..., None]) -> None:
    """Register architecture builders: ``register(Architecture(name, backend, model_types, build))``.

    An architecture maps config.json's ``model_type`` (e.g. "llama") or ``architectures`` entry
    (e.g. "LlamaForCausalLM") to a model built for one backend: ``build(config, weights, device,
    dtype)``. Register once per backend the family supports. When no registered architecture
    matches a model for the chosen backend, the run fails naming the model type and the
    architectures that are installed.
    """


@hookspec
def register_samplers(register: Callable[..., None]) -> None:
    """Register samplers: ``register(Sampler(name, kind, create))``.

    A sampler is either a *processor* (rewrites logits: temperature, top-k, repetition penalty, ...)
    or a *picker* (chooses the token: argmax, a seeded draw, ...). The core chains processors in a
    fixed documented order and ends with one picker; ``--sampler NAME -o KEY VALUE`` selects any
    registered sampler by name and passes it its options.
    """


@hookspec
def register_backends(register: Callable[..., None]) -> None:
    """Register device backends: ``register(backend)`` with an `influence_core.interfaces.Backend`.

    A backend declares the device kinds (cpu, cuda, mps) and dtypes it supports, reports which
    devices this machine actually has, and loads a model source into a `Runner` that owns the KV
    cache and computes logits. ``--backend NAME`` picks one per run.
    """


@hookspec
def register_tool_parsers(register: Callable[..., None]) -> None:
    """Register tool-call formats: ``register(ToolParser(name, matches, parse, call_grammar, ...))``.

    Added in hook spec 1.1. The server picks, for a model's chat template, the first parser whose
    ``matches(template)`` is true (the built-in ``hermes`` parser otherwise, which also serves
    templates that cannot render tools): it parses the model's replies into OpenAI ``tool_calls``
    and supplies the grammar that forces a call under ``tool_choice`` "required" or a named
    function. A plugin adds a model family's tool format by registering one more parser; a plugin
    using this hook declares ``influence_hookspec_version = "1.1"``.
    """


@hookspec
def register_model_resolvers(register: Callable[..., None]) -> None:
    """Register model resolvers: ``register(ModelResolver(name, resolve, names=..., default_name=...))``.

    Added in hook spec 1.2. A resolver turns a model *name*, anything given as a model that is not
    an existing path, into something a loader opens: ``resolve(reference, prefer_quantized)``
    returns a `Path` (or, where it adjusted what it found, the opened `ModelSource`), or None for a
    name it does not handle. ``reference`` None means "the default model". The core asks resolvers
    in call order and uses the first answer that is not None; when two register the same name, the
    one called first wins. When none answers, the run fails with one line naming the reference and
    the resolvers installed. The shipped ``influence_models`` plugin registers ``store`` (aliases,
    names in the store, the default model) and ``hub`` (ORG/NAME on the Hugging Face hub,
    downloaded on first use) as ``trylast``, so a third party's resolver is asked first: for its own
    scheme (``ollama:NAME``, ``s3://...``), or to replace one of ours by name. ``names()`` feeds
    shell completion of ``-m``; ``default_name()`` names the default model for the config file's
    ``[models.NAME]`` tables. A plugin using this hook declares ``influence_hookspec_version = "1.2"``.
    """


@hookspec
def register_commands(cli: object) -> None:
    """Add subcommands to the ``influence`` CLI: ``cli`` is its `typer.Typer` app.

    Use ``@cli.command()`` or ``cli.add_typer(...)``. Import heavy libraries inside the command
    functions, never at module level, so that ``influence --help`` stays instant. Raise
    `influence_core.InfluenceError` for anything the user got wrong: it becomes one ``error:`` line.
    """
