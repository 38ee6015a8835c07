"""`rscir serve SOURCE`: the HTTP API and web page on a store directory or a Postgres URI."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Any

from ..errors import InvalidArgumentError, ServerError
from .core import add_model_args
from .extras import SERVE_MODULES, require


def register(sub: argparse._SubParsersAction) -> None:
    """Add this module's subcommands to the rscir parser."""
    p = sub.add_parser(
        "serve", help="HTTP API + web page for composed search",
        description="Serve composed search over HTTP (OpenAPI at /docs, web page at /). Binds to "
                    "loopback unless --host says otherwise; Ctrl-C or SIGTERM stops it after "
                    "running requests finish.")
    p.add_argument("source", help="store directory or postgresql:// URI")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default 127.0.0.1; 0.0.0.0 exposes the archive)")
    p.add_argument("--port", type=int, default=8000, help="TCP port (0: any free port)")
    add_model_args(p)
    g = p.add_argument_group("limits")
    g.add_argument("--workers", type=int, default=8, help="searches run at once (threads)")
    g.add_argument("--max-upload-mb", type=float, default=20.0, help="largest upload")
    g.add_argument("--max-pixels", type=int, default=50_000_000, help="largest uploaded image")
    g.add_argument("--max-side", type=int, default=20_000,
                   help="longest side of an uploaded image, in pixels (default 20000)")
    g.add_argument("--max-aspect", type=float, default=20.0,
                   help="most elongated upload accepted, long side / short side (default 20)")
    g.add_argument("--decode-memory-mb", type=int, default=1024,
                   help="memory all concurrent upload decodes may use together; uploads wait "
                        "for their share, one that alone needs more is refused (default 1024)")
    g.add_argument("--header-timeout", type=float, default=10.0,
                   help="seconds a client has to send its request headers (default 10)")
    g.add_argument("--body-timeout", type=float, default=60.0,
                   help="seconds a client has to send a request body (default 60)")
    g.add_argument("--max-connections", type=int, default=256,
                   help="open connections; past this, requests get 503 (default 256)")
    g.add_argument("--max-k", type=int, default=10_000, help="most results per λ")
    p.add_argument("--basemap", default=None,
                   help="tile URL template for the page's map, e.g. "
                   "https://tile.openstreetmap.org/{z}/{x}/{y}.png (default: none, a lon/lat grid)")
    p.add_argument("--basemap-attribution", default=None, help="credit shown under the map")
    g.add_argument("--graceful-timeout", type=int, default=10,
                   help="seconds running requests get to finish on shutdown")
    p.set_defaults(func=cmd_serve)


def limit_blas_threads(workers: int) -> Any:
    """Give each search thread ``cores // workers`` BLAS threads (at least one): the server's
    concurrency comes from its search threads, and BLAS's default of one thread per core in
    each of them oversubscribes the cores (8 searches at once on 2 cores ran 16 BLAS threads; a
    search's CPU time was 1.6x that with one BLAS thread each). Returns the threadpoolctl
    limiter (the limit holds for the process)."""
    from threadpoolctl import threadpool_limits

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return threadpool_limits(max(1, (cores or 1) // workers), user_api="blas")


def cmd_serve(a: argparse.Namespace) -> int:
    require(SERVE_MODULES, "rscir serve")  # before any import or model load: one line
    from ..api import open_searcher
    from ..serve import ServeConfig, create_app
    from ..serve.server import bind_socket, is_loopback, make_server, url_of

    for name, v in (("--workers", a.workers), ("--max-k", a.max_k), ("--max-pixels", a.max_pixels),
                    ("--max-side", a.max_side), ("--decode-memory-mb", a.decode_memory_mb),
                    ("--max-connections", a.max_connections), ("--max-aspect", a.max_aspect)):
        if v < 1:
            raise InvalidArgumentError(f"{name} must be >= 1")
    for name, f in (("--max-upload-mb", a.max_upload_mb), ("--header-timeout", a.header_timeout),
                    ("--body-timeout", a.body_timeout)):
        if not f > 0:
            raise InvalidArgumentError(f"{name} must be > 0")
    cfg = ServeConfig(max_upload_bytes=int(a.max_upload_mb * 1024 * 1024),
                      max_pixels=a.max_pixels, max_k=a.max_k, workers=a.workers,
                      max_side=a.max_side, max_aspect=a.max_aspect,
                      decode_memory_mb=a.decode_memory_mb, body_timeout_s=a.body_timeout,
                      basemap=a.basemap, basemap_attribution=a.basemap_attribution)
    sock = bind_socket(a.host, a.port)  # fails fast, before the model loads
    try:
        if not is_loopback(a.host):
            print(f"rscir serve: warning: listening on {a.host}, not loopback: anyone who can "
                  "reach this address can search the archive and read its images",
                  file=sys.stderr)
        limit_blas_threads(a.workers)
        searcher = open_searcher(a.source, model=a.model, arch=a.arch, checkpoint=a.checkpoint,
                                 device=a.device)
        try:
            # Models load lazily; load and run them now, so that the server answers its
            # first request (health check or query) only when queries are fast.
            if searcher.encoder is not None:
                searcher.encoder.warm_up()
            app = create_app(searcher, cfg)  # the app closes the searcher on shutdown
        except BaseException:
            searcher.close()
            raise
        for name in ("rscir.serve", "uvicorn.error"):
            logging.getLogger(name).setLevel(logging.INFO)
        server = make_server(app, sock, graceful_s=a.graceful_timeout,
                             header_timeout_s=a.header_timeout, max_connections=a.max_connections)
        print(f"rscir serve: {url_of(sock)}/ (API docs at /docs; Ctrl-C to stop)",
              file=sys.stderr, flush=True)
        server.run(sockets=[sock])
        if not server.started:
            raise ServerError("the server failed to start (see the log above)")
    finally:
        sock.close()
    return 0
