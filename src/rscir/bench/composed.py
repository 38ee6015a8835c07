"""A composed-retrieval benchmark on real tiles (UC Merced multi-labels), and the method ablation.

Protocol (``rscir bench composed``; ``docs/fusion_methods.md`` has the numbers):

* **Archive**: every tile of the folder (``images/<class>/*.jpg``), or with ``subset="heldout"``
  only the tiles of the UCM-captions *test* split (``captions.jsonl``), which no rscir-mini
  training source saw. Ground truth: the scene class (the folder) and the 17 binary object
  labels of ``multilabels.csv`` (Chaudhuri et al., 2018).
* **Queries** (:func:`build_queries`), for every class ``C`` and label ``L`` with at least
  ``min_relevant`` class-``C`` tiles on each side of ``L``:

  - ``add``: a class-``C`` tile *without* ``L`` + the text ``"with <L>"``; relevant: the
    class-``C`` tiles *with* ``L``;
  - ``remove``: a class-``C`` tile *with* ``L`` + ``"without <L>"``; relevant: the class-``C``
    tiles without ``L`` (absence; text encoders are known to handle negation poorly, so this
    task mostly measures how much a method lets the text hurt).

  A class change ("the same tile as a <C'>") has no sound ground truth in these labels
  (nothing says which ``C'`` tile keeps the query's content), so it is not built.
* The query tile is removed from its own ranking; AP over the full ranking, R@k = share of the
  relevant tiles in the top k, P@k; means over pairs, in percent.
* **Honest λ**: the tiles of each class are split 50/50 (seeded) into ``val`` and ``test``; a
  pair belongs to the split of its query tile (relevant tiles are searched in the whole
  archive). λ — and any hyper-parameter — is chosen on ``val``; ``test`` is reported.
  The methods are training-free: nothing is fitted to the labels.

The same evaluator runs the ablation on PatternCom-format features
(:func:`queries_from_patterncom`: PatternCom's pairs and relevance, the query kept in the
database as in the reference protocol).
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..errors import InvalidArgumentError, PathNotFoundError
from ..scoring import (
    FusionOptions,
    MethodSpec,
    QueryStats,
    TextBasis,
    archive_similarities,
    check_lam,
    combine,
    method_spec,
    prepare_queries,
)
from .metrics import average_precision_from_ranks, precision_recall_at_k, relevant_ranks

log = logging.getLogger(__name__)

TASKS: tuple[str, ...] = ("add", "remove")
TEMPLATES: dict[str, str] = {"add": "with {}", "remove": "without {}"}
KS: tuple[int, ...] = (1, 5, 10)
# How a label reads in a query text (the column names are terse or hyphenated).
PHRASES: dict[str, str] = {
    "airplane": "airplanes", "bare-soil": "bare soil", "court": "courts", "dock": "docks",
    "mobile-home": "mobile homes", "ship": "ships", "tanks": "storage tanks",
}
SPLITS: tuple[str, ...] = ("val", "test")
AVG = "avg"  # pseudo-task: the mean of the per-task means


def ablation_methods(with_encoder: bool = True) -> list[str]:
    """Every method the benchmark runs by default: the originals, each transform on and off
    under WeiCom, the new fusions with and without all transforms, and the presets."""
    trans = ["centre", "tcentre", "project", "qe"] if with_encoder else ["centre", "qe"]
    out = ["image", "text", "average", "sum", "product"]
    for mask in range(1 << len(trans)):
        picked = [t for i, t in enumerate(trans) if mask >> i & 1]
        out.append("+".join(["weicom", *picked]))
    full = "+".join(trans)
    for f in ("minmax", "harris"):
        out += [f, f"{f}+centre+qe", f"{f}+{full}"]
    out += ["weicom-x"] + (["basic"] if with_encoder else [])
    seen: dict[str, None] = {}
    for m in out:
        spec = method_spec(m)
        if with_encoder or not spec.needs_encoder:
            seen.setdefault(spec.name, None)
    return list(seen)


# --------------------------------------------------------------------------- ground truth
@dataclass(frozen=True)
class TileSet:
    """Ground truth aligned with the database rows."""

    paths: list[str]
    classes: np.ndarray
    labels: np.ndarray
    label_names: list[str]
    heldout: np.ndarray

    def __len__(self) -> int:
        return len(self.paths)


def _key(path: str) -> str:
    """``class/file`` of a path (how the multi-label CSV names tiles)."""
    parts = Path(str(path)).parts
    return "/".join(parts[-2:])


def load_tileset(data: str | os.PathLike[str], db_paths: Sequence[str]) -> TileSet:
    """Classes, multi-labels and the captions-test flag of each database row.

    ``data`` holds ``multilabels.csv`` (an ``image`` column ``class/file.jpg`` and 0/1 label
    columns) and optionally ``captions.jsonl`` (``image``, ``split``)."""
    d = Path(data)
    csv_path = d / "multilabels.csv"
    if not csv_path.is_file():
        raise PathNotFoundError(f"{csv_path} does not exist (expected the UCM multi-labels)")
    ml = pd.read_csv(csv_path)
    if "image" not in ml.columns:
        raise InvalidArgumentError(f"{csv_path} has no 'image' column")
    ml["image"] = ml["image"].map(_key)
    ml = ml.drop_duplicates("image", keep="last").set_index("image")
    names = [str(c) for c in ml.columns]
    keys = [_key(p) for p in db_paths]
    missing = [k for k in keys if k not in ml.index]
    if missing:
        raise InvalidArgumentError(
            f"{len(missing)} database images have no row in {csv_path} (e.g. {missing[:3]}); "
            "index exactly the images of the multi-label set"
        )
    labels = ml.loc[keys].to_numpy() > 0
    heldout = np.zeros(len(keys), bool)
    cap = d / "captions.jsonl"
    if cap.is_file():
        test = set()
        with open(cap, encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    rec = json.loads(line)
                    if rec.get("split") == "test":
                        test.add(_key(rec["image"]))
        heldout = np.array([k in test for k in keys])
    classes = np.array([k.split("/")[0] for k in keys])
    return TileSet(keys, classes, labels, names, heldout)


def split_mask(classes: np.ndarray, seed: int = 0) -> np.ndarray:
    """``True`` = val: half of each class's rows (the first ⌊n/2⌋ of a seeded permutation)."""
    rng = np.random.default_rng(seed)
    val = np.zeros(len(classes), bool)
    for c in sorted(set(classes.tolist())):
        rows = np.flatnonzero(classes == c)
        val[rng.permutation(rows)[: len(rows) // 2]] = True
    return val


# --------------------------------------------------------------------------- queries
@dataclass(frozen=True)
class ComposedQueries:
    """(query row, text) pairs with their relevant rows; every array is (P,).

    ``task`` (``add``/``remove``, or a PatternCom attribute) groups the pairs in the tables;
    ``relevant[group[p]]`` are the database rows relevant to pair ``p``."""

    task: np.ndarray
    query: np.ndarray
    text: np.ndarray
    texts: list[str]
    group: np.ndarray
    relevant: list[np.ndarray]
    split: np.ndarray
    detail: pd.DataFrame = field(default_factory=pd.DataFrame)

    def __len__(self) -> int:
        return len(self.query)

    def tasks(self) -> list[str]:
        return list(dict.fromkeys(self.task.tolist()))

    def n_relevant(self) -> np.ndarray:
        return np.array([len(self.relevant[g]) for g in self.group], np.int64)


def build_queries(
    tiles: TileSet,
    *,
    tasks: Sequence[str] = TASKS,
    min_relevant: int = 5,
    phrases: dict[str, str] | None = None,
    templates: dict[str, str] | None = None,
    seed: int = 0,
) -> ComposedQueries:
    """The ``add``/``remove`` pairs of the module docstring (classes and labels in sorted
    order, query rows ascending)."""
    ph = {**PHRASES, **(phrases or {})}
    tpl = {**TEMPLATES, **(templates or {})}
    for t in tasks:
        if t not in TASKS:
            raise InvalidArgumentError(f"unknown task {t!r}; choose from {', '.join(TASKS)}")
    if min_relevant < 1:
        raise InvalidArgumentError(f"min_relevant must be >= 1, got {min_relevant}")
    val = split_mask(tiles.classes, seed)
    texts: list[str] = []
    text_id: dict[str, int] = {}
    relevant: list[np.ndarray] = []
    recs: list[tuple[str, int, int, int, str, str]] = []
    for task in tasks:
        for c in sorted(set(tiles.classes.tolist())):
            in_c = tiles.classes == c
            for j, name in enumerate(tiles.label_names):
                has = np.flatnonzero(in_c & tiles.labels[:, j])
                lacks = np.flatnonzero(in_c & ~tiles.labels[:, j])
                if len(has) < min_relevant or len(lacks) < min_relevant:
                    continue
                src, rel = (lacks, has) if task == "add" else (has, lacks)
                text = tpl[task].format(ph.get(name, name))
                if text not in text_id:
                    text_id[text] = len(texts)
                    texts.append(text)
                g = len(relevant)
                relevant.append(rel.astype(np.int64))
                recs += [(task, int(q), text_id[text], g, c, name) for q in src]
    if not recs:
        raise InvalidArgumentError(
            f"no (class, label) group has {min_relevant} tiles on each side: lower min_relevant"
        )
    cols: list[np.ndarray] = [np.array(x) for x in zip(*recs, strict=True)]
    task_a, qrow, tid, grp, cls_a, lab_a = cols
    split = np.where(val[qrow], "val", "test")
    detail = pd.DataFrame({"task": task_a, "query": [tiles.paths[i] for i in qrow],
                           "class": cls_a, "label": lab_a, "text": [texts[i] for i in tid],
                           "split": split})
    return ComposedQueries(task_a, qrow.astype(np.int64), tid.astype(np.int64), texts,
                           grp.astype(np.int64), relevant, split, detail)


def queries_from_patterncom(
    data: str | os.PathLike[str],
    db_paths: Sequence[str],
    attributes: Sequence[str] | None = None,
    *,
    seed: int = 0,
    skip_missing: bool = False,
) -> ComposedQueries:
    """PatternCom's pairs and relevance (:func:`rscir.bench.patterncom.build_pairs`) as
    :class:`ComposedQueries`, ``task`` = attribute; the split is by query image (50/50 per
    PatternNet class, seeded)."""
    from .patterncom import ATTRIBUTES, build_pairs, class_of, patterncom_dir, read_attribute_csv

    csv_dir = patterncom_dir(data)
    classes = np.array([class_of(p) for p in db_paths])
    val = split_mask(classes, seed)
    text_id: dict[str, int] = {}
    parts: dict[str, list] = {k: [] for k in ("task", "query", "text", "group")}
    relevant: list[np.ndarray] = []
    for a in attributes or ATTRIBUTES:
        p = build_pairs(read_attribute_csv(csv_dir / f"{a}.csv", a), db_paths,
                        skip_missing=skip_missing)
        remap = np.array([text_id.setdefault(t, len(text_id)) for t in p.texts], np.int64)
        parts["task"].append(np.full(len(p), a))
        parts["query"].append(p.query)
        parts["text"].append(remap[p.text] if len(p) else p.text)
        parts["group"].append(p.group + len(relevant))
        relevant += p.relevant
    cat = {k: np.concatenate(v) if v else np.zeros(0) for k, v in parts.items()}
    q = cat["query"].astype(np.int64)
    texts = sorted(text_id, key=text_id.__getitem__)
    return ComposedQueries(cat["task"].astype(str), q, cat["text"].astype(np.int64), texts,
                           cat["group"].astype(np.int64), relevant,
                           np.where(val[q], "val", "test"))


# --------------------------------------------------------------------------- evaluation
@dataclass
class ComposedResult:
    """Per-pair AP and R@k/P@k (fractions) of every (method, λ); λ is None for λ-free
    methods."""

    queries: ComposedQueries
    methods: list[str]
    lams: tuple[float, ...]
    ks: tuple[int, ...]
    ap: dict[tuple[str, float | None], np.ndarray]
    recall: dict[tuple[str, float | None], np.ndarray]
    precision: dict[tuple[str, float | None], np.ndarray]
    n_database: int
    seconds: float = 0.0
    skipped: dict[str, str] = field(default_factory=dict)
    meta: dict[str, object] = field(default_factory=dict)

    def method_lams(self, method: str) -> list[float | None]:
        return [lam for (m, lam) in self.ap if m == method]

    def _sel(self, task: str | None, split: str | None) -> np.ndarray:
        q = self.queries
        sel = np.ones(len(q), bool)
        if task is not None:
            sel &= q.task == task
        if split is not None:
            sel &= q.split == split
        return sel

    def mean(self, method: str, lam: float | None, task: str | None = None,
             split: str | None = None, metric: str = "AP") -> float:
        """Mean over the selected pairs, in percent (NaN when none). ``task="avg"``: the mean
        of the per-task means (PatternCom's ``avg`` over attributes); None: all pairs."""
        if task == AVG:
            return float(np.mean([self.mean(method, lam, t, split, metric)
                                  for t in self.queries.tasks()]))
        sel = self._sel(task, split)
        if not sel.any():
            return float("nan")
        key = (method, lam)
        if metric == "AP":
            v = self.ap[key]
        else:
            kind, k = metric.split("@")
            arr = self.recall[key] if kind == "R" else self.precision[key]
            v = arr[:, self.ks.index(int(k))]
        return float(100.0 * v[sel].mean())

    def choose_lambda(self, method: str, task: str | None, split: str = "val") -> float | None:
        """The λ of best mean AP on ``split`` (the smallest on ties; None if λ-free)."""
        lams = self.method_lams(method)
        if lams == [None]:
            return None
        vals = [self.mean(method, lam, task, split) for lam in lams]
        return lams[int(np.nanargmax(vals))]

    def lambda_table(self, task: str | None, split: str | None = "test") -> pd.DataFrame:
        """mAP (%) by λ (rows) for every λ-method (columns)."""
        cols = {m: [self.mean(m, lam, task, split) for lam in self.lams]
                for m in self.methods if self.method_lams(m) != [None]}
        df = pd.DataFrame(cols, index=pd.Index([f"{x:g}" for x in self.lams], name="lambda"))
        return df.round(2)

    def summary(self, task: str | None, *, select_on: str = "val",
                report_on: str = "test", baseline: str = "weicom") -> pd.DataFrame:
        """Per method: λ chosen on ``select_on``, the ``report_on`` mAP/R@k/P@k at that λ, the
        best ``report_on`` mAP over λ (oracle, for reference) and the gain over the baseline
        at its own chosen λ."""
        rows = {}
        base = None
        if baseline in self.methods:
            base = self.mean(baseline, self.choose_lambda(baseline, task, select_on), task,
                             report_on)
        for m in self.methods:
            lam = self.choose_lambda(m, task, select_on)
            rec: dict[str, object] = {"lambda": "-" if lam is None else f"{lam:g}"}
            rec[f"{select_on} mAP"] = self.mean(m, lam, task, select_on)
            m_ap = self.mean(m, lam, task, report_on)
            rec["mAP"] = m_ap
            for k in self.ks:
                rec[f"R@{k}"] = self.mean(m, lam, task, report_on, f"R@{k}")
            for k in self.ks:
                rec[f"P@{k}"] = self.mean(m, lam, task, report_on, f"P@{k}")
            lams = self.method_lams(m)
            vals = [self.mean(m, x, task, report_on) for x in lams]
            best = int(np.nanargmax(vals))
            rec["oracle mAP"] = vals[best]
            rec["oracle lambda"] = "-" if lams[best] is None else f"{lams[best]:g}"
            rec[f"Δ vs {baseline}"] = m_ap - base if base is not None else float("nan")
            rows[m] = rec
        df = pd.DataFrame.from_dict(rows, orient="index")
        df.index.name = "method"
        num = df.select_dtypes("number").columns
        df[num] = df[num].astype(float).round(2)
        return df

    def ablation(self, task: str | None, *, select_on: str = "val",
                 report_on: str = "test") -> pd.DataFrame:
        """The summary with one column per component (fusion, centre, tcentre, project, qe)."""
        s = self.summary(task, select_on=select_on, report_on=report_on)
        comp = []
        for m in s.index:
            spec = method_spec(m)
            comp.append({"fusion": spec.fusion, **{t: ("x" if getattr(spec, t) else "")
                                                  for t in ("centre", "tcentre", "project",
                                                            "qe")}})
        c = pd.DataFrame(comp, index=s.index)
        keep = ["lambda", f"{select_on} mAP", "mAP", *[f"R@{k}" for k in self.ks],
                f"P@{self.ks[-1]}", "oracle mAP", "Δ vs weicom"]
        return pd.concat([c, s[[k for k in keep if k in s.columns]]], axis=1)

    def paired_bootstrap(self, a: tuple[str, float | None], b: tuple[str, float | None],
                         task: str | None, split: str = "test", n: int = 2000,
                         seed: int = 0) -> tuple[float, float, float]:
        """Mean AP difference a − b (percent) on the split and its 95% interval, resampling
        query tiles (a tile's pairs move together)."""
        sel = self._sel(task, split)
        diff = (self.ap[a] - self.ap[b])[sel] * 100.0
        qrow = self.queries.query[sel]
        uq, inv = np.unique(qrow, return_inverse=True)
        sums = np.bincount(inv, diff, len(uq))
        cnt = np.bincount(inv, minlength=len(uq)).astype(float)
        rng = np.random.default_rng(seed)
        draws = rng.integers(0, len(uq), size=(n, len(uq)))
        boot = sums[draws].sum(1) / cnt[draws].sum(1)
        lo, hi = np.percentile(boot, [2.5, 97.5])
        return float(diff.mean()), float(lo), float(hi)


def _rank_metrics(fused: np.ndarray, cols: np.ndarray, valid: np.ndarray, n_rel: np.ndarray,
                  ks: Sequence[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    ranks = relevant_ranks(fused, cols, valid)
    ap = average_precision_from_ranks(ranks, n_rel)
    prec, rec = precision_recall_at_k(ranks, n_rel, ks)
    return ap, rec, prec


def text_side(encode_texts: Callable[[list[str]], np.ndarray], texts: Sequence[str],
              methods: Sequence[str] | None, opts: FusionOptions,
              ) -> tuple[np.ndarray, list[str], Any]:
    """What every composed benchmark needs from the model's text tower: the queries' text
    features, the methods to run (default: the ablation) and, when one of them needs it, the
    text basis of objects and styles."""
    from ..scoring import text_basis

    tf = np.asarray(encode_texts(list(texts)), np.float64)
    names = list(methods or ablation_methods(True))
    basis = None
    if any(method_spec(m).needs_encoder for m in names):
        basis = text_basis(encode_texts, opts.objects, opts.styles, alpha=opts.alpha,
                           n_components=opts.n_components)
    return tf, names, basis


def evaluate(
    embeddings: np.ndarray,
    moments: object,
    queries: ComposedQueries,
    text_features: np.ndarray,
    methods: Sequence[str],
    lams: Sequence[float],
    *,
    options: FusionOptions | None = None,
    basis: TextBasis | None = None,
    exclude_query: bool = True,
    ks: Sequence[int] = KS,
    block: int = 256,
    query_vectors: np.ndarray | None = None,
    progress: Callable[[str], None] | None = None,
) -> ComposedResult:
    """Every method at every λ (λ-free methods once) on every pair.

    Each method prepares its queries once (:func:`rscir.scoring.prepare_queries`: one image
    query per distinct query tile, one text query per distinct text), scans the archive once
    (:func:`rscir.scoring.archive_similarities`) and fuses per λ by blocks of pairs; every
    normalization is over the whole archive. Methods that need a :class:`TextBasis` are
    skipped (and listed in ``skipped``) when none is given. ``query_vectors`` (R, d): query
    images that are not archive rows (``queries.query`` then indexes it, and nothing is
    excluded from the rankings)."""
    t0 = time.perf_counter()
    opts = options or FusionOptions()
    lams = tuple(check_lam(x) for x in lams) or (0.5,)
    ks = tuple(int(k) for k in ks)
    n = int(embeddings.shape[0])
    text_features = np.asarray(text_features, np.float64)
    if text_features.shape[0] != len(queries.texts):
        raise InvalidArgumentError(
            f"{text_features.shape[0]} text features for {len(queries.texts)} texts"
        )
    uq, q_inv = np.unique(queries.query, return_inverse=True)
    counts = np.array([len(r) for r in queries.relevant], np.int64)
    m_max = int(counts.max()) if len(counts) else 0
    rel_cols = np.zeros((len(counts), max(m_max, 1)), np.int64)
    for g, r in enumerate(queries.relevant):
        rel_cols[g, : len(r)] = r
    rel_valid = np.arange(rel_cols.shape[1])[None, :] < counts[:, None]
    res = ComposedResult(queries, [], lams, ks, {}, {}, {}, n)
    if query_vectors is not None:
        exclude_query = False
        q_img = np.asarray(query_vectors, np.float64)[uq]
    else:
        q_img = np.asarray(embeddings[uq], np.float64)
    for name in methods:
        spec: MethodSpec = method_spec(name)
        if spec.needs_encoder and basis is None:
            res.skipped[spec.name] = "needs the text encoder's word-list basis"
            continue
        if progress is not None:
            progress(spec.name)
        prep = prepare_queries(spec, q_img if spec.needs_image else None,
                               text_features if spec.needs_text else None, moments,
                               options=opts, basis=basis, embeddings=embeddings, paired=False)
        si, st = archive_similarities(prep, embeddings)
        ist, tst = prep.used_stats("img"), prep.used_stats("txt")
        method_lams: tuple[float | None, ...] = lams if spec.uses_lambda else (None,)
        out = {lam: (np.zeros(len(queries)), np.zeros((len(queries), len(ks))),
                     np.zeros((len(queries), len(ks)))) for lam in method_lams}
        for lo in range(0, len(queries), block):
            sl = slice(lo, min(lo + block, len(queries)))
            qi, ti, gi = q_inv[sl], queries.text[sl], queries.group[sl]
            a = None if si is None else si[qi]
            b = None if st is None else st[ti]
            i_stats = None if ist is None else QueryStats(ist.mean[qi], ist.std[qi])
            t_stats = None if tst is None else QueryStats(tst.mean[ti], tst.std[ti])
            cols, valid, n_rel = rel_cols[gi], rel_valid[gi], counts[gi]
            for lam in method_lams:
                fused = np.array(combine(spec.fusion, a, b, 0.5 if lam is None else lam,
                                         img_stats=i_stats, txt_stats=t_stats,
                                         harris_h=opts.harris_h), dtype=np.float64)
                if exclude_query:
                    fused[np.arange(len(fused)), queries.query[sl]] = -np.inf
                ap, rec, prec = _rank_metrics(fused, cols, valid, n_rel, ks)
                out[lam][0][sl], out[lam][1][sl], out[lam][2][sl] = ap, rec, prec
        res.methods.append(spec.name)
        for lam, (ap, rec, prec) in out.items():
            res.ap[(spec.name, lam)] = ap
            res.recall[(spec.name, lam)] = rec
            res.precision[(spec.name, lam)] = prec
    res.seconds = time.perf_counter() - t0
    return res


# --------------------------------------------------------------------------- whole runs
@dataclass(frozen=True)
class Archive:
    """Embeddings (N, d) with their relative paths, and the archive moments."""

    embeddings: np.ndarray
    paths: list[str]
    moments: object


def archive_from_store(store_dir: str | os.PathLike[str], rows: np.ndarray | None = None
                       ) -> Archive:
    """A store's embeddings (memory-mapped) and moments; with ``rows`` only those rows (then
    the moments are recomputed over them: they define the archive)."""
    from ..moments import ArchiveMoments
    from ..stores.uri import open_store

    st = open_store(store_dir)
    emb = st.embeddings
    paths = st.items["path"].astype(str).tolist()
    if rows is None:
        return Archive(emb, paths, st.moments())
    sub = np.asarray(emb[np.sort(rows)], np.float32)
    return Archive(sub, [paths[i] for i in np.sort(rows)], ArchiveMoments.of(sub))


def run_composed(
    data: str | os.PathLike[str],
    archive: Archive,
    encode_texts: Callable[[list[str]], np.ndarray] | None,
    *,
    methods: Sequence[str] | None = None,
    lams: Sequence[float] = tuple(np.round(np.arange(0, 1.0001, 0.05), 2)),
    subset: str = "all",
    tasks: Sequence[str] = TASKS,
    min_relevant: int = 5,
    options: FusionOptions | None = None,
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
) -> ComposedResult:
    """The real-tile benchmark end to end (``subset``: ``all`` or ``heldout``)."""
    if subset not in ("all", "heldout"):
        raise InvalidArgumentError(f"subset must be 'all' or 'heldout', got {subset!r}")
    tiles = load_tileset(data, archive.paths)
    if subset == "heldout":
        if not tiles.heldout.any():
            raise InvalidArgumentError(f"no captions.jsonl test split under {data}")
        rows = np.flatnonzero(tiles.heldout)
        from ..moments import ArchiveMoments

        sub = np.asarray(archive.embeddings[rows], np.float32)
        archive = Archive(sub, [archive.paths[i] for i in rows], ArchiveMoments.of(sub))
        tiles = load_tileset(data, archive.paths)
    queries = build_queries(tiles, tasks=tasks, min_relevant=min_relevant, seed=seed)
    opts = options or FusionOptions()
    if encode_texts is None:
        raise InvalidArgumentError("the composed benchmark needs the model's text encoder")
    tf, names, basis = text_side(encode_texts, queries.texts, methods, opts)
    res = evaluate(archive.embeddings, archive.moments, queries, tf,
                   names, lams, options=opts, basis=basis,
                   progress=progress)
    res.meta.update(subset=subset, n_queries=len(queries), min_relevant=min_relevant,
                    seed=seed, options=_opts_meta(opts),
                    basis_components=None if basis is None else basis.n_components)
    return res


def run_patterncom_ablation(
    data: str | os.PathLike[str],
    database: object,
    texts: dict[str, np.ndarray] | Callable[[list[str]], np.ndarray],
    *,
    methods: Sequence[str] | None = None,
    lams: Sequence[float] = tuple(np.round(np.arange(0, 1.0001, 0.05), 2)),
    attributes: Sequence[str] | None = None,
    options: FusionOptions | None = None,
    encode_texts: Callable[[list[str]], np.ndarray] | None = None,
    seed: int = 0,
    skip_missing: bool = False,
    progress: Callable[[str], None] | None = None,
) -> ComposedResult:
    """The ablation on PatternCom-format features (``database``: a
    :class:`rscir.bench.patterncom.Database`). The word-list methods run only with
    ``encode_texts`` (features from files have no text tower)."""
    from ..moments import ArchiveMoments
    from ..scoring import text_basis
    from .patterncom import text_matrix

    feats = np.asarray(database.features, np.float32)  # type: ignore[attr-defined]
    norms = np.linalg.norm(feats, axis=1, keepdims=True)
    feats = feats / np.maximum(norms, 1e-12)
    queries = queries_from_patterncom(data, database.paths, attributes,  # type: ignore[attr-defined]
                                      seed=seed, skip_missing=skip_missing)
    tf = text_matrix(queries.texts, texts, feats.shape[1]).astype(np.float64)
    opts = options or FusionOptions()
    basis = None
    if encode_texts is not None:
        basis = text_basis(encode_texts, opts.objects, opts.styles, alpha=opts.alpha,
                           n_components=opts.n_components)
    res = evaluate(feats, ArchiveMoments.of(feats), queries, tf,
                   methods or ablation_methods(basis is not None), lams, options=opts,
                   basis=basis, exclude_query=False, ks=(5, 10, 20), progress=progress)
    res.meta.update(protocol="patterncom", n_queries=len(queries), seed=seed,
                    options=_opts_meta(opts))
    return res


def _opts_meta(o: FusionOptions) -> dict[str, object]:
    return {"alpha": o.alpha, "n_components": o.n_components, "qe_k": o.qe_k,
            "qe_beta": o.qe_beta, "harris_h": o.harris_h, "n_objects": len(o.objects),
            "n_styles": len(o.styles)}


def read_word_list(path: str | os.PathLike[str]) -> tuple[str, ...]:
    """One entry per line (first CSV field; blank lines and ``#`` comments skipped)."""
    p = Path(path)
    if not p.is_file():
        raise PathNotFoundError(f"word list {p} does not exist")
    out = []
    for line in p.read_text(encoding="utf-8").splitlines():
        w = line.split(",")[0].strip()
        if w and not w.startswith("#"):
            out.append(w)
    if len(out) < 2:
        raise InvalidArgumentError(f"word list {p} needs at least 2 entries")
    return tuple(out)
