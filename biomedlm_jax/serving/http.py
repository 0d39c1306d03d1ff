"""The HTTP layer under the API (ASGI middleware): OpenAI-shaped errors, the body limit, the API key,
the access log with request ids."""
from __future__ import annotations

import logging
import secrets
import time
import uuid
from typing import Callable, Optional

from fastapi.responses import JSONResponse

log = logging.getLogger("biomedlm_jax.serve")


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: Optional[str] = None, kind: str = "invalid_request_error",
                 code: Optional[str] = None, headers: Optional[dict] = None):
        super().__init__(message)
        self.status, self.message, self.param, self.kind, self.code, self.headers = status, message, param, kind, code, headers

    def response(self) -> JSONResponse:
        return JSONResponse({"error": {"message": self.message, "type": self.kind, "param": self.param,
                                       "code": self.code}}, status_code=self.status, headers=self.headers)


class BodyLimit:
    """ASGI middleware: a request body over `limit` bytes gets a 400 (OpenAI's error shape) before it is
    read (by its Content-Length) or as soon as the bytes received pass the limit (a chunked body)."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    def _refuse(self) -> JSONResponse:
        return ApiError(400, f"the request body is larger than this server's limit of {self.limit} bytes "
                        "(its --max_body_bytes)", code="request_too_large").response()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or ()).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            return await self._refuse()(scope, receive, send)
        seen, too_large = 0, False

        async def limited_receive():
            nonlocal seen, too_large
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:  # the app gets an unparseable end of body, and its answer is replaced
                    too_large = True
                    return {"type": "http.request", "body": b"\x00", "more_body": False}
            return message

        async def guarded_send(message):
            if not too_large:
                await send(message)

        await self.app(scope, limited_receive, guarded_send)
        if too_large:
            await self._refuse()(scope, receive, send)


_REQUEST_ID_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._-:")


class AccessLog:
    """ASGI middleware: every response, whatever its status (refusals included), gets one log line
    (method, path, status, milliseconds, request id, client) and an `X-Request-Id` header: the client's
    own (up to 128 of [A-Za-z0-9._-:]) or a new one. The id is in scope["state"]["request_id"]."""

    def __init__(self, app, on_response: Optional[Callable[[int], None]] = None):
        self.app, self.on_response = app, on_response

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0 = time.perf_counter()
        given = dict(scope.get("headers") or ()).get(b"x-request-id", b"").decode("latin-1")
        rid = given if 0 < len(given) <= 128 and set(given) <= _REQUEST_ID_CHARS else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = rid
        status = ["-"]

        async def send_with_id(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
                message = dict(message, headers=list(message.get("headers") or ()) + [(b"x-request-id", rid.encode())])
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            if self.on_response is not None and status[0] != "-":
                self.on_response(status[0])
            client = scope.get("client") or ("-", 0)
            log.info("access %s %s %s %.0fms request_id=%s client=%s", scope["method"], scope["path"], status[0],
                     1e3 * (time.perf_counter() - t0), rid, client[0])


class ApiKey:
    """ASGI middleware: with a key set, every route but /health needs `Authorization: Bearer KEY`
    (compared in constant time); otherwise 401 in OpenAI's shape."""

    OPEN = ("/health",)

    def __init__(self, app, key: str):
        self.app, self.key = app, key.encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] in self.OPEN or scope["method"] == "OPTIONS":
            return await self.app(scope, receive, send)
        auth = dict(scope.get("headers") or ()).get(b"authorization", b"")
        scheme, _, given = auth.partition(b" ")
        if scheme.lower() == b"bearer" and secrets.compare_digest(given.strip(), self.key):
            return await self.app(scope, receive, send)
        error = ApiError(401, "a valid API key is required: send 'Authorization: Bearer KEY' (the server's --api_key)",
                         code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
        await error.response()(scope, receive, send)
