"""Loading plugins and collecting what they register.

Plugins come from the ``influence`` entry-point group (ours and third parties' alike) or are
registered in-process with `register_plugin`. A plugin that fails to import, or raises while
registering (``sys.exit`` and KeyboardInterrupt included), is skipped with one warning line; the
rest keep working. So is a plugin written for hook specs this core does not provide (see
`hookspecs.HOOKSPEC_VERSION`), and a third-party entry point that takes a built-in plugin's name.
At run time, a loader whose ``detect`` raises is skipped with a warning, and any other failure of
a plugin's code names the plugin (`call_plugin`).

Replacing a built-in (registering a sampler, backend, loader, architecture, model resolver or
command of the same name) is allowed, and visible: `influence plugins` lists every override, and an
installed plugin's override is announced on stderr once, the first time it is seen (remembered in
``INFLUENCE_HOME/notices.json``; a new version of the plugin is announced again).

``INFLUENCE_TRACE_PLUGINS=1`` prints to stderr which plugins load, each hook call, the
implementations it calls in order and what each registered.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import sys
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import pluggy

from . import hookspecs
from .config import ModelConfig
from .errors import (
    BackendError,
    InfluenceError,
    ModelNotFoundError,
    PluginVersionError,
    SamplingError,
    UnsupportedArchitectureError,
)
from .interfaces import Architecture, Backend, BackendOptions, ModelLoader, ModelResolver, ModelSource, Sampler, ToolParser

ENTRY_POINT_GROUP = "influence"
BUILTIN_DISTRIBUTION = "influence"  # the plugins we ship come with the core's own distribution
CORE = "influence"  # who provides the core's own commands
LOAD_PLUGINS_ENV = "INFLUENCE_LOAD_PLUGINS"
TRACE_PLUGINS_ENV = "INFLUENCE_TRACE_PLUGINS"
HOOKSPEC_VERSION_ATTRIBUTE = "influence_hookspec_version"
NOTICES = "notices.json"  # in INFLUENCE_HOME: the override notices already shown once

hookimpl = pluggy.HookimplMarker("influence")

# A plugin's code raising these must not end the command: it is skipped like any other failure.
# At import and registration a KeyboardInterrupt is the plugin's too; at run time it is the user's.
PLUGIN_FAILURES = (Exception, SystemExit, KeyboardInterrupt)
RUN_TIME_FAILURES = (Exception, SystemExit)

# hook name -> (what each registered item must be, registry attribute)
REGISTER_HOOKS: dict[str, tuple[type, str]] = {
    "register_model_loaders": (ModelLoader, "loaders"),
    "register_architectures": (Architecture, "architectures"),
    "register_samplers": (Sampler, "samplers"),
    "register_backends": (Backend, "backends"),
    "register_tool_parsers": (ToolParser, "tool_parsers"),
    "register_model_resolvers": (ModelResolver, "model_resolvers"),
}


def warn(message: str) -> None:
    print(f"influence: warning: {message}", file=sys.stderr)


def tracing() -> bool:
    return os.environ.get(TRACE_PLUGINS_ENV, "") not in ("", "0")


def trace(message: str) -> None:
    if tracing():
        print(f"influence: trace: {message}", file=sys.stderr)


@dataclass(frozen=True)
class Override:
    """A plugin's ``kind`` called ``name`` that replaces the built-in one of ``replaced``."""

    kind: str  # sampler, backend, loader, architecture, command
    name: str
    plugin: str
    replaced: str

    def describe(self) -> str:
        return f"the built-in {self.kind} {self.name!r} (of {self.replaced!r})"


@dataclass
class PluginInfo:
    name: str
    version: str | None
    distribution: str | None
    hooks: list[str]
    provides: list[str] = field(default_factory=list)
    overrides: list[str] = field(default_factory=list)  # "sampler:argmax (built-in, of samplers)"
    # Each backend's own options (`BackendOptions`), as `OptionSpec.as_dict` gives them.
    backend_options: dict[str, list[dict[str, Any]]] = field(default_factory=dict)


