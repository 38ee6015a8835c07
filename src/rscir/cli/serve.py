"""`rscir serve SOURCE`: the HTTP API and web page on a store directory or a Postgres URI."""

from __future__ import annotations

import argparse
import logging
import sys

from .core import add_model_args
from .extras import SERVE_MODULES, require


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
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
    g.add_argument("--max-k", type=int, default=200, help="most results per λ")
    g.add_argument("--graceful-timeout", type=int, default=10,
                   help="seconds running requests get to finish on shutdown")
    p.set_defaults(func=cmd_serve)


def cmd_serve(a: argparse.Namespace) -> int:
    require(SERVE_MODULES, "rscir serve")  # before any import or model load: one line
    from ..api import open_searcher
    from ..serve import ServeConfig, create_app
    from ..serve.server import bind_socket, is_loopback, make_server, url_of

    for name, v in (("--workers", a.workers), ("--max-k", a.max_k), ("--max-pixels", a.max_pixels)):
        if v < 1:
            raise ValueError(f"{name} must be >= 1")
    if not a.max_upload_mb > 0:
        raise ValueError("--max-upload-mb must be > 0")
    cfg = ServeConfig(max_upload_bytes=int(a.max_upload_mb * 1024 * 1024),
                      max_pixels=a.max_pixels, max_k=a.max_k, workers=a.workers)
    sock = bind_socket(a.host, a.port)  # fails fast, before the model loads
    try:
        if not is_loopback(a.host):
            print(f"rscir serve: warning: listening on {a.host}, not loopback: anyone who can "
                  "reach this address can search the archive and read its images",
                  file=sys.stderr)
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
        server = make_server(app, sock, graceful_s=a.graceful_timeout)
        print(f"rscir serve: {url_of(sock)}/ (API docs at /docs; Ctrl-C to stop)",
              file=sys.stderr, flush=True)
        server.run(sockets=[sock])
        if not server.started:
            raise RuntimeError("the server failed to start (see the log above)")
    finally:
        sock.close()
    return 0
