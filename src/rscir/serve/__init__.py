"""HTTP API and web page for composed search (``rscir serve``)."""

from __future__ import annotations

from .app import ServeConfig, create_app
from .backend import Backend, EmbeddedBackend, PgBackend, open_backend

__all__ = ["Backend", "EmbeddedBackend", "PgBackend", "ServeConfig", "create_app", "open_backend"]