@dataclass
class Registry:
    """Everything the loaded plugins registered, in call order, with who provided what."""

    loaders: list[ModelLoader] = field(default_factory=list)
    architectures: list[Architecture] = field(default_factory=list)
    samplers: list[Sampler] = field(default_factory=list)
    backends: list[Backend] = field(default_factory=list)
    tool_parsers: list[ToolParser] = field(default_factory=list)
    model_resolvers: list[ModelResolver] = field(default_factory=list)
    provider: dict[int, str] = field(default_factory=dict)  # id(item) -> plugin name
    overrides: list[Override] = field(default_factory=list)

    def add(self, attribute: str, item: Any, plugin_name: str) -> None:
        getattr(self, attribute).append(item)
        self.provider[id(item)] = plugin_name

    def provided_by(self, item: Any) -> str:
        return self.provider.get(id(item), "?")

    def backend(self, name: str) -> Backend:
        for backend in self.backends:
            if backend.name == name:
                return backend
        raise BackendError(f"unknown backend {name!r} (installed: {_names(self.backends)})")

    def sampler(self, name: str) -> Sampler:
        for sampler in self.samplers:
            if sampler.name == name:
                return sampler
        raise SamplingError(f"unknown sampler {name!r} (installed: {_names(self.samplers)})")

    def tool_parser_for(self, chat_template: str) -> ToolParser:
        """The first parser whose family the template belongs to, else the Hermes format (which
        also serves templates that cannot render tools)."""
        for parser in self.tool_parsers:
            if parser.matches(chat_template):
                return parser
        for parser in self.tool_parsers:
            if parser.name == "hermes":
                return parser
        raise SamplingError("tool calling needs a tool parser, and no installed plugin registers one "
                            "(the built-in one comes with influence's grammar plugin)")

    def resolvers(self) -> list[ModelResolver]:
        """The model resolvers in call order, each name once (the first registered wins)."""
        winners: dict[str, ModelResolver] = {}
        for resolver in self.model_resolvers:
            winners.setdefault(resolver.name, resolver)
        return list(winners.values())

    def resolve_model(self, reference: str | None, prefer_quantized: bool = False) -> Path | ModelSource:
        """What the first resolver that knows ``reference`` (None: the default model) makes of it."""
        resolvers = self.resolvers()
        for resolver in resolvers:
            found = call_plugin(self, resolver, f"model resolver {resolver.name!r}", resolver.resolve, reference,
                                prefer_quantized)
            if isinstance(found, (Path, ModelSource)):
                return found
            if found is not None:
                raise InfluenceError(f"plugin {self.provided_by(resolver)!r}: model resolver {resolver.name!r} "
                                     f"returned {type(found).__name__}, not a Path, a ModelSource or None")
        installed = "; ".join(f"{r.name}: {r.description}" if r.description else r.name for r in resolvers)
        if not resolvers:
            why = ("no model resolver is installed (the influence_models plugin shipped with influence resolves "
                   f"aliases, names in the store and ORG/NAME; {LOAD_PLUGINS_ENV} may leave it out)")
        elif reference is None:
            why = f"no installed model resolver gives a default model ({installed})"
        else:
            why = f"no installed model resolver knows it ({installed})"
        if reference is None:
            raise ModelNotFoundError(f"no model given, and {why}; pass -p/--model-path or -m/--model")
        raise ModelNotFoundError(f"model {reference!r} does not exist: it is not a path, and {why}")

    def model_names(self) -> list[str]:
        """Every name the resolvers can list without fetching anything, for shell completion."""
        names: list[str] = []
        for resolver in self.resolvers():
            names += call_plugin(self, resolver, f"model resolver {resolver.name!r}", resolver.names)
        return list(dict.fromkeys(names))

    def default_model_name(self) -> str | None:
        """The name of the default model, from the first resolver that gives one."""
        for resolver in self.resolvers():
            name = call_plugin(self, resolver, f"model resolver {resolver.name!r}", resolver.default_name)
            if name is not None:
                return name
        return None

    def loader_for(self, path: Path) -> ModelLoader:
        for loader in self.loaders:
            try:
                detected = loader.detect(path)
            except RUN_TIME_FAILURES as error:  # one broken loader must not break loading for the others
                warn(f"plugin {self.provided_by(loader)!r}: loader {loader.name!r} was skipped: its detect() "
                     f"raised {type(error).__name__}: {error}")
                continue
            if detected:
                return loader
        raise ModelNotFoundError(
            f"no installed model loader recognises {path} (loaders: {_names(self.loaders)}; "
            "expected a Hugging Face directory with config.json and *.safetensors, or a .gguf file)"
        )

    def architecture_for(self, config: ModelConfig, backend: str) -> Architecture:
        for architecture in self.architectures:
            if architecture.backend == backend and architecture.matches(config):
                return architecture
        wanted = config.model_type or ", ".join(config.architectures) or "unknown"
        elsewhere = [a for a in self.architectures if a.matches(config)]
        if elsewhere:
            built_for = ", ".join(f"{a.backend} (plugin {self.provided_by(a)})" for a in elsewhere)
            raise UnsupportedArchitectureError(
                f"no installed plugin builds model type {wanted!r} for backend {backend!r} "
                f"(it is built for: {built_for})"
            )
        installed = ", ".join(
            f"{a.name} ({a.backend}, plugin {self.provided_by(a)})" for a in self.architectures
        ) or "none"
        raise UnsupportedArchitectureError(
            f"no installed plugin builds model type {wanted!r} for backend {backend!r} "
            f"(installed architectures: {installed}); install an architecture plugin for it "
            "(docs/plugins.md; `influence plugins` lists what is loaded)"
        )


