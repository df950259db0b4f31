"""``influence serve --ray``: the OpenAI-compatible server as Ray Serve replicas.

Each replica loads the model and serves the very app `influence serve` does (`server.create_app`,
over its own `BatchEngine`, so continuous batching works within a replica); Ray Serve's proxy
spreads requests over the replicas, and its controller replaces one that dies. Every response
names the replica that produced it in the ``X-Influence-Replica`` header (Ray's actor name for it).

Imported only by ``serve --ray``, so ray is imported at the top here.
"""

from __future__ import annotations

from typing import Any

import ray
from fastapi import FastAPI, Request
from ray import serve

REPLICA_HEADER = "X-Influence-Replica"


@serve.deployment
@serve.ingress()  # the app is built on each replica, by __serve_build_asgi_app__, around its own model
class InfluenceReplica:
    def __init__(self, model: str | None, model_name: str, load_options: dict[str, Any], max_queue: int) -> None:
        from influence_core.api import load
        from influence_core.batching import BatchEngine

        self.model = load(model, **load_options)
        self.model_name = model_name
        self.engine = BatchEngine(self.model.runner, max_queue=max_queue)
        self.engine.start()
        self.replica = serve.get_replica_context().replica_id.to_full_id_str()

    def __serve_build_asgi_app__(self) -> FastAPI:
        from .router import ModelRouter
        from .server import create_app

        app = create_app(ModelRouter.single(self.model_name, self.model, self.engine))

        @app.middleware("http")
        async def name_the_replica(request: Request, call_next):
            response = await call_next(request)
            response.headers[REPLICA_HEADER] = self.replica
            return response

        return app


def deployment(model: str | None, model_name: str, load_options: dict[str, Any], max_queue: int, replicas: int,
               autoscaling: dict[str, Any] | None = None) -> serve.Application:
    """The app to hand `serve.run`: ``replicas`` copies of the model, or as many as Ray Serve's
    ``autoscaling`` config (min_replicas, max_replicas, target_ongoing_requests, ...) asks for.
    A replica reserves one GPU on CUDA, else ``threads`` CPUs (default 1)."""
    device = load_options.get("device", "auto")
    resources = {"num_gpus": 1} if device.startswith("cuda") else {"num_cpus": load_options.get("threads") or 1}
    scaling = {"autoscaling_config": autoscaling} if autoscaling else {"num_replicas": replicas}
    # A replica takes as many requests as it has batch slots (Ray's default, 5, would leave slots
    # empty); Ray queues up to max_queue more, each for the first replica with a free slot, and
    # answers 503 beyond that (a plain `influence serve` answers 429).
    slots = load_options.get("max_batch") or 1
    return InfluenceReplica.options(ray_actor_options=resources, max_ongoing_requests=slots,
                                    max_queued_requests=max_queue, **scaling).bind(
        model, model_name, load_options, max_queue)


def run(app: serve.Application, host: str, port: int, blocking: bool = True) -> None:
    """Serve ``app`` on the Ray instance this process is connected to, else on the cluster RAY_ADDRESS
    names, else on a new local one; ``blocking``: until interrupted."""
    if not ray.is_initialized():
        ray.init()
    serve.start(http_options={"host": host, "port": port})
    serve.run(app, name="influence", route_prefix="/", blocking=blocking)
