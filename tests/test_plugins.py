"""Plugins installed the way third parties install them: through the ``influence`` entry-point group."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from influence_core import hookimpl, register_plugin
from influence_core.hookspecs import HOOKSPEC_VERSION
from influence_core.interfaces import Architecture, Sampler
from influence_core.plugins import call_each_implementation, get_registry

INFLUENCE = [sys.executable, "-c", "from influence_core.cli import run; run()"]

THIRD_PARTY = '''
from influence_core import hookimpl
from influence_core.interfaces import Sampler

@hookimpl
def register_samplers(register):
    def create(offset=1):
        return lambda logits, context: (int(logits.argmax()) + int(offset)) % logits.shape[-1]
    register(Sampler("shift", "picker", create, "argmax plus OFFSET"))
'''


def install_fake_distribution(site: Path, name: str, version: str, module: str, source: str) -> None:
    """What pip leaves behind: the module plus a dist-info with METADATA and entry_points.txt."""
    (site / f"{module}.py").write_text(textwrap.dedent(source))
    dist_info = site / f"{module}-{version}.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    (dist_info / "entry_points.txt").write_text(f"[influence]\n{name} = {module}\n")


@pytest.fixture
def site(tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    install_fake_distribution(site, "shift-sampler", "1.2.3", "shift_sampler", THIRD_PARTY)
    return site


def influence(site: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    environment = {**os.environ, "PYTHONPATH": str(site), **env}
    return subprocess.run([*INFLUENCE, *args], capture_output=True, text=True, env=environment, timeout=120)


def test_an_installed_third_party_plugin_is_listed_and_usable(site, tiny_model):
    listing = influence(site, "plugins", "--json")
    assert listing.returncode == 0, listing.stderr
    plugins = {p["name"]: p for p in json.loads(listing.stdout)}
    assert plugins["shift-sampler"]["version"] == "1.2.3"
    assert plugins["shift-sampler"]["hooks"] == ["register_samplers"]
    assert "sampler:shift" in plugins["shift-sampler"]["provides"]
    assert {"torch", "samplers", "safetensors"} <= set(plugins)

    args = ["generate", "--raw", "hello", "-p", str(tiny_model), "--max-tokens", "1", "--json"]
    greedy = json.loads(influence(site, *args, "--temperature", "0").stdout)["token_ids"][0]
    shifted = influence(site, *args, "--sampler", "shift", "-o", "offset", "5")
    assert shifted.returncode == 0, shifted.stderr
    assert json.loads(shifted.stdout)["token_ids"][0] == (greedy + 5) % 400


def test_a_plugin_that_fails_to_import_is_skipped_with_one_warning(site, tiny_model):
    install_fake_distribution(site, "broken", "0.1", "broken_plugin", "raise RuntimeError('boom at import')\n")
    listing = influence(site, "plugins", "--json")
    assert listing.returncode == 0
    assert "broken" not in {p["name"] for p in json.loads(listing.stdout)}
    warnings = [line for line in listing.stderr.splitlines() if "broken" in line]
    assert len(warnings) == 1 and "boom at import" in warnings[0] and "Traceback" not in listing.stderr

    run = influence(site, "generate", "hi", "-p", str(tiny_model), "--max-tokens", "2")
    assert run.returncode == 0, run.stderr


def test_a_plugin_that_raises_while_registering_is_skipped(site):
    install_fake_distribution(site, "raiser", "0.1", "raiser_plugin", '''
        from influence_core import hookimpl
        @hookimpl
        def register_samplers(register):
            register(object())  # not a Sampler
    ''')
    listing = influence(site, "plugins", "--json")
    assert listing.returncode == 0
    assert "raiser" in listing.stderr and "expected a Sampler" in listing.stderr
    assert "sampler:shift" in {s for p in json.loads(listing.stdout) for s in p["provides"]}


def test_influence_load_plugins_restricts_what_loads(site):
    only = influence(site, "plugins", "--json", INFLUENCE_LOAD_PLUGINS="samplers,shift-sampler")
    assert {p["name"] for p in json.loads(only.stdout)} == {"samplers", "shift-sampler"}
    none = influence(site, "plugins", "--json", INFLUENCE_LOAD_PLUGINS="")
    assert json.loads(none.stdout) == []


def test_without_the_torch_plugin_the_backend_is_a_clear_error(site, tiny_model):
    run = influence(site, "generate", "hi", "-p", str(tiny_model), INFLUENCE_LOAD_PLUGINS="samplers,safetensors")
    assert run.returncode == 1
    assert run.stderr.strip() == "error: unknown backend 'torch' (installed: none)"


class Reloaded:
    calls = 0

    @staticmethod
    @hookimpl
    def register_samplers(register):
        Reloaded.calls += 1


def test_registering_in_process_rebuilds_the_registry(plugin):
    get_registry()
    plugin(Reloaded, "reloaded")
    get_registry()
    get_registry()
    assert Reloaded.calls == 1


def test_a_plugin_can_add_a_cli_command_and_a_broken_one_is_skipped(site):
    install_fake_distribution(site, "hello-command", "0.2", "hello_command", '''
        from influence_core import hookimpl

        @hookimpl
        def register_commands(cli):
            @cli.command()
            def hello(name: str):
                """Say hello."""
                print(f"hello {name}")
    ''')
    install_fake_distribution(site, "bad-command", "0.1", "bad_command", '''
        from influence_core import hookimpl

        @hookimpl
        def register_commands(cli):
            raise RuntimeError("no commands today")
    ''')
    assert "hello" in influence(site, "--help").stdout
    run = influence(site, "hello", "plugins")
    assert run.returncode == 0 and run.stdout == "hello plugins\n"
    assert "bad-command" in run.stderr and "no commands today" in run.stderr
    listed = {plugin["name"]: plugin for plugin in json.loads(influence(site, "plugins", "--json").stdout)}
    assert "command:hello" in listed["hello-command"]["provides"]
    assert "command:serve" in listed["serve"]["provides"]  # ours are listed alike


def test_a_plugin_for_other_hook_specs_is_refused_naming_both_versions(site):
    core = HOOKSPEC_VERSION
    major, minor = map(int, core.split("."))
    next_minor = f"{major}.{minor + 1}"
    for name, version in [("next-major", f"{major + 1}.0"), ("next-minor", next_minor), ("older-major", "0.9"),
                          ("current", core), ("older-minor", f"{major}.0")]:
        install_fake_distribution(site, name, "0.1", name.replace("-", "_"), f'''
            from influence_core import hookimpl
            influence_hookspec_version = "{version}"

            @hookimpl
            def register_samplers(register):
                pass
        ''')
    listing = influence(site, "plugins", "--json")
    assert {"current", "older-minor", "shift-sampler"} <= {p["name"] for p in json.loads(listing.stdout)}
    assert not {"next-major", "next-minor", "older-major"} & {p["name"] for p in json.loads(listing.stdout)}
    warnings = listing.stderr.splitlines()
    assert (f"influence: warning: plugin 'next-major' (next_major) was written for influence hook spec {major + 1}.0, "
            f"but this influence provides hook spec {core}: upgrade influence; it was skipped") in warnings
    assert (f"influence: warning: plugin 'next-minor' (next_minor) was written for influence hook spec {next_minor}, "
            f"but this influence provides hook spec {core}: upgrade influence; it was skipped") in warnings
    assert ("influence: warning: plugin 'older-major' (older_major) was written for influence hook spec 0.9, but this "
            f"influence provides hook spec {core}: install a release of the plugin written for hook spec {major}.x; "
            "it was skipped") in warnings


class FromTheFuture:
    influence_hookspec_version = "2.0"


def test_registering_a_plugin_for_other_hook_specs_in_process_is_refused():
    from influence_core.errors import PluginVersionError

    with pytest.raises(PluginVersionError, match="'future' was written for influence hook spec 2.0, but this "
                                                 f"influence provides hook spec {HOOKSPEC_VERSION}"):
        register_plugin(FromTheFuture, name="future")


class WithoutArguments:
    called = False

    @staticmethod
    @hookimpl
    def register_commands():
        WithoutArguments.called = True


def test_an_implementation_taking_fewer_arguments_than_the_spec_is_called(plugin):
    plugin(WithoutArguments, "without-arguments")
    call_each_implementation("register_commands", cli=object())
    assert WithoutArguments.called


def test_adding_an_argument_to_a_spec_keeps_older_plugins_working():
    """A spec that grew an argument (a later minor version) still calls an implementation written
    before it, passing only the arguments that implementation names."""
    import pluggy

    from influence_core.plugins import _call_register_hook

    class GrownSpecs:
        @staticmethod
        @pluggy.HookspecMarker("influence")
        def register_samplers(register, core_version):
            """register_samplers with an argument added after the plugin below was written."""

    class OlderPlugin:
        @staticmethod
        @hookimpl
        def register_samplers(register):
            register(Sampler("older", "picker", lambda: None))

    manager = pluggy.PluginManager("influence")
    manager.add_hookspecs(GrownSpecs)
    manager.register(OlderPlugin, name="older")
    [(name, items)] = _call_register_hook(manager, "register_samplers", Sampler)
    assert name == "older" and [item.name for item in items] == ["older"]


def test_influence_trace_plugins_shows_each_hook_call_and_what_each_plugin_registered(site):
    run = influence(site, "plugins", "--json", INFLUENCE_TRACE_PLUGINS="1",
                    INFLUENCE_LOAD_PLUGINS="samplers,shift-sampler")
    trace = [line for line in run.stderr.splitlines() if line.startswith("influence: trace: ")]
    assert "influence: trace: loaded plugin 'shift-sampler' (shift_sampler) from shift-sampler 1.2.3" in trace
    assert "influence: trace: register_samplers: calling shift-sampler, samplers" in trace
    assert "influence: trace:   shift-sampler registered: Sampler 'shift'" in trace
    assert "influence: trace:   samplers registered: Sampler 'repetition_penalty', Sampler 'presence_penalty', " \
           "Sampler 'frequency_penalty', Sampler 'temperature', Sampler 'top_k', Sampler 'top_p', Sampler 'min_p', Sampler 'argmax', Sampler 'sample'" in trace
    assert "influence: trace: register_backends: calling no implementations" in trace
    quiet = influence(site, "plugins", "--json", INFLUENCE_LOAD_PLUGINS="samplers,shift-sampler")
    assert "trace" not in quiet.stderr


def test_a_model_whose_architecture_plugin_is_missing_says_where_to_look(site, influence_tiny_model):
    run = influence(site, "generate", "t5", "--raw", "-p", str(influence_tiny_model("qwen2")),
                    INFLUENCE_LOAD_PLUGINS="torch,samplers,safetensors")
    assert run.returncode == 1
    assert run.stderr.strip() == ("error: no installed plugin builds model type 'qwen2' for backend 'torch' "
                                  "(installed architectures: llama (torch, plugin torch)); install an architecture "
                                  "plugin for it (docs/plugins.md; `influence plugins` lists what is loaded)")


BACKEND_WITH_OPTIONS = '''
from dataclasses import dataclass

from influence_core import hookimpl
from influence_core.interfaces import BackendOptions, option
from influence_torch.backend import TorchBackend

influence_hookspec_version = "1.2"


@dataclass(frozen=True)
class EchoOptions(BackendOptions):
    {field}


class EchoBackend(TorchBackend):
    name = "echo"
    options_type = EchoOptions
    uses_architectures = False

    def load(self, source, architecture, device, dtype, options, backend_options=EchoOptions()):
        raise SystemExit(f"echo got {{backend_options!r}}")


@hookimpl
def register_backends(register):
    register(EchoBackend())
'''


def test_a_backends_own_options_are_listed_validated_and_passed_typed(site, tiny_model):
    install_fake_distribution(site, "echo-backend", "0.1", "echo_backend", BACKEND_WITH_OPTIONS.format(
        field='beams: int = option(1, "How many beams.", minimum=1)\n    fast: bool = option(False, "Go fast.")'))
    listing = influence(site, "plugins", "--json")
    assert listing.returncode == 0, listing.stderr
    options = {p["name"]: p["backend_options"] for p in json.loads(listing.stdout)}
    assert options["echo-backend"] == {"echo": [
        {"name": "beams", "type": "int", "default": 1, "help": "How many beams.", "minimum": 1, "choices": []},
        {"name": "fast", "type": "bool", "default": False, "help": "Go fast.", "minimum": None, "choices": []}]}
    assert [o["name"] for o in options["torch"]["torch"]] == ["tensor_parallel", "compiled"]
    table = influence(site, "plugins")
    assert "backend options (-B KEY=VALUE)" in table.stdout and "How many beams." in table.stdout

    def generate(*options):
        return influence(site, "generate", "hi", "-p", str(tiny_model), "--backend", "echo", *options)

    passed = generate("-B", "beams=3", "-B", "fast=yes")
    assert "echo got EchoOptions(beams=3, fast=True)" in passed.stderr, passed.stderr
    for options, message in [
        (["-B", "width=2"], "error: backend 'echo' has no option 'width' (its options: beams, fast; "
                            "`influence plugins` lists them)"),
        (["-B", "beams=0"], "error: backend 'echo' option beams must be an integer >= 1, got '0'"),
        (["-B", "beams=two"], "error: backend 'echo' option beams must be an integer >= 1, got 'two'"),
        (["-B", "fast=maybe"], "error: backend 'echo' option fast must be true or false, got 'maybe'"),
        (["-B", "beams"], "error: -B 'beams' needs a key and a value: -B KEY=VALUE"),
        (["-B", "beams=2", "-B", "beams=3"], "error: -B beams is given twice"),
    ]:
        refused = generate(*options)
        assert refused.returncode == 1 and refused.stderr == message + "\n", refused.stderr


def test_a_backend_whose_options_the_core_cannot_validate_is_skipped(site):
    install_fake_distribution(site, "echo-backend", "0.1", "echo_backend", BACKEND_WITH_OPTIONS.format(
        field="beams: int = 1"))
    listing = influence(site, "plugins", "--json")
    assert listing.returncode == 0
    assert "echo-backend" in {p["name"] for p in json.loads(listing.stdout)}
    assert ("influence: warning: plugin 'echo-backend' was skipped for register_backends: TypeError: "
            "EchoOptions.beams needs a default and help: declare it with option(default, help)") in listing.stderr


def test_options_from_python_are_checked_for_type_not_read_as_text(tiny_model):
    import influence_core as influence
    from influence_core.errors import BackendError

    with pytest.raises(BackendError, match=r"option tensor_parallel must be an integer >= 1, got True"):
        influence.load(tiny_model, device="cpu", backend_options={"tensor_parallel": True})
    with pytest.raises(BackendError, match=r"option compiled must be true or false, got 1"):
        influence.load(tiny_model, device="cpu", backend_options={"compiled": 1})
    with pytest.raises(BackendError, match=r"backend 'onnx' has no option 'compiled' "
                                           r"\(its options: graph_optimization"):
        influence.load(tiny_model, backend="onnx", device="cpu", backend_options={"compiled": True})


def test_a_model_built_only_for_another_backend_names_the_backends_it_has():
    from influence_core.config import ModelConfig
    from influence_core.errors import UnsupportedArchitectureError
    from influence_core.plugins import Registry

    registry = Registry()
    registry.add("architectures", Architecture("qwen2", "torch", ("qwen2",), lambda *args: None), "qwen2")
    config = ModelConfig.from_dict({"model_type": "qwen2", "vocab_size": 8, "hidden_size": 8,
                                    "intermediate_size": 8, "num_hidden_layers": 1, "num_attention_heads": 1})
    with pytest.raises(UnsupportedArchitectureError, match=r"model type 'qwen2' for backend 'other' "
                                                           r"\(it is built for: torch \(plugin qwen2\)\)"):
        registry.architecture_for(config, "other")


@pytest.mark.parametrize("source, raised", [
    ("import sys\nsys.exit(3)\n", "SystemExit: 3"),
    ("raise KeyboardInterrupt\n", "KeyboardInterrupt"),
    ("from influence_core import hookimpl\n@hookimpl\ndef register_samplers(register):\n    raise SystemExit(4)\n",
     "SystemExit: 4"),
    ("from influence_core import hookimpl\n@hookimpl\ndef register_commands(cli):\n    raise KeyboardInterrupt\n",
     "KeyboardInterrupt"),
])
def test_sys_exit_or_ctrl_c_in_a_plugin_is_contained(site, tiny_model, source, raised):
    install_fake_distribution(site, "quitter", "0.1", "quitter_plugin", source)
    listing = influence(site, "plugins", "--json")
    assert listing.returncode == 0, listing.stderr
    warnings = [line for line in listing.stderr.splitlines() if "quitter" in line]
    assert len(warnings) == 1 and raised in warnings[0] and warnings[0].startswith("influence: warning: plugin")
    assert "sampler:shift" in {s for p in json.loads(listing.stdout) for s in p["provides"]}
    run = influence(site, "generate", "hi", "-p", str(tiny_model), "--max-tokens", "2")
    assert run.returncode == 0, run.stderr


BROKEN_LOADER = '''
from influence_core import hookimpl
from influence_core.interfaces import ModelLoader

def detect(path):
    if path.suffix == ".mine":
        return True
    raise RuntimeError("detect is broken")

def load(path):
    raise ValueError("cannot read this")

@hookimpl
def register_model_loaders(register):
    register(ModelLoader("mine", detect, load))
'''


def test_a_loader_whose_detect_raises_is_skipped_naming_its_plugin(site, tiny_model, tmp_path):
    install_fake_distribution(site, "broken-loader", "0.1", "broken_loader", BROKEN_LOADER)
    run = influence(site, "generate", "hi", "-p", str(tiny_model), "--max-tokens", "2")
    assert run.returncode == 0, run.stderr
    assert run.stderr.splitlines() == ["influence: warning: plugin 'broken-loader': loader 'mine' was skipped: its "
                                       "detect() raised RuntimeError: detect is broken"]
    mine = tmp_path / "model.mine"
    mine.write_text("")
    failed = influence(site, "generate", "hi", "-p", str(mine))
    assert failed.returncode == 1
    assert failed.stderr == ("error: plugin 'broken-loader' failed in loader 'mine': ValueError: cannot read this\n")


def test_a_third_party_entry_point_named_as_a_built_in_does_not_push_it_out(site, tiny_model):
    install_fake_distribution(site, "torch-impostor", "6.6", "torch_impostor", '''
        raise RuntimeError("the impostor was imported")
    ''')
    (site / "torch_impostor-6.6.dist-info" / "entry_points.txt").write_text("[influence]\ntorch = torch_impostor\n")
    listing = influence(site, "plugins", "--json")
    assert listing.returncode == 0, listing.stderr
    plugins = {p["name"]: p for p in json.loads(listing.stdout)}
    assert plugins["torch"]["distribution"] == "influence" and "backend:torch" in plugins["torch"]["provides"]
    [warning] = [line for line in listing.stderr.splitlines() if "torch_impostor" in line]
    assert warning.startswith("influence: warning: plugin 'torch' (torch_impostor from torch-impostor 6.6) was "
                              "skipped: the built-in plugin 'torch' (influence_torch from influence ")
    assert "imported" not in listing.stderr
    assert influence(site, "generate", "hi", "-p", str(tiny_model), "--max-tokens", "2").returncode == 0


OVERRIDER = '''
from influence_core import hookimpl
from influence_core.interfaces import Sampler

@hookimpl
def register_samplers(register):
    register(Sampler("argmax", "picker", lambda: (lambda logits, context: 7), "always token 7"))

@hookimpl
def register_commands(cli):
    @cli.command()
    def generate(prompt: str):
        """Not the built-in generate."""
        print(f"hijacked {prompt}")
'''


def test_replacing_a_built_in_is_allowed_listed_and_announced_once(site, tiny_model, tmp_path):
    install_fake_distribution(site, "overrider", "2.0", "overrider", OVERRIDER)
    home = str(tmp_path / "home")
    first = influence(site, "plugins", "--json", INFLUENCE_HOME=home)
    assert first.returncode == 0, first.stderr
    plugins = {p["name"]: p for p in json.loads(first.stdout)}
    assert plugins["overrider"]["overrides"] == ["sampler:argmax (built-in, of samplers)",
                                                 "command:generate (built-in, of influence)"]
    assert plugins["samplers"]["overrides"] == []
    notices = [line for line in first.stderr.splitlines() if "notice" in line]
    assert notices == [
        "influence: notice: plugin 'overrider' replaces the built-in command 'generate' (of 'influence'); "
        "`influence plugins` lists every override",
        "influence: notice: plugin 'overrider' replaces the built-in sampler 'argmax' (of 'samplers'); "
        "`influence plugins` lists every override",
    ]
    again = influence(site, "generate", "hi", INFLUENCE_HOME=home)
    assert again.returncode == 0 and again.stdout == "hijacked hi\n" and again.stderr == ""
    table = influence(site, "plugins", INFLUENCE_HOME=home, COLUMNS="200")
    assert "sampler:argmax (built-in, of samplers)" in table.stdout and table.stderr == ""

    (site / "overrider-2.0.dist-info").rename(site / "overrider-2.1.dist-info")
    (site / "overrider-2.1.dist-info" / "METADATA").write_text("Metadata-Version: 2.1\nName: overrider\nVersion: 2.1\n")
    upgraded = influence(site, "plugins", "--json", INFLUENCE_HOME=home)
    assert len([line for line in upgraded.stderr.splitlines() if "notice" in line]) == 2  # a new version: again


class QuietArgmax:
    @staticmethod
    @hookimpl
    def register_samplers(register):
        register(Sampler("argmax", "picker", lambda: (lambda logits, context: 0), "always token 0"))


def test_an_override_registered_in_process_is_listed(plugin, capsys):
    from influence_core.plugins import list_plugins

    plugin(QuietArgmax, "quiet-argmax")
    [info] = [info for info in list_plugins() if info.name == "quiet-argmax"]
    assert info.overrides == ["sampler:argmax (built-in, of samplers)"]
    assert "notice" not in capsys.readouterr().err  # only installed plugins are announced
