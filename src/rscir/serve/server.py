"""Running the app under uvicorn on a socket we bind ourselves.

Binding first (rather than letting uvicorn do it) turns "port in use" or "bad host" into a clean
error before the model loads, lets ``--port 0`` report the port it got, and lets tests and the
load benchmark serve on a free loopback port without a race.

Connections are bounded in time and number: a request's headers must be complete within
``header_timeout_s`` of the connection opening (or of the previous response), idle keep-alive
connections close after ``keep_alive_s``, and past ``max_connections`` open connections new
requests get 503. (The body's deadline is the app's: :class:`.middleware.BodyDeadline`.)"""

from __future__ import annotations

import ipaddress
import logging
import socket
import threading
import time
from typing import TYPE_CHECKING, Any

from ..errors import InvalidArgumentError, ServerError, missing_dependency

if TYPE_CHECKING:
    import uvicorn

log = logging.getLogger("rscir.serve")


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and ``localhost``."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def bind_socket(host: str = "127.0.0.1", port: int = 0) -> socket.socket:
    """A listening TCP socket on ``host:port`` (port 0: any free port)."""
    if not 0 <= port <= 65535:
        raise InvalidArgumentError(f"port must be in 0..65535, got {port}")
    try:
        infos = socket.getaddrinfo(host.strip("[]"), port, type=socket.SOCK_STREAM,
                                   flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise InvalidArgumentError(f"cannot resolve host {host!r}: {e.strerror}") from None
    family, kind, proto, _, addr = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
        sock.listen(2048)
    except OSError as e:
        sock.close()
        raise ServerError(f"cannot listen on {host}:{port}: {e.strerror}") from None
    sock.set_inheritable(True)
    return sock


def make_server(app: Any, sock: socket.socket, *, graceful_s: int = 10,
                log_level: str = "info", header_timeout_s: float = 10.0,
                keep_alive_s: int = 5, max_connections: int = 256) -> uvicorn.Server:
    """A uvicorn server for ``app`` on ``sock``: our access log replaces uvicorn's; on SIGINT or
    SIGTERM it stops accepting, lets running requests finish (up to ``graceful_s``), then runs
    the app's shutdown (which closes the store). Connection limits: see the module docstring."""
    if not header_timeout_s > 0 or keep_alive_s < 1 or max_connections < 1:
        raise InvalidArgumentError(
            "header_timeout_s, keep_alive_s and max_connections must be positive")
    try:
        import uvicorn
    except ModuleNotFoundError as e:
        raise missing_dependency("uvicorn", "serve", "serving over HTTP") from e
    from .protocol import HeaderTimeoutProtocol
    from .uploads import tune_process_memory

    tune_process_memory()  # decodes give their memory back (see there)
    host, port = sock.getsockname()[:2]
    protocol = type("HeaderTimeoutProtocol", (HeaderTimeoutProtocol,),
                    {"header_timeout_s": float(header_timeout_s)})
    cfg = uvicorn.Config(app, host=host, port=port, access_log=False, log_config=None,
                         log_level=log_level, timeout_graceful_shutdown=graceful_s,
                         lifespan="on", server_header=False, http=protocol,
                         timeout_keep_alive=keep_alive_s, limit_concurrency=max_connections)
    return uvicorn.Server(cfg)


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


class ServerThread:
    """Serve an app from a background thread (tests, benchmarks): ``with ServerThread(app) as
    url: ...``; leaving the block shuts the server down gracefully."""

    def __init__(self, app: Any, host: str = "127.0.0.1", port: int = 0,
                 **server_kwargs: Any) -> None:
        self.sock = bind_socket(host, port)
        self.url = url_of(self.sock)
        self.server = make_server(app, self.sock, log_level="warning", **server_kwargs)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]},
                                       name="rscir-serve", daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        deadline = time.monotonic() + 60
        while self.thread.is_alive() and not self.server.started and time.monotonic() < deadline:
            time.sleep(0.02)
        if not self.server.started:
            self.__exit__()
            raise ServerError("the server did not start")
        return self.url

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=15)
        self.sock.close()