def call_plugin(registry: Registry, item: Any, what: str, function: Callable[..., Any], *args: Any,
                **kwargs: Any) -> Any:
    """Run a registered item's code; a failure that is not already a clear `InfluenceError` becomes
    one naming the plugin, instead of an anonymous "unexpected" error."""
    try:
        return function(*args, **kwargs)
    except InfluenceError:
        raise
    except RUN_TIME_FAILURES as error:
        raise InfluenceError(f"plugin {registry.provided_by(item)!r} failed in {what}: "
                             f"{type(error).__name__}: {error}") from error


def _names(items: list[Any]) -> str:
    return ", ".join(dict.fromkeys(item.name for item in items)) or "none"


@lru_cache(maxsize=1)
def get_plugin_manager() -> pluggy.PluginManager:
    manager = pluggy.PluginManager("influence")
    manager.add_hookspecs(hookspecs)
    _load_entry_points(manager)
    return manager


def _allowed_plugins() -> set[str] | None:
    value = os.environ.get(LOAD_PLUGINS_ENV)
    if value is None:
        return None
    return {name.strip() for name in value.split(",") if name.strip()}


# Each distribution's name, read once: `Distribution.name` parses its METADATA file on every access,
# and start-up asks it of every entry point several times.
_distribution_names: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _distribution_name(entry_point: importlib.metadata.EntryPoint) -> str | None:
    dist = entry_point.dist
    if dist is None:
        return None
    if dist not in _distribution_names:
        _distribution_names[dist] = dist.name
    return _distribution_names[dist]


def _is_builtin(entry_point: importlib.metadata.EntryPoint) -> bool:
    return _distribution_name(entry_point) == BUILTIN_DISTRIBUTION


@lru_cache(maxsize=1)
def builtin_plugins() -> frozenset[str]:
    """The names of the plugins we ship."""
    return frozenset(ep.name for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP) if _is_builtin(ep))


# The entry point each plugin name was loaded from (a name's other entry points were skipped).
_entry_points: dict[str, importlib.metadata.EntryPoint] = {}


