"""Held-out retrieval metrics: text-to-image / image-to-text recall@k and image-to-image mAP.

Captions in remote-sensing caption sets repeat across images ("There is a piece of farmland ."
describes dozens of tiles), so two text-to-image protocols are reported:

* ``t2i_R@k`` — each *distinct* caption is one query; every image that carries that exact
  caption is relevant (scores of identical captions are identical, so "its own image" is
  ill-defined);
* ``t2i_strict_R@k`` — the usual protocol: each (image, caption) pair is one query and only
  its own image is relevant (ties with other images carrying the same caption count against it).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
from sklearn.metrics import label_ranking_average_precision_score

from ..errors import InvalidArgumentError

KS = (1, 5, 10)


def recall_at_k(scores: np.ndarray, relevant: np.ndarray, ks: Sequence[int] = KS) -> dict[int, float]:
    """Fraction of queries (rows) with at least one relevant item among their top k.

    Ties are broken pessimistically: the rank of the best relevant item counts every
    irrelevant item that scores at least as high (rows without a relevant item are skipped)."""
    scores = np.asarray(scores, np.float64)
    relevant = np.asarray(relevant, bool)
    if scores.shape != relevant.shape:
        raise InvalidArgumentError(f"scores {scores.shape} and relevance {relevant.shape} differ")
    keep = relevant.any(axis=1)
    scores, relevant = scores[keep], relevant[keep]
    if len(scores) == 0:
        return {k: float("nan") for k in ks}
    best_rel = np.where(relevant, scores, -np.inf).max(axis=1)
    # rank of the best relevant item = number of items scoring >= it (pessimistic on ties)
    n_irrel_ge = ((scores >= best_rel[:, None]) & ~relevant).sum(axis=1)
    rank = n_irrel_ge + 1
    return {k: float((rank <= k).mean()) for k in ks}


def image_map(emb: np.ndarray, labels: Sequence[str | None]) -> float:
    """Mean average precision of image-to-image retrieval by class label, each image querying
    all others (itself excluded); queries whose class has no other member are skipped."""
    lab = np.asarray([x if x is not None else "" for x in labels], dtype=object)
    ok = lab != ""
    emb = np.asarray(emb, np.float64)[ok]
    lab = lab[ok]
    n = len(lab)
    if n < 2:
        return float("nan")
    sims = emb @ emb.T
    rel = lab[:, None] == lab[None, :]
    off = ~np.eye(n, dtype=bool)
    sims = sims[off].reshape(n, n - 1)
    rel = rel[off].reshape(n, n - 1)
    has = rel.any(axis=1)
    if not has.any():
        return float("nan")
    return float(label_ranking_average_precision_score(rel[has], sims[has]))


def evaluate_embeddings(
    img_emb: np.ndarray,
    captions: Sequence[Sequence[str]] | None,
    labels: Sequence[str | None],
    embed_texts: Callable[[list[str]], np.ndarray] | None,
    ks: Sequence[int] = KS,
) -> dict[str, float]:
    """All held-out numbers for L2-normalized image embeddings; text metrics only when a text
    tower is given (``embed_texts``) and images have captions."""
    out: dict[str, float] = {"n_images": float(len(img_emb)), "i2i_mAP": image_map(img_emb, labels)}
    if embed_texts is None or not captions or not any(captions):
        return out
    vocab: dict[str, int] = {}
    for caps in captions:
        for c in caps:
            vocab.setdefault(c, len(vocab))
    texts = list(vocab)
    txt = np.asarray(embed_texts(texts), np.float64)
    n, q = len(img_emb), len(texts)
    owns = np.zeros((q, n), bool)
    for i, caps in enumerate(captions):
        owns[[vocab[c] for c in caps], i] = True
    scores = txt @ np.asarray(img_emb, np.float64).T  # (Q, N)
    for k, v in recall_at_k(scores, owns, ks).items():
        out[f"t2i_R@{k}"] = v
    for k, v in recall_at_k(scores.T, owns.T, ks).items():
        out[f"i2t_R@{k}"] = v
    # strict protocol: one query per (image, caption), only that image relevant
    qi = np.asarray([vocab[c] for caps in captions for c in caps])
    ii = np.asarray([i for i, caps in enumerate(captions) for _ in caps])
    strict_rel = np.zeros((len(qi), n), bool)
    strict_rel[np.arange(len(qi)), ii] = True
    for k, v in recall_at_k(scores[qi], strict_rel, ks).items():
        out[f"t2i_strict_R@{k}"] = v
    out["n_texts"] = float(q)
    return out
