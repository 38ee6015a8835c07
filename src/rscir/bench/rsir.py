"""Real-image retrieval benchmarks on stores of UC Merced-16 and RSSCN7 (``rscir bench rsir``).

Usable with any encoder, because everything image-side is read from a store that ``rscir index``
built (its embeddings and labels); only text-to-image retrieval needs the store's model, for
the caption embeddings.

* **Single-label image-to-image** (any store with class labels, e.g. UCM-16, RSSCN7): every
  labelled item queries all the others (leave-the-query-out); relevant = same class. mAP over
  the full ranking and P@k.
* **Multi-label** (items of UCM-16 listed in ``ucm16/multilabels.csv``, the 17 object labels of
  Chaudhuri et al., TGRS 2018): relevance = at least one shared label (mAP, P@k), and the graded
  measures of multi-label RS retrieval with gain = number of shared labels: ACG@k, NDCG@k and
  weighted mAP (:func:`rscir.bench.metrics.graded_metrics`), and the label-based precision,
  recall and accuracy of the top k (lP@k, lR@k, lAcc@k: per retrieved image, the share of the
  query's labels it has, :func:`rscir.bench.metrics.label_based_metrics`). Queries without any
  label are left out (they have nothing relevant) and counted.
* **Text-to-image** (items of the ``test`` split of ``ucm16/captions.jsonl``, when the store's
  model has a text tower): the RemoteCLIP protocol within the 157 test images — each caption
  (5 per image) retrieves its own image (t2i R@1/5/10), each image retrieves any of its captions
  among all 5 × N (i2t R@1/5/10; a caption string that is also one of the image's own counts as
  correct, whoever it was written for), mean recall = mean of the six. Because UCM captions repeat across images
  ("There is a piece of farmland ."), the lenient t2i variant of :mod:`rscir.train.metrics` is
  reported too (each distinct caption a query, every image carrying it relevant).

Queries are processed in row blocks, so the similarity matrices held at once stay small.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..errors import InvalidArgumentError, PathNotFoundError
from .metrics import graded_metrics, label_based_metrics, ranking_metrics, recall_at_k_multi

log = logging.getLogger(__name__)

KS: tuple[int, ...] = (5, 10, 20, 50, 100)
TEXT_KS: tuple[int, ...] = (1, 5, 10)
DEFAULT_BLOCK = 512  # query rows scored at once
# What the shipped rscir-mini was trained on (docs/MODEL_CARD_rscir-mini.md): its image tables
# on these archives are not held-out numbers, and the report says so.
TRAINED_ON = {
    "ucm16": "rscir-mini was trained on the UCM-16 images outside the captions test split: its "
             "image-to-image numbers here are not held-out (text-to-image is)",
    "rsscn7": "rscir-mini was trained on RSSCN7 (class templates): these are not held-out numbers",
}


def default_data_dir() -> Path:
    """``$RSCIR_SHARED_DATA`` or ``../shared/data`` (the layout of this workplace)."""
    return Path(os.environ.get("RSCIR_SHARED_DATA", "../shared/data"))


@dataclass(frozen=True)
class RsirData:
    """Where the annotation files of the benchmarks live under ``--data``."""

    root: Path

    @property
    def ucm_images(self) -> Path:
        return self.root / "ucm16" / "images"

    @property
    def multilabels(self) -> Path:
        return self.root / "ucm16" / "multilabels.csv"

    @property
    def captions(self) -> Path:
        return self.root / "ucm16" / "captions.jsonl"

    def dataset_name(self, archive_root: str | os.PathLike[str]) -> str:
        """``ucm16``/``rsscn7`` for the known image folders, else the folder's own name."""
        real = os.path.realpath(archive_root)
        for name in ("ucm16", "rsscn7"):
            if real == os.path.realpath(self.root / name / "images"):
                return name
        p = Path(real)
        return p.parent.name if p.name == "images" else p.name


# ----------------------------------------------------------------------------- metrics


def _block_scores(emb: np.ndarray, lo: int, hi: int) -> np.ndarray:
    """Similarities of queries ``lo:hi`` to every item, the query itself pushed to the end
    (-inf), which leaves every rank above it unchanged: leave-the-query-out."""
    s = emb[lo:hi] @ emb.T
    s[np.arange(hi - lo), np.arange(lo, hi)] = -np.inf
    return s


