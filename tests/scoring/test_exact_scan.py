"""score_exact / prepare_queries / text_basis against a per-query brute-force computation of
each transform's definition (BASIC's centring, contrastive PCA and query expansion)."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
from scipy.special import ndtr

from rscir.errors import InvalidArgumentError, QueryError
from rscir.moments import ArchiveMoments, Moments
from rscir.scoring import (
    FusionOptions,
    QueryStats,
    TextBasisCache,
    combine,
    exact_neighbours,
    fuse,
    method_spec,
    prepare_queries,
    score_exact,
    text_basis,
)

D = 12


def encoder(calls: list[int] | None = None):
    """A deterministic stand-in text tower: each text hashes to a fixed unit vector."""

    def encode(texts: list[str]) -> np.ndarray:
        if calls is not None:
            calls.append(len(texts))
        out = []
        for t in texts:
            seed = int(hashlib.sha256(t.encode()).hexdigest()[:8], 16)
            v = np.random.default_rng(seed).normal(size=D)
            out.append(v / np.linalg.norm(v))
        return np.array(out, np.float32)

    return encode


OBJ = tuple(f"object {i}" for i in range(20))
STY = tuple(f"style {i}" for i in range(15))
OPTS = FusionOptions(objects=OBJ, styles=STY, alpha=0.3, n_components=5, qe_k=4, qe_beta=2.0,
                     harris_h=0.1)


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(7)
    x = unit(rng.normal(size=(90, D)) + 0.8)  # a shared offset, as real embeddings have
    qi = unit(rng.normal(size=(3, D)) + 0.8)
    qt = unit(rng.normal(size=(3, D)))
    return x.astype(np.float32), qi, qt


def brute_projection(enc) -> tuple[np.ndarray, np.ndarray]:
    a = unit(enc(list(OBJ)).astype(np.float64))  # BASIC L2-normalizes the corpus features
    b = unit(enc(list(STY)).astype(np.float64))
    mt = a.mean(0)
    sa = (a - mt).T @ (a - mt) / (len(a) - 1)
    sb = (b - mt).T @ (b - mt) / (len(b) - 1)
    w, v = np.linalg.eigh((1 - OPTS.alpha) * sa - OPTS.alpha * sb)
    top = np.argsort(-w)[: OPTS.n_components]
    assert (w[top] > 0).all()
    return v[:, top] @ v[:, top].T, mt


def brute_scores(method: str, x: np.ndarray, qi: np.ndarray, qt: np.ndarray, lam: float):
    """Direct formulas, one query at a time, float64, full archive."""
    spec = method_spec(method)
    x = x.astype(np.float64)
    mu = x.mean(0) if spec.centre else np.zeros(D)
    p, mt = brute_projection(encoder())
    xc = x - mu
    out = []
    for q in range(len(qi)):
        base = qi[q] - mu
        probe = p @ base if spec.project else base
        if spec.qe:
            s = xc @ probe
            nb = sorted(range(len(x)), key=lambda j: (-s[j], j))[: OPTS.qe_k]
            w = np.exp(OPTS.qe_beta * np.r_[s[nb], 1.0])
            w /= w.sum()
            e = (w[:-1, None] * xc[nb]).sum(0) + w[-1] * base
            probe = p @ e if spec.project else e
        si = xc @ probe
        t = qt[q] - mt if spec.tcentre else qt[q]
        st = xc @ t
        if spec.fusion == "weicom":
            zi = (si - si.mean()) / si.std(ddof=1)
            zt = (st - st.mean()) / st.std(ddof=1)
            f = lam * ndtr(zt) + (1 - lam) * ndtr(zi)
        else:
            a = (si - si.min()) / (si.max() - si.min())
            b = (st - st.min()) / (st.max() - st.min())
            if spec.fusion == "minmax":
                f = lam * b + (1 - lam) * a
            else:
                pa, pb = a ** (2 * (1 - lam)), b ** (2 * lam)
                f = pa * pb - OPTS.harris_h * (pa + pb) ** 2
        out.append((f, si, st))
    return tuple(np.array(v) for v in zip(*out, strict=True))


METHODS_UNDER_TEST = [
    "weicom", "weicom+centre", "weicom+tcentre", "weicom+project", "weicom+qe",
    "weicom+centre+project+qe", "weicom-x", "minmax", "minmax+centre+qe", "harris", "basic",
]


@pytest.mark.parametrize("method", METHODS_UNDER_TEST)
@pytest.mark.parametrize("lam", [0.3, 0.7])
def test_score_exact_equals_brute_force(data, method: str, lam: float) -> None:
    x, qi, qt = data
    got = score_exact(method, qi, qt, x, Moments.of(x), lam, options=OPTS,
                      encode_texts=encoder(), chunk=17)
    f, si, st = brute_scores(method, x, qi, qt, lam)
    np.testing.assert_allclose(got.sim_img, si, atol=1e-9)
    np.testing.assert_allclose(got.sim_txt, st, atol=1e-9)
    np.testing.assert_allclose(got.scores, f, atol=1e-9)


def test_float16_memmap_in_chunks(tmp_path, data) -> None:
    x, qi, qt = data
    path = tmp_path / "emb.npy"
    np.save(path, x.astype(np.float16))
    mm = np.load(path, mmap_mode="r")
    got = score_exact("basic", qi, qt, mm, Moments.of(mm), 0.5, options=OPTS,
                      encode_texts=encoder(), chunk=8)
    ref = brute_scores("basic", np.asarray(mm, np.float32), qi, qt, 0.5)[0]
    np.testing.assert_allclose(got.scores, ref, atol=1e-9)
    assert got.scores.shape == (3, 90)


def test_weicom_is_unchanged(data) -> None:
    x, qi, qt = data
    am = ArchiveMoments.of(x)
    got = score_exact("weicom", qi, qt, x, am, 0.4).scores
    x64 = x.astype(np.float64)
    ref = fuse("weicom", qi @ x64.T, qt @ x64.T, 0.4, img_stats=am.query_stats(qi),
               txt_stats=am.query_stats(qt))
    np.testing.assert_allclose(got, ref, atol=1e-12)


@pytest.mark.parametrize("method", ["weicom+centre+qe", "weicom-x", "sum+centre+project"])
def test_prepared_vectors_serve_the_ta_path(data, method: str) -> None:
    """The TA/ANN contract: fusing the *raw* inner products of the prepared vectors with the
    prepared (moment) statistics ranks exactly as the exact scan (same values for WeiCom)."""
    x, qi, qt = data
    spec = method_spec(method)
    assert spec.ta_capable
    prep = prepare_queries(spec, qi, qt, Moments.of(x), options=OPTS, encode_texts=encoder(),
                           embeddings=x)
    x64 = x.astype(np.float64)
    ta = combine(spec.fusion, prep.img @ x64.T, prep.txt @ x64.T, 0.35,
                 img_stats=prep.img_stats, txt_stats=prep.txt_stats)
    ex = score_exact(spec, qi, qt, x, Moments.of(x), 0.35, options=OPTS,
                     encode_texts=encoder()).scores
    assert np.array_equal(np.argsort(-ta, axis=1, kind="stable"),
                          np.argsort(-ex, axis=1, kind="stable"))
    if spec.fusion == "weicom":
        np.testing.assert_allclose(ta, ex, atol=1e-12)
    # the statistics are the full-archive ones of q'·x
    ref = QueryStats.of(prep.img @ x64.T)
    np.testing.assert_allclose(prep.img_stats.mean, ref.mean, atol=1e-12)
    np.testing.assert_allclose(prep.img_stats.std, ref.std, atol=1e-12)


def test_neighbour_callable_and_exact_neighbours(data) -> None:
    x, qi, qt = data
    q = np.vstack([qi, x[:1]])
    q[1] = 0.0  # all scores 0: ties everywhere -> lowest rows
    got = exact_neighbours(x, q, 5, chunk=7)
    s = q @ x.astype(np.float64).T
    ref = np.array([sorted(range(len(x)), key=lambda j: (-r[j], j))[:5] for r in s])
    np.testing.assert_array_equal(got, ref)
    assert got[1].tolist() == [0, 1, 2, 3, 4]
    seen = []

    def ann(probe, k):
        seen.append(k)
        return exact_neighbours(x, probe, k)

    a = score_exact("weicom+qe", qi, qt, x, Moments.of(x), 0.5, options=OPTS, neighbours=ann)
    b = score_exact("weicom+qe", qi, qt, x, Moments.of(x), 0.5, options=OPTS)
    assert seen == [OPTS.qe_k]
    np.testing.assert_array_equal(a.scores, b.scores)
    assert a.prepared.neighbours.shape == (3, OPTS.qe_k)
    # -1 padding (an ANN that found fewer rows) gives those slots no weight
    pad = score_exact("weicom+qe", qi, qt, x, Moments.of(x), 0.5, options=OPTS,
                      neighbours=lambda p, k: np.c_[exact_neighbours(x, p, 2),
                                                    np.full((len(p), k - 2), -1)])
    two = score_exact("weicom+qe", qi, qt, x, Moments.of(x), 0.5,
                      options=FusionOptions(objects=OBJ, styles=STY, qe_k=2, qe_beta=2.0))
    np.testing.assert_allclose(pad.scores, two.scores, atol=1e-12)


def test_text_basis_and_cache() -> None:
    calls: list[int] = []
    enc = encoder(calls)
    b = text_basis(enc, OBJ, STY, alpha=OPTS.alpha, n_components=OPTS.n_components)
    p, mt = brute_projection(encoder())
    np.testing.assert_allclose(b.components.T @ b.components, p, atol=1e-10)
    np.testing.assert_allclose(b.components @ b.components.T, np.eye(5), atol=1e-10)
    np.testing.assert_allclose(b.text_mean, mt, atol=1e-7)
    assert (np.diff(b.eigenvalues) <= 0).all() and (b.eigenvalues > 0).all()
    # only positive eigenvalues are kept: 20 objects span at most 19 centred directions
    assert text_basis(enc, OBJ, STY, alpha=0.3, n_components=D).n_components <= 19
    cache = TextBasisCache()
    calls.clear()
    b1 = cache.get("m1", enc, OBJ, STY, alpha=0.3, n_components=5)
    b2 = cache.get("m1", enc, OBJ, STY, alpha=0.3, n_components=5)
    assert b1 is b2 and calls == [20, 15]
    cache.get("m2", enc, OBJ, STY, alpha=0.3, n_components=5)
    assert calls == [20, 15, 20, 15]
    with pytest.raises(InvalidArgumentError):
        text_basis(enc, OBJ, STY, alpha=1.0)
    with pytest.raises(InvalidArgumentError):
        text_basis(enc, ("one",), STY)


def test_prepare_errors(data) -> None:
    x, qi, qt = data
    m = Moments.of(x)
    with pytest.raises(QueryError):
        score_exact("weicom", None, qt, x, m)
    with pytest.raises(QueryError):
        score_exact("minmax", qi, None, x, m)
    with pytest.raises(InvalidArgumentError, match="text encoder"):
        score_exact("weicom+project", qi, qt, x, m)
    with pytest.raises(InvalidArgumentError, match="dim"):
        score_exact("weicom", qi[:, :5], qt, x, m)
    with pytest.raises(InvalidArgumentError):
        score_exact("weicom", qi, qt[:2], x, m)
    with pytest.raises(InvalidArgumentError):
        score_exact("weicom+qe", qi, qt, x, m, neighbours=lambda p, k: np.full((3, k), 10**6))
    # λ = 0 / 1 limits: exactly the image / text order of the used similarities
    for lam, which in ((0.0, "sim_img"), (1.0, "sim_txt")):
        r = score_exact("basic", qi, qt, x, m, lam, options=OPTS, encode_texts=encoder())
        assert np.array_equal(np.argsort(-r.scores, 1, kind="stable"),
                              np.argsort(-getattr(r, which), 1, kind="stable"))
