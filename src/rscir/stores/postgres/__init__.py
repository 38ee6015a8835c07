"""The PostgreSQL/pgvector store: the store (:mod:`.store`), its wire format (:mod:`.wire`),
connections (:mod:`.pool`) and addresses (:mod:`.uri`). Needs the ``pg`` extra (psycopg)."""

from .store import PostgresStore
from .uri import redact_uri, split_uri

__all__ = ["PostgresStore", "redact_uri", "split_uri"]
