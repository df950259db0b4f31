"""The models one `influence serve` offers, by the name clients give in a request's ``model``.

Each model is loaded on first use (the first one at start, so a server answers as soon as it is
up) with its own `BatchEngine`; when loading one would exceed ``max_loaded``, the least recently
used model with no request in flight is unloaded first, as Ollama does.
"""

from __future__ import annotations

import asyncio
import gc
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from influence_core.batching import DEFAULT_PREFILL_CHUNK, BatchEngine, TokenObserver
from influence_core.errors import InfluenceError

if TYPE_CHECKING:
    from influence_core.api import Model


class ModelNotServed(InfluenceError):
    """A request named a model this server does not offer."""


class ModelsBusy(InfluenceError):
    """Every loaded model has requests in flight, so none can make room for another."""


@dataclass(frozen=True)
class ModelSpec:
    name: str  # the id clients see
    reference: str | Path | None  # what `influence_core.load` takes; None: the default model


@dataclass(frozen=True)
class EngineSettings:
    max_queue: int = 64
    prefill_chunk: int = DEFAULT_PREFILL_CHUNK
    prefix_cache: bool = True


@dataclass
class Served:
    name: str
    model: Model
    engine: BatchEngine
    in_flight: int = 0
    last_used: float = field(default_factory=time.monotonic)


class ModelRouter:
    def __init__(self, specs: list[ModelSpec], load: Callable[[ModelSpec], Model],
                 engine_settings: EngineSettings = EngineSettings(), max_loaded: int = 1) -> None:
        if not specs:
            raise InfluenceError("no model to serve")
        names = [spec.name for spec in specs]
        duplicate = next((name for name in names if names.count(name) > 1), None)
        if duplicate:
            raise InfluenceError(f"two models would be served as {duplicate!r}; give them different names")
        if max_loaded < 1:
            raise InfluenceError(f"--max-loaded must be >= 1, got {max_loaded}")
        self.specs = {spec.name: spec for spec in specs}
        self.default = specs[0].name
        self.load = load
        self.engine_settings = engine_settings
        self.max_loaded = max_loaded
        self.loaded: dict[str, Served] = {}
        self.observer_for: Callable[[str], TokenObserver] | None = None
        self.created = int(time.time())
        self._loading = asyncio.Lock()

    @classmethod
    def single(cls, name: str, model: Model, engine: BatchEngine) -> ModelRouter:
        """A router over one model already loaded and running (a Ray Serve replica)."""
        router = cls([ModelSpec(name, model.source.path)], load=lambda spec: model)
        router.loaded[name] = Served(name, model, engine)
        return router

    @property
    def names(self) -> list[str]:
        return list(self.specs)

    def engines(self) -> dict[str, BatchEngine]:
        return {name: served.engine for name, served in self.loaded.items()}

    def observe_tokens(self, observer_for: Callable[[str], TokenObserver]) -> None:
        """Have every engine, loaded now or later, report each token it picks."""
        self.observer_for = observer_for
        for name, served in self.loaded.items():
            served.engine.on_token = observer_for(name)

    def load_now(self, name: str) -> Served:
        """Load a model before serving starts (the first one, so errors show at start)."""
        return self._start(self.specs[name], self.load(self.specs[name]))

    async def acquire(self, name: str | None) -> Served:
        """The model a request names (None: the first one), loaded if need be; `release` it after."""
        name = self.default if name is None else name
        if name not in self.specs:
            raise ModelNotServed(f"the model {name!r} is not served here (served: {', '.join(self.specs)})")
        served = self.loaded.get(name)
        if served is None:
            async with self._loading:
                served = self.loaded.get(name) or await self._load_with_room(self.specs[name])
        served.in_flight += 1
        served.last_used = time.monotonic()
        return served

    def release(self, served: Served) -> None:
        served.in_flight -= 1
        served.last_used = time.monotonic()

    async def _load_with_room(self, spec: ModelSpec) -> Served:
        while len(self.loaded) >= self.max_loaded:
            idle = [served for served in self.loaded.values() if served.in_flight == 0]
            if not idle:
                raise ModelsBusy(f"all {len(self.loaded)} loaded models are busy, so {spec.name!r} cannot be "
                                 "loaded now (see --max-loaded)")
            self._unload(min(idle, key=lambda served: served.last_used))
        model = await asyncio.get_running_loop().run_in_executor(None, self.load, spec)
        return self._start(spec, model)

    def _start(self, spec: ModelSpec, model: Model) -> Served:
        settings = self.engine_settings
        engine = BatchEngine(model.runner, max_queue=settings.max_queue, prefill_chunk=settings.prefill_chunk,
                             prefix_cache=settings.prefix_cache,
                             on_token=self.observer_for(spec.name) if self.observer_for else None)
        engine.start()
        served = self.loaded[spec.name] = Served(spec.name, model, engine)
        return served

    def _unload(self, served: Served) -> None:
        del self.loaded[served.name]
        served.engine.stop()
        served.model.close()
        gc.collect()

    def close(self) -> None:
        for served in list(self.loaded.values()):
            self._unload(served)
