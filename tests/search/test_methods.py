"""Every scoring method is usable through the Searcher on every store and strategy, and equals
the exact whole-archive computation of :func:`rscir.scoring.score_exact` (brute force)."""

from __future__ import annotations

import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from rscir.encoders.base import ModelInfo, l2_normalize
from rscir.scoring import FusionOptions, method_names, method_spec, score_exact
from rscir.search import ItemFilter, Searcher, SearchParams, strategies_for
from rscir.search.ann import build_index
from rscir.stores import EmbeddingStore, open_or_create_store

DIM = 16
N = 200
INFO = ModelInfo(name="m", arch="A", fingerprint="sha256:aa", dim=DIM)
OPTS = FusionOptions(objects=("ship", "tank", "court", "road", "tree"),
                     styles=("cloudy", "dark", "blurry"), n_components=6, qe_k=5)


class WordEncoder:
    """Deterministic text vectors per word (enough for word-list bases)."""

    info = INFO
    dim = DIM

    def encode_texts(self, texts: list[str]) -> np.ndarray:
        return np.stack([l2_normalize(np.random.default_rng(zlib.crc32(t.encode())).normal(
            size=DIM)) for t in texts]).astype(np.float32)


@pytest.fixture()
def store(store_location: Callable[[], str], tmp_path: Path):
    rng = np.random.default_rng(3)
    cent = rng.normal(size=(4, DIM))
    lab = rng.integers(0, 4, N)
    x = l2_normalize(cent[lab] + 0.7 * rng.normal(size=(N, DIM))).astype(np.float32)
    st = open_or_create_store(store_location(), INFO, tmp_path, dtype="float32")
    st.add(x, [{"path": f"{i}.jpg", "label": f"c{lab[i]}"} for i in range(N)])
    st.compact()
    if st.backend == "embedded":
        build_index(st, "flat")  # type: ignore[arg-type]
    yield st
    st.close()


METHODS_TO_CHECK = [*method_names(), "sum+centre", "average+qe", "image+centre+qe",
                    "weicom+project", "text+tcentre"]


@pytest.mark.parametrize("store_location", ["embedded", "postgres"], indirect=True)
def test_every_method_on_every_strategy_equals_the_exact_scan(store: EmbeddingStore) -> None:
    x = np.asarray(store.vectors_for_ids(list(range(N))), np.float64)
    enc = WordEncoder()
    qi = x[9].astype(np.float32)
    qt = enc.encode_texts(["a ship near the road"])[0]
    f = ItemFilter(labels=("c1", "c2"))
    ok = f.mask(store.filter_index())[np.argsort(store.ids)]
    for name in METHODS_TO_CHECK:
        spec = method_spec(name)
        lams = [0.0, 0.4] if spec.uses_lambda else [0.5]
        for strat in sorted(strategies_for(store.backend)):
            s = Searcher(store, enc, strategy=strat, fusion=OPTS,  # type: ignore[arg-type]
                         params=SearchParams(ef_search=1000))
            res = s.search_ids(qi if spec.needs_image else None,
                               qt if spec.needs_text else None, name, lams, 10,
                               exclude_id=9, where=f)
            for lam, r in zip(lams, res, strict=True):
                ref = score_exact(spec, qi[None] if spec.needs_image else None,
                                  qt[None] if spec.needs_text else None, x, store.moments(),
                                  lam, options=OPTS, encode_texts=enc.encode_texts)
                sc = ref.scores[0].astype(np.float64).copy()
                sc[~ok] = -np.inf
                sc[9] = -np.inf
                want = np.lexsort((np.arange(N), -sc))[:10]
                np.testing.assert_allclose(r.scores, sc[want], atol=2e-5,
                                           err_msg=f"{name} {strat} λ={lam}")
                tied = np.abs(sc[want][:, None] - sc[want][None, :]) < 2e-5
                assert all(r.ids[i] == want[i] or tied[i].sum() > 1 for i in range(10)), (
                    name, strat, lam)
                if ref.sim_img is not None and r.sim_image is not None:
                    np.testing.assert_allclose(r.sim_image, ref.sim_img[0][r.ids], atol=2e-5)
                if spec.fusion == "weicom" and r.norm_image is not None:
                    assert np.all((r.norm_image >= 0) & (r.norm_image <= 1))


@pytest.mark.parametrize("store_location", ["embedded"], indirect=True)
def test_methods_by_name_through_search(store: EmbeddingStore) -> None:
    s = Searcher(store, WordEncoder(), fusion=OPTS)  # type: ignore[arg-type]
    r = s.search(item_id=3, text="tank", method="weicom-x", lam=0.2, k=5)
    assert r.method == "weicom-x" and len(r.hits) == 5
    assert all(h.norm_image is not None and h.sim_image is not None for h in r.hits)
    b = s.search(item_id=3, text="tank", method="basic", lam=0.5, k=5)  # exact scan only
    assert b.method == "basic" and len(b.hits) == 5
    with pytest.raises(ValueError, match="transforms are centre"):
        s.search(item_id=3, text="tank", method="weicom+sparkle")
    with pytest.raises(ValueError, match="unknown method"):
        s.search(item_id=3, text="tank", method="sparkle")
