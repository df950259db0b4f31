"""What stands in front of every route of `influence serve`: the API key, the request-body cap, a
JSON 500 for anything unexpected, and the count of answers by status.

A plain ASGI middleware (not Starlette's BaseHTTPMiddleware, which buffers streams and hides client
disconnects from the routes). The ``serve`` command reads this module's defaults, so it imports no web
framework at module level.
"""

from __future__ import annotations

import hmac
import json
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from starlette.types import ASGIApp, Message, Receive, Scope, Send

DEFAULT_MAX_BODY_BYTES = 4 * 1024 * 1024
OPEN_PATHS = frozenset({"/health"})  # answered without the API key (load balancers probe it)
ROUTES = frozenset({"/health", "/metrics", "/v1/models", "/v1/completions", "/v1/chat/completions"})


def body_too_large(limit: int) -> Exception:
    """Raised from inside a route's body read, as an HTTPException: FastAPI passes those through to
    their handler (any other exception there becomes a 400 'error parsing the body')."""
    from starlette.exceptions import HTTPException

    return HTTPException(413, too_large_message(limit))


def too_large_message(limit: int) -> str:
    return f"the request body is larger than the server's limit of {limit} bytes (see --max-body-bytes)"


def openai_error_body(message: str, kind: str = "invalid_request_error", param: str | None = None,
                      code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


class RequestGuard:
    def __init__(self, app: ASGIApp, api_key: str | None, max_body_bytes: int,
                 count: Callable[[str, int], None]) -> None:
        self.app = app
        self.api_key = api_key
        self.max_body_bytes = max_body_bytes
        self.count = count

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        status: list[int] = []

        async def send_and_note(message: Message) -> None:
            if message["type"] == "http.response.start":
                status.append(message["status"])
            await send(message)

        try:
            if self.api_key and path not in OPEN_PATHS and not self._authorized(scope):
                await _send_json(send_and_note, 401, openai_error_body(
                    "a valid API key is required: send the header 'Authorization: Bearer KEY'",
                    code="invalid_api_key"), {"www-authenticate": "Bearer"})
            elif self._declared_length(scope) > self.max_body_bytes:
                await _send_json(send_and_note, 413, openai_error_body(too_large_message(self.max_body_bytes)))
            else:
                await self.app(scope, self._capped(receive), send_and_note)
        except Exception as error:  # a bug somewhere below: one line in the log, a JSON 500 out
            print(f"influence: error: {scope['method']} {path}: {type(error).__name__}: {error}", file=sys.stderr)
            if not status:
                await _send_json(send_and_note, 500, openai_error_body(
                    f"internal error: {type(error).__name__}", kind="server_error"))
        finally:
            self.count(path if path in ROUTES else "other", status[0] if status else 500)

    def _authorized(self, scope: Scope) -> bool:
        header = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
        scheme, _, key = header.partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(key.strip().encode(), self.api_key.encode())

    @staticmethod
    def _declared_length(scope: Scope) -> int:
        value = dict(scope["headers"]).get(b"content-length", b"0")
        return int(value) if value.isdigit() else 0

    def _capped(self, receive: Receive) -> Receive:
        """``receive``, counting body bytes: a chunked body that outgrows the cap stops being read."""
        received = 0

        async def capped() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body_bytes:
                    raise body_too_large(self.max_body_bytes)
            return message

        return capped


async def _send_json(send: Send, status: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> None:
    payload = json.dumps(body).encode()
    raw_headers = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
    raw_headers += [(key.encode(), value.encode()) for key, value in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw_headers})
    await send({"type": "http.response.body", "body": payload})
