"""The PatternCom composed-retrieval protocol (Psomas et al., IGARSS 2024), exact and fast.

Rules (the issue's wording is authoritative; they match the reference ``evaluate.py``):

* Layout ``PatternNet/images/<class>/<file>.jpg`` and ``PatternNet/PatternCom/<attribute>.csv``
  with rows ``filename,attribute,value`` and no header. A file's class is its name up to the
  first digit.
* Every CSV row is a query image; its texts are the *other* values the same attribute takes for
  the same class in that CSV. When grouping values, some classes are merged, each merge only
  within its own attribute (:data:`ATTRIBUTE_MERGES`).
* A database image is relevant to (query, text) when its (merged, :data:`CLASS_MERGES`) class
  equals the query's and the CSV gives it exactly that value. The CSV is looked up by file name
  through a dict, so with duplicate rows for one file the *last* row wins; images absent from
  the CSV are never relevant.
* The database is every image, the query included. AP over the full ranking (0 without relevant
  images), in percent rounded to 2 decimals per pair, averaged per attribute; ``avg`` is the mean
  of the attribute means. P@k and R@k likewise.

* WeiCom normalizes each query's similarities with their mean and unbiased std over the whole
  database and maps them through the reference's own ``0.5·(1 + erf(z/√2))`` in float32. At λ = 0
  and λ = 1 WeiCom ranks exactly as the raw image / text similarities (the normalization is
  strictly increasing), so those rankings are used: float32 Φ saturates at 1 for z > 5.4, which
  would otherwise tie the best matches arbitrarily.

Why it is fast: AP, P@k and R@k need only the rank of each relevant item, i.e. how many items
score higher (plus the tie rule), so no ranking is materialized. Image similarities are one
float32 matrix product per chunk of query images (the same product and normalization as
before, so every score is bit-identical), normalized once for every λ; rankings that do not
depend on the text (image only) or on the image (text only) are sorted once per image or text;
fused rows are computed into reused buffers a few pairs at a time and sorted while in cache
(numpy's SIMD sort); each relevant item's rank is then a binary search in its sorted row
(:func:`rscir.bench.metrics.ranks_in_sorted_rows`). Ties are broken by database order (a stable
descending sort); the reference's GPU ``argsort`` breaks them arbitrarily.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import pickle
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from threadpoolctl import threadpool_limits

from ..errors import InvalidArgumentError, PathNotFoundError, UntrustedFileError
from ..moments import ArchiveMoments
from ..scoring import METHODS, QueryStats, check_lam, check_method, fuse
from .metrics import (
    average_precision_from_ranks,
    precision_recall_at_k,
    ranks_in_sorted_rows,
    sort_rows,
    sort_rows_above,
)

log = logging.getLogger(__name__)

ATTRIBUTES: tuple[str, ...] = ("color", "context", "density", "existence", "quantity", "shape")
KS: tuple[int, ...] = (5, 10, 15, 20)
DEFAULT_MEMORY_CAP = 1 << 30  # bytes of similarity matrices held at once

# Merged classes for relevance (all attributes).
CLASS_MERGES: dict[str, str] = {
    "denseresidential": "residential",
    "sparseresidential": "residential",
    "closedroad": "road",
    "intersection": "road",
    "bridge": "roadpass",
    "overpass": "roadpass",
    "ferryterminal": "pier",
    "harbor": "pier",
    "parkingspace": "parking",
    "parkinglot": "parking",
}
# Merges used when grouping a class's values into query texts: only within their attribute.
ATTRIBUTE_MERGES: dict[str, dict[str, str]] = {
    "density": {"denseresidential": "residential", "sparseresidential": "residential"},
    "shape": {"closedroad": "road", "intersection": "road"},
    "context": {"bridge": "roadpass", "overpass": "roadpass"},
    "existence": {
        "ferryterminal": "pier",
        "harbor": "pier",
        "parkingspace": "parking",
        "parkinglot": "parking",
    },
}

_DIGIT = re.compile(r"\d")


def class_of(filename: str) -> str:
    """PatternNet class of a file: its base name up to the first digit."""
    return _DIGIT.split(os.path.basename(filename), maxsplit=1)[0]


def merged_class(cls: str) -> str:
    return CLASS_MERGES.get(cls, cls)


# --------------------------------------------------------------------------- CSV and pairs
@dataclass(frozen=True)
class AttributeCSV:
    """The rows of one PatternCom attribute file, in file order."""

    attribute: str
    filenames: list[str]
    attributes: list[str]
    values: list[str]

    def __len__(self) -> int:
        return len(self.filenames)


def read_attribute_csv(path: str | os.PathLike[str], attribute: str | None = None) -> AttributeCSV:
    """Parse ``filename,attribute,value`` rows (no header; blank lines skipped)."""
    p = Path(path)
    if not p.is_file():
        raise PathNotFoundError(f"PatternCom file {p} is missing")
    names: list[str] = []
    attrs: list[str] = []
    vals: list[str] = []
    with open(p, newline="", encoding="utf-8-sig") as f:
        for lineno, row in enumerate(csv.reader(f), start=1):
            while row and row[-1] == "":
                row = row[:-1]
            if not row:
                continue
            if len(row) != 3:
                raise InvalidArgumentError(
                    f"{p}:{lineno}: expected 3 fields filename,attribute,value, got {len(row)}: {row}"
                )
            names.append(row[0])
            attrs.append(row[1])
            vals.append(row[2])
    return AttributeCSV(attribute or p.stem, names, attrs, vals)


@dataclass(frozen=True)
class Pairs:
    """The (query, text) pairs of one attribute and the relevant database rows of each.

    ``csv_row``/``query``/``text``/``group`` are (P,) arrays: the CSV row of the query, its
    database row, the index of its text in ``texts`` and its relevance group; ``relevant[g]`` are
    the database rows relevant to group ``g`` (a merged class and a value).
    """

    attribute: str
    csv: AttributeCSV
    csv_row: np.ndarray
    query: np.ndarray
    text: np.ndarray
    group: np.ndarray
    texts: list[str]
    relevant: list[np.ndarray]
    missing_queries: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.csv_row)

    def n_relevant(self) -> np.ndarray:
        counts = np.array([len(r) for r in self.relevant], dtype=np.int64)
        return counts[self.group] if len(self.group) else np.zeros(0, np.int64)

    def query_files(self) -> list[str]:
        return [self.csv.filenames[r] for r in self.csv_row]

    def text_values(self) -> list[str]:
        return [self.texts[t] for t in self.text]


def database_lookup(names: Sequence[str]) -> dict[str, int]:
    """Base name → database row (the last row wins for duplicate names, as in the reference)."""
    return {os.path.basename(n): i for i, n in enumerate(names)}


def build_pairs(
    table: AttributeCSV, db_names: Sequence[str], *, skip_missing: bool = False
) -> Pairs:
    """The query/text pairs and relevance of one attribute over a database of file names."""
    attribute = table.attribute
    n_rows = len(table)
    classes = [class_of(f) for f in table.filenames]
    merges = ATTRIBUTE_MERGES.get(attribute, {})
    group_cls = [
        merges.get(c, c) if a == attribute else c
        for c, a in zip(classes, table.attributes, strict=True)
    ]
    # Values taken by each (row attribute, grouping class); texts = the others, sorted.
    values_of: dict[tuple[str, str], set[str]] = {}
    for a, c, v in zip(table.attributes, group_cls, table.values, strict=True):
        values_of.setdefault((a, c), set()).add(v)

    # Relevance: a database image's CSV row is the last row with its file name.
    last_row = {f: i for i, f in enumerate(table.filenames)}
    db_base = [os.path.basename(n) for n in db_names]
    db_row = np.array([last_row.get(b, -1) for b in db_base], dtype=np.int64)
    in_csv = np.flatnonzero(db_row >= 0)
    keys = pd.DataFrame(
        {
            "db": in_csv,
            "cls": [merged_class(classes[r]) for r in db_row[in_csv]],
            "value": [table.values[r] for r in db_row[in_csv]],
        }
    )
    rel_by_key: dict[tuple[str, str], np.ndarray] = {
        (str(k[0]), str(k[1])): np.sort(g["db"].to_numpy(np.int64))
        for k, g in keys.groupby(["cls", "value"], sort=True)
    }

    lookup = database_lookup(db_names)
    missing = [f for f in table.filenames if f not in lookup]
    if missing and not skip_missing:
        raise InvalidArgumentError(
            f"{len(missing)} of {n_rows} query images of {attribute!r} are not in the database "
            f"(e.g. {missing[:3]}); index all PatternNet images or pass --skip-missing"
        )
    texts: list[str] = []
    text_id: dict[str, int] = {}
    groups: list[np.ndarray] = []
    group_id: dict[tuple[str, str], int] = {}
    csv_row, query, text, group = [], [], [], []
    empty = np.zeros(0, np.int64)
    for r in range(n_rows):
        q = lookup.get(table.filenames[r])
        if q is None:
            continue
        others = sorted(values_of[(table.attributes[r], group_cls[r])] - {table.values[r]})
        qcls = merged_class(classes[r])
        for t in others:
            if t not in text_id:
                text_id[t] = len(texts)
                texts.append(t)
            key = (qcls, t)
            if key not in group_id:
                group_id[key] = len(groups)
                groups.append(rel_by_key.get(key, empty))
            csv_row.append(r)
            query.append(q)
            text.append(text_id[t])
            group.append(group_id[key])
    as_arr = lambda x: np.asarray(x, dtype=np.int64)  # noqa: E731
    return Pairs(
        attribute, table, as_arr(csv_row), as_arr(query), as_arr(text), as_arr(group),
        texts, groups, missing,
    )


# --------------------------------------------------------------------------- configurations
@dataclass(frozen=True)
class Config:
    """One scoring configuration: a method and (for WeiCom) its λ."""

    method: str
    lam: float | None = None

    @property
    def label(self) -> str:
        return self.method if self.lam is None else f"{self.method}@{self.lam:g}"


def make_configs(methods: Iterable[str], lams: Iterable[float]) -> list[Config]:
    """``weicom`` once per λ; every other method once (it does not depend on λ)."""
    lams = [check_lam(x) for x in lams] or [0.5]
    out: list[Config] = []
    for m in methods:
        check_method(m)
        cfgs = [Config(m, lam) for lam in lams] if m == "weicom" else [Config(m)]
        out.extend(c for c in cfgs if c not in out)
    if not out:
        raise InvalidArgumentError("no methods given")
    return out


def parse_lams(specs: Sequence[str] | str) -> list[float]:
    """λ values from ``0.5``, ``0.3 0.5``, ``0.3,0.5`` or a sweep ``start:stop:step`` (inclusive)."""
    if isinstance(specs, str):
        specs = [specs]
    out: list[float] = []
    for spec in specs:
        for part in str(spec).replace(",", " ").split():
            if ":" in part:
                bits = part.split(":")
                if len(bits) != 3:
                    raise InvalidArgumentError(f"a λ sweep is start:stop:step, got {part!r}")
                a, b, s = (float(x) for x in bits)
                if s <= 0 or b < a:
                    raise InvalidArgumentError(f"bad λ sweep {part!r}: need step > 0 and stop >= start")
                n = int(np.floor((b - a) / s + 1e-9)) + 1
                out.extend(round(a + i * s, 10) for i in range(n))
            else:
                try:
                    out.append(float(part))
                except ValueError as e:
                    raise InvalidArgumentError(f"bad λ value {part!r}") from e
    for x in out:
        check_lam(x)
    return list(dict.fromkeys(out))


def normalize_cdf(
    sims: np.ndarray, stats: QueryStats, out: np.ndarray | None = None
) -> np.ndarray:
    """WeiCom's per-query normalization Φ((s − mean)/std) as the reference computes it,
    ``0.5·(1 + erf(z/√2))`` in float32 (into ``out``, else a new array). Hand-written instead of
    :func:`rscir.scoring.norm_cdf` (scipy's ``ndtr``) because torch's vectorized ``erf`` is ~10×
    faster here and is the reference's formula; the two agree to float32 rounding. Elementwise:
    a block of rows gives the same bits as the whole matrix (the tests check it)."""
    if out is None:
        out = np.array(sims, dtype=np.float32, copy=True)
    else:
        np.copyto(out, sims)
    t = torch.from_numpy(out)
    std = np.where(stats.std > 0, stats.std, 1.0) * np.sqrt(2.0)
    t.sub_(torch.from_numpy(np.asarray(stats.mean, dtype=np.float32)))
    t.div_(torch.from_numpy(std.astype(np.float32)))
    t.erf_().add_(1.0).mul_(0.5)
    return out


def weicom_from_normalized(ni: np.ndarray, nt: np.ndarray, lam: float) -> np.ndarray:
    """WeiCom from already normalized similarities, the same arithmetic as
    :func:`rscir.scoring.fuse` (``λ·nt + (1−λ)·ni``; exactly ``ni``/``nt`` at λ = 0/1). Exists so
    a λ sweep normalizes once; the tests check it against ``fuse``."""
    if lam == 0.0:
        return ni
    if lam == 1.0:
        return nt
    out = np.multiply(ni, 1.0 - lam)
    out += np.multiply(nt, lam)
    return out


# --------------------------------------------------------------------------- evaluation
@dataclass
class PairMetrics:
    """Per-pair metrics in percent, rounded to 2 decimals as in the reference."""

    ap: np.ndarray
    precision: np.ndarray  # (P, len(ks))
    recall: np.ndarray  # (P, len(ks))


@dataclass
class AttributeResult:
    attribute: str
    pairs: Pairs
    metrics: dict[Config, PairMetrics]
    seconds: float = 0.0


@dataclass
class PatternComResult:
    configs: list[Config]
    ks: tuple[int, ...]
    attributes: list[AttributeResult]
    n_database: int
    seconds: float = 0.0

    def attribute_names(self) -> list[str]:
        return [a.attribute for a in self.attributes]

    def table(self, metric: str = "AP", configs: Sequence[Config] | None = None) -> pd.DataFrame:
        """Rows = configurations, columns = attributes + ``avg``: the per-attribute mean of the
        per-pair values, rounded to 2 decimals, and the mean of those means."""
        cfgs = list(configs) if configs is not None else self.configs
        rows = {}
        for c in cfgs:
            vals = {a.attribute: _mean2(_metric_values(a.metrics[c], metric, self.ks))
                    for a in self.attributes}
            vals["avg"] = round(float(np.mean(list(vals.values()))), 2) if vals else 0.0
            rows[c.label] = vals
        df = pd.DataFrame.from_dict(rows, orient="index")
        df.index.name = "method"
        return df

    def long_table(self) -> pd.DataFrame:
        """Every (configuration, attribute, metric) mean, plus the number of pairs."""
        recs = []
        names = ["AP"] + [f"P@{k}" for k in self.ks] + [f"R@{k}" for k in self.ks]
        for c in self.configs:
            for a in self.attributes:
                for name in names:
                    recs.append({
                        "method": c.method, "lam": c.lam, "config": c.label,
                        "attribute": a.attribute, "metric": name,
                        "value": _mean2(_metric_values(a.metrics[c], name, self.ks)),
                        "pairs": len(a.pairs),
                    })
        return pd.DataFrame.from_records(recs)


def _metric_values(m: PairMetrics, metric: str, ks: Sequence[int]) -> np.ndarray:
    if metric == "AP":
        return m.ap
    kind, _, k = metric.partition("@")
    if kind not in ("P", "R") or not k.isdigit() or int(k) not in ks:
        raise InvalidArgumentError(f"unknown metric {metric!r}; use AP, P@k or R@k with k in {list(ks)}")
    arr = m.precision if kind == "P" else m.recall
    return arr[:, list(ks).index(int(k))]


def _mean2(x: np.ndarray) -> float:
    return round(float(np.mean(x)), 2) if len(x) else 0.0


def as_float32(x: np.ndarray) -> np.ndarray:
    a = np.ascontiguousarray(np.asarray(x), dtype=np.float32)
    if not np.isfinite(a).all():
        raise InvalidArgumentError("features contain NaN or infinite values")
    return a


def _ranking_of(c: Config) -> str:
    """``image``/``text`` when a configuration ranks exactly as the raw image/text similarities
    (WeiCom at λ = 0/1: Φ and the per-query standardization are strictly increasing), else
    ``fused``."""
    lam = c.lam if c.lam is not None else 0.5
    if c.method == "image" or (c.method == "weicom" and lam == 0.0):
        return "image"
    if c.method == "text" or (c.method == "weicom" and lam == 1.0):
        return "text"
    return "fused"


@dataclass(frozen=True)
class _Relevance:
    """The relevant database rows of every group as one flat array: group ``g``'s are
    ``cols[starts[g]:starts[g+1]]``."""

    cols: np.ndarray
    starts: np.ndarray

    @classmethod
    def of(cls, relevant: Sequence[np.ndarray]) -> _Relevance:
        counts = np.array([len(r) for r in relevant], dtype=np.int64)
        cols = np.concatenate([np.asarray(r, np.int64) for r in relevant]) if relevant else None
        return cls(cols if cols is not None else np.zeros(0, np.int64),
                   np.r_[0, np.cumsum(counts)].astype(np.int64))

    @property
    def longest(self) -> int:
        return int(np.diff(self.starts).max()) if len(self.starts) > 1 else 0

    def lists(self, groups: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The ragged lists (``cols``, ``starts``) of a sequence of groups."""
        lengths = self.starts[groups + 1] - self.starts[groups]
        starts = np.zeros(len(groups) + 1, np.int64)
        np.cumsum(lengths, out=starts[1:])
        src = np.repeat(self.starts[groups] - starts[:-1], lengths) + np.arange(starts[-1])
        return self.cols[src], starts


class _Buffers:
    """Float32 (rows, N) arrays of one worker, reused across chunks and blocks: a fresh array
    of a chunk's image similarities is hundreds of MB whose first touch costs a page fault
    every 4 KB (seconds of system time over a run), and fresh (block, N) arrays per block and
    configuration also miss the cache."""

    def __init__(self, n: int) -> None:
        self.n = n
        self._bufs: dict[str, np.ndarray] = {}

    def get(self, name: str, rows: int) -> np.ndarray:
        buf = self._bufs.get(name)
        if buf is None or buf.shape[0] < rows:
            buf = self._bufs[name] = np.empty((rows, self.n), np.float32)
        return buf[:rows]


class _ImageRows:
    """A chunk's image similarity rows (one per query image) with their WeiCom normalization
    and sorted copy, made a few rows at a time just before the pairs that need them (in query
    order), while the rows are in cache: over the whole chunk at once these passes stream
    hundreds of MB through memory each."""

    def __init__(
        self, sims: np.ndarray, stats: QueryStats | None, need_sorted: bool, bufs: _Buffers
    ) -> None:
        self.raw, self.stats = sims, stats
        q = sims.shape[0]
        self.norm = bufs.get("norm", q) if stats is not None else None
        self.sorted = bufs.get("sorted_img", q) if need_sorted else None
        self.done = 0

    def ready(self, upto: int, step: int = 8) -> None:
        """Normalize and sort rows ``[done, upto)``."""
        for a in range(self.done, upto, step):
            b = min(a + step, upto)
            if self.norm is not None:
                assert self.stats is not None
                normalize_cdf(self.raw[a:b], QueryStats(self.stats.mean[a:b], self.stats.std[a:b]),
                              out=self.norm[a:b])
            if self.sorted is not None:
                sort_rows(self.raw[a:b], out=self.sorted[a:b])
        self.done = max(self.done, upto)


def _fused_scores(
    c: Config, rows: Callable[[str], np.ndarray], out: np.ndarray, tmp: np.ndarray
) -> np.ndarray:
    """A block's fused scores written into ``out``, with exactly the float32 arithmetic of
    :func:`rscir.scoring.fuse` (average ``(a + b) / 2``) and :func:`weicom_from_normalized`;
    ``rows(kind)`` gives the block's raw (``si``/``st``) or normalized (``ni``/``nt``) rows."""
    lam = c.lam if c.lam is not None else 0.5
    if c.method == "weicom":
        np.multiply(rows("ni"), 1.0 - lam, out=out)
        np.multiply(rows("nt"), lam, out=tmp)
        out += tmp
    elif c.method == "average":
        np.add(rows("si"), rows("st"), out=out)
        np.divide(out, 2, out=out)
    elif c.method == "sum":
        np.add(rows("si"), rows("st"), out=out)
    elif c.method == "product":
        np.multiply(rows("si"), rows("st"), out=out)
    else:
        out[...] = fuse(c.method, rows("si"), rows("st"), lam)
    return out


@dataclass
class _Job:
    """Everything a worker needs to score chunks of pairs."""

    db: np.ndarray
    query: np.ndarray  # (P,) database row of each pair's query image
    text: np.ndarray  # (P,) text index of each pair
    group: np.ndarray  # (P,) relevance group of each pair
    order: np.ndarray  # pairs sorted by query image (chunks are ranges of it)
    rel: _Relevance
    raw_t: np.ndarray
    norm_t: np.ndarray | None
    sorted_t: np.ndarray | None
    moments: ArchiveMoments | None
    configs: list[Config]
    kinds: list[str]
    ks: tuple[int, ...]
    block: int

    def score(
        self, lo: int, hi: int, bufs: _Buffers
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Pairs ``order[lo:hi]`` (whole query images): their indices and per configuration
        AP (C, P), P@k and R@k (C, P, len(ks)) in percent, rounded to 2 decimals."""
        db, n, block, configs, kinds = self.db, self.db.shape[0], self.block, self.configs, self.kinds
        m_max = self.rel.longest
        idx_chunk = self.order[lo:hi]
        uq, qi_chunk = np.unique(self.query[idx_chunk], return_inverse=True)
        s_img = np.matmul(db[uq], db.T, out=bufs.get("raw", len(uq)))
        stats = None
        if self.norm_t is not None:  # WeiCom at some 0 < λ < 1: normalized rows needed
            assert self.moments is not None
            stats = self.moments.query_stats(db[uq])
        img = _ImageRows(s_img, stats, "image" in kinds, bufs)
        n_img, sorted_img = img.norm, img.sorted
        n_c, n_p = len(configs), hi - lo
        ap = np.zeros((n_c, n_p))
        prec = np.zeros((n_c, n_p, len(self.ks)))
        rec = np.zeros((n_c, n_p, len(self.ks)))
        for b in range(0, n_p, block):
            sl = slice(b, min(b + block, n_p))
            idx, qi = idx_chunk[sl], qi_chunk[sl]
            img.ready(int(qi[-1]) + 1)  # pairs are in query order
            ti = self.text[idx]
            cols, rstarts = self.rel.lists(self.group[idx])
            n_rel = np.diff(rstarts)
            pair_of = np.repeat(np.arange(len(idx)), n_rel)
            slot = np.arange(len(cols)) - rstarts[pair_of]
            has = n_rel > 0
            seg_starts = rstarts[:-1][has]
            gathered: set[str] = set()

            def rows(kind: str, qi=qi, ti=ti, gathered=gathered) -> np.ndarray:
                buf = bufs.get(kind, len(qi))
                if kind not in gathered:  # once per block, shared by every λ
                    src = {"si": s_img, "ni": n_img, "st": self.raw_t, "nt": self.norm_t}[kind]
                    assert src is not None
                    # mode="clip": with the default "raise" numpy buffers ``out`` (a copy)
                    np.take(src, qi if kind[1] == "i" else ti, axis=0, out=buf, mode="clip")
                    gathered.add(kind)
                return buf

            # Every configuration's ranks in one padded matrix, AP/P/R computed once per block.
            padded = np.full((n_c, len(idx), m_max), n + 1, np.int64)
            for ci, c in enumerate(configs):
                if kinds[ci] == "image":
                    assert sorted_img is not None
                    ranks = ranks_in_sorted_rows(s_img, sorted_img, qi, cols, rstarts)
                elif kinds[ci] == "text":
                    assert self.sorted_t is not None
                    ranks = ranks_in_sorted_rows(self.raw_t, self.sorted_t, ti, cols, rstarts)
                else:
                    fused = _fused_scores(c, rows, bufs.get("fused", len(idx)),
                                          bufs.get("tmp", len(idx)))
                    # Items below a pair's lowest relevant score never outrank a relevant item.
                    floors = np.full(len(idx), np.inf, np.float32)
                    floors[has] = np.minimum.reduceat(fused[pair_of, cols], seg_starts)
                    srt = bufs.get("sorted", len(idx))
                    kept = sort_rows_above(fused, floors, srt)
                    ranks = ranks_in_sorted_rows(fused, srt, np.arange(len(idx)), cols, rstarts,
                                                 kept)
                padded[ci, pair_of, slot] = ranks
            flat = padded.reshape(-1, m_max)  # rows are independent: same values as one by one
            n_rel_all = np.tile(n_rel, n_c)
            shape = (n_c, len(idx))
            ap[:, sl] = (average_precision_from_ranks(flat, n_rel_all) * 100).reshape(shape)
            p, r = precision_recall_at_k(flat, n_rel_all, self.ks)
            prec[:, sl], rec[:, sl] = (p * 100).reshape(*shape, -1), (r * 100).reshape(*shape, -1)
        return idx_chunk, np.round(ap, 2), np.round(prec, 2), np.round(rec, 2)


def evaluate_pairs(
    db: np.ndarray,
    text_feats: np.ndarray,
    pairs: Pairs,
    configs: Sequence[Config],
    *,
    ks: Sequence[int] = KS,
    memory_cap: int = DEFAULT_MEMORY_CAP,
    block: int = 16,
    workers: int = 1,
    moments: ArchiveMoments | None = None,
    progress: Callable[[int], None] | None = None,
) -> dict[Config, PairMetrics]:
    """Metrics of every pair for every configuration. ``text_feats`` (len(pairs.texts), d).

    Pairs are grouped by query image into chunks whose similarity matrices fit ``memory_cap``
    (shared by ``workers`` threads: numpy's sort and search, BLAS and torch release the GIL).
    Per chunk, the image similarities are one matrix product, normalized once for every λ and
    sorted once per query image; text similarities once per attribute. Then ``block`` pairs at
    a time: rankings that depend on one modality only reuse those sorted rows; fused scores are
    computed into reused buffers and sorted while in cache (only the items at or above the
    pair's lowest relevant score); and only each relevant item's rank is looked up
    (:func:`rscir.bench.metrics.ranks_in_sorted_rows`)."""
    db = as_float32(db)
    n = db.shape[0]
    if n < 2:
        raise InvalidArgumentError("the database needs at least 2 images")
    text_feats = as_float32(text_feats)
    if text_feats.shape != (len(pairs.texts), db.shape[1]):
        raise InvalidArgumentError(
            f"text features have shape {text_feats.shape}, expected "
            f"{(len(pairs.texts), db.shape[1])}"
        )
    n_pairs = len(pairs)
    out = {
        c: PairMetrics(np.zeros(n_pairs), np.zeros((n_pairs, len(ks))), np.zeros((n_pairs, len(ks))))
        for c in configs
    }
    if n_pairs == 0:
        return out
    block = max(1, int(block))
    configs = list(configs)
    kinds = [_ranking_of(c) for c in configs]
    need_norm = any(c.method == "weicom" and k == "fused" for c, k in zip(configs, kinds,
                                                                          strict=True))
    raw_t = text_feats @ db.T
    norm_t = None
    if need_norm:
        moments = moments if moments is not None else ArchiveMoments.of(db)
        norm_t = normalize_cdf(raw_t, moments.query_stats(text_feats))
    order = np.argsort(pairs.query, kind="stable")
    job = _Job(db, pairs.query, pairs.text, pairs.group, order, _Relevance.of(pairs.relevant),
               raw_t, norm_t, sort_rows(raw_t) if "text" in kinds else None,
               moments if need_norm else None, configs, kinds, tuple(ks), block)

    # Chunks of whole queries: per chunk ~3 float32 (queries × N) matrices (raw, normalized and
    # sorted image similarities) plus a worker's ~7 (block × N) buffers.
    workers = max(1, int(workers))
    q_sorted = pairs.query[order]
    max_pairs = max(1, int(memory_cap // workers // (4 * 4 * n)) - 8 * block)
    starts = np.flatnonzero(np.r_[True, q_sorted[1:] != q_sorted[:-1]])
    bounds = [0]
    for s in starts[1:]:
        if s - bounds[-1] >= max_pairs:
            bounds.append(int(s))
    bounds.append(n_pairs)
    spans = list(zip(bounds[:-1], bounds[1:], strict=True))

    def collect(res: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]) -> None:
        idx, ap, prec, rec = res
        for ci, c in enumerate(configs):
            out[c].ap[idx], out[c].precision[idx], out[c].recall[idx] = ap[ci], prec[ci], rec[ci]
        if progress is not None:
            progress(len(idx))

    # torch (normalization) single-threaded: its OpenMP barriers on a block of rows cost ~10 ms
    # each when the cores are busy (measured: 5.3 s vs 0.07 s for 512 rows in blocks of 8).
    with _torch_threads(1):
        if workers == 1 or len(spans) == 1:
            bufs = _Buffers(n)
            for lo, hi in spans:
                collect(job.score(lo, hi, bufs))
        else:
            local = threading.local()  # each worker thread's buffers

            def task(lo: int, hi: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
                if not hasattr(local, "bufs"):
                    local.bufs = _Buffers(n)
                return job.score(lo, hi, local.bufs)

            # One BLAS/OpenMP thread per worker: the workers already use every core. (Forked
            # processes instead of threads measured the same: the GIL is not what limits.)
            with threadpool_limits(limits=1), ThreadPoolExecutor(workers) as pool:
                for f in [pool.submit(task, lo, hi) for lo, hi in spans]:
                    collect(f.result())
    return out


@contextmanager
def _torch_threads(n: int) -> Iterator[None]:
    """torch's intra-op thread count for a while (restored after)."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# --------------------------------------------------------------------------- inputs
@dataclass(frozen=True)
class Database:
    """Image features and the file names they belong to (base names are what the CSVs use)."""

    features: np.ndarray
    paths: list[str]
    source: str = ""

    def __post_init__(self) -> None:
        if self.features.ndim != 2 or self.features.shape[0] != len(self.paths):
            raise InvalidArgumentError(
                f"features {self.features.shape} do not match {len(self.paths)} paths"
            )


def _latin1_encode(text: str, encoding: str = "utf-8") -> bytes:
    """``_codecs.encode`` as protocol-2 pickles use it for bytes (always latin-1), and no other
    codec (a codec name would be looked up and imported)."""
    if encoding.replace("-", "").replace("_", "").lower() not in ("latin1", "iso88591"):
        raise UntrustedFileError(f"the pickle asks for the {encoding!r} codec; feature files "
                                 "only use latin-1")
    return text.encode("latin-1")


def _safe_globals() -> dict[tuple[str, str], Any]:
    """What a feature pickle may name: numpy's array, scalar and dtype rebuilders (under their
    numpy 1 and numpy 2 module names) and plain containers; none of them runs code."""
    try:
        from numpy._core import multiarray, numeric
    except ImportError:  # numpy < 2
        from numpy.core import multiarray, numeric  # type: ignore[no-redef]
    allowed: dict[tuple[str, str], Any] = {
        ("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype,
        ("collections", "OrderedDict"): OrderedDict, ("_codecs", "encode"): _latin1_encode,
    }
    for mod in ("numpy.core", "numpy._core"):
        allowed[(f"{mod}.multiarray", "_reconstruct")] = multiarray._reconstruct
        allowed[(f"{mod}.multiarray", "scalar")] = multiarray.scalar
        allowed[(f"{mod}.numeric", "_frombuffer")] = getattr(numeric, "_frombuffer")  # noqa: B009 - private in numpy
    for mod in ("builtins", "__builtin__"):  # protocols 0-2 name the Python 2 module
        for cls in (set, frozenset, bytearray, complex, slice, range):
            allowed[(mod, cls.__name__)] = cls
    return allowed


class FeatureUnpickler(pickle.Unpickler):
    """Reads pickles that hold only numpy arrays, numpy scalars and plain containers (the
    reference PatternCom feature layout); any other object (a function, a class, anything whose
    unpickling could run code) raises :class:`UntrustedFileError` before it is looked up."""

    def __init__(self, file: Any, source: str) -> None:
        super().__init__(file)
        self.source = source
        self.allowed = _safe_globals()

    def find_class(self, module: str, name: str) -> Any:
        obj = self.allowed.get((module, name))
        if obj is None:
            raise UntrustedFileError(
                f"{self.source} refers to the Python object {module}.{name}: feature pickles "
                "are read with only numpy arrays and plain containers allowed, because loading "
                "anything else can run code. If you made this file yourself and trust it, pass "
                "--trust-pickle (or save the features as arrays: feats N×d, paths N)")
        return obj


def load_database(path: str | os.PathLike[str], *, trust_pickle: bool = False) -> Database:
    """Features from an rscir store directory or a reference pickle (``feats``, ``paths``).

    Pickles are read by :class:`FeatureUnpickler` (numpy arrays and plain containers only)
    unless ``trust_pickle`` allows any object (which can run code from the file)."""
    p = Path(path)
    if p.is_dir():
        from ..stores.directory import DirectoryStore

        st = DirectoryStore.open(p)
        return Database(np.asarray(st.embeddings), st.items["path"].astype(str).tolist(), str(p))
    if not p.is_file():
        raise PathNotFoundError(f"features file {p} does not exist")
    try:
        with open(p, "rb") as f:
            # pickle.load only when the user vouched for the file (it can run code)
            data = pickle.load(f) if trust_pickle else FeatureUnpickler(f, str(p)).load()
    except UntrustedFileError:
        raise
    except (pickle.UnpicklingError, EOFError, AttributeError, ImportError, ValueError,
            TypeError, IndexError, KeyError, MemoryError) as e:
        raise InvalidArgumentError(f"{p} is neither an rscir store nor a readable pickle: "
                         f"{type(e).__name__}: {e}") from e
    if not isinstance(data, dict) or "feats" not in data or "paths" not in data:
        raise InvalidArgumentError(f"{p}: expected a dict with 'feats' (N×d) and 'paths' (N)")
    feats = np.asarray(data["feats"])
    return Database(feats, [str(x) for x in data["paths"]], str(p))


def load_text_features(path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    """Text → vector from an ``.npz`` (arrays ``texts`` + ``features``, or one array per text)
    or a JSON object ``{text: [floats]}``."""
    p = Path(path)
    if not p.is_file():
        raise PathNotFoundError(f"text features file {p} does not exist")
    if p.suffix.lower() == ".json":
        try:
            obj = json.loads(p.read_text())
        except json.JSONDecodeError as e:
            raise InvalidArgumentError(f"{p}: not valid JSON: {e}") from e
        if not isinstance(obj, dict):
            raise InvalidArgumentError(f"{p}: expected a JSON object mapping text to vector")
        return {str(k): np.asarray(v, dtype=np.float32) for k, v in obj.items()}
    try:
        with np.load(p, allow_pickle=False) as z:
            if "texts" in z.files and ("features" in z.files or "feats" in z.files):
                feats = z["features"] if "features" in z.files else z["feats"]
                texts = [str(t) for t in z["texts"]]
                if len(texts) != len(feats):
                    raise InvalidArgumentError(f"{p}: {len(texts)} texts but {len(feats)} feature rows")
                return {t: np.asarray(v, np.float32) for t, v in zip(texts, feats, strict=True)}
            return {k: np.asarray(z[k], np.float32) for k in z.files}
    except (OSError, ValueError) as e:
        raise InvalidArgumentError(f"{p}: cannot read text features ({e})") from e


def save_text_features(path: str | os.PathLike[str], feats: dict[str, np.ndarray]) -> None:
    """Write the ``texts`` + ``features`` npz layout (atomically)."""
    p = Path(path)
    texts = sorted(feats)
    arr = np.stack([feats[t] for t in texts]).astype(np.float32) if texts else np.zeros((0, 0))
    tmp = p.with_name(p.name + ".tmp.npz")
    np.savez(tmp, texts=np.array(texts, dtype=str), features=arr)
    os.replace(tmp, p)


TextEncoder = Callable[[list[str]], np.ndarray]


def cached_text_encoder(
    encode: TextEncoder, cache_file: str | os.PathLike[str]
) -> TextEncoder:
    """Wrap a text encoder with an ``.npz`` cache (``texts`` + ``features``): texts already in
    the file are read back, the others are encoded once and added. The cache file must belong to
    one model; callers key its name by the model's fingerprint."""
    path = Path(cache_file)

    def encode_cached(texts: list[str]) -> np.ndarray:
        have = load_text_features(path) if path.is_file() else {}
        todo = [t for t in dict.fromkeys(texts) if t not in have]
        if todo:
            new = np.asarray(encode(todo), dtype=np.float32)
            have.update(zip(todo, new, strict=True))
            path.parent.mkdir(parents=True, exist_ok=True)
            save_text_features(path, have)
        if not texts:
            return np.zeros((0, 0), np.float32)
        return np.stack([have[t] for t in texts])

    return encode_cached


def text_matrix(
    texts: Sequence[str], source: dict[str, np.ndarray] | TextEncoder, dim: int
) -> np.ndarray:
    """(T, dim) L2-normalized text features, from a mapping or an encoder callable."""
    if callable(source):
        mat = np.asarray(source(list(texts)), dtype=np.float32) if texts else np.zeros((0, dim))
    else:
        missing = [t for t in texts if t not in source]
        if missing:
            raise InvalidArgumentError(
                f"no text features for {len(missing)} text(s), e.g. {missing[:5]}"
            )
        mat = np.stack([source[t] for t in texts]) if texts else np.zeros((0, dim), np.float32)
    mat = np.asarray(mat, dtype=np.float32).reshape(len(texts), -1)
    if len(texts) and mat.shape[1] != dim:
        raise InvalidArgumentError(f"text features have dimension {mat.shape[1]}, images {dim}")
    norms = np.linalg.norm(mat, axis=1, keepdims=True)
    return mat / np.maximum(norms, 1e-12)


def patterncom_dir(data: str | os.PathLike[str]) -> Path:
    """The PatternCom CSV folder for a PatternNet root (or the folder itself)."""
    d = Path(data)
    for cand in (d / "PatternCom", d):
        if cand.is_dir() and any((cand / f"{a}.csv").is_file() for a in ATTRIBUTES):
            return cand
    raise PathNotFoundError(
        f"no PatternCom CSVs under {d} (expected {d}/PatternCom/<attribute>.csv)"
    )


def default_workers() -> int:
    """Threads for the evaluation: the CPU cores this process may use, at most 8."""
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        n = os.cpu_count() or 1
    return max(1, min(8, n))


def run_patterncom(
    data: str | os.PathLike[str],
    database: Database,
    texts: dict[str, np.ndarray] | TextEncoder,
    *,
    methods: Sequence[str] = ("image", "text", "average", "weicom"),
    lams: Sequence[float] = (0.5,),
    attributes: Sequence[str] = ATTRIBUTES,
    ks: Sequence[int] = KS,
    memory_cap: int = DEFAULT_MEMORY_CAP,
    skip_missing: bool = False,
    workers: int | None = None,
    block: int = 16,
    progress: bool = True,
    evaluator: Callable[..., dict[Config, PairMetrics]] | None = None,
) -> PatternComResult:
    """The full protocol over the attribute CSVs under ``data``. ``evaluator`` replaces
    :func:`evaluate_pairs` (same signature), e.g. by the previous implementation in
    :mod:`rscir.bench.patterncom_baseline` for a before/after comparison."""
    from tqdm.auto import tqdm

    t0 = time.perf_counter()
    configs = make_configs(methods, lams)
    for m in methods:
        if m not in METHODS:
            raise InvalidArgumentError(f"unknown method {m!r}")
    csv_dir = patterncom_dir(data)
    feats = as_float32(database.features)
    all_pairs = [
        build_pairs(read_attribute_csv(csv_dir / f"{a}.csv", a), database.paths,
                    skip_missing=skip_missing)
        for a in attributes
    ]
    for p in all_pairs:
        if p.missing_queries:
            log.warning("%s: %d query images not in the database were skipped",
                        p.attribute, len(p.missing_queries))
    all_texts = sorted({t for p in all_pairs for t in p.texts})
    tmat = text_matrix(all_texts, texts, feats.shape[1])
    trow = {t: i for i, t in enumerate(all_texts)}
    need_norm = any(c.method == "weicom" and c.lam not in (0.0, 1.0) for c in configs)
    moments = ArchiveMoments.of(feats) if need_norm else None
    workers = default_workers() if workers is None else workers
    total = sum(len(p) for p in all_pairs)
    results = []
    with tqdm(total=total, desc=f"PatternCom ({len(configs)} configs)", unit="pair",
              disable=not progress) as bar:
        for p in all_pairs:
            ta = time.perf_counter()
            bar.set_postfix_str(p.attribute)
            tf = tmat[[trow[t] for t in p.texts]] if p.texts else np.zeros((0, feats.shape[1]))
            metrics = (evaluator or evaluate_pairs)(
                feats, tf, p, configs, ks=ks, memory_cap=memory_cap, block=block,
                workers=workers, moments=moments, progress=bar.update)
            results.append(AttributeResult(p.attribute, p, metrics, time.perf_counter() - ta))
    return PatternComResult(configs, tuple(ks), results, feats.shape[0], time.perf_counter() - t0)