def single_label_retrieval(
    emb: np.ndarray, labels: Sequence[str], ks: Sequence[int] = KS, block: int = DEFAULT_BLOCK
) -> dict[str, np.ndarray]:
    """Per-query AP and P@k (leave-the-query-out, relevant = same label) for L2-normalized
    embeddings (N, d); a query whose class has no other member gets AP 0 (none occur in the
    benchmark datasets, which have 100 or 400 images per class)."""
    emb = np.ascontiguousarray(emb, dtype=np.float32)
    lab = np.asarray(labels, dtype=object)
    if len(lab) != len(emb):
        raise InvalidArgumentError(f"{len(lab)} labels for {len(emb)} embeddings")
    _, codes = np.unique(lab.astype(str), return_inverse=True)
    parts: list[dict[str, np.ndarray]] = []
    for lo in range(0, len(emb), block):
        hi = min(lo + block, len(emb))
        rel = codes[lo:hi, None] == codes[None, :]
        rel[np.arange(hi - lo), np.arange(lo, hi)] = False
        parts.append(ranking_metrics(_block_scores(emb, lo, hi), rel, ks))
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]} if parts else {}


def multi_label_retrieval(
    emb: np.ndarray, label_matrix: np.ndarray, ks: Sequence[int] = KS, block: int = DEFAULT_BLOCK
) -> dict[str, np.ndarray]:
    """Per-query multi-label measures (leave-the-query-out) for items with a 0/1 label matrix
    (N, L): ``AP``/``P@k``/``R@k`` with relevance = ≥ 1 shared label, and ``wAP``, ``ACG@k``,
    ``NDCG@k`` with gain = number of shared labels; ``lP@k``/``lR@k``/``lAcc@k`` label-based
    (set overlap of the top k's labels with the query's). Queries without labels are dropped;
    the returned ``query`` holds the row of each query kept."""
    emb = np.ascontiguousarray(emb, dtype=np.float32)
    lm = np.asarray(label_matrix, dtype=np.int64)
    if lm.shape[0] != len(emb):
        raise InvalidArgumentError(f"{lm.shape[0]} label rows for {len(emb)} embeddings")
    queries = np.flatnonzero(lm.sum(axis=1) > 0)
    parts: list[dict[str, np.ndarray]] = []
    for lo in range(0, len(queries), block):
        q = queries[lo : lo + block]
        s = emb[q] @ emb.T
        s[np.arange(len(q)), q] = -np.inf
        gains = lm[q] @ lm.T  # shared labels
        gains[np.arange(len(q)), q] = 0  # the query itself is not in the database
        out = ranking_metrics(s, gains > 0, ks)
        out.update(graded_metrics(s, gains, ks))
        out.update(label_based_metrics(s, lm[q], lm, ks))  # the query itself ranks last
        parts.append(out)
    res = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]} if parts else {}
    res["query"] = queries
    return res


def text_image_retrieval(
    img_emb: np.ndarray,
    captions: Sequence[Sequence[str]],
    embed_texts: Callable[[list[str]], np.ndarray],
    ks: Sequence[int] = TEXT_KS,
) -> dict[str, float]:
    """Cross-modal recall within a set of captioned images (RemoteCLIP's protocol): ``t2i_R@k``
    one query per (image, caption), only its image correct; ``i2t_R@k`` one query per image,
    any caption whose text is one of its captions correct; ``mean_recall`` over all six; ``t2i_distinct_R@k`` the lenient
    variant (one query per distinct caption, every image carrying it correct)."""
    from ..train.metrics import recall_at_k

    img = np.asarray(img_emb, dtype=np.float64)
    vocab: dict[str, int] = {}
    for caps in captions:
        for c in caps:
            vocab.setdefault(c, len(vocab))
    txt = np.asarray(embed_texts(list(vocab)), dtype=np.float64)
    qi = np.asarray([vocab[c] for caps in captions for c in caps], dtype=np.int64)
    owner = np.asarray([i for i, caps in enumerate(captions) for _ in caps], dtype=np.int64)
    t2i = txt[qi] @ img.T  # (C, N)
    correct = owner[:, None] == np.arange(len(img))[None, :]
    r_t2i = recall_at_k_multi(t2i, correct, ks)
    # i2t: a caption is correct when its *text* is one of the image's captions, so identical
    # strings written for other images (exact score ties) are not arbitrarily right or wrong
    own_text = np.zeros((len(img), len(vocab)), dtype=bool)
    own_text[owner, qi] = True
    r_i2t = recall_at_k_multi(t2i.T, own_text[:, qi], ks)
    out: dict[str, float] = {"n_images": float(len(img)), "n_captions": float(len(qi))}
    out.update({f"t2i_R@{k}": float(v) for k, v in zip(ks, r_t2i, strict=True)})
    out.update({f"i2t_R@{k}": float(v) for k, v in zip(ks, r_i2t, strict=True)})
    out["t2i_mean_recall"] = float(np.mean(r_t2i))
    out["mean_recall"] = float(np.mean(np.concatenate([r_t2i, r_i2t])))
    # the lenient variant of rscir.train.metrics: each distinct caption a query
    lenient = recall_at_k(txt @ img.T, own_text.T, ks)
    out.update({f"t2i_distinct_R@{k}": lenient[k] for k in ks})
    return out


