"""HTTP API and web page for composed search (``rscir serve``)."""

from __future__ import annotations

from .app import ServeConfig, create_app

__all__ = ["ServeConfig", "create_app"]
