"""``influence serve``: an OpenAI-compatible HTTP server over one or more models, with continuous
batching and a prefix cache.

Routes: GET /health, GET /metrics (Prometheus), GET /v1/models, POST /v1/completions, POST
/v1/chat/completions (the model's chat template), streaming as server-sent events in OpenAI's chunk
format. The request's ``model`` picks one of the served models (`router`). Every request
becomes one or more generations in that model's `BatchEngine`; a client that goes away, streaming
or not, frees its slots at the next step, and so does every choice of a request that failed.
Every error, ours or the framework's, is an OpenAI-shaped JSON body (`limits`).

Every request field is either honoured or refused with a 400 naming it: structured output
(``response_format``), tools, logprobs, OpenAI's penalties and vLLM's ``top_k``, ``min_p`` and
``repetition_penalty`` are honoured (docs/structured-output.md); any other field is refused.
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import json
import signal
import socket
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException

from influence_core.api import Model
from influence_core.batching import BatchEngine, Job, QueueFullError
from influence_core.errors import InfluenceError
from influence_core.generation import Generation, TokenLogprob
from influence_core.sampling import MAX_SEED
from influence_core.structured import constraint_from

from .limits import DEFAULT_MAX_BODY_BYTES, RequestGuard, openai_error_body
from .metrics import CONTENT_TYPE, ServerMetrics
from .router import ModelNotServed, ModelRouter, ModelsBusy, Served
from .tools import ReplyFilter, ToolPlan, plan_tools, split_reply, template_messages

# OpenAI's finish reasons: "stop" when the model or a stop string ended it, "length" when a limit did.
FINISH_REASONS = {"eos": "stop", "stop": "stop", "length": "length", "context": "length"}
RETRY_AFTER_S = 1
DISCONNECT_POLL_S = 0.25  # how often a non-streaming request checks that its client is still there
SHUTDOWN_GRACE_S = 5  # after SIGTERM, how long running requests may take before they are cancelled


class SamplingFields(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a field we do not know is refused, never ignored

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
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    # vLLM's extra sampling fields (extra_body in the openai client); top_k -1 means off, as in vLLM.
    top_k: int | None = Field(default=None, ge=-1)
    min_p: float | None = Field(default=None, ge=0, le=1)
    repetition_penalty: float | None = Field(default=None, gt=0)
    response_format: dict[str, Any] | None = None


class CompletionRequest(SamplingFields):
    prompt: str | list[str]
    logprobs: int | None = Field(default=None, ge=0, le=20)
    echo: bool = False


class FunctionCall(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    arguments: str | dict[str, Any] = "{}"


class ToolCallField(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    tool_calls: list[ToolCallField] | None = None
    tool_call_id: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        for part in self.content:
            if part.get("type") != "text":
                raise OpenAIError(400, f"message content of type {part.get('type')!r} is not supported (text only)",
                                  param="messages")
        return "".join(part.get("text", "") for part in self.content)

    def for_template(self) -> dict[str, Any]:
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise OpenAIError(400, f"a {self.role} message needs content (only an assistant message with "
                                   "tool_calls may have none)", param="messages")
        return {"role": self.role if self.role != "developer" else "system", "content": self.text(),
                "name": self.name, "tool_call_id": self.tool_call_id,
                "tool_calls": [call.model_dump() for call in self.tool_calls] if self.tool_calls else None}


class Function(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["function"]
    function: Function


class ChatRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    tools: list[Tool] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool = True


class OpenAIError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
                 headers: dict[str, str] | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.headers = status, message, kind, param, headers
        self.code = code


def error_response(error: OpenAIError) -> JSONResponse:
    return JSONResponse(openai_error_body(error.message, error.kind, error.param, error.code),
                        status_code=error.status, headers=error.headers)


@dataclass(frozen=True)
class ServerSettings:
    api_key: str | None = None
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES


def create_app(router: ModelRouter, settings: ServerSettings = ServerSettings()) -> FastAPI:
    app = FastAPI(title="Influence", description=f"OpenAI-compatible API serving {', '.join(router.names)}")
    metrics = ServerMetrics(router.engines)
    router.observe_tokens(metrics.token_observer)
    app.add_middleware(RequestGuard, api_key=settings.api_key, max_body_bytes=settings.max_body_bytes,
                       count=lambda route, status: metrics.requests.labels(route, str(status)).inc())

    @app.exception_handler(OpenAIError)
    async def openai_error(request: Request, error: OpenAIError) -> JSONResponse:
        return error_response(error)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, error: HTTPException) -> JSONResponse:
        # The framework's own answers (404 no such route, 405 wrong method, 413 body too large).
        return error_response(OpenAIError(error.status_code, str(error.detail), headers=error.headers,
                                          code="not_found" if error.status_code == 404 else None))

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, error: RequestValidationError) -> JSONResponse:
        first = error.errors()[0]
        if first.get("type") == "json_invalid":
            reason = (first.get("ctx") or {}).get("error", "")
            return error_response(OpenAIError(400, f"the request body is not valid JSON ({reason})"))
        location = ".".join(str(part) for part in first.get("loc", ())[1:])
        if first.get("type") == "extra_forbidden":
            return error_response(OpenAIError(400, f"{location}: this field is not supported by Influence",
                                              param=location))
        return error_response(OpenAIError(400, f"{location}: {first.get('msg')}", param=location or None))

    @app.get("/health")
    async def health() -> dict[str, Any]:
        loaded = router.loaded.values()
        return {"status": "ok", "model": router.default, "loaded": [served.name for served in loaded],
                "active_slots": sum(s.engine.busy_slots for s in loaded),
                "queued": sum(s.engine.queued for s in loaded),
                "cancelled": sum(s.engine.cancelled for s in loaded),
                "max_batch": max((s.model.runner.max_batch for s in loaded), default=0)}

    @app.get("/metrics")
    async def prometheus_metrics() -> Response:
        return Response(metrics.exposition(), media_type=CONTENT_TYPE)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": name, "object": "model", "created": router.created,
                                            "owned_by": "influence"} for name in router.names]}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Any:
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if not prompts:
            raise OpenAIError(400, "prompt must not be empty", param="prompt")
        if body.echo and body.logprobs is not None:
            raise OpenAIError(400, "echo with logprobs is not supported (it needs the prompt's logprobs)",
                              param="echo")
        served = await acquire(router, body.model)
        try:
            jobs = await submit(served, [p for p in prompts for _ in range(body.n)], body, raw=True,
                                logprobs=body.logprobs)
        except BaseException:
            router.release(served)
            raise
        echoed = [p for p in prompts for _ in range(body.n)] if body.echo else None
        return await respond(router, served, jobs, body, chat=False, request=request, metrics=metrics,
                             echoed=echoed)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest, request: Request) -> Any:
        if body.top_logprobs is not None and not body.logprobs:
            raise OpenAIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        served = await acquire(router, body.model)
        try:
            tokenizer = served.model.tokenizer
            if not tokenizer.chat_template:
                raise OpenAIError(400, "this model has no chat template; use /v1/completions")
            try:
                plan = plan_tools(tokenizer, [tool.model_dump(exclude_none=True) for tool in body.tools or []],
                                  body.tool_choice, body.parallel_tool_calls)
                messages, tools = template_messages([m.for_template() for m in body.messages], plan, tokenizer)
            except InfluenceError as error:
                raise OpenAIError(400, str(error), param="tools") from None
            constraint = plan.constraint if plan else None
            if constraint and body.response_format and body.response_format.get("type") != "text":
                if plan.calling:
                    raise OpenAIError(400, "response_format cannot be combined with a tool_choice that constrains "
                                           "the reply (required, a named function, or strict functions)",
                                      param="response_format")
                constraint = None  # under "none", response_format's own form opens no call either
            jobs = await submit(served, [messages] * body.n, body, raw=False,
                                logprobs=(body.top_logprobs or 0) if body.logprobs else None, tools=tools,
                                constraint=constraint)
        except BaseException:
            router.release(served)
            raise
        return await respond(router, served, jobs, body, chat=True, request=request, metrics=metrics, plan=plan)

    return app


async def acquire(router: ModelRouter, name: str | None) -> Served:
    try:
        return await router.acquire(name)
    except ModelNotServed as error:
        raise OpenAIError(404, str(error), param="model", code="model_not_found") from None
    except ModelsBusy as error:
        raise OpenAIError(429, str(error), kind="rate_limit_error",
                          headers={"Retry-After": str(RETRY_AFTER_S)}) from None
    except InfluenceError as error:  # the model failed to load
        raise OpenAIError(500, str(error), kind="server_error") from None


@dataclass
class Submitted:
    """A job in the engine, and the asyncio queue its text pieces arrive on (None: finished)."""

    job: Job
    pieces: asyncio.Queue


def _response_format(body: SamplingFields):
    try:
        return constraint_from(body.response_format)
    except InfluenceError as error:
        raise OpenAIError(400, str(error), param="response_format") from None


async def submit(served: Served, prompts: list[Any], body: SamplingFields, raw: bool, logprobs: int | None = None,
                 tools: list[dict[str, Any]] | None = None, constraint: Any = None) -> list[Submitted]:
    """Queue one generation per prompt; if any cannot be queued, none stays queued. Prompts are
    tokenized on a worker thread, so a long one never stalls the event loop."""
    loop = asyncio.get_running_loop()
    model, engine = served.model, served.engine
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    max_tokens = body.max_completion_tokens or body.max_tokens  # None: the shared default (influence_core.defaults)
    response_format = constraint or _response_format(body)
    jobs: list[Submitted] = []
    try:
        for index, prompt in enumerate(prompts):
            check_unicode(prompt)
            generation = await loop.run_in_executor(None, functools.partial(
                model.new_generation,
                prompt, raw=raw, max_tokens=max_tokens, stop=stop,
                temperature=body.temperature,
                top_p=body.top_p, top_k=None if body.top_k is None else max(body.top_k, 0), min_p=body.min_p,
                repetition_penalty=body.repetition_penalty, presence_penalty=body.presence_penalty,
                frequency_penalty=body.frequency_penalty, response_format=response_format, logprobs=logprobs,
                tools=tools, seed=None if body.seed is None else body.seed + index,
            ))
            pieces: asyncio.Queue = asyncio.Queue()
            job = engine.submit(generation, lambda piece, q=pieces: loop.call_soon_threadsafe(q.put_nowait, piece))
            jobs.append(Submitted(job, pieces))
    except BaseException as error:
        release(engine, jobs)
        if isinstance(error, QueueFullError):
            raise OpenAIError(429, f"the server is busy ({error}); retry shortly", kind="rate_limit_error",
                              headers={"Retry-After": str(RETRY_AFTER_S)}) from None
        if isinstance(error, InfluenceError):
            raise OpenAIError(400, str(error)) from None
        if isinstance(error, UnicodeError):
            raise OpenAIError(400, f"the prompt is not valid Unicode text ({error.reason})") from None
        raise
    return jobs


def check_unicode(prompt: str | list[dict[str, str]]) -> None:
    """JSON can carry lone surrogates ("\\ud800"), which no tokenizer takes: raise UnicodeError."""
    for text in [prompt] if isinstance(prompt, str) else [message["content"] for message in prompt]:
        text.encode("utf-8")


def release(engine: BatchEngine, jobs: list[Submitted]) -> None:
    """Cancel whatever of a request is still queued or running (its client is gone, or it failed)."""
    for submitted in jobs:
        if not submitted.job.done.is_set():
            engine.cancel(submitted.job)


async def respond(router: ModelRouter, served: Served, jobs: list[Submitted], body: SamplingFields, chat: bool,
                  request: Request, metrics: ServerMetrics, plan: ToolPlan | None = None,
                  echoed: list[str] | None = None) -> Any:
    identifier = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
    created = int(time.time())
    engine, model, model_name = served.engine, served.model, served.name
    choices_per_prompt = body.n
    if body.stream:
        include_usage = bool((body.stream_options or {}).get("include_usage"))
        events = stream_events(engine, served.model, jobs, chat, identifier, created, model_name, include_usage,
                               choices_per_prompt, plan, echoed)
        cleanup = _once(lambda: finish(router, served, jobs, choices_per_prompt, metrics))
        # From the stream's end, and after the response: a client gone before the first event
        # leaves the stream never started, so its own `finally` never runs.
        return StreamingResponse(_finally(events, cleanup), media_type="text/event-stream",
                                 background=BackgroundTask(cleanup))
    try:
        if not await all_finished(jobs, request):
            raise OpenAIError(499, "the client went away")  # nobody reads this answer
    finally:
        finish(router, served, jobs, choices_per_prompt, metrics)
    failed = next((s.job.error for s in jobs if s.job.error), None)
    if failed:
        raise OpenAIError(500, failed, kind="server_error")
    choices = []
    for index, submitted in enumerate(jobs):
        result = submitted.job.result
        finish_reason = FINISH_REASONS[result.finish_reason]
        logprobs = None
        if result.logprobs is not None:
            logprobs = (chat_logprobs(model, result.logprobs) if chat
                        else completion_logprobs(model, result.logprobs, len(echoed[index]) if echoed else 0))
        # "settings" (not OpenAI's; clients ignore it) says what ran after defaults, as `generate --json` does.
        choice: dict[str, Any] = {"index": index, "finish_reason": finish_reason, "logprobs": logprobs,
                                  "settings": result.settings}
        if chat:
            content, calls = split_reply(plan, result.text)
            choice["message"] = {"role": "assistant", "content": content}
            if calls:
                choice["message"]["tool_calls"] = [tool_call(call) for call in calls]
                choice["finish_reason"] = "tool_calls" if finish_reason == "stop" else finish_reason
        else:
            choice["text"] = (echoed[index] if echoed else "") + result.text
        choices.append(choice)
    return {"id": identifier, "object": "chat.completion" if chat else "text_completion", "created": created,
            "model": model_name, "choices": choices, "usage": usage(jobs, choices_per_prompt)}


def tool_call(call: Any, index: int | None = None) -> dict[str, Any]:
    entry = {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
             "function": {"name": call.name, "arguments": json.dumps(call.arguments, ensure_ascii=False)}}
    return entry if index is None else {"index": index, **entry}


def _token_text(model: Model, token_id: int) -> str:
    # As the text shows it: special tokens are left out of both, so the tokens join into the text.
    return model.tokenizer.decode([token_id])


def chat_logprobs(model: Model, logprobs: list[TokenLogprob]) -> dict[str, Any]:
    def entry(token_id: int, logprob: float) -> dict[str, Any]:
        text = _token_text(model, token_id)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    return {"content": [{**entry(t.token_id, t.logprob), "top_logprobs": [entry(i, lp) for i, lp in t.top]}
                        for t in logprobs], "refusal": None}


def completion_logprobs(model: Model, logprobs: list[TokenLogprob], offset: int) -> dict[str, Any]:
    tokens = [_token_text(model, t.token_id) for t in logprobs]
    offsets, position = [], offset
    for text in tokens:
        offsets.append(position)
        position += len(text)
    return {"tokens": tokens, "token_logprobs": [t.logprob for t in logprobs],
            "top_logprobs": [{_token_text(model, i): lp for i, lp in t.top} for t in logprobs],
            "text_offset": offsets}


async def all_finished(jobs: list[Submitted], request: Request) -> bool:
    """Wait until every job is over; False as soon as the client is gone (the jobs are then left
    for the caller to cancel)."""
    async def drain() -> None:
        for submitted in jobs:
            while await submitted.pieces.get() is not None:
                pass

    draining = asyncio.ensure_future(drain())
    try:
        while not (await asyncio.wait({draining}, timeout=DISCONNECT_POLL_S))[0]:
            if await request.is_disconnected():
                return False
        return True
    finally:
        draining.cancel()


def finish(router: ModelRouter, served: Served, jobs: list[Submitted], choices_per_prompt: int,
           metrics: ServerMetrics) -> None:
    """However a request ends: cancel what of it still runs, count its prompt, release its model."""
    release(served.engine, jobs)
    counted = usage(jobs, choices_per_prompt)
    metrics.count_prompt(served.name, counted["prompt_tokens"], counted["prompt_tokens_details"]["cached_tokens"])
    router.release(served)


def _once(action: Callable[[], None]) -> Callable[[], None]:
    done = False

    def run() -> None:
        nonlocal done
        if not done:
            done = True
            action()

    return run


async def _finally(events: AsyncIterator[str], cleanup: Callable[[], None]) -> AsyncIterator[str]:
    try:
        async for event in events:
            yield event
    finally:
        cleanup()


def usage(jobs: list[Submitted], choices_per_prompt: int) -> dict[str, Any]:
    """OpenAI's usage: each prompt counted once however many choices it has (they share its
    cache), and how many of its tokens came from the prefix cache."""
    firsts = [s.job.generation for s in jobs[::choices_per_prompt]]
    prompt = sum(len(generation.prompt_ids) for generation in firsts)
    cached = sum(generation.reused_prompt_tokens for generation in firsts)
    completion = sum(len(s.job.generation.generated) for s in jobs)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached}}


class LogprobCursor:
    """Hands out, with each streamed piece, the logprobs of the tokens picked since the last one."""

    def __init__(self, generation: Generation) -> None:
        self.generation = generation
        self.sent = 0

    @property
    def pending(self) -> bool:
        return len(self.generation.token_logprobs) > self.sent

    def take(self) -> list[TokenLogprob] | None:
        if self.generation.top_logprobs is None:
            return None
        taken = self.generation.token_logprobs[self.sent:]
        self.sent += len(taken)
        return taken


async def stream_events(engine: BatchEngine, model: Model, jobs: list[Submitted], chat: bool, identifier: str,
                        created: int, model_name: str, include_usage: bool, choices_per_prompt: int,
                        plan: ToolPlan | None = None, echoed: list[str] | None = None) -> AsyncIterator[str]:
    kind = "chat.completion.chunk" if chat else "text_completion"

    def event(choices: list[dict[str, Any]], **extra: Any) -> str:
        chunk = {"id": identifier, "object": kind, "created": created, "model": model_name, "choices": choices,
                 **extra}
        return f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n"

    def choice(index: int, text: str | None, finish_reason: str | None, logprobs: list[TokenLogprob] | None,
               offset: int = 0, **delta: Any) -> dict[str, Any]:
        if chat:
            content = {} if text is None else {"content": text}
            return {"index": index, "delta": {**content, **delta}, "finish_reason": finish_reason,
                    "logprobs": chat_logprobs(model, logprobs) if logprobs else None}
        return {"index": index, "text": text or "", "finish_reason": finish_reason,
                "logprobs": completion_logprobs(model, logprobs, offset) if logprobs else None}

    try:
        if chat:
            for index in range(len(jobs)):
                yield event([{"index": index, "delta": {"role": "assistant", "content": ""},
                              "finish_reason": None, "logprobs": None}])
        for index, submitted in enumerate(jobs):
            job = submitted.job
            cursor, reply = LogprobCursor(job.generation), ReplyFilter(plan if chat else None)
            offset = 0
            if echoed:
                yield event([choice(index, echoed[index], None, None)])
                offset = len(echoed[index])
            while (piece := await submitted.pieces.get()) is not None:
                text = reply.push(piece)
                if text or job.generation.top_logprobs is not None:
                    yield event([choice(index, text, None, cursor.take(), offset)])
                    offset += len(text)
            if job.error:
                yield f"data: {json.dumps({'error': {'message': job.error, 'type': 'server_error'}})}\n\n"
                return
            finish_reason = FINISH_REASONS.get(job.result.finish_reason, "stop")
            rest, calls = reply.finish()
            if rest or calls or cursor.pending:
                extra = {"tool_calls": [tool_call(call, i) for i, call in enumerate(calls)]} if calls else {}
                yield event([choice(index, rest or None, None, cursor.take(), offset, **extra)])
            if calls and finish_reason == "stop":
                finish_reason = "tool_calls"
            yield event([choice(index, None, finish_reason, None)])
        if include_usage:
            yield event([], usage=usage(jobs, choices_per_prompt))
        yield "data: [DONE]\n\n"
    finally:
        release(engine, jobs)  # a client that went away frees its slots at the next step


def serve(router: ModelRouter, settings: ServerSettings, host: str, port: int) -> None:
    """Serve until SIGTERM or Ctrl-C: then stop admitting, give running requests SHUTDOWN_GRACE_S
    to finish, cancel the rest and return."""
    import uvicorn

    if settings.api_key is None and not is_loopback(host):
        print(f"influence: warning: listening on {host} without --api-key: anyone who can reach this port "
              "can use the server", file=sys.stderr)
    with _listen(host, port) as listening:
        app = create_app(router, settings)
        server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=SHUTDOWN_GRACE_S))
        # uvicorn re-raises the signal that stopped it once it has shut down; by then there is nothing
        # left to interrupt, so that second delivery must not kill the process with the signal's status.
        for stopping in (signal.SIGTERM, signal.SIGINT):
            signal.signal(stopping, lambda number, frame: None)
        try:
            server.run(sockets=[listening])
        finally:
            router.close()


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


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