def summarize(per_query: dict[str, np.ndarray], skip: Sequence[str] = ("query",)) -> dict[str, float]:
    """Mean over queries of each per-query measure (``AP`` becomes ``mAP``)."""
    out: dict[str, float] = {}
    for k, v in per_query.items():
        if k in skip:
            continue
        out["mAP" if k == "AP" else k] = float(np.mean(v)) if len(v) else float("nan")
    return out


# ----------------------------------------------------------------------------- one store


@dataclass
class StoreReport:
    """Everything measured on one store."""

    store: str
    model: str
    dataset: str
    n_items: int
    single_label: dict[str, Any] | None = None
    multi_label: dict[str, Any] | None = None
    text: dict[str, Any] | None = None
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "store": self.store, "model": self.model, "dataset": self.dataset,
            "n_items": self.n_items, "single_label": self.single_label,
            "multi_label": self.multi_label, "text": self.text, "notes": self.notes,
        }


def _real_paths(root: str, rel: Sequence[str]) -> list[str]:
    return [os.path.realpath(os.path.join(root, r)) for r in rel]


def _match(store_paths: Sequence[str], wanted: Sequence[str]) -> np.ndarray:
    """Store row of each wanted (real) path, -1 when the store lacks it."""
    return pd.Index(store_paths).get_indexer(pd.Index(wanted)).astype(np.int64)


def read_multilabels(path: str | os.PathLike[str]) -> tuple[list[str], list[str], np.ndarray]:
    """(image paths relative to ``images/``, label names, 0/1 matrix) of a multilabels CSV."""
    df = pd.read_csv(path)
    if "image" not in df.columns or df.shape[1] < 2:
        raise InvalidArgumentError(f"{path}: expected an 'image' column and one 0/1 column per label")
    names = [c for c in df.columns if c != "image"]
    m = df[names].to_numpy()
    if not np.isin(m, (0, 1)).all():
        raise InvalidArgumentError(f"{path}: label columns must hold 0/1")
    return df["image"].astype(str).tolist(), names, m.astype(np.int64)


def read_test_captions(path: str | os.PathLike[str], split: str = "test") -> list[tuple[str, list[str]]]:
    """(image, captions) of one split of a captions JSONL, in file order."""
    out = []
    with open(path, encoding="utf-8") as f:
        for ln, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                d = json.loads(line)
                if d.get("split") == split:
                    out.append((str(d["image"]), [str(c) for c in d["captions"]]))
            except (ValueError, KeyError, TypeError) as e:
                raise InvalidArgumentError(f"{path}:{ln}: bad captions line ({e})") from e
    return out


def _text_encoder(
    store: Any, model: str | None, checkpoint: str | None, device: str
) -> tuple[Any, str]:
    """The store's encoder for captions, or None (with the reason) when it has no text tower."""
    from ..api import load_encoder_for_store
    from ..errors import ModelUnavailableError

    if model is None and checkpoint is None and store.manifest.model.backend == "classic":
        return None, f"model {store.manifest.model.name!r} has no text tower"
    try:
        enc = load_encoder_for_store(store, model=model, checkpoint=checkpoint, device=device)
        if not getattr(enc, "has_text", True):
            return None, f"model {enc.info.name!r} has no text tower"
        enc.encode_texts(["probe"])
    except (ModelUnavailableError, NotImplementedError) as e:
        if model is not None or checkpoint is not None:
            raise
        return None, f"text tower unavailable: {e}"
    return enc, ""


def _store_multilabels(items: pd.DataFrame) -> tuple[list[str], np.ndarray] | None:
    """(label names, 0/1 matrix) from the items' ``labels`` when the store is multi-label (some
    item carries several labels), else None."""
    lists = [list(v) for v in items["labels"]]
    if not any(len(v) > 1 for v in lists):
        return None
    names = sorted({x for v in lists for x in v})
    col = {n: j for j, n in enumerate(names)}
    lm = np.zeros((len(lists), len(names)), np.int8)
    rows = np.repeat(np.arange(len(lists)), [len(v) for v in lists])
    lm[rows, [col[x] for v in lists for x in v]] = 1
    return names, lm


