"""The new fusions and the method registry against independent brute-force numpy code."""

from __future__ import annotations

import numpy as np
import pytest

from rscir.errors import InvalidArgumentError, QueryError
from rscir.scoring import (
    FUSIONS,
    METHODS,
    PRESETS,
    QueryStats,
    check_harris_h,
    combine,
    fuse,
    harris,
    method_spec,
    minmax_norm,
    parse_method,
)


def brute_minmax(x: np.ndarray) -> np.ndarray:
    out = np.empty_like(x, dtype=np.float64)
    for q in range(x.shape[0]):
        lo, hi = x[q].min(), x[q].max()
        out[q] = (x[q] - lo) / (hi - lo) if hi > lo else 0.0
    return out


def brute_combine(fusion: str, si: np.ndarray, st: np.ndarray, lam: float, h: float) -> np.ndarray:
    a, b = brute_minmax(si), brute_minmax(st)
    if lam == 0.0:
        return a
    if lam == 1.0:
        return b
    if fusion == "minmax":
        return lam * b + (1 - lam) * a
    out = np.empty_like(a)
    for q in range(a.shape[0]):
        for n in range(a.shape[1]):
            pa = a[q, n] ** (2 * (1 - lam))
            pb = b[q, n] ** (2 * lam)
            out[q, n] = pa * pb - h * (pa + pb) ** 2
    return out


@pytest.mark.parametrize("fusion", ["minmax", "harris"])
@pytest.mark.parametrize("lam", [0.0, 0.2, 0.5, 0.9, 1.0])
def test_range_fusions_equal_brute_force(fusion: str, lam: float) -> None:
    rng = np.random.default_rng(3)
    si = rng.uniform(-0.3, 0.9, (4, 60))
    st = rng.uniform(-0.1, 0.4, (4, 60))
    got = combine(fusion, si, st, lam, harris_h=0.15)
    np.testing.assert_allclose(got, brute_combine(fusion, si, st, lam, 0.15), atol=1e-12)


def test_harris_at_half_is_basic_formula_and_hand_value() -> None:
    # a = 0.8, b = 0.5, h = 0.1: 0.4 - 0.1 * 1.69 = 0.231
    assert harris(np.array([0.8]), np.array([0.5]), 0.5, 0.1)[0] == pytest.approx(0.231)
    # an item strong in one modality only loses to a balanced one (the point of Harris)
    v = harris(np.array([1.0, 0.6]), np.array([0.2, 0.6]), 0.5, 0.1)
    assert v[1] > v[0]


@pytest.mark.parametrize("lam", [1e-6, 1 - 1e-6])
def test_harris_near_limits_ranks_as_single_modality(lam: float) -> None:
    """The exponent weighting makes λ→0 / λ→1 continuous with image-only / text-only order."""
    rng = np.random.default_rng(5)
    a, b = rng.uniform(0.01, 1, 500), rng.uniform(0.01, 1, 500)
    order = np.argsort(-harris(a, b, lam, 0.2), kind="stable")
    ref = np.argsort(-(a if lam < 0.5 else b), kind="stable")
    assert np.array_equal(order, ref)


def test_minmax_over_whole_archive_with_slice_ranges() -> None:
    rng = np.random.default_rng(0)
    s = rng.normal(size=(3, 40))
    full = minmax_norm(s)
    lo, hi = s.min(1, keepdims=True), s.max(1, keepdims=True)
    np.testing.assert_allclose(minmax_norm(s[:, 5:9], lo, hi), full[:, 5:9])
    assert not np.allclose(minmax_norm(s[:, 5:9]), full[:, 5:9])
    np.testing.assert_array_equal(minmax_norm(np.ones((2, 5))), np.zeros((2, 5)))
    got = combine("minmax", s[:, 5:9], s[:, 5:9] * 2, 0.3, img_range=(lo, hi),
                  txt_range=(2 * lo, 2 * hi))
    np.testing.assert_allclose(got, combine("minmax", s, 2 * s, 0.3)[:, 5:9])


def test_combine_legacy_fusions_are_fuse() -> None:
    rng = np.random.default_rng(1)
    si, st = rng.normal(size=(2, 30)), rng.normal(size=(2, 30))
    for m in METHODS:
        np.testing.assert_array_equal(combine(m, si, st, 0.4), fuse(m, si, st, 0.4))


def test_combine_errors() -> None:
    s = np.zeros((1, 3))
    with pytest.raises(QueryError):
        combine("minmax", None, s, 0.5)
    assert combine("minmax", np.array([[0.0, 2.0, 1.0]]), None, 0.0).tolist() == [[0, 1, 0.5]]
    with pytest.raises(InvalidArgumentError):
        combine("nope", s, s)
    with pytest.raises(InvalidArgumentError):
        check_harris_h(0.25)
    with pytest.raises(ValueError):  # InvalidArgumentError is a ValueError (old callers)
        fuse("harris", s, s)


def test_registry() -> None:
    assert METHODS == ("image", "text", "average", "weicom", "sum", "product")
    assert set(FUSIONS) == set(METHODS) | {"minmax", "harris"}
    for name, spec in PRESETS.items():
        assert method_spec(name) is spec and spec.name == name
        assert method_spec(spec.canonical).canonical == spec.canonical
    s = method_spec("weicom+qe+centre")
    assert s.name == "weicom+centre+qe" and s.ta_capable and s.needs_neighbours
    assert not s.needs_encoder and s.uses_lambda
    assert method_spec("weicom-x").canonical == "weicom+centre+tcentre+qe"
    assert method_spec("weicom-x").needs_encoder and method_spec("weicom-x").ta_capable
    basic = method_spec("basic")
    assert basic.fusion == "harris" and basic.exact_only and basic.transforms == (
        "centre", "tcentre", "project", "qe")
    assert method_spec("product").ta_capable and not method_spec("product+centre").ta_capable
    assert not method_spec("minmax").ta_capable and not method_spec("sum").uses_lambda
    for bad in ("weicom+qe+qe", "weicom+blur", "nope", "qe"):
        with pytest.raises(InvalidArgumentError):
            parse_method(bad)
    info = method_spec("harris").info()
    assert info["needs_image"] and info["needs_text"] and info["ta_capable"] is False


def test_query_stats_slices() -> None:
    s = np.arange(12.0).reshape(2, 6)
    st = QueryStats.of(s)
    assert st.mean.shape == (2, 1) and st.std[0, 0] == pytest.approx(np.std(s[0], ddof=1))
