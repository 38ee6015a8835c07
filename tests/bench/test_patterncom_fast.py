"""The fast PatternCom evaluation equals the previous one, entry for entry, on a fixture built
to tie: integer image features (exact integer similarities, many equal), texts that normalize
exactly (±1 on four dimensions), duplicated images. The rank helpers equal a stable argsort."""

from __future__ import annotations

import numpy as np
import pytest

from rscir.bench import patterncom_baseline
from rscir.bench.fixtures import make_patterncom
from rscir.bench.metrics import ranks_in_sorted_rows, sort_rows, sort_rows_above
from rscir.bench.patterncom import Database, run_patterncom

METHODS = ["image", "text", "average", "sum", "product", "weicom"]
LAMS = [0, 0.3, 0.5, 1]


@pytest.fixture(scope="module")
def tied(tmp_path_factory):
    fx = make_patterncom(tmp_path_factory.mktemp("pc_ties"), per_class=16, dim=16,
                         duplicate_rows=3, noise=1.0, seed=5)
    feats = np.round(fx.features * 4).astype(np.float32)  # integers in -3..3
    feats[1::5] = feats[0::5][: len(feats[1::5])]  # exact duplicates of neighbours
    texts = {}
    for t, v in fx.text_features.items():
        top = np.argsort(-np.abs(v))[:4]
        q = np.zeros_like(v)
        q[top] = np.sign(v[top])  # norm exactly 2: normalizing keeps it exact
        texts[t] = q
    return fx, Database(feats, fx.paths), texts


def _run(tied, **kw):
    fx, db, texts = tied
    return run_patterncom(fx.root, db, texts, methods=METHODS, lams=LAMS, progress=False, **kw)


def test_fixture_really_ties(tied):
    _, db, texts = tied
    s_img = db.features[:50] @ db.features.T
    s_txt = np.stack(list(texts.values())) / 2 @ db.features.T
    n = db.features.shape[0]
    assert max(len(np.unique(r)) for r in s_img) < n / 5  # hundreds of items per value
    assert max(len(np.unique(r)) for r in s_txt) < n / 5


@pytest.mark.parametrize("kw", [
    {},  # defaults: blocks of 16 pairs, one worker
    {"block": 3, "workers": 2},
    {"block": 64, "memory_cap": 1},  # one query image per chunk
])
def test_fast_path_equals_previous_path_with_ties(tied, kw):
    old = _run(tied, evaluator=patterncom_baseline.evaluate_pairs, block=128, workers=1)
    new = _run(tied, **kw)
    assert [c.label for c in new.configs] == [c.label for c in old.configs]
    for a, b in zip(new.attributes, old.attributes, strict=True):
        assert len(a.pairs) > 0
        for c in new.configs:
            np.testing.assert_array_equal(a.metrics[c].ap, b.metrics[c].ap, err_msg=c.label)
            np.testing.assert_array_equal(a.metrics[c].precision, b.metrics[c].precision)
            np.testing.assert_array_equal(a.metrics[c].recall, b.metrics[c].recall)
    assert new.table().equals(old.table())
    assert new.table().loc["weicom@0.5", "avg"] > 0


def _stable_ranks(row: np.ndarray) -> np.ndarray:
    order = np.argsort(-row, kind="stable")
    pos = np.empty(len(row), np.int64)
    pos[order] = np.arange(1, len(row) + 1)
    return pos


@pytest.mark.parametrize("pruned", [False, True])
def test_ranks_in_sorted_rows_equal_a_stable_sort(pruned):
    rng = np.random.default_rng(7)
    scores = rng.integers(-12, 13, size=(9, 60)).astype(np.float32) / 4  # 25 values: ties
    scores[2, ::3] = -0.0  # -0.0 and 0.0 are one score
    scores[2, 1::3] = 0.0
    lists = [np.sort(rng.choice(60, size=k, replace=False)) for k in (0, 1, 5, 30, 60, 7, 2)]
    rows = np.array([0, 2, 2, 5, 8, 2, 1])  # several lists share a row
    cols = np.concatenate(lists)
    starts = np.r_[0, np.cumsum([len(x) for x in lists])]
    if pruned:  # a row per list, holding only the scores at or above its lowest listed one
        mine = scores[rows]
        floors = np.array([mine[i, x].min() if len(x) else np.inf for i, x in enumerate(lists)],
                          np.float32)
        srt = np.zeros_like(mine)
        lengths = sort_rows_above(mine, floors, srt, full_above=0.9)
        got = ranks_in_sorted_rows(mine, srt, np.arange(len(lists)), cols, starts, lengths)
        assert lengths[0] == 0 and ((lengths > 0) & (lengths < 60)).any() and (lengths == 60).any()
    else:
        got = ranks_in_sorted_rows(scores, sort_rows(scores, rows=4), rows, cols, starts)
    for p, x in enumerate(lists):
        want = np.sort(_stable_ranks(scores[rows[p]])[x])
        assert np.sort(got[starts[p]:starts[p + 1]]).tolist() == want.tolist(), p


def test_sort_rows_above_keeps_exactly_the_scores_at_or_above_the_floor():
    rng = np.random.default_rng(1)
    s = rng.standard_normal((4, 100)).astype(np.float32)
    floors = np.array([np.inf, 2.0, 0.0, -3.0], np.float32)
    out = np.full_like(s, np.nan)
    lengths = sort_rows_above(s, floors, out, full_above=0.9)
    assert lengths[0] == 0
    for i in (1, 2):
        k = lengths[i]
        assert k == (s[i] >= floors[i]).sum() and k < 90
        np.testing.assert_array_equal(out[i, :k], np.sort(s[i][s[i] >= floors[i]]))
    assert lengths[3] == 100  # (almost) everything kept: the whole row is sorted
    np.testing.assert_array_equal(out[3], np.sort(s[3]))


def test_normalization_of_a_block_of_rows_has_the_bits_of_the_whole_matrix():
    """The evaluation normalizes a chunk's image similarities 8 rows at a time (in cache); the
    previous one normalized the whole chunk. Elementwise float32 ops and erf, so the same bits,
    also for a row length that is no multiple of the SIMD width."""
    from rscir.bench.patterncom import normalize_cdf
    from rscir.scoring import QueryStats

    rng = np.random.default_rng(0)
    s = (rng.standard_normal((40, 1001)) * 0.1).astype(np.float32)
    st = QueryStats.of(s)
    whole = normalize_cdf(s, st)
    out = np.empty_like(s)
    for a in range(0, 40, 8):
        normalize_cdf(s[a:a + 8], QueryStats(st.mean[a:a + 8], st.std[a:a + 8]), out=out[a:a + 8])
    np.testing.assert_array_equal(out.view(np.int32), whole.view(np.int32))


def test_torch_thread_count_is_restored(tied):
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        _run(tied, workers=2)
        assert torch.get_num_threads() == 2  # evaluated with 1 torch thread, then restored
    finally:
        torch.set_num_threads(before)
