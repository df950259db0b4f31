"""Plugin ``serve``: ``influence serve``, an OpenAI-compatible HTTP server over the core's batching engine.

server.py is the FastAPI app and its routes; router.py the served models by name, loaded on first
use; limits.py the API key, body cap and JSON errors; metrics.py the Prometheus /metrics; tools.py
tool calling (prompts in, calls out, through the core's registered tool parsers); ray_serve.py the
app as Ray Serve replicas (``serve --ray``). fastapi, uvicorn and prometheus-client (the ``serve``
extra) and ray (the ``ray`` extra) are imported only when the command runs, so importing this is instant.
"""

from influence_core import hookimpl


@hookimpl(trylast=True)
def register_commands(cli) -> None:
    from .commands import serve

    cli.command()(serve)
