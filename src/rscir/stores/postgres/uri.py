"""Postgres store addresses: ``postgresql://USER@HOST/DB?schema=NAME`` (no psycopg needed)."""

from __future__ import annotations

import re
import urllib.parse

from ...errors import InvalidArgumentError

SCHEMES = ("postgresql://", "postgres://")

DEFAULT_SCHEMA = "rscir"
_SCHEMA_RE = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")


def is_pg_uri(location: object) -> bool:
    """True for ``postgresql://`` / ``postgres://`` store addresses."""
    return isinstance(location, str) and location.startswith(SCHEMES)


def split_uri(uri: str) -> tuple[str, str]:
    """(libpq conninfo without our ``schema`` parameter, schema name)."""
    if not is_pg_uri(uri):
        raise InvalidArgumentError(f"not a postgresql:// URI: {uri!r}")
    parts = urllib.parse.urlsplit(uri)
    query = urllib.parse.parse_qsl(parts.query, keep_blank_values=True)
    schema = DEFAULT_SCHEMA
    rest = []
    for k, v in query:
        if k == "schema":
            schema = v
        else:
            rest.append((k, v))
    if not _SCHEMA_RE.match(schema):
        raise InvalidArgumentError(f"schema must match {_SCHEMA_RE.pattern}, got {schema!r}")
    conninfo = urllib.parse.urlunsplit(parts._replace(query=urllib.parse.urlencode(rest)))
    return conninfo, schema


def redact_uri(uri: str) -> str:
    """The URI without its password (in the user part or a ``password=`` parameter), for logs,
    error messages and ``/info``."""
    parts = urllib.parse.urlsplit(uri)
    netloc, query = parts.netloc, parts.query
    if parts.password:
        netloc = netloc.replace(f":{parts.password}@", ":***@", 1)
    pairs = urllib.parse.parse_qsl(query, keep_blank_values=True)
    if any(key.lower() == "password" for key, _ in pairs):
        query = urllib.parse.urlencode(
            [(key, "***" if key.lower() == "password" else v) for key, v in pairs], safe="*")
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc, query=query))
