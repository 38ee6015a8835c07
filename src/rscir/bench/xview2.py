"""xView2-CIR: change-centric composed retrieval (Psomas, Christopoulos et al., 2026).

The reference repository (``billpsomas/rscir``) ships ``xview2_cir.csv`` with the header
``image,query_default,query_alt1,query_alt2,target``: a *pre*-disaster xView2 tile, a default
text naming the post-event state ("post fire", "post flood", ...), two alternative phrasings
used in the paper's ablation ("burned area", "fire-affected region", ...), and the
*post*-disaster tile of the same place, the target. Paths are relative to the xView2 root
(``test/images/<event>_<id>_{pre,post}_disaster.tif``). The paper (arXiv 2605.24442) frames
retrieval as conditioned on *scene identity* and the target post-event state.

What the reference does not spell out (no evaluation script for it is published), and what
rscir therefore fixes and exposes as options:

* **Gallery** (``gallery="all"``, default): every distinct image of the CSV, pre- and
  post-disaster, so the other pre-disaster tiles and the post-disaster tiles of other places
  are the distractors; ``"targets"``: only the post-disaster tiles.
* **The query tile** is removed from its own ranking (``keep_query=False``, as composed-retrieval
  benchmarks with a reference image in the gallery do); with ``keep_query=True`` it stays (an
  image-only search then returns it first).
* **Relevance**: the target alone. Metrics: Recall@k (share of queries whose target is in the
  top k; k = 1, 5, 10) and mAP (= mean reciprocal rank of the target, one relevant item); ties
  broken by gallery order, as everywhere in rscir.
* **Texts**: each of the three columns is its own run (``task`` = column name).
* **λ**: chosen on a seeded half of the queries of each disaster event (``val``), reported on
  the other half (``test``), as in :mod:`rscir.bench.composed`; the full λ table is written too.

No xView2 imagery is reachable from this project's machines: :func:`make_xview2_fixture` writes
a tree in the exact layout (CSV header, paths, file names, texts) for the tests.
"""

from __future__ import annotations

import csv
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import InvalidArgumentError, PathNotFoundError
from ..scoring import FusionOptions
from .composed import Archive, ComposedQueries, ComposedResult, evaluate, text_side

COLUMNS: tuple[str, ...] = ("image", "query_default", "query_alt1", "query_alt2", "target")
QUERY_COLUMNS: tuple[str, ...] = ("query_default", "query_alt1", "query_alt2")
KS: tuple[int, ...] = (1, 5, 10)
GALLERIES: tuple[str, ...] = ("all", "targets")
# The texts of the reference CSV per disaster type: (default, alt1, alt2).
REFERENCE_TEXTS: dict[str, tuple[str, str, str]] = {
    "earthquake": ("post earthquake", "earthquake damaged area", "seismic damage"),
    "fire": ("post fire", "burned area", "fire-affected region"),
    "flood": ("post flood", "flooded area", "flood-affected region"),
    "hurricane": ("post hurricane", "storm damaged area", "hurricane-affected region"),
    "tsunami": ("post tsunami", "inundated coastal area", "tsunami-affected coastline"),
    "volcano": ("post volcano", "volcanic damage", "lava-affected area"),
}
_EVENT = re.compile(r"^(.*?)_\d+_(?:pre|post)_disaster", re.IGNORECASE)


@dataclass(frozen=True)
class XView2CIR:
    """The rows of ``xview2_cir.csv``: query images, texts per column, targets."""

    images: list[str]
    texts: dict[str, list[str]]
    targets: list[str]

    def __len__(self) -> int:
        return len(self.images)

    def events(self) -> list[str]:
        return [event_of(p) for p in self.images]

    def gallery(self, mode: str = "all") -> list[str]:
        """The gallery paths (sorted, distinct): all CSV images or the targets only."""
        if mode not in GALLERIES:
            raise InvalidArgumentError(f"gallery must be one of {', '.join(GALLERIES)}")
        paths = set(self.targets) | (set(self.images) if mode == "all" else set())
        return sorted(paths)


def event_of(path: str) -> str:
    """The xView2 event of a file name (``socal-fire`` of ``socal-fire_00000016_pre_...``)."""
    name = os.path.basename(str(path))
    m = _EVENT.match(name)
    return m.group(1) if m else name.split("_")[0]


