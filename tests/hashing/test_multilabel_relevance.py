"""Multi-label relevance for hashing benchmarks: AP with "at least one shared label", the graded
variant and the label-based precision/recall/accuracy of the top k (rscir.bench.metrics)."""

from __future__ import annotations

import numpy as np
import pytest

from rscir.bench.metrics import graded_metrics, label_based_metrics, ranking_metrics
from rscir.bench.rsir import multi_label_retrieval

#                  a  b  c
ITEMS = np.array([[1, 1, 0],   # item 0 {a, b}
                  [0, 1, 0],   # item 1 {b}
                  [0, 0, 1],   # item 2 {c}
                  [1, 0, 1]])  # item 3 {a, c}
QUERY = np.array([[1, 1, 0]])  # {a, b}
SCORES = np.array([[0.9, 0.1, 0.5, 0.7]])  # ranking: item 0, 3, 2, 1


def test_multilabel_ap_and_graded_hand_computed():
    gains = QUERY @ ITEMS.T  # shared labels: 2, 1, 0, 1
    m = ranking_metrics(SCORES, gains > 0, ks=(1, 2))
    # relevant at ranks 1 (item 0), 2 (item 3), 4 (item 1): AP = (1/1 + 2/2 + 3/4) / 3
    assert m["AP"][0] == pytest.approx((1 + 1 + 0.75) / 3)
    assert m["P@2"][0] == pytest.approx(1.0)
    g = graded_metrics(SCORES, gains, ks=(2,))
    # gains in rank order 2, 1, 0, 1: ACG@1 = 2, ACG@2 = 1.5, ACG@4 = 1; wAP = mean over relevant
    assert g["wAP"][0] == pytest.approx((2 + 1.5 + 1) / 3)
    assert g["ACG@2"][0] == pytest.approx(1.5)


def test_label_based_hand_computed():
    m = label_based_metrics(SCORES, QUERY, ITEMS, ks=(1, 2, 4))
    # per ranked item (0, 3, 2, 1): shared 2, 1, 0, 1; item sizes 2, 2, 1, 1; |query| = 2
    assert m["lP@1"][0] == m["lR@1"][0] == m["lAcc@1"][0] == pytest.approx(1.0)
    assert m["lP@2"][0] == pytest.approx((1 + 1 / 2) / 2)
    assert m["lR@2"][0] == pytest.approx((1 + 1 / 2) / 2)
    assert m["lAcc@2"][0] == pytest.approx((1 + 1 / 3) / 2)
    assert m["lP@4"][0] == pytest.approx((1 + 1 / 2 + 0 + 1) / 4)
    assert m["lR@4"][0] == pytest.approx((1 + 1 / 2 + 0 + 1 / 2) / 4)
    assert m["lAcc@4"][0] == pytest.approx((1 + 1 / 3 + 0 + 1 / 2) / 4)
    # k beyond the archive: the whole ranking
    assert label_based_metrics(SCORES, QUERY, ITEMS, ks=(10,))["lR@10"][0] == m["lR@4"][0]


def test_label_based_ties_and_empty_labels():
    tied = np.array([[0.5, 0.5, 0.5, 0.5]])  # equal scores: lower column first
    m = label_based_metrics(tied, QUERY, ITEMS, ks=(2,))
    assert m["lR@2"][0] == pytest.approx((1 + 1 / 2) / 2)  # items 0 and 1
    items = ITEMS.copy()
    items[0] = 0  # an item without labels: precision 0 (not NaN)
    m = label_based_metrics(SCORES, QUERY, items, ks=(1,))
    assert m["lP@1"][0] == 0.0 and m["lAcc@1"][0] == 0.0
    m = label_based_metrics(SCORES, np.zeros((1, 3)), ITEMS, ks=(1,))  # a query without labels
    assert m["lR@1"][0] == 0.0
    with pytest.raises(ValueError, match="one column per label"):
        label_based_metrics(SCORES, QUERY[:, :2], ITEMS, ks=(1,))


def test_multi_label_retrieval_reports_label_based_measures():
    rng = np.random.default_rng(0)
    emb = rng.standard_normal((25, 4)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    lm = (rng.random((25, 5)) < 0.35).astype(np.int64)
    lm[4] = 0
    out = multi_label_retrieval(emb, lm, ks=(3, 5), block=7)
    q = out["query"]
    s = emb[q] @ emb.T
    s[np.arange(len(q)), q] = -np.inf  # leave the query out
    ref = label_based_metrics(s, lm[q], lm, ks=(3, 5))
    for k in ("lR@3", "lP@5", "lAcc@5"):
        np.testing.assert_allclose(out[k], ref[k], atol=1e-6)