def _load_entry_points(manager: pluggy.PluginManager) -> None:
    allowed = _allowed_plugins()
    _entry_points.clear()
    # Built-ins first, so that a third-party entry point of the same name cannot push one out.
    entry_points = sorted(importlib.metadata.entry_points(group=ENTRY_POINT_GROUP), key=lambda ep: not _is_builtin(ep))
    for entry_point in entry_points:
        if allowed is not None and entry_point.name not in allowed:
            continue
        if entry_point.name in _entry_points:
            first = _entry_points[entry_point.name]
            if first.value != entry_point.value:  # not merely the same distribution found twice
                warn(f"plugin {entry_point.name!r} ({entry_point.value}{_from(entry_point)}) was skipped: "
                     f"{'the built-in' if _is_builtin(first) else 'another'} plugin {entry_point.name!r} "
                     f"({first.value}{_from(first)}) has that name; a plugin replaces a built-in by registering "
                     "a sampler, backend, loader or command of the same name, under its own plugin name")
            continue
        if manager.has_plugin(entry_point.name):
            continue
        _entry_points[entry_point.name] = entry_point  # even if it fails below: a broken built-in is not replaced
        try:
            plugin = entry_point.load()
            check_hookspec_version(plugin, f"{entry_point.name!r} ({entry_point.value})")
            manager.register(plugin, name=entry_point.name)
        except PluginVersionError as refused:
            warn(f"{refused}; it was skipped")
            continue
        except PLUGIN_FAILURES as error:  # a broken plugin must not break the CLI, whatever it raises
            warn(f"plugin {entry_point.name!r} ({entry_point.value}) was skipped: it failed to load: "
                 f"{type(error).__name__}: {error}")
            continue
        if tracing():  # its distribution's version is read from disk
            trace(f"loaded plugin {entry_point.name!r} ({entry_point.value}){_from(entry_point)}")
        _warn_unknown_hooks(manager, entry_point.name)


def _from(entry_point: importlib.metadata.EntryPoint) -> str:
    return f" from {entry_point.dist.name} {entry_point.dist.version}" if entry_point.dist else ""


def _version_pair(version: str) -> tuple[int, int]:
    major, minor = str(version).split(".")
    return int(major), int(minor)


def check_hookspec_version(plugin: object, name: str) -> None:
    """Refuse ``plugin`` unless it runs on this core's hook specs: the majors must be equal, and the
    plugin must not need a minor version (new hooks or arguments) newer than the core's."""
    wanted = getattr(plugin, HOOKSPEC_VERSION_ATTRIBUTE, "1.0")
    try:
        major, minor = _version_pair(wanted)
    except ValueError:
        raise PluginVersionError(f"plugin {name} declares {HOOKSPEC_VERSION_ATTRIBUTE} = {wanted!r}, "
                                 'which is not a MAJOR.MINOR version such as "1.0"') from None
    core_major, core_minor = _version_pair(hookspecs.HOOKSPEC_VERSION)
    if major == core_major and minor <= core_minor:
        return
    remedy = ("upgrade influence" if (major, minor) > (core_major, core_minor)
              else f"install a release of the plugin written for hook spec {core_major}.x")
    raise PluginVersionError(f"plugin {name} was written for influence hook spec {wanted}, but this "
                             f"influence provides hook spec {hookspecs.HOOKSPEC_VERSION}: {remedy}")


def _warn_unknown_hooks(manager: pluggy.PluginManager, name: str) -> None:
    for caller in manager.get_hookcallers(manager.get_plugin(name)) or []:
        if caller.spec is None:
            warn(f"plugin {name!r} implements unknown hook {caller.name!r}, which is ignored")


def register_plugin(plugin: object, name: str | None = None) -> None:
    """Register a plugin object (module or class with hookimpls) in this process; one written for
    other hook specs is refused with a `PluginVersionError` naming both versions."""
    check_hookspec_version(plugin, repr(name or getattr(plugin, "__name__", plugin)))
    get_plugin_manager().register(plugin, name=name)
    get_registry.cache_clear()