def read_xview2_csv(path: str | os.PathLike[str]) -> XView2CIR:
    """Parse the CSV (header row with exactly :data:`COLUMNS`; blank lines skipped)."""
    p = Path(path)
    if not p.is_file():
        raise PathNotFoundError(f"{p} does not exist (expected xview2_cir.csv)")
    with open(p, newline="", encoding="utf-8-sig") as f:
        rows = [r for r in csv.reader(f) if any(c.strip() for c in r)]
    if not rows:
        raise InvalidArgumentError(f"{p} is empty")
    head = [c.strip() for c in rows[0]]
    if head != list(COLUMNS):
        raise InvalidArgumentError(f"{p}: header must be {','.join(COLUMNS)}, got {','.join(head)}")
    images, targets = [], []
    texts: dict[str, list[str]] = {c: [] for c in QUERY_COLUMNS}
    for lineno, r in enumerate(rows[1:], start=2):
        if len(r) != len(COLUMNS):
            raise InvalidArgumentError(f"{p}:{lineno}: expected {len(COLUMNS)} fields, got {len(r)}")
        r = [c.strip() for c in r]
        if not r[0] or not r[4] or r[0] == r[4]:
            raise InvalidArgumentError(f"{p}:{lineno}: image and target must be two paths")
        images.append(r[0])
        targets.append(r[4])
        for c, v in zip(QUERY_COLUMNS, r[1:4], strict=True):
            if not v:
                raise InvalidArgumentError(f"{p}:{lineno}: empty {c}")
            texts[c].append(v)
    return XView2CIR(images, texts, targets)


