"""The PostgreSQL/pgvector store (imported lazily: psycopg is an optional dependency)."""

from .store import PgSearcher, PgStore, is_pg_uri, redact_uri, split_uri

__all__ = ["PgSearcher", "PgStore", "is_pg_uri", "redact_uri", "split_uri"]
