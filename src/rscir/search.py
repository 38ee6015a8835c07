"""Composed search over a store: encode the query once, score the archive, return top-k hits.

Scoring is exact and vectorized over the archive (in row chunks, so float16 stores are converted
a slice at a time) and over batches of queries.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .encoders.base import Encoder, ImageLike, l2_normalize
from .scoring import NEEDS_IMAGE, NEEDS_TEXT, QueryStats, check_lam, check_method, fuse, topk
from .store import Store

QueryImage = str | os.PathLike[str] | ImageLike


@dataclass(frozen=True)
class ItemFilter:
    """Metadata restrictions on results: any of ``labels`` (matches ``label`` or ``labels``) and
    a lon/lat bounding box ``(min_lon, min_lat, max_lon, max_lat)``. Filtering never changes the
    WeiCom normalization, which is always over the whole archive."""

    labels: tuple[str, ...] = ()
    bbox: tuple[float, float, float, float] | None = None

    def is_empty(self) -> bool:
        return not self.labels and self.bbox is None

    def mask(self, items: pd.DataFrame) -> np.ndarray:
        """Boolean (N,) of items that pass."""
        keep = np.ones(len(items), dtype=bool)
        if self.labels:
            want = set(self.labels)
            single = items["label"].isin(want).to_numpy()
            multi = np.fromiter((bool(want.intersection(v)) for v in items["labels"]), bool, len(items))
            keep &= single | multi
        if self.bbox is not None:
            x0, y0, x1, y1 = self.bbox
            if x0 > x1 or y0 > y1:
                raise ValueError("bbox must be (min_lon, min_lat, max_lon, max_lat)")
            lon, lat = items["lon"].to_numpy(), items["lat"].to_numpy()
            keep &= (lon >= x0) & (lon <= x1) & (lat >= y0) & (lat <= y1)
        return keep


@dataclass(frozen=True)
class Hit:
    rank: int
    id: int
    path: str
    score: float
    label: str | None = None


@dataclass
class SearchResult:
    hits: list[Hit]
    method: str
    lam: float
    texts: list[str] = field(default_factory=list)
    query_id: int | None = None

    def to_frame(self) -> pd.DataFrame:
        return pd.DataFrame([asdict(h) for h in self.hits], columns=["rank", "id", "path", "score", "label"])

    def to_records(self) -> list[dict[str, Any]]:
        return [asdict(h) for h in self.hits]


class Searcher:
    """Answers composed queries on one store with the encoder it was built with."""

    def __init__(self, store: Store, encoder: Encoder | None, *, chunk_rows: int = 1 << 16) -> None:
        if encoder is not None:
            store.check_model(encoder.info)
        self.store = store
        self.encoder = encoder
        self.chunk_rows = chunk_rows

    # ----------------------------------------------------------------- query encoding
    def _require_encoder(self) -> Encoder:
        if self.encoder is None:
            raise RuntimeError("this searcher has no encoder: pass one to embed images or texts")
        return self.encoder

    def image_vector(self, image: QueryImage) -> tuple[np.ndarray, int | None]:
        """Embedding of a query image (path, PIL, array) and its archive row if it is an item."""
        from .ingest import load_image

        if isinstance(image, str | os.PathLike):
            p = Path(image)
            if not p.is_file():
                raise FileNotFoundError(f"query image not found: {p}")
            row = self._row_of_file(p)
            if row is not None:
                return np.asarray(self.store.embeddings[row], dtype=np.float32), row
            pil, _ = load_image(p)
            return self._require_encoder().encode_images([pil])[0], None
        return self._require_encoder().encode_images([image])[0], None

    def _row_of_file(self, p: Path) -> int | None:
        root = Path(self.store.root).resolve()
        rp = p.resolve()
        if root not in rp.parents:
            return None
        rows = self.store.rows_for_paths([rp.relative_to(root).as_posix()])
        if rows[0] < 0:
            return None
        st = p.stat()
        item = self.store.items.iloc[int(rows[0])]
        # a changed file on disk is not the indexed one: embed it afresh
        if int(item["size"]) != st.st_size or int(item["mtime_ns"]) != st.st_mtime_ns:
            return None
        return int(rows[0])

    def text_vector(self, texts: str | Sequence[str]) -> np.ndarray:
        """Several modifiers are averaged in embedding space, then re-normalized."""
        tl = [texts] if isinstance(texts, str) else list(texts)
        tl = [t.strip() for t in tl if t and t.strip()]
        if not tl:
            raise ValueError("empty text modifier")
        return l2_normalize(self._require_encoder().encode_texts(tl).mean(axis=0))

    # ----------------------------------------------------------------- scoring
    def similarities(self, vecs: np.ndarray) -> np.ndarray:
        """Cosine similarities (Q, N) float32 of query vectors against every live item."""
        x = self.store.embeddings
        q = np.atleast_2d(np.asarray(vecs, dtype=np.float32))
        out = np.empty((q.shape[0], x.shape[0]), np.float32)
        for s in range(0, x.shape[0], self.chunk_rows):
            out[:, s : s + self.chunk_rows] = q @ np.asarray(x[s : s + self.chunk_rows], np.float32).T
        return out

    def scores(
        self,
        img: np.ndarray | None,
        txt: np.ndarray | None,
        method: str = "weicom",
        lam: float = 0.5,
    ) -> np.ndarray:
        """Fused scores (Q, N) for every live item."""
        check_method(method)
        si = self.similarities(img) if img is not None and method in NEEDS_IMAGE else None
        st = self.similarities(txt) if txt is not None and method in NEEDS_TEXT else None
        if method == "weicom":
            return fuse(method, si, st, lam,
                        img_stats=QueryStats.of(si) if si is not None else None,
                        txt_stats=QueryStats.of(st) if st is not None else None)
        return fuse(method, si, st, lam)

    def search_vectors(
        self,
        img: np.ndarray | None,
        txt: np.ndarray | None,
        method: str = "weicom",
        lam: float = 0.5,
        k: int = 20,
        exclude_rows: Sequence[int | None] | None = None,
        where: ItemFilter | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-k (rows (Q,k), scores (Q,k)) for batches of query vectors (either may be None).

        Rows in ``exclude_rows`` (one per query) and rows failing ``where`` are never returned;
        fewer than k rows come back only when fewer than k rows qualify."""
        check_method(method)
        check_lam(lam)
        if len(self.store) == 0:
            q = np.atleast_2d(img if img is not None else txt).shape[0]
            return np.zeros((q, 0), np.int64), np.zeros((q, 0), np.float32)
        s = np.array(self.scores(img, txt, method, lam), dtype=np.float64, copy=True)
        if exclude_rows is not None:
            for qi, r in enumerate(exclude_rows):
                if r is not None and r >= 0:
                    s[qi, r] = -np.inf
        if where is not None and not where.is_empty():
            s[:, ~where.mask(self.store.items)] = -np.inf
        rows, vals = topk(s, k)
        if exclude_rows is not None or where is not None:  # never return an excluded row
            keep = np.isfinite(vals)
            if not keep.all():
                kk = int(keep.sum(axis=1).min())
                rows, vals = rows[:, :kk], vals[:, :kk]
        return rows, vals

    def search(
        self,
        image: QueryImage | None = None,
        text: str | Sequence[str] | None = None,
        *,
        item_id: int | None = None,
        lam: float = 0.5,
        k: int = 20,
        method: str = "weicom",
        exclude_query: bool = True,
        where: ItemFilter | None = None,
    ) -> SearchResult:
        """One composed query: an image (file, PIL, array) or an archive item id, plus text."""
        if image is not None and item_id is not None:
            raise ValueError("give a query image or an item id, not both")
        img_vec: np.ndarray | None = None
        row: int | None = None
        if item_id is not None:
            row = int(self.store.rows_for_ids([item_id])[0])
            img_vec = np.asarray(self.store.embeddings[row], np.float32)
        elif image is not None:
            img_vec, row = self.image_vector(image)
        texts = [] if text is None else ([text] if isinstance(text, str) else list(text))
        txt_vec = self.text_vector(texts) if texts else None
        if method in NEEDS_IMAGE and img_vec is None:
            raise ValueError(f"method {method!r} needs a query image (--image or --item-id)")
        if method in NEEDS_TEXT and txt_vec is None:
            raise ValueError(f"method {method!r} needs a text modifier (--text)")
        rows, vals = self.search_vectors(
            img_vec[None] if img_vec is not None else None,
            txt_vec[None] if txt_vec is not None else None,
            method,
            lam,
            k,
            exclude_rows=[row] if exclude_query and row is not None else None,
            where=where,
        )
        items = self.store.items
        sel = items.iloc[rows[0]]
        hits = [
            Hit(rank=i + 1, id=int(iid), path=str(p), score=float(v),
                label=None if lab is None else str(lab))
            for i, (iid, p, lab, v) in enumerate(
                zip(sel["id"].tolist(), sel["path"].tolist(), sel["label"].tolist(), vals[0].tolist(),
                    strict=True)
            )
        ]
        qid = int(items["id"].iloc[row]) if row is not None else None
        return SearchResult(hits=hits, method=method, lam=float(lam), texts=texts, query_id=qid)
