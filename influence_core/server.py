"""``influence serve``: an OpenAI-compatible HTTP server over one model, with continuous batching.

Routes: GET /health, GET /v1/models, POST /v1/completions, POST /v1/chat/completions (the
model's chat template), streaming as server-sent events in OpenAI's chunk format. Every request
becomes one or more generations in a shared `BatchEngine`; a streaming client that goes away
frees its slot at the next decode step.
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, Field

from .api import Model
from .engine import BatchEngine, Job, QueueFullError
from .errors import InfluenceError
from .sampling import MAX_SEED

# OpenAI's finish reasons: "stop" when the model or a stop string ended it, "length" when a limit did.
FINISH_REASONS = {"eos": "stop", "stop": "stop", "length": "length", "context": "length"}
RETRY_AFTER_S = 1


class SamplingFields(BaseModel):
    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    seed: int | None = Field(default=None, ge=0, le=MAX_SEED)
    stop: str | list[str] | None = None
    n: int = Field(default=1, ge=1, le=8)
    stream: bool = False
    stream_options: dict[str, Any] | None = None


class CompletionRequest(SamplingFields):
    prompt: str | list[str]


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[dict[str, Any]]

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(part.get("text", "") for part in self.content if part.get("type") == "text")


class ChatRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)


class OpenAIError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.headers = status, message, kind, param, headers


def error_response(error: OpenAIError) -> JSONResponse:
    body = {"error": {"message": error.message, "type": error.kind, "param": error.param, "code": None}}
    return JSONResponse(body, status_code=error.status, headers=error.headers)


def create_app(model: Model, engine: BatchEngine, model_name: str) -> FastAPI:
    app = FastAPI(title="Influence", description=f"OpenAI-compatible API serving {model_name}")
    created = int(time.time())

    @app.exception_handler(OpenAIError)
    async def openai_error(request: Request, error: OpenAIError) -> JSONResponse:
        return error_response(error)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, error: RequestValidationError) -> JSONResponse:
        first = error.errors()[0]
        location = ".".join(str(part) for part in first.get("loc", ())[1:])
        return error_response(OpenAIError(400, f"{location}: {first.get('msg')}", param=location or None))

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": model_name, "active_slots": engine.busy_slots,
                "queued": len(engine.pending), "cancelled": engine.cancelled, "max_batch": model.runner.max_batch}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created,
                                            "owned_by": "influence"}]}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest) -> Any:
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if not prompts:
            raise OpenAIError(400, "prompt must not be empty", param="prompt")
        jobs = submit(engine, model, [p for p in prompts for _ in range(body.n)], body, raw=True)
        return await respond(engine, jobs, body, chat=False, model_name=model_name)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest) -> Any:
        if not model.tokenizer.chat_template:
            raise OpenAIError(400, "this model has no chat template; use /v1/completions")
        messages = [{"role": m.role if m.role != "developer" else "system", "content": m.text()}
                    for m in body.messages]
        jobs = submit(engine, model, [messages] * body.n, body, raw=False)
        return await respond(engine, jobs, body, chat=True, model_name=model_name)

    return app


@dataclass
class Submitted:
    """A job in the engine, and the asyncio queue its text pieces arrive on (None: finished)."""

    job: Job
    pieces: asyncio.Queue


def submit(engine: BatchEngine, model: Model, prompts: list[Any], body: SamplingFields, raw: bool) -> list[Submitted]:
    """Queue one generation per prompt; if any cannot be queued, none stays queued."""
    loop = asyncio.get_running_loop()
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    max_tokens = body.max_completion_tokens or body.max_tokens or model.runner.context_length
    jobs = []
    try:
        for index, prompt in enumerate(prompts):
            generation = model.new_generation(
                prompt, raw=raw, max_tokens=max_tokens, stop=stop,
                temperature=body.temperature if body.temperature is not None else _default_temperature(model),
                top_p=body.top_p, seed=None if body.seed is None else body.seed + index,
            )
            pieces: asyncio.Queue = asyncio.Queue()
            job = engine.submit(generation, lambda piece, q=pieces: loop.call_soon_threadsafe(q.put_nowait, piece))
            jobs.append(Submitted(job, pieces))
    except (QueueFullError, InfluenceError) as error:
        release(engine, jobs)
        if isinstance(error, QueueFullError):
            raise OpenAIError(429, f"the server is busy ({error}); retry shortly", kind="rate_limit_error",
                              headers={"Retry-After": str(RETRY_AFTER_S)}) from None
        raise OpenAIError(400, str(error)) from None
    return jobs


def release(engine: BatchEngine, jobs: list[Submitted]) -> None:
    """Cancel whatever of a request is still queued or running (its client is gone, or it failed)."""
    for submitted in jobs:
        if not submitted.job.done.is_set():
            engine.cancel(submitted.job)


def _default_temperature(model: Model) -> float:
    """OpenAI's default is 1.0; a model's own generation_config.json default wins."""
    defaults = model.config.generation
    return defaults.temperature if defaults.do_sample and defaults.temperature is not None else 1.0


async def respond(engine: BatchEngine, jobs: list[Submitted], body: SamplingFields, chat: bool,
                  model_name: str) -> Any:
    identifier = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
    created = int(time.time())
    if body.stream:
        include_usage = bool((body.stream_options or {}).get("include_usage"))
        return StreamingResponse(stream_events(engine, jobs, chat, identifier, created, model_name, include_usage),
                                 media_type="text/event-stream")
    try:
        for submitted in jobs:
            while await submitted.pieces.get() is not None:
                pass
    finally:
        release(engine, jobs)
    failed = next((s.job.error for s in jobs if s.job.error), None)
    if failed:
        raise OpenAIError(500, failed, kind="server_error")
    results = [s.job.result for s in jobs]
    choices = []
    for index, result in enumerate(results):
        choice: dict[str, Any] = {"index": index, "finish_reason": FINISH_REASONS[result.finish_reason],
                                  "logprobs": None}
        if chat:
            choice["message"] = {"role": "assistant", "content": result.text}
        else:
            choice["text"] = result.text
        choices.append(choice)
    return {"id": identifier, "object": "chat.completion" if chat else "text_completion", "created": created,
            "model": model_name, "choices": choices, "usage": usage(jobs)}


def usage(jobs: list[Submitted]) -> dict[str, int]:
    prompt = sum(len(s.job.generation.prompt_ids) for s in jobs)
    completion = sum(len(s.job.generation.generated) for s in jobs)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


async def stream_events(engine: BatchEngine, jobs: list[Submitted], chat: bool, identifier: str, created: int, model_name: str,
                        include_usage: bool) -> AsyncIterator[str]:
    kind = "chat.completion.chunk" if chat else "text_completion"

    def event(choices: list[dict[str, Any]], **extra: Any) -> str:
        chunk = {"id": identifier, "object": kind, "created": created, "model": model_name, "choices": choices,
                 **extra}
        return f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n"

    def choice(index: int, text: str | None, finish_reason: str | None) -> dict[str, Any]:
        if chat:
            delta = {} if text is None else {"content": text}
            return {"index": index, "delta": delta, "finish_reason": finish_reason, "logprobs": None}
        return {"index": index, "text": text or "", "finish_reason": finish_reason, "logprobs": None}

    try:
        if chat:
            for index in range(len(jobs)):
                yield event([{"index": index, "delta": {"role": "assistant", "content": ""},
                              "finish_reason": None, "logprobs": None}])
        for index, submitted in enumerate(jobs):
            job = submitted.job
            while (piece := await submitted.pieces.get()) is not None:
                yield event([choice(index, piece, None)])
            if job.error:
                yield f"data: {json.dumps({'error': {'message': job.error, 'type': 'server_error'}})}\n\n"
                return
            yield event([choice(index, None, FINISH_REASONS.get(job.result.finish_reason, "stop"))])
        if include_usage:
            yield event([], usage=usage(jobs))
        yield "data: [DONE]\n\n"
    finally:
        release(engine, jobs)  # a client that went away frees its slots at the next step


def serve(model: Model, model_name: str, host: str, port: int, max_queue: int) -> None:
    import uvicorn

    with _listen(host, port) as listening:
        engine = BatchEngine(model.runner, max_queue=max_queue)
        engine.start()
        try:
            config = uvicorn.Config(create_app(model, engine, model_name), log_level="warning")
            uvicorn.Server(config).run(sockets=[listening])
        finally:
            engine.stop()


def _listen(host: str, port: int) -> socket.socket:
    """The server's socket, bound here so that a busy or forbidden address is one clear error."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        listening = socket.socket(family, socket.SOCK_STREAM)
        listening.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listening.bind((host, port))
    except OSError as error:
        raise InfluenceError(f"cannot listen on {host}:{port}: {error.strerror or error}") from None
    return listening
