"""Plugin ``bench``: measuring what runs. ``influence bench`` (speed, llama-bench style, and whole
processes with ``--cli``), ``influence compare`` (one greedy generation per backend, side by side)
and ``influence perplexity`` (quality over a text, and a format's drift from another).

It uses only the public library (`influence_core.api`); typer is imported when the CLI adds the
commands, torch and rich only when one of them runs, so importing this is instant.
"""

from influence_core import hookimpl


@hookimpl(trylast=True)
def register_commands(cli) -> None:
    from .commands import bench, compare, perplexity

    for command in (bench, compare, perplexity):
        cli.command()(command)
