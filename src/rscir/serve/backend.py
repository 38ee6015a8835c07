"""One interface over the embedded store (:class:`rscir.search.Searcher`) and Postgres
(:class:`rscir.pgstore.PgSearcher`), so the HTTP layer never cares where the archive lives."""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence
from pathlib import Path
from typing import Any, Protocol, TypeVar

import numpy as np
import pandas as pd
from PIL import Image

from ..encoders.base import Encoder
from ..search.searcher import ItemFilter, Searcher

V = TypeVar("V")


class LRU:
    """A small thread-safe least-recently-used cache (text embeddings, uploads, thumbnails)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._d: OrderedDict[Hashable, Any] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: Hashable) -> Any | None:
        with self._lock:
            if key not in self._d:
                return None
            self._d.move_to_end(key)
            return self._d[key]

    def put(self, key: Hashable, value: Any) -> None:
        with self._lock:
            self._d[key] = value
            self._d.move_to_end(key)
            while len(self._d) > self.size:
                self._d.popitem(last=False)

    def get_or_make(self, key: Hashable, make: Callable[[], V]) -> V:
        hit = self.get(key)
        if hit is None:
            hit = make()
            self.put(key, hit)
        return hit


class Backend(Protocol):
    """What the server needs from a store + model."""

    kind: str
    encoder: Encoder | None

    def info(self) -> dict[str, Any]: ...
    def encode_image(self, image: Image.Image) -> np.ndarray: ...
    def encode_texts(self, texts: Sequence[str]) -> np.ndarray: ...
    def item_vector(self, item_id: int) -> np.ndarray: ...
    def search(self, img: np.ndarray | None, txt: np.ndarray | None, method: str,
               lams: Sequence[float], k: int, exclude_id: int | None,
               where: ItemFilter | None) -> list[tuple[np.ndarray, np.ndarray]]: ...
    def items(self, ids: Sequence[int]) -> pd.DataFrame: ...
    def list_items(self, offset: int, limit: int, label: str | None) -> tuple[int, pd.DataFrame]: ...
    def labels(self) -> list[tuple[str, int]]: ...
    def resolve(self, rel: str) -> Path: ...
    def close(self) -> None: ...


def _text_vector(encoder: Encoder | None, texts: Sequence[str]) -> np.ndarray:
    from ..encoders.base import l2_normalize

    if encoder is None:
        raise RuntimeError("the server has no model loaded")
    tl = [t.strip() for t in texts if t and t.strip()]
    if not tl:
        raise ValueError("empty text modifier")
    return l2_normalize(encoder.encode_texts(tl).mean(axis=0))


def _label_counts(items: pd.DataFrame) -> list[tuple[str, int]]:
    """Counts of every label in ``label`` or ``labels`` (an item counts once per label)."""
    per_item = [set(ls) | ({lab} if lab else set())
                for lab, ls in zip(items["label"], items["labels"], strict=True)]
    s = pd.Series([x for sset in per_item for x in sset], dtype=object)
    vc = s.value_counts()
    return sorted(((str(k), int(v)) for k, v in vc.items()), key=lambda t: t[0])


def _page(items: pd.DataFrame, offset: int, limit: int, label: str | None) -> tuple[int, pd.DataFrame]:
    if label:
        items = items[ItemFilter(labels=(label,)).mask(items)]
    return len(items), items.iloc[offset : offset + limit]


class EmbeddedBackend:
    """The on-disk store, scored exactly by :class:`Searcher` (numpy; thread-safe reads)."""

    kind = "embedded"

    def __init__(self, searcher: Searcher) -> None:
        self.searcher = searcher
        self.store = searcher.store
        self.encoder = searcher.encoder

    def info(self) -> dict[str, Any]:
        return {"backend": self.kind, **self.store.info()}

    def encode_image(self, image: Image.Image) -> np.ndarray:
        if self.encoder is None:
            raise RuntimeError("the server has no model loaded")
        return self.encoder.encode_images([image])[0]

    def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        return _text_vector(self.encoder, texts)

    def item_vector(self, item_id: int) -> np.ndarray:
        row = int(self.store.rows_for_ids([item_id])[0])
        return np.asarray(self.store.embeddings[row], np.float32)

    def search(self, img: np.ndarray | None, txt: np.ndarray | None, method: str,
               lams: Sequence[float], k: int, exclude_id: int | None,
               where: ItemFilter | None) -> list[tuple[np.ndarray, np.ndarray]]:
        excl = None
        if exclude_id is not None:
            excl = [int(self.store.rows_for_ids([exclude_id])[0])]
        ids = self.store.ids
        out = []
        for lam in lams:
            rows, vals = self.searcher.search_vectors(
                None if img is None else img[None], None if txt is None else txt[None],
                method, lam, k, exclude_rows=excl, where=where)
            out.append((ids[rows[0]], vals[0].astype(np.float64)))
        return out

    def items(self, ids: Sequence[int]) -> pd.DataFrame:
        if not len(ids):
            return self.store.items.iloc[:0]
        return self.store.items.iloc[self.store.rows_for_ids(list(ids))].reset_index(drop=True)

    def list_items(self, offset: int, limit: int, label: str | None) -> tuple[int, pd.DataFrame]:
        return _page(self.store.items, offset, limit, label)

    def labels(self) -> list[tuple[str, int]]:
        return _label_counts(self.store.items)

    def resolve(self, rel: str) -> Path:
        return self.store.resolve_path(rel)

    def close(self) -> None:
        self.store.close()


class PgBackend:
    """A Postgres/pgvector store (:class:`rscir.pgstore.PgSearcher`)."""

    kind = "postgres"

    def __init__(self, searcher: Any) -> None:
        self.searcher = searcher
        self.store = searcher.store
        self.encoder = searcher.encoder

    def info(self) -> dict[str, Any]:
        self.store.refresh()
        return self.store.info()

    def encode_image(self, image: Image.Image) -> np.ndarray:
        if self.encoder is None:
            raise RuntimeError("the server has no model loaded")
        return self.encoder.encode_images([image])[0]

    def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        return _text_vector(self.encoder, texts)

    def item_vector(self, item_id: int) -> np.ndarray:
        return self.searcher.item_vector(item_id)

    def search(self, img: np.ndarray | None, txt: np.ndarray | None, method: str,
               lams: Sequence[float], k: int, exclude_id: int | None,
               where: ItemFilter | None) -> list[tuple[np.ndarray, np.ndarray]]:
        res = self.searcher.search_ids(img, txt, method, list(lams), k, exclude_id=exclude_id,
                                       where=where)
        return [(ids, scores) for ids, scores, _ in res]

    def items(self, ids: Sequence[int]) -> pd.DataFrame:
        return self.store.items_for_ids(list(ids))

    def list_items(self, offset: int, limit: int, label: str | None) -> tuple[int, pd.DataFrame]:
        self.store.refresh()
        return _page(self.store.items, offset, limit, label)

    def labels(self) -> list[tuple[str, int]]:
        self.store.refresh()
        return _label_counts(self.store.items)

    def resolve(self, rel: str) -> Path:
        return self.store.resolve_path(rel)

    def close(self) -> None:
        self.searcher.close()


def open_backend(source: Any, **model_kwargs: Any) -> Backend:
    """A backend from a store directory, a ``postgresql://`` URI, or an open searcher."""
    from ..stores.postgres.store import PgSearcher, is_pg_uri, open_pg_searcher

    if isinstance(source, Searcher):
        return EmbeddedBackend(source)
    if isinstance(source, PgSearcher):
        return PgBackend(source)
    if is_pg_uri(source):
        return PgBackend(open_pg_searcher(source, **model_kwargs))
    if isinstance(source, str | os.PathLike):
        from ..api import open_searcher

        return EmbeddedBackend(open_searcher(source, **model_kwargs))
    if all(hasattr(source, a) for a in ("search", "items", "resolve", "info")):
        return source  # already a backend
    raise TypeError(f"cannot serve {type(source).__name__}: give a store directory, a "
                    "postgresql:// URI or a Searcher")