def split_by_event(events: Sequence[str], seed: int = 0) -> np.ndarray:
    """``True`` = val: the first ⌊n/2⌋ of a seeded permutation of each event's queries."""
    ev = np.asarray(events)
    rng = np.random.default_rng(seed)
    val = np.zeros(len(ev), bool)
    for e in sorted(set(ev.tolist())):
        rows = np.flatnonzero(ev == e)
        val[rng.permutation(rows)[: len(rows) // 2]] = True
    return val


def build_xview2_queries(
    cir: XView2CIR,
    gallery_paths: Sequence[str],
    columns: Sequence[str] = QUERY_COLUMNS,
    *,
    seed: int = 0,
) -> ComposedQueries:
    """One pair per CSV row and text column (``task`` = column); relevant = the target row.
    ``query`` is the query image's gallery row, or -1 when the gallery lacks it (then pass
    the query features to :func:`rscir.bench.composed.evaluate` as ``query_vectors``)."""
    for c in columns:
        if c not in QUERY_COLUMNS:
            raise InvalidArgumentError(f"unknown text column {c!r}; choose from {QUERY_COLUMNS}")
    row = {p: i for i, p in enumerate(gallery_paths)}
    missing = sorted({t for t in cir.targets if t not in row})
    if missing:
        raise InvalidArgumentError(
            f"{len(missing)} targets are not in the gallery (e.g. {missing[:3]})"
        )
    val = split_by_event(cir.events(), seed)
    texts: list[str] = []
    tid: dict[str, int] = {}
    task, query, text, group, split = [], [], [], [], []
    relevant = [np.array([row[t]], np.int64) for t in cir.targets]
    for c in columns:
        for i, t in enumerate(cir.texts[c]):
            if t not in tid:
                tid[t] = len(texts)
                texts.append(t)
            task.append(c)
            query.append(row.get(cir.images[i], -1))
            text.append(tid[t])
            group.append(i)
            split.append("val" if val[i] else "test")
    return ComposedQueries(np.array(task), np.array(query, np.int64), np.array(text, np.int64),
                           texts, np.array(group, np.int64), relevant, np.array(split))


def xview2_metrics(scores: np.ndarray, target: np.ndarray, ks: Sequence[int] = KS
                   ) -> dict[str, float]:
    """Recall@k and mAP (percent) of a score matrix (Q, N) with one relevant column per query
    (ties by lower column): the rank of the target is 1 + #higher + #equal-before."""
    s = np.asarray(scores, np.float64)
    t = np.asarray(target, np.int64)
    ts = s[np.arange(len(s)), t][:, None]
    cols = np.arange(s.shape[1])[None, :]
    rank = 1 + (s > ts).sum(1) + ((s == ts) & (cols < t[:, None])).sum(1)
    out = {f"R@{k}": float(100 * np.mean(rank <= k)) for k in ks}
    out["mAP"] = float(100 * np.mean(1.0 / rank))
    return out


def archive_for_gallery(store_dir: str | os.PathLike[str], gallery_paths: Sequence[str]
                        ) -> Archive:
    """The gallery's rows of a store indexed at the xView2 root (paths match the CSV's, or
    else by unique base name); the moments are those of the gallery."""
    from ..moments import ArchiveMoments
    from ..stores.uri import open_store

    st = open_store(store_dir)
    paths = [p.replace(os.sep, "/") for p in st.items["path"].astype(str).tolist()]
    by_path = {p: i for i, p in enumerate(paths)}
    base: dict[str, list[int]] = {}
    for i, p in enumerate(paths):
        base.setdefault(os.path.basename(p), []).append(i)
    rows, missing = [], []
    for g in gallery_paths:
        r = by_path.get(g)
        if r is None:
            cand = base.get(os.path.basename(g), [])
            r = cand[0] if len(cand) == 1 else None
        if r is None:
            missing.append(g)
        else:
            rows.append(r)
    if missing:
        raise InvalidArgumentError(
            f"{len(missing)} gallery images are not in the store {store_dir} (e.g. "
            f"{missing[:3]}); index the xView2 root that the CSV paths are relative to"
        )
    emb = np.asarray(st.embeddings[np.asarray(rows, np.int64)], np.float32)
    return Archive(emb, list(gallery_paths), ArchiveMoments.of(emb))


def run_xview2(
    csv_path: str | os.PathLike[str],
    archive_for: Callable[[list[str]], Archive],
    encode_texts: Callable[[list[str]], np.ndarray],
    *,
    methods: Sequence[str] | None = None,
    lams: Sequence[float] = tuple(np.round(np.arange(0, 1.0001, 0.05), 2)),
    columns: Sequence[str] = QUERY_COLUMNS,
    gallery: str = "all",
    keep_query: bool = False,
    options: FusionOptions | None = None,
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
) -> ComposedResult:
    """The protocol end to end; ``archive_for(gallery_paths)`` supplies the features."""
    cir = read_xview2_csv(csv_path)
    paths = cir.gallery(gallery)
    archive = archive_for(paths)
    queries = build_xview2_queries(cir, archive.paths, columns, seed=seed)
    opts = options or FusionOptions()
    qvec = None
    if (queries.query < 0).any():  # query images outside the gallery (gallery="targets")
        uniq = sorted(set(cir.images))
        qvec = archive_for(uniq).embeddings
        pos = {p: i for i, p in enumerate(uniq)}
        n_cols = len(queries) // len(cir)
        queries = ComposedQueries(
            queries.task, np.tile([pos[p] for p in cir.images], n_cols).astype(np.int64),
            queries.text, queries.texts, queries.group, queries.relevant, queries.split)
    tf, names, basis = text_side(encode_texts, queries.texts, methods, opts)
    res = evaluate(archive.embeddings, archive.moments, queries, tf,
                   names, lams, options=opts, basis=basis,
                   exclude_query=not keep_query, ks=KS, query_vectors=qvec,
                   progress=progress)
    res.meta.update(protocol="xview2-cir", gallery=gallery, keep_query=keep_query,
                    n_rows=len(cir), n_gallery=len(paths), seed=seed)
    return res


# --------------------------------------------------------------------------- fixture
def make_xview2_fixture(
    out_dir: str | os.PathLike[str],
    *,
    events: dict[str, str] | None = None,
    per_event: int = 4,
    distractors: int = 2,
    size: int = 32,
    seed: int = 0,
) -> Path:
    """Write ``out_dir/xview2`` with ``test/images/<event>_<id>_{pre,post}_disaster.tif``
    pairs and ``xview2_cir.csv`` in the reference layout (texts from
    :data:`REFERENCE_TEXTS`); ``distractors`` extra pre/post pairs per event are written but
    not listed (a gallery must not pick them up). Post tiles keep the pre tile's layout with a
    disaster-specific tint, so scene identity and change are both present. Returns the root."""
    from PIL import Image

    ev = events or {"socal-fire": "fire", "midwest-flooding": "flood",
                    "hurricane-michael": "hurricane"}
    for t in ev.values():
        if t not in REFERENCE_TEXTS:
            raise InvalidArgumentError(f"unknown disaster type {t!r}")
    rng = np.random.default_rng(seed)
    tint = {"fire": (90, -30, -40), "flood": (-40, -10, 80), "hurricane": (30, 30, 30),
            "earthquake": (40, 20, 0), "tsunami": (-30, 20, 60), "volcano": (60, -40, -40)}
    root = Path(out_dir) / "xview2"
    img_dir = root / "test" / "images"
    img_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for e, kind in ev.items():
        for i in range(per_event + distractors):
            stem = f"{e}_{i * 7 + 3:08d}"
            pre = rng.integers(0, 256, size=(size, size, 3)).astype(np.int16)
            post = np.clip(pre + np.array(tint[kind]) + rng.integers(-10, 11, pre.shape),
                           0, 255)
            Image.fromarray(pre.astype(np.uint8)).save(img_dir / f"{stem}_pre_disaster.tif")
            Image.fromarray(post.astype(np.uint8)).save(img_dir / f"{stem}_post_disaster.tif")
            if i < per_event:
                rows.append([f"test/images/{stem}_pre_disaster.tif", *REFERENCE_TEXTS[kind],
                             f"test/images/{stem}_post_disaster.tif"])
    with open(root / "xview2_cir.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(COLUMNS)
        w.writerows(rows)
    return root