def evaluate_store(
    store_dir: str | os.PathLike[str],
    data: RsirData,
    *,
    ks: Sequence[int] = KS,
    text_ks: Sequence[int] = TEXT_KS,
    model: str | None = None,
    checkpoint: str | None = None,
    device: str = "auto",
    text: bool = True,
    block: int = DEFAULT_BLOCK,
) -> StoreReport:
    """All the benchmarks that apply to one store (a directory or a ``postgresql://`` URI)."""
    from ..stores.uri import open_store, store_exists

    if not store_exists(store_dir):
        raise PathNotFoundError(f"no rscir store at {store_dir} (build one with `rscir index`)")
    store = open_store(store_dir)
    try:
        items = store.items
        emb = np.asarray(store.embeddings, dtype=np.float32)
        if len(store) < 2:
            raise InvalidArgumentError(f"store {store_dir} holds {len(store)} item(s); need at least 2")
        rep = StoreReport(str(store_dir), store.manifest.model.name,
                          data.dataset_name(store.root), len(store))
        paths = _real_paths(store.root, items["path"].tolist())
        if rep.model == "rscir-mini" and rep.dataset in TRAINED_ON:
            rep.notes.append(TRAINED_ON[rep.dataset])

        lab = items["label"]
        has = lab.notna() & (lab.astype(str) != "")
        if has.sum() >= 2:
            rows = np.flatnonzero(has.to_numpy())
            labels = lab[has].astype(str).to_numpy()
            pq = single_label_retrieval(emb[rows], labels, ks, block)
            per_class = {c: float(pq["AP"][labels == c].mean()) for c in np.unique(labels)}
            rep.single_label = {"n_queries": len(rows), "n_classes": len(per_class),
                                **summarize(pq), "per_class_mAP": per_class}
            if len(rows) < len(store):
                rep.notes.append(f"single-label: {len(store) - len(rows)} unlabelled items left out")
        else:
            rep.notes.append("single-label: the store has no class labels (index with --labels folder)")

        own = _store_multilabels(items)
        if own is not None:  # the store's own multi-labels (e.g. BigEarthNet's 19 or 43 classes)
            names, lm = own
            pq = multi_label_retrieval(emb, lm, ks, block)
            rep.multi_label = {"n_items": len(store), "n_queries": len(pq["query"]),
                               "n_labels": len(names), "source": "store labels",
                               **summarize(pq)}
        elif data.multilabels.is_file():
            imgs, names, lm = read_multilabels(data.multilabels)
            r = _match(paths, _real_paths(str(data.ucm_images), imgs))
            ok = r >= 0
            if ok.sum() >= 2:
                pq = multi_label_retrieval(emb[r[ok]], lm[ok], ks, block)
                rep.multi_label = {"n_items": int(ok.sum()), "n_queries": len(pq["query"]),
                                   "n_labels": len(names), **summarize(pq)}
                if (~ok).any():
                    rep.notes.append(f"multi-label: {int((~ok).sum())} listed images not in the store")
                if len(pq["query"]) < ok.sum():
                    rep.notes.append(f"multi-label: {int(ok.sum()) - len(pq['query'])} images "
                                     "without any label are not queries")
            else:
                rep.notes.append("multi-label: no image of ucm16/multilabels.csv is in this store")
        else:
            rep.notes.append(f"multi-label: {data.multilabels} not found")

        if not text:
            rep.notes.append("text-to-image: not requested")
        elif not data.captions.is_file():
            rep.notes.append(f"text-to-image: {data.captions} not found")
        else:
            caps = read_test_captions(data.captions)
            r = _match(paths, _real_paths(str(data.ucm_images), [c[0] for c in caps]))
            ok = r >= 0
            if ok.sum() < 2:
                rep.notes.append("text-to-image: the captions test split is not in this store")
            else:
                enc, why = _text_encoder(store, model, checkpoint, device)
                if enc is None:
                    rep.notes.append(f"text-to-image: skipped, {why}")
                else:
                    kept = [caps[i][1] for i in np.flatnonzero(ok)]
                    rep.text = text_image_retrieval(emb[r[ok]], kept, enc.encode_texts, text_ks)
                    if (~ok).any():
                        rep.notes.append(f"text-to-image: {int((~ok).sum())} test images not in "
                                         "the store")
        return rep
    finally:
        store.close()


# ----------------------------------------------------------------------------- tables


