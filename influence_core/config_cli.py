"""`influence config`: show and edit the config file (`influence_core.userconfig`), and turn it into
the defaults click gives each command's options. (typer ships its own copy of click, so its objects
are reached through typer and told apart by their attributes.)"""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer

from .errors import InfluenceError
from .userconfig import CONFIGURABLE_COMMANDS, MODEL_KEYS, UserConfig, parse_value, read_config, write_setting

config_app = typer.Typer(help="The config file: defaults for generate, chat and serve, and per-model settings.",
                         no_args_is_help=True, rich_markup_mode=None)


def option_key(option: Any) -> str:
    """An option's name in the config file: its long flag, without dashes, with underscores."""
    longest = max(option.opts, key=len)
    return longest.lstrip("-").replace("-", "_")


def configurable_options(command: Any) -> dict[str, Any]:
    """A command's options (not its arguments) by their config-file names."""
    return {option_key(p): p for p in command.params
            if p.param_type_name == "option" and not p.is_eager and p.name != "help"}


def default_map(group: Any, config: UserConfig) -> dict[str, dict[str, Any]]:
    """click's ``default_map`` for the file's command tables, every key and value checked first, so
    that a wrong one is an error naming the file, table and key (never a silent default)."""
    result: dict[str, dict[str, Any]] = {}
    for command_name, values in config.commands.items():
        if command_name not in group.commands:  # a plugin's command (serve) this run did not load: no option reads it
            continue
        options = configurable_options(group.commands[command_name])
        result[command_name] = {_checked(config, f"[{command_name}]", options, key, value).name: value
                                for key, value in values.items()}
    generate = configurable_options(group.commands["generate"])
    for model, values in config.models.items():
        for key, value in values.items():
            _checked(config, f"[models.{model!r}]", generate, key, value)
    return result


def _checked(config: UserConfig, where: str, options: dict[str, Any], key: str, value: Any) -> Any:
    option = options.get(key)
    if option is None:
        raise InfluenceError(f"{config.path}: {where} has no setting {key!r} "
                             f"(settings: {', '.join(sorted(options))})")
    check_value(option, value, f"{config.path}: {where} {key}")
    return option


def check_value(option: Any, value: Any, where: str) -> None:
    try:
        option.process_value(typer.Context(typer.main.get_command(config_app)), value)
    except typer.BadParameter as error:
        raise InfluenceError(f"{where} = {value!r}: {error.message}") from None


def _group() -> Any:
    from .cli import app

    return typer.main.get_command(app)


def _split_key(key: str) -> tuple[tuple[str, ...], str]:
    """``generate.temperature`` -> (("generate",), "temperature"); ``models.NAME.temperature`` ->
    (("models", "NAME"), "temperature"); NAME may itself hold dots."""
    table, _, setting = key.rpartition(".")
    if table in CONFIGURABLE_COMMANDS:
        return (table,), setting
    prefix, _, model = table.partition(".")
    if prefix == "models" and model:
        return ("models", model), setting
    raise InfluenceError(f"{key!r} is not a setting: write COMMAND.KEY ({', '.join(CONFIGURABLE_COMMANDS)}) "
                         "or models.NAME.KEY")


def _option_for(group: Any, table: tuple[str, ...], setting: str) -> Any:
    command_name = table[0] if table[0] != "models" else "generate"
    if command_name not in group.commands:
        raise InfluenceError(f"`influence {command_name}` is not installed (a plugin provides it; see "
                             "`influence plugins`), so its settings cannot be checked")
    options = configurable_options(group.commands[command_name])
    allowed = MODEL_KEYS if table[0] == "models" else sorted(options)
    if setting not in allowed:
        raise InfluenceError(f"[{'.'.join(table)}] has no setting {setting!r} (settings: {', '.join(allowed)})")
    return options[setting]


@config_app.command("path")
def config_path_command() -> None:
    """Print where the config file is (INFLUENCE_CONFIG names another)."""
    print(read_config().path)


@config_app.command("show")
def config_show(as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False) -> None:
    """Every setting of generate, chat and serve, its value, and where the value comes from."""
    config = read_config()
    group = _group()
    default_map(group, config)  # refuses a wrong file before showing anything
    rows = []
    for command_name in (name for name in CONFIGURABLE_COMMANDS if name in group.commands):
        table = config.commands.get(command_name, {})
        for key, option in configurable_options(group.commands[command_name]).items():
            from_file = key in table
            rows.append({"setting": f"{command_name}.{key}", "value": table[key] if from_file else option.default,
                         "from": f"{config.path} [{command_name}]" if from_file else "built-in"})
    for model, values in config.models.items():
        for key, value in values.items():
            rows.append({"setting": f"models.{model}.{key}", "value": value, "from": f"{config.path} [models.{model!r}]"})
    if as_json:
        print(json.dumps({"path": str(config.path), "settings": rows}, indent=2))
        return
    print(f"config file: {config.path}{'' if config.path.exists() else ' (none yet)'}")
    width = max(len(row["setting"]) for row in rows)
    for row in rows:
        value = "(unset: the model's, else the built-in default)" if row["value"] is None else json.dumps(row["value"])
        print(f"{row['setting']:<{width}}  {value}  [{row['from']}]")


@config_app.command("set")
def config_set(key: Annotated[str, typer.Argument(help="COMMAND.KEY or models.NAME.KEY, e.g. generate.temperature.")],
               value: Annotated[str, typer.Argument(help="The value, read as TOML reads one (0.7, true, \"text\").")]) -> None:
    """Set a default in the config file (its comments and layout are kept)."""
    config = read_config()
    table, setting = _split_key(key)
    option = _option_for(_group(), table, setting)
    typed = parse_value(value)
    check_value(option, typed, key)
    write_setting(config.path, table, setting, typed)
    print(f"{key} = {json.dumps(typed)} in {config.path}")


@config_app.command("unset")
def config_unset(key: Annotated[str, typer.Argument(help="COMMAND.KEY or models.NAME.KEY.")]) -> None:
    """Remove a setting from the config file, so the built-in default applies again."""
    config = read_config()
    table, setting = _split_key(key)
    _option_for(_group(), table, setting)
    write_setting(config.path, table, setting, None)
    print(f"{key} unset in {config.path}")
