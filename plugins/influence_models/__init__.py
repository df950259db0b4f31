"""Plugin ``models``: models by name, the local store, downloads from the Hugging Face hub, and the
bundled default model.

It registers two model resolvers (`resolvers`), so that ``-m NAME`` and "no model given" find a
model, and the commands that manage the store: ``influence models list/rm/prune/alias/default``,
``influence download`` and ``influence convert``. Downloading needs the ``hub`` extra
(huggingface_hub), imported only when a download starts; typer is imported only when the CLI adds
the commands, so importing this is instant.
"""

from influence_core import hookimpl

influence_hookspec_version = "1.2"  # register_model_resolvers


@hookimpl(trylast=True)
def register_model_resolvers(register) -> None:
    from .resolvers import HUB, STORE

    register(STORE)
    register(HUB)


@hookimpl(trylast=True)
def register_commands(cli) -> None:
    from .commands import convert, download, models_app

    cli.command()(download)
    cli.command()(convert)
    cli.add_typer(models_app, name="models")
