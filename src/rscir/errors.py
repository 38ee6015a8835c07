"""One error hierarchy for rscir (as torchgeo's ``datasets/errors.py``).

Every error rscir raises on purpose derives from :class:`RscirError`, so the command line and
the server catch one type and print one line. Each also derives from the builtin it resembles
(``ValueError``, ``KeyError``, ``FileNotFoundError``, ``RuntimeError``, ``ImportError``), so code
written against the builtins keeps working. Messages say what is wrong *and* how to fix it.
"""

from __future__ import annotations


class RscirError(Exception):
    """Base of every error rscir raises on purpose; the message says how to fix it."""


class InvalidArgumentError(RscirError, ValueError):
    """An argument is out of range or of the wrong form (``k``, ``λ``, a method name, ...)."""


class QueryError(InvalidArgumentError):
    """A query that cannot be answered as asked (e.g. a method that needs text got none)."""


class UnknownItemError(RscirError, KeyError):
    """An item id (or path) that the store does not hold."""

    def __str__(self) -> str:  # KeyError quotes its message; ours is a sentence
        return str(self.args[0]) if self.args else "unknown item"


class PathNotFoundError(RscirError, FileNotFoundError):
    """A file or folder named by the user does not exist."""


class ImageDecodeError(RscirError, ValueError):
    """A file could not be turned into an image; the message is the reason."""


class UntrustedFileError(RscirError, ValueError):
    """A file would run code or is not of the format it claims (pickles, weights)."""


class MissingDependencyError(RscirError, ImportError):
    """An optional dependency is not installed; the message names the ``pip install`` to run."""


class ServerError(RscirError, OSError):
    """The HTTP server cannot listen or start (port in use, bad host, ...)."""


class ModelError(RscirError, RuntimeError):
    """Base of the model errors."""


class ModelUnavailableError(ModelError):
    """The weights of a model cannot be obtained (offline hub, missing file); says how to fix."""


class ModelMismatchError(ModelError):
    """A store or checkpoint was built for another model than the one given."""


class StoreError(RscirError, RuntimeError):
    """A store cannot be opened or written (missing, locked, wrong model, ...)."""


class StoreLockedError(StoreError):
    """Another process writes (or creates) the store."""


class StoreExistsError(StoreError):
    """A store already exists where a new one was to be created."""


class StoreDamagedError(StoreError):
    """A store's files or tables do not agree with what it recorded; names verify/repair."""


class StaleIndexError(StoreError):
    """A derived index (ANN) was built from an older generation of the store."""


def missing_dependency(module: str, extra: str, what: str) -> MissingDependencyError:
    """The error for an optional module that is not installed, naming the extra to install."""
    return MissingDependencyError(
        f"{what} needs the Python package {module!r}, which is not installed: "
        f"pip install 'rscir[{extra}]'"
    )
