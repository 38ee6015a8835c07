"""Retrieval metrics, vectorized over queries.

Two families:

* **Rank-based** (AP, P@k, R@k): for large archives only the ranks of the *relevant* items are
  needed. :func:`relevant_ranks` sorts each score row once (numpy's SIMD sort, far faster than an
  argsort) and finds each relevant item's rank with a batched binary search, instead of ordering
  the whole archive per query.
* **Graded** (ACG@k, NDCG@k, weighted mAP) for multi-label retrieval, where the gain of an item is
  the number of labels it shares with the query; these need the full order and are meant for
  small archives (thousands of items).
* **Label-based** (lP@k, lR@k, lAcc@k) for multi-label retrieval: per retrieved item, the share
  of the query's labels it carries (recall), of its own labels the query has (precision), and
  their Jaccard overlap — the seed's recall measure for multi-code hashing.

Ties are broken the way a *stable* descending sort breaks them: equal scores keep column order
(lower index ranks first). The tie repair is exact and runs only for rows that contain ties.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..errors import InvalidArgumentError


def relevant_ranks(
    scores: np.ndarray,
    cols: np.ndarray,
    valid: np.ndarray,
    *,
    rows: np.ndarray | None = None,
    sorted_scores: np.ndarray | None = None,
) -> np.ndarray:
    """1-based ranks of ``scores[rows[q], cols[q, j]]`` within row ``rows[q]`` in descending order.

    ``scores`` (R, N); ``cols``/``valid`` (Q, M) padded column lists; ``rows`` (Q,) maps each query
    to a score row (identity when None, then Q == R), so that queries sharing a ranking (e.g. one
    text for many queries) sort it once. ``sorted_scores`` is ``np.sort(scores, axis=1)`` when the
    caller already has it. Invalid entries get rank ``N + 1``.
    """
    scores = np.asarray(scores)
    if scores.ndim != 2:
        raise InvalidArgumentError(f"scores must be 2-D, got shape {scores.shape}")
    n = scores.shape[1]
    cols = np.asarray(cols, dtype=np.int64)
    valid = np.asarray(valid, dtype=bool)
    q = cols.shape[0]
    if rows is None:
        if q != scores.shape[0]:
            raise InvalidArgumentError("without rows, cols must have one row per score row")
        rows = np.arange(q)
    rows = np.asarray(rows, dtype=np.int64)
    safe_cols = np.where(valid, cols, 0)
    if q == 0 or cols.shape[1] == 0:
        return np.full(cols.shape, n + 1, dtype=np.int64)
    import torch  # batched searchsorted; imported here so `rscir` starts without torch

    srt = np.sort(scores, axis=1) if sorted_scores is None else sorted_scores
    vals = scores[rows[:, None], safe_cols]
    identity = len(rows) == srt.shape[0] and np.array_equal(rows, np.arange(len(rows)))
    t_sorted = torch.from_numpy(np.ascontiguousarray(srt))
    if not identity:
        t_sorted = t_sorted[torch.from_numpy(rows)]
    t_vals = torch.from_numpy(np.ascontiguousarray(vals))
    right = torch.searchsorted(t_sorted, t_vals, right=True)
    # The item itself sits at right-1; another item has exactly its score iff right-2 holds it too.
    before = torch.gather(t_sorted, 1, (right - 2).clamp_(min=0)).numpy()
    right = right.numpy()
    greater = n - right  # items scoring strictly higher
    ranks = greater + 1
    tied = valid & (right >= 2) & (before == vals)
    if tied.any():
        ranks += _equal_before(scores, rows, safe_cols, vals, tied)
    ranks[~valid] = n + 1
    return ranks


def _equal_before(
    scores: np.ndarray, rows: np.ndarray, cols: np.ndarray, vals: np.ndarray, tied: np.ndarray
) -> np.ndarray:
    """For tied entries, how many items with exactly the same score have a lower column (they
    rank first in a stable order); 0 elsewhere.

    In float32, chance ties are common at archive scale (tens of thousands of scores share a
    narrow range), so this is vectorized: each affected row is compared once per distinct tied
    value it holds (usually one or two), and the equal items are counted with a binary search."""
    n = scores.shape[1]
    out = np.zeros(tied.shape, dtype=np.int64)
    t_rows = np.flatnonzero(tied.any(axis=1))
    tv = np.where(tied[t_rows], vals[t_rows], np.inf)
    tv.sort(axis=1)
    first = np.isfinite(tv)
    first[:, 1:] &= tv[:, 1:] != tv[:, :-1]
    n_distinct = first.sum(axis=1)
    k = int(n_distinct.max())
    distinct = np.full((len(t_rows), k), np.inf, dtype=scores.dtype)
    r_idx, c_idx = np.nonzero(first)
    distinct[r_idx, (np.cumsum(first, axis=1) - 1)[r_idx, c_idx]] = tv[r_idx, c_idx]
    # Equal items as sorted keys (local row, value index, column).
    row_scores = scores[rows[t_rows]]
    keys = []
    for j in range(k):
        sel = np.flatnonzero(n_distinct > j)
        block = row_scores if len(sel) == len(t_rows) else row_scores[sel]
        er, ec = np.nonzero(block == distinct[sel, j, None])
        keys.append((sel[er] * k + j) * n + ec)
    eq_keys = np.sort(np.concatenate(keys))
    tr, tj = np.nonzero(tied[t_rows])
    tval = vals[t_rows[tr], tj]
    tk = (distinct[tr] < tval[:, None]).sum(axis=1)  # index of the value in its row's list
    base = (tr * k + tk) * n
    cnt = np.searchsorted(eq_keys, base + cols[t_rows[tr], tj]) - np.searchsorted(eq_keys, base)
    out[t_rows[tr], tj] = cnt
    return out


def sort_rows(scores: np.ndarray, out: np.ndarray | None = None, rows: int = 8) -> np.ndarray:
    """``np.sort(scores, axis=1)``, copied and sorted a few rows at a time so each row is sorted
    while it is still in cache (at 30,000 columns a 128-row ``np.sort`` is ~2× slower per row).
    ``out`` may be a preallocated array of the same shape."""
    s = np.asarray(scores)
    out = np.empty_like(s) if out is None else out
    for i in range(0, s.shape[0], rows):
        blk = out[i : i + rows]
        np.copyto(blk, s[i : i + rows])
        blk.sort(axis=1)
    return out


def sort_rows_above(
    scores: np.ndarray, floors: np.ndarray, out: np.ndarray, *, full_above: float = 0.4
) -> np.ndarray:
    """Each row's scores that are ``>= floors[row]``, sorted ascending into the start of
    ``out[row]``; returns how many (the sorted length of each row).

    Exists because AP needs only the ranks of relevant items: with ``floors`` the lowest
    relevant score of each row, every item below it is outranked by all relevant items, so it
    never enters a rank and need not be sorted. Where a good method ranks all relevant items in
    the top few percent this sorts a few percent of the row. Rows where more than
    ``full_above`` of the items are kept are sorted whole (selecting them costs more than it
    saves); their sorted length is the row length."""
    n = scores.shape[1]
    lengths = np.zeros(scores.shape[0], np.int64)
    for i, floor in enumerate(np.asarray(floors, scores.dtype).tolist()):
        row, dst = scores[i], out[i]
        keep = row >= floor  # exact: the floor is one of the row's own (float32) scores
        k = np.count_nonzero(keep)  # per row: count_nonzero(axis=1) is ~5× slower
        if k == 0:
            continue
        if k > full_above * n:
            k = n
            np.copyto(dst, row)
        else:
            dst = dst[:k]
            np.compress(keep, row, out=dst)
        dst.sort()
        lengths[i] = k
    return lengths


def ranks_in_sorted_rows(
    scores: np.ndarray,
    sorted_scores: np.ndarray,
    rows: np.ndarray,
    cols: np.ndarray,
    starts: np.ndarray,
    lengths: np.ndarray | None = None,
) -> np.ndarray:
    """1-based ranks, in a stable descending order, of ragged lists of items: list ``p`` is
    ``cols[starts[p]:starts[p+1]]`` in score row ``rows[p]``. Returns a flat array like ``cols``
    whose ``p``-th segment holds the ranks of list ``p``, in no particular order (AP and P/R@k
    only need the set of ranks).

    ``sorted_scores`` is ``np.sort(scores, axis=1)``, or with ``lengths`` its rows' first
    ``lengths[row]`` entries hold every score ``>=`` the lowest listed score of the row, sorted
    (:func:`sort_rows_above`). The same ranks as :func:`relevant_ranks` without padding every
    list to the longest: each list's values are sorted (so numpy's binary search walks the sorted
    row forward) and located in the sorted row; items with an exactly equal score elsewhere in
    the row get the stable tie rule (equal items in lower columns rank first), counted on the
    unsorted row for those items only."""
    n = scores.shape[1]
    rows = np.asarray(rows, dtype=np.int64)
    starts = np.asarray(starts, dtype=np.int64)
    cols = np.asarray(cols, dtype=np.int64)
    sizes = np.diff(starts)
    total = int(starts[-1]) if len(starts) else 0
    if total == 0:
        return np.zeros(0, np.int64)
    pair = np.repeat(np.arange(len(rows)), sizes)
    row_of = rows[pair]
    vals = scores[row_of, cols]
    order = _by_list_then_value(pair, vals)
    vals, cols = vals[order], cols[order]
    width = np.full(len(rows), n, np.int64) if lengths is None else np.asarray(lengths)[rows]
    right = np.empty(total, np.int64)
    bounds = starts.tolist()
    for p, (r, w) in enumerate(zip(rows.tolist(), width.tolist(), strict=True)):
        a, b = bounds[p], bounds[p + 1]
        if b > a:
            right[a:b] = sorted_scores[r, :w].searchsorted(vals[a:b], side="right")
    ranks = width[pair] - right + 1  # 1 + items scoring strictly higher (the item is at right-1)
    # Another item has exactly this score iff right-2 holds it too; then equal items in lower
    # columns rank first (counted on the unsorted row, for these items only: ties are rare).
    tied = np.flatnonzero(right >= 2)
    tied = tied[sorted_scores[row_of[tied], right[tied] - 2] == vals[tied]]
    for i in tied:
        ranks[i] += np.count_nonzero(scores[row_of[i], : cols[i]] == vals[i])
    return ranks


def _by_list_then_value(pair: np.ndarray, vals: np.ndarray) -> np.ndarray:
    """Order of entries by (list, value). For float32, an argsort of int64 keys (list index over
    the value's order-preserving bits), ~5× faster than ``np.lexsort``."""
    if vals.dtype != np.float32:
        return np.lexsort((vals, pair))
    u = vals.view(np.int32)
    key = (u ^ ((u >> 31) & 0x7FFFFFFF)).astype(np.int64) + (1 << 31)  # in [0, 2**32)
    key |= pair.astype(np.int64) << 32
    return np.argsort(key)


def average_precision_from_ranks(ranks: np.ndarray, n_relevant: np.ndarray) -> np.ndarray:
    """AP in [0, 1] per row from the ranks of all relevant items (padding ranks > N); 0 when a
    query has no relevant item. AP = mean over relevant items of (relevant up to it) / rank."""
    ranks = np.sort(np.asarray(ranks, dtype=np.int64), axis=1)
    n_rel = np.asarray(n_relevant, dtype=np.int64)
    if ranks.shape[1] == 0:
        return np.zeros(ranks.shape[0])
    pos = np.arange(1, ranks.shape[1] + 1)
    prec = np.where(pos[None, :] <= n_rel[:, None], pos[None, :] / ranks, 0.0)
    return prec.sum(axis=1) / np.maximum(n_rel, 1)


def hits_at_k(ranks: np.ndarray, ks: Sequence[int]) -> np.ndarray:
    """(Q, len(ks)) number of relevant items ranked within the top k (padding ranks > N)."""
    r = np.asarray(ranks)
    return np.stack([(r <= k).sum(axis=1) for k in ks], axis=1) if len(ks) else np.zeros((len(r), 0))


def precision_recall_at_k(
    ranks: np.ndarray, n_relevant: np.ndarray, ks: Sequence[int]
) -> tuple[np.ndarray, np.ndarray]:
    """P@k and R@k in [0, 1], each (Q, len(ks)); R@k is 0 for a query with no relevant item."""
    hits = hits_at_k(ranks, ks).astype(np.float64)
    n_rel = np.asarray(n_relevant, dtype=np.float64)[:, None]
    prec = hits / np.asarray(ks, dtype=np.float64)[None, :]
    rec = np.divide(hits, n_rel, out=np.zeros_like(hits), where=n_rel > 0)
    return prec, rec


def pad_relevant(relevant: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Dense boolean relevance (Q, N) → padded column lists ``cols``, ``valid`` (Q, M) and
    counts (Q,), with M the largest count (relevant columns first, in column order)."""
    rel = np.asarray(relevant, dtype=bool)
    counts = rel.sum(axis=1)
    m = int(counts.max()) if rel.size else 0
    order = np.argsort(~rel, axis=1, kind="stable")[:, :m]
    valid = np.arange(m)[None, :] < counts[:, None]
    return order.astype(np.int64), valid, counts


def ranking_metrics(
    scores: np.ndarray, relevant: np.ndarray, ks: Sequence[int]
) -> dict[str, np.ndarray]:
    """Per-query AP, P@k and R@k (all in [0, 1]) over the full ranking of ``scores`` (Q, N) with a
    dense boolean relevance matrix (Q, N)."""
    cols, valid, counts = pad_relevant(relevant)
    ranks = relevant_ranks(np.asarray(scores), cols, valid)
    prec, rec = precision_recall_at_k(ranks, counts, ks)
    out = {"AP": average_precision_from_ranks(ranks, counts)}
    for i, k in enumerate(ks):
        out[f"P@{k}"] = prec[:, i]
        out[f"R@{k}"] = rec[:, i]
    return out


def stable_order(scores: np.ndarray) -> np.ndarray:
    """Column order of each row by descending score, ties by lower column first."""
    return np.argsort(-np.asarray(scores), axis=1, kind="stable")


def graded_metrics(
    scores: np.ndarray, gains: np.ndarray, ks: Sequence[int]
) -> dict[str, np.ndarray]:
    """Multi-label retrieval measures per query, with integer ``gains`` (Q, N) = number of labels
    each item shares with the query (Zhao et al., CVPR 2015, as used for multi-label RS retrieval):

    * ``ACG@k`` = mean gain of the top k;
    * ``NDCG@k`` = DCG@k / ideal DCG@k with DCG@k = Σ_{i≤k} (2^g_i − 1) / log2(1 + i) (0 when no
      item has a gain);
    * ``wAP`` (weighted mAP) = (1/R) Σ_i [g_i > 0] · ACG@i over the full ranking, R = #{g > 0}.
    """
    g_all = np.asarray(gains, dtype=np.float64)
    order = stable_order(scores)
    g = np.take_along_axis(g_all, order, axis=1)
    n = g.shape[1]
    pos = np.arange(1, n + 1, dtype=np.float64)
    acg_all = np.cumsum(g, axis=1) / pos[None, :]
    n_pos = (g > 0).sum(axis=1)
    wap = np.where(g > 0, acg_all, 0.0).sum(axis=1) / np.maximum(n_pos, 1)
    discount = 1.0 / np.log2(1.0 + pos)
    dcg = np.cumsum((np.exp2(g) - 1.0) * discount[None, :], axis=1)
    ideal = -np.sort(-g_all, axis=1)
    idcg = np.cumsum((np.exp2(ideal) - 1.0) * discount[None, :], axis=1)
    out: dict[str, np.ndarray] = {"wAP": wap}
    for k in ks:
        kk = min(int(k), n)
        out[f"ACG@{k}"] = acg_all[:, kk - 1]
        out[f"NDCG@{k}"] = np.divide(
            dcg[:, kk - 1], idcg[:, kk - 1], out=np.zeros(len(g)), where=idcg[:, kk - 1] > 0
        )
    return out


def recall_at_k_multi(scores: np.ndarray, correct: np.ndarray, ks: Sequence[int]) -> np.ndarray:
    """(len(ks),) fraction of queries with at least one correct item in the top k (cross-modal
    R@k, as RemoteCLIP reports), ties broken stably."""
    order = stable_order(scores)
    hit = np.take_along_axis(np.asarray(correct, dtype=bool), order, axis=1)
    first = np.where(hit.any(axis=1), hit.argmax(axis=1) + 1, np.iinfo(np.int64).max)
    return np.array([(first <= k).mean() for k in ks], dtype=np.float64)


def label_based_metrics(
    scores: np.ndarray, query_labels: np.ndarray, item_labels: np.ndarray, ks: Sequence[int]
) -> dict[str, np.ndarray]:
    """Label-based multi-label retrieval measures per query (the set-based precision, recall
    and accuracy used for multi-label RS retrieval by Chaudhuri, Demir, Chaudhuri & Bruzzone,
    TGRS 2018, and the multi-code hashing seed's recall): for query labels ``L_q`` and each of
    the top-k items' labels ``L_i``,

    * ``lP@k`` = mean_i |L_q ∩ L_i| / |L_i| (0 for an item without labels),
    * ``lR@k`` = mean_i |L_q ∩ L_i| / |L_q|,
    * ``lAcc@k`` = mean_i |L_q ∩ L_i| / |L_q ∪ L_i| (Jaccard).

    ``scores`` (Q, N); ``query_labels`` (Q, L) and ``item_labels`` (N, L) 0/1. The top k is the
    stable order (equal scores by lower column); a query without labels scores 0."""
    s = np.asarray(scores)
    lq = np.asarray(query_labels, dtype=np.float64)
    li = np.asarray(item_labels, dtype=np.float64)
    if s.shape != (lq.shape[0], li.shape[0]) or lq.shape[1] != li.shape[1]:
        raise InvalidArgumentError(f"scores {s.shape} must be (queries {lq.shape[0]}, items "
                         f"{li.shape[0]}) and both label matrices have one column per label")
    from ..scoring import topk

    kmax = min(max(ks), s.shape[1]) if len(ks) else 0
    idx, _ = topk(s, kmax)
    inter = np.einsum("ql,qkl->qk", lq, li[idx])  # (Q, kmax) shared labels
    n_item = li.sum(axis=1)[idx]
    n_q = lq.sum(axis=1, keepdims=True)
    prec = np.divide(inter, n_item, out=np.zeros_like(inter), where=n_item > 0)
    rec = np.divide(inter, n_q, out=np.zeros_like(inter), where=n_q > 0)
    union = n_q + n_item - inter
    acc = np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)
    out: dict[str, np.ndarray] = {}
    for k in ks:
        kk = min(int(k), kmax)
        out[f"lP@{k}"] = prec[:, :kk].mean(axis=1)
        out[f"lR@{k}"] = rec[:, :kk].mean(axis=1)
        out[f"lAcc@{k}"] = acc[:, :kk].mean(axis=1)
    return out