def unregister_plugin(name: str) -> None:
    get_plugin_manager().unregister(name=name)
    get_registry.cache_clear()


@lru_cache(maxsize=1)
def get_registry() -> Registry:
    manager = get_plugin_manager()
    registry = Registry()
    for hook_name, (item_type, attribute) in REGISTER_HOOKS.items():
        for plugin_name, items in _call_register_hook(manager, hook_name, item_type):
            for item in items:
                registry.add(attribute, item, plugin_name)
        registry.overrides += _overrides(registry, attribute)
    announce_overrides(registry.overrides)
    return registry


def _overrides(registry: Registry, attribute: str) -> list[Override]:
    """Built-ins that a plugin's item of the same name (the first registered, which wins) hides."""
    winners: dict[tuple[str, ...], Any] = {}
    found = []
    for item in getattr(registry, attribute):
        key = (item.name, item.backend) if isinstance(item, Architecture) else (item.name,)
        winner = winners.setdefault(key, item)
        plugin, replaced = registry.provided_by(winner), registry.provided_by(item)
        if winner is not item and replaced in builtin_plugins() and plugin not in builtin_plugins():
            found.append(Override(attribute[:-1], item.name, plugin, replaced))
    return found


# The commands each plugin added, and those replacing built-in ones, as the CLI finds them (`record_commands`).
_commands: dict[str, list[str]] = {}
_command_overrides: list[Override] = []


def record_commands(plugin_name: str, added: list[str], replaced: dict[str, str]) -> None:
    """``plugin_name`` added the commands ``added``, some named as the built-in ones in ``replaced``
    (name -> provider)."""
    _commands.setdefault(plugin_name, []).extend(added)
    if plugin_name in builtin_plugins():
        return
    overrides = [Override("command", name, plugin_name, provider) for name, provider in replaced.items()
                 if provider == CORE or provider in builtin_plugins()]
    _command_overrides.extend(overrides)
    announce_overrides(overrides)