def tables(reports: Sequence[StoreReport], ks: Sequence[int] = KS,
           text_ks: Sequence[int] = TEXT_KS) -> dict[str, pd.DataFrame]:
    """Wide tables, one row per store: ``single_label``, ``multi_label``, ``text``."""
    def rows(attr: str, cols: Sequence[str]) -> pd.DataFrame:
        out = []
        for r in reports:
            d = getattr(r, attr)
            if d is not None:
                out.append({"store": r.store, "model": r.model, "dataset": r.dataset,
                            **{c: d.get(c) for c in cols}})
        return pd.DataFrame(out, columns=["store", "model", "dataset", *cols])

    single = ["n_queries", "mAP", *[f"P@{k}" for k in ks]]
    multi = ["n_queries", "mAP", "wAP", *[f"P@{k}" for k in ks], *[f"ACG@{k}" for k in ks],
             *[f"NDCG@{k}" for k in ks], *[f"lR@{k}" for k in ks], *[f"lP@{k}" for k in ks]]
    txt = ["n_images", "n_captions", *[f"t2i_R@{k}" for k in text_ks],
           *[f"i2t_R@{k}" for k in text_ks], "mean_recall", "t2i_mean_recall",
           *[f"t2i_distinct_R@{k}" for k in text_ks]]
    return {"single_label": rows("single_label", single), "multi_label": rows("multi_label", multi),
            "text": rows("text", txt)}


def long_table(reports: Sequence[StoreReport]) -> pd.DataFrame:
    """One row per (store, task, metric): the CSV output."""
    out = []
    for r in reports:
        for task in ("single_label", "multi_label", "text"):
            d = getattr(r, task)
            for k, v in (d or {}).items():
                if isinstance(v, (int, float)):
                    out.append({"store": r.store, "model": r.model, "dataset": r.dataset,
                                "task": task, "metric": k, "value": float(v)})
    return pd.DataFrame(out, columns=["store", "model", "dataset", "task", "metric", "value"])


def _md(df: pd.DataFrame) -> str:
    if df.empty:
        return "(none)\n"
    cols = list(df.columns)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for row in df.itertuples(index=False):
        cells = []
        for v in row:
            if isinstance(v, float):
                cells.append(f"{v:.0f}" if float(v).is_integer() and abs(v) >= 2 else f"{v:.4f}")
            else:
                cells.append(str(v))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def markdown(reports: Sequence[StoreReport], ks: Sequence[int] = KS,
             text_ks: Sequence[int] = TEXT_KS) -> str:
    t = tables(reports, ks, text_ks)
    parts = [
        "# rscir bench rsir\n",
        "## Single-label image-to-image retrieval (leave-the-query-out, relevant = same class)\n",
        _md(t["single_label"]),
        "## Multi-label retrieval on UCM-16 (relevant = ≥ 1 shared label; gain = shared labels; "
        "lR/lP = label-based recall/precision of the top k)\n",
        _md(t["multi_label"]),
        "## Text-to-image on the UCM captions test split (RemoteCLIP protocol)\n",
        "t2i: one query per (image, caption), its image correct; i2t: one query per image, any "
        "caption with the text of one of its captions correct; mean_recall = mean of the six R@k; t2i_distinct: one query per "
        "distinct caption, every image carrying it correct.\n",
        _md(t["text"]),
    ]
    notes = [f"- `{r.store}`: {n}" for r in reports for n in r.notes]
    if notes:
        parts += ["## Notes\n", "\n".join(notes) + "\n"]
    return "\n".join(parts)


def write_outputs(reports: Sequence[StoreReport], out: str | os.PathLike[str],
                  ks: Sequence[int] = KS, text_ks: Sequence[int] = TEXT_KS) -> dict[str, Path]:
    """``rsir.md``, ``rsir.csv`` (long), ``rsir_<task>.csv`` (wide) and ``rsir.json``."""
    d = Path(out)
    d.mkdir(parents=True, exist_ok=True)
    paths = {"markdown": d / "rsir.md", "csv": d / "rsir.csv", "json": d / "rsir.json"}
    paths["markdown"].write_text(markdown(reports, ks, text_ks), encoding="utf-8")
    long_table(reports).to_csv(paths["csv"], index=False)
    for name, df in tables(reports, ks, text_ks).items():
        p = d / f"rsir_{name}.csv"
        df.to_csv(p, index=False)
        paths[name] = p
    paths["json"].write_text(json.dumps(
        {"ks": list(ks), "text_ks": list(text_ks), "stores": [r.to_dict() for r in reports]},
        indent=1), encoding="utf-8")
    return paths
