"""Every hashing estimator through scikit-learn's own API checks (parametrize_with_checks).

Small configurations keep the ~47 checks per estimator fast; the only checks marked as expected
failures are PCA-ITQ's, whose method has one principal direction per bit: with ``n_bits`` a
positive multiple of 8 (codes are whole bytes) and the checks' data having 1-5 features, ITQ
cannot fit there by construction. Any other failure is a defect to fix, not to mark.
"""

from __future__ import annotations

import pytest
from sklearn.utils.estimator_checks import parametrize_with_checks
from threadpoolctl import threadpool_limits

from rscir.hashing import (
    ClusterMultiCodeHasher,
    DeepMetricHasher,
    ITQHasher,
    KernelLSHHasher,
    KSHHasher,
    LSHHasher,
    MultiCodeHasher,
)

ITQ_NEEDS_BITS_LE_FEATURES = (
    "PCA-ITQ needs n_bits <= n_features (one principal direction per bit); n_bits is a "
    "multiple of 8 and the checks' data has fewer features"
)
ITQ_FAILING = (
    "check_dict_unchanged", "check_dont_overwrite_parameters", "check_estimators_dtypes",
    "check_estimators_fit_returns_self", "check_estimators_nan_inf",
    "check_estimators_overwrite_params", "check_estimators_pickle",
    "check_f_contiguous_array_estimator", "check_fit2d_1feature", "check_fit2d_predict1d",
    "check_fit_check_is_fitted", "check_fit_idempotent", "check_fit_score_takes_y",
    "check_methods_sample_order_invariance", "check_methods_subset_invariance",
    "check_n_features_in", "check_n_features_in_after_fitting", "check_pipeline_consistency",
    "check_positive_only_tag_during_fit", "check_readonly_memmap_input",
    "check_transformer_data_not_an_array", "check_transformer_general",
)


@pytest.fixture(autouse=True, scope="module")
def one_blas_thread():
    """Small arrays: BLAS/OpenMP threads only add waiting (minutes instead of seconds for KSH's
    eigen-solves on a busy 2-core machine)."""
    with threadpool_limits(limits=1):
        yield


def _ksh() -> KSHHasher:
    return KSHHasher(8, n_anchors=30, max_iter=10)


ESTIMATORS = [
    LSHHasher(16),
    ITQHasher(8),
    KernelLSHHasher(16, n_anchors=30),
    _ksh(),
    DeepMetricHasher(8, hidden_layer_sizes=(16,), epochs=2),
    MultiCodeHasher(LSHHasher(8)),
    MultiCodeHasher(_ksh(), match="aligned"),
    ClusterMultiCodeHasher(4, n_clusters=2, hasher=KernelLSHHasher(n_anchors=30)),
    ClusterMultiCodeHasher(4, n_clusters=2, hasher=_ksh(), absent="max"),
]


def expected_failed(estimator: object) -> dict[str, str]:
    if isinstance(estimator, ITQHasher):
        return dict.fromkeys(ITQ_FAILING, ITQ_NEEDS_BITS_LE_FEATURES)
    return {}


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")
@parametrize_with_checks(ESTIMATORS, expected_failed_checks=expected_failed, xfail_strict=True)
def test_sklearn_compatible(estimator, check):
    check(estimator)
