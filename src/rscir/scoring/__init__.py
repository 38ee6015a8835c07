"""Scoring of composed queries: fusions, the method registry and the exact archive scan.

* :mod:`.fusion` — similarity-level fusions: the original :func:`fuse` (``image``, ``text``,
  ``average``, ``sum``, ``product``, ``weicom``; :data:`METHODS`), :func:`combine` for every
  fusion including ``minmax`` and ``harris``, :func:`norm_cdf`, :class:`QueryStats`,
  :func:`topk`.
* :mod:`.methods` — the registry: :func:`method_spec` turns a name (a preset of
  :data:`PRESETS` or ``FUSION+centre+tcentre+project+qe``) into a :class:`MethodSpec` that says
  what it needs and whether the TA/ANN strategies can serve it (``ta_capable``).
* :mod:`.basis` — the text centre and contrastive-PCA projection from word lists
  (:func:`text_basis`, memoized per model by :class:`TextBasisCache`); :mod:`.words` the
  default remote-sensing lists.
* :mod:`.exact` — :func:`score_exact` (and its steps :func:`prepare_queries`,
  :func:`archive_similarities`, :func:`fuse_prepared`): any method over a whole archive,
  chunked, normalized over the whole archive.

How the search layer uses it (one store, one query batch)::

    spec = method_spec(name)
    if spec.ta_capable:   # prepare, then the existing TA/ANN top-k with method=spec.fusion
        prep = prepare_queries(spec, q_img, q_txt, store.moments(), basis=..., embeddings=emb,
                               neighbours=ann_search_or_None)
        composed_topk(emb, prep.img, prep.txt, spec.fusion, lam, k,
                      img_stats=prep.img_stats, txt_stats=prep.txt_stats, ...)
    else:                 # exact scan over every row, then filter / top-k
        res = score_exact(spec, q_img, q_txt, emb, store.moments(), lam, basis=...)
"""

from .basis import TextBasis, TextBasisCache, TextEncoder, text_basis
from .exact import (
    ExactScores,
    PreparedQueries,
    archive_similarities,
    exact_neighbours,
    fuse_prepared,
    prepare_queries,
    score_exact,
)
from .fusion import (
    FUSIONS,
    LAMBDA_FUSIONS,
    METHODS,
    NEEDS_IMAGE,
    NEEDS_TEXT,
    RANGE_FUSIONS,
    QueryStats,
    check_harris_h,
    check_lam,
    check_method,
    combine,
    fuse,
    harris,
    minmax_norm,
    norm_cdf,
    topk,
)
from .methods import (
    PRESETS,
    TRANSFORMS,
    FusionOptions,
    MethodSpec,
    method_names,
    method_spec,
    parse_method,
)
from .words import RS_OBJECTS, RS_STYLES

__all__ = [
    "FUSIONS", "LAMBDA_FUSIONS", "METHODS", "NEEDS_IMAGE", "NEEDS_TEXT", "PRESETS",
    "RANGE_FUSIONS", "RS_OBJECTS", "RS_STYLES", "TRANSFORMS", "ExactScores", "FusionOptions",
    "MethodSpec", "PreparedQueries", "QueryStats", "TextBasis", "TextBasisCache", "TextEncoder",
    "archive_similarities", "check_harris_h", "check_lam", "check_method", "combine",
    "exact_neighbours", "fuse", "fuse_prepared", "harris", "method_names", "method_spec",
    "minmax_norm", "norm_cdf", "parse_method", "prepare_queries", "score_exact", "text_basis",
    "topk",
]
