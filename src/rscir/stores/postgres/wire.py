"""pgvector's binary wire formats and our byte packing of moments.

halfvec_send / vector_send: int16 dim, int16 unused, then dim big-endian float16 / float32
values. Written here because pgvector-python is not a dependency and binary transfer avoids
formatting and parsing floats as text for every row.
"""

from __future__ import annotations

import struct
from typing import Any

import numpy as np

from ...errors import StoreError


def make_adapters(conn: Any) -> None:
    from psycopg.adapt import Dumper, Loader
    from psycopg.pq import Format
    from psycopg.types import TypeInfo

    for tname, be in (("halfvec", ">f2"), ("vector", ">f4")):
        info = TypeInfo.fetch(conn, tname)
        if info is None:
            raise StoreError("the pgvector extension is not installed in this database")

        class _Load(Loader):
            format = Format.BINARY
            _dt = be

            def load(self, data: Any) -> np.ndarray:
                b = bytes(data)
                (dim,) = struct.unpack_from(">H", b)
                return np.frombuffer(b, self._dt, dim, 4).astype(np.float32)

        class _Dump(Dumper):
            format = Format.BINARY
            oid = info.oid
            _dt = be

            def dump(self, obj: Any) -> bytes:
                a = np.asarray(obj).ravel()
                return struct.pack(">HH", a.shape[0], 0) + a.astype(self._dt).tobytes()

        info.register(conn)  # lets COPY name the type
        conn.adapters.register_loader(info.oid, _Load)
        # registered under a private class so it never captures ordinary parameters; COPY's
        # set_types() finds it by the type's oid (query vectors are sent as text literals)
        marker = type(f"_{tname}_param", (), {})
        conn.adapters.register_dumper(marker, _Dump)


def pack(a: np.ndarray) -> bytes:
    return np.ascontiguousarray(a, dtype="<f8").tobytes()


def unpack(b: bytes, shape: tuple[int, ...]) -> np.ndarray:
    return np.frombuffer(bytes(b), "<f8").reshape(shape).copy()


def vec_literal(v: np.ndarray) -> str:
    """Text form of a query vector; repr of float32 values round-trips exactly."""
    return "[" + ",".join(repr(float(x)) for x in np.asarray(v, np.float32)) + "]"
