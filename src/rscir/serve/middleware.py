"""ASGI middleware: request size cap, body deadline, access log with request ids, security headers.

Written as plain ASGI callables (not ``BaseHTTPMiddleware``) so request bodies are counted while
they stream in, before any handler buffers them."""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import anyio

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

access_log = logging.getLogger("rscir.serve.access")

SECURITY_HEADERS = [
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"x-frame-options", b"DENY"),
    (b"content-security-policy",
     b"default-src 'self'; img-src 'self' blob: data:; style-src 'self'; script-src 'self'; "
     b"connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'"),
]


class BodyTooLarge(Exception):
    """A request body grew past the limit while streaming in."""


class BodyTimeout(Exception):
    """A request body did not arrive in time (a slow or stalled client)."""


async def _send_json(send: Send, status: int, body: dict[str, Any],
                     extra: list[tuple[bytes, bytes]] | None = None) -> None:
    data = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(data)).encode()), *(extra or [])]})
    await send({"type": "http.response.body", "body": data})


class BodyDeadline:
    """408 when a request body has not fully arrived ``timeout_s`` seconds after its headers
    (a client sending a byte a second holds a connection and a worker for at most that long).

    Reads of the body are wrapped in ``anyio.fail_after``; on expiry the handler's read raises
    :class:`BodyTimeout`, which is answered here with 408 and ``Connection: close`` (uvicorn then
    drops the connection, as the rest of the body was never read)."""

    def __init__(self, app: ASGIApp, timeout_s: float) -> None:
        self.app = app
        self.timeout_s = timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        deadline = anyio.current_time() + self.timeout_s
        done = False
        started = False

        async def timed() -> Message:
            nonlocal done
            if done:  # the body is in: later reads wait for a disconnect, untimed
                return await receive()
            try:
                with anyio.fail_after(max(0.0, deadline - anyio.current_time())):
                    msg = await receive()
            except TimeoutError:
                raise BodyTimeout() from None
            if msg["type"] != "http.request" or not msg.get("more_body", False):
                done = True
            return msg

        async def watched(msg: Message) -> None:
            nonlocal started
            if msg["type"] == "http.response.start":
                started = True
            await send(msg)

        try:
            await self.app(scope, timed, watched)
        except BodyTimeout:
            if started:
                raise
            await _send_json(send, 408, {"detail": f"the request body did not arrive within "
                                                   f"{self.timeout_s:g} s"},
                             [(b"connection", b"close")])


class BodyLimit:
    """413 for bodies over ``max_bytes``: at once from Content-Length, else while streaming
    (the handler's read raises :class:`BodyTooLarge`, mapped to 413 by the app)."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        cl = headers.get(b"content-length")
        if cl is not None:
            try:
                n = int(cl)
            except ValueError:
                await _send_json(send, 400, {"detail": "invalid Content-Length"})
                return
            if n > self.max_bytes:
                await _send_json(send, 413, {"detail": f"request body over {self.max_bytes} bytes"})
                return
        seen = 0

        async def counted() -> Message:
            nonlocal seen
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > self.max_bytes:
                    raise BodyTooLarge()
            return msg

        await self.app(scope, counted, send)


class AccessLog:
    """One log line per request (method, path, status, ms, bytes, request id); adds an
    ``X-Request-ID`` header (the client's, if it sent a sane one) and security headers."""

    def __init__(self, app: ASGIApp, logger: logging.Logger = access_log) -> None:
        self.app = app
        self.log = logger

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        given = dict(scope.get("headers") or []).get(b"x-request-id", b"").decode("latin-1")
        rid = given if given and len(given) <= 64 and given.isascii() and given.isprintable() \
            else uuid.uuid4().hex[:16]
        scope.setdefault("state", {})["request_id"] = rid
        status = 500
        size = 0

        async def wrapped(msg: Message) -> None:
            nonlocal status, size
            if msg["type"] == "http.response.start":
                status = msg["status"]
                hdrs = list(msg.get("headers") or [])
                have = {k.lower() for k, _ in hdrs}
                hdrs += [(k, v) for k, v in SECURITY_HEADERS if k not in have]
                hdrs.append((b"x-request-id", rid.encode()))
                msg["headers"] = hdrs
            elif msg["type"] == "http.response.body":
                size += len(msg.get("body", b""))
            await send(msg)

        try:
            await self.app(scope, receive, wrapped)
        finally:
            client = scope.get("client")
            self.log.info(
                '%s %s %s %s %d %.1fms %dB rid=%s',
                client[0] if client else "-", scope.get("method"), scope.get("path"),
                scope.get("http_version", "1.1"), status, (time.perf_counter() - t0) * 1e3, size,
                rid,
            )