def _read_notices() -> dict[str, Any]:
    from .artifacts import home

    try:
        notices = json.loads((home() / NOTICES).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        notices = {}  # lost or damaged: at worst a notice is shown again
    return notices if isinstance(notices, dict) else {}


def announce_overrides(overrides: list[Override]) -> None:
    """One notice line per override by an installed plugin, the first time this store sees it."""
    if not overrides:
        return
    from .artifacts import editing_json, home

    versions = {name: ep.dist.version for name, ep in _entry_points.items() if ep.dist}
    keyed = {f"{o.plugin} {versions[o.plugin]}: {o.kind} {o.name}": o for o in overrides if o.plugin in versions}
    if not keyed:
        return
    try:
        with editing_json(home() / NOTICES, _read_notices) as seen:
            previous = seen.get("overrides")
            shown = seen["overrides"] = [key for key in previous if isinstance(key, str)] \
                if isinstance(previous, list) else []
            new = [key for key in keyed if key not in shown]
            shown += new
    except (OSError, InfluenceError):  # a store we cannot write: announce every time rather than never
        new = list(keyed)
    for key in new:
        override = keyed[key]
        print(f"influence: notice: plugin {override.plugin!r} replaces {override.describe()}; "
              "`influence plugins` lists every override", file=sys.stderr)


def _implementations(manager: pluggy.PluginManager, hook_name: str) -> list[tuple[str, Any]]:
    """(plugin name, implementation) in the order pluggy would call them."""
    impls = reversed(getattr(manager.hook, hook_name).get_hookimpls())  # pluggy calls the last one first
    return [(manager.get_name(impl.plugin) or repr(impl.plugin), impl) for impl in impls]


def _guarded(plugin_name: str, hook_name: str, call: Callable[[], None]) -> bool:
    """Run one plugin's implementation; if it raises, warn and report failure instead."""
    try:
        call()
    except PLUGIN_FAILURES as error:  # a broken plugin must not break the others
        warn(f"plugin {plugin_name!r} was skipped for {hook_name}: {type(error).__name__}: {error}")
        return False
    return True


def _trace_call(hook_name: str, implementations: list[tuple[str, Any]]) -> None:
    trace(f"{hook_name}: calling {', '.join(name for name, _ in implementations) or 'no implementations'}")


def call_each_implementation(hook_name: str, *, after: Callable[[str], None] | None = None, **kwargs: Any) -> None:
    """Call every implementation of a hook on its own, skipping (with a warning) any that raises.
    Each is passed only the arguments it names, so one written before an argument was added works;
    ``after(plugin_name)`` runs after each one that succeeded."""
    implementations = _implementations(get_plugin_manager(), hook_name)
    _trace_call(hook_name, implementations)
    for plugin_name, impl in implementations:
        if _guarded(plugin_name, hook_name, lambda: impl.function(*[kwargs[arg] for arg in impl.argnames])):
            trace(f"  {plugin_name}: done")
            if after is not None:
                after(plugin_name)


def _call_register_hook(manager: pluggy.PluginManager, hook_name: str,
                        item_type: type) -> list[tuple[str, list[Any]]]:
    """Each plugin's registered items, in call order; a plugin's items count only if its whole
    implementation succeeded and registered the right kind of thing."""
    results = []
    implementations = _implementations(manager, hook_name)
    _trace_call(hook_name, implementations)
    for plugin_name, impl in implementations:
        items: list[Any] = []

        def call() -> None:
            impl.function(*[{"register": items.append}[arg] for arg in impl.argnames])
            wrong = [item for item in items if not isinstance(item, item_type)]
            if wrong:
                raise TypeError(f"{hook_name} got {wrong[0]!r}, expected a {item_type.__name__}")
            for backend in items if item_type is Backend else ():
                _check_options_type(backend)

        if _guarded(plugin_name, hook_name, call):
            described = ", ".join(_describe(item, item_type) for item in items)
            trace(f"  {plugin_name} registered: {described or 'nothing'}")
            results.append((plugin_name, items))
    return results


def _check_options_type(backend: Backend) -> None:
    """A backend's `options_type` must be a `BackendOptions` the core can validate (`TypeError` otherwise)."""
    if not (isinstance(backend.options_type, type) and issubclass(backend.options_type, BackendOptions)):
        raise TypeError(f"backend {backend.name!r} has options_type {backend.options_type!r}, "
                        "which is not a BackendOptions subclass")
    backend.options_type.specs()


def _describe(item: Any, item_type: type) -> str:
    backend = f" for backend {item.backend!r}" if isinstance(item, Architecture) else ""
    return f"{item_type.__name__} {item.name!r}{backend}"


def list_plugins() -> list[PluginInfo]:
    """Every loaded plugin: name, version, the hooks it implements and what it registered."""
    manager = get_plugin_manager()
    registry = get_registry()
    distributions = {name: ep.dist for name, ep in _entry_points.items() if ep.dist}
    infos = []
    for name, plugin in manager.list_name_plugin():
        dist = distributions.get(name)
        hooks = sorted(caller.name for caller in manager.get_hookcallers(plugin) or [])
        provides = []
        for _, attribute in REGISTER_HOOKS.values():
            for item in getattr(registry, attribute):
                if registry.provided_by(item) == name:
                    provides.append(f"{attribute[:-1]}:{item.name}")
        provides += [f"command:{command}" for command in _commands.get(name, [])]
        overrides = [f"{o.kind}:{o.name} (built-in, of {o.replaced})"
                     for o in [*registry.overrides, *_command_overrides] if o.plugin == name]
        backend_options = {backend.name: [spec.as_dict() for spec in backend.options_type.specs()]
                           for backend in registry.backends if registry.provided_by(backend) == name}
        infos.append(PluginInfo(name=name, version=dist.version if dist else None,
                                distribution=dist.name if dist else None, hooks=hooks, provides=provides,
                                overrides=overrides, backend_options=backend_options))
    return infos
