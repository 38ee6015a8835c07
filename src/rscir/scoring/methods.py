"""The method registry: every composed-search method name and what scoring it needs.

A method is a *fusion* of an image similarity and a text similarity (:data:`FUSIONS`) plus
optional query transforms, named ``FUSION[+centre][+tcentre][+project][+qe]``:

=========== ==================================================================================
``centre``  centre the image query and the archive by the archive mean ``μ`` (from the store's
            moments): the image similarity becomes ``(q − μ)·(x − μ)``; the text similarity
            uses ``x − μ`` too. Removes what every tile shares (hubness).
``tcentre`` centre the text query by the mean object-word embedding ``μ_t``
            (:mod:`rscir.scoring.basis`; needs the text encoder).
``project`` contrastive-PCA projection of the (centred) image query onto object directions,
            away from style directions (two word lists; needs the text encoder).
``qe``      query expansion: the image query becomes the ``exp(β·s)``-weighted mean of itself
            and its ``qe_k`` most similar archive items (BASIC: 25, β = 0.1).
=========== ==================================================================================

Besides the six original methods (``image``, ``text``, ``average``, ``sum``, ``product``,
``weicom``) the registry names presets (:data:`PRESETS`): ``minmax``, ``harris``, ``basic``
(the whole BASIC pipeline with rscir's archive statistics) and ``weicom-x``, the combination
that measured best on the real-tile benchmark (``docs/fusion_methods.md``).

For the search layer, each :class:`MethodSpec` says:

* ``needs_image`` / ``needs_text``; ``uses_lambda``;
* ``needs_encoder``: the text tower is needed beyond the query (``tcentre``/``project``);
* ``ta_capable``: after :func:`rscir.scoring.exact.prepare_queries` the fused score is a
  monotone function of the two inner products ``q'_img·x`` and ``q'_txt·x`` with per-query
  constants from the archive moments (``img_stats``/``txt_stats``), so the threshold-algorithm
  and ANN strategies apply unchanged to the *prepared* query vectors with ``method=fusion``.
  The transforms are all linear on the query side, so this holds for ``image``, ``text``,
  ``average``, ``sum`` and ``weicom`` fusions with any transform, and for ``product`` without
  one (centring shifts each similarity by a per-query constant, which a product does not
  absorb). ``minmax``/``harris`` need the archive's per-query min and max (a full scan) and
  Harris is not monotone: exact scan only;
* ``needs_neighbours``: ``qe`` — preparing the query needs the top ``qe_k`` archive neighbours
  of the (projected) image query by inner product; ``prepare_queries`` takes a callable for it
  (ANN or exact) and computes the weights exactly from the stored rows.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import InvalidArgumentError
from .basis import DEFAULT_ALPHA
from .fusion import (
    DEFAULT_HARRIS_H,
    FUSIONS,
    LAMBDA_FUSIONS,
    METHODS,
    NEEDS_IMAGE,
    NEEDS_TEXT,
    RANGE_FUSIONS,
    check_harris_h,
)
from .words import RS_OBJECTS, RS_STYLES

TRANSFORMS: tuple[str, ...] = ("centre", "tcentre", "project", "qe")
_TA_FUSIONS = frozenset({"image", "text", "average", "sum", "weicom"})


@dataclass(frozen=True)
class FusionOptions:
    """Parameters of the transforms and fusions (defaults: BASIC's, scaled to the model).

    ``objects``/``styles``: the word lists of ``tcentre``/``project``; ``alpha``: weight of the
    style scatter; ``n_components``: directions kept (None: a third of the dimension);
    ``qe_k``/``qe_beta``: neighbours and weight sharpness of query expansion; ``harris_h``: the
    Harris trace weight."""

    objects: tuple[str, ...] = RS_OBJECTS
    styles: tuple[str, ...] = RS_STYLES
    alpha: float = DEFAULT_ALPHA
    n_components: int | None = None
    qe_k: int = 25
    qe_beta: float = 0.1
    harris_h: float = DEFAULT_HARRIS_H

    def __post_init__(self) -> None:
        object.__setattr__(self, "objects", tuple(str(w) for w in self.objects))
        object.__setattr__(self, "styles", tuple(str(w) for w in self.styles))
        if self.qe_k < 1:
            raise InvalidArgumentError(f"qe_k must be >= 1, got {self.qe_k}")
        check_harris_h(self.harris_h)


@dataclass(frozen=True)
class MethodSpec:
    """One method: a fusion and its query transforms (see the module docstring)."""

    fusion: str
    centre: bool = False
    tcentre: bool = False
    project: bool = False
    qe: bool = False
    alias: str | None = None
    description: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        if self.fusion not in FUSIONS:
            raise InvalidArgumentError(
                f"unknown fusion {self.fusion!r}; choose from {', '.join(FUSIONS)}"
            )

    @property
    def transforms(self) -> tuple[str, ...]:
        return tuple(t for t in TRANSFORMS if getattr(self, t))

    @property
    def canonical(self) -> str:
        """``fusion+transform+...`` in the fixed order of :data:`TRANSFORMS`."""
        return "+".join((self.fusion, *self.transforms))

    @property
    def name(self) -> str:
        return self.alias or self.canonical

    @property
    def needs_image(self) -> bool:
        return self.fusion in NEEDS_IMAGE or self.fusion in RANGE_FUSIONS

    @property
    def needs_text(self) -> bool:
        return self.fusion in NEEDS_TEXT or self.fusion in RANGE_FUSIONS

    @property
    def uses_lambda(self) -> bool:
        return self.fusion in LAMBDA_FUSIONS

    @property
    def uses_image_transforms(self) -> bool:
        return self.centre or self.project or self.qe

    @property
    def needs_encoder(self) -> bool:
        return self.tcentre or self.project

    @property
    def needs_neighbours(self) -> bool:
        return self.qe

    @property
    def ta_capable(self) -> bool:
        if self.fusion == "product":
            return not self.transforms
        return self.fusion in _TA_FUSIONS

    @property
    def exact_only(self) -> bool:
        return not self.ta_capable

    def info(self) -> dict[str, object]:
        """What a client (CLI, HTTP, page) shows about the method."""
        return {
            "name": self.name, "canonical": self.canonical, "fusion": self.fusion,
            "transforms": list(self.transforms), "needs_image": self.needs_image,
            "needs_text": self.needs_text, "uses_lambda": self.uses_lambda,
            "needs_encoder": self.needs_encoder, "ta_capable": self.ta_capable,
            "description": self.description,
        }


def _preset(alias: str, canonical: str, description: str) -> MethodSpec:
    base = parse_method(canonical)
    return MethodSpec(base.fusion, base.centre, base.tcentre, base.project, base.qe,
                      alias=alias, description=description)


def parse_method(name: str) -> MethodSpec:
    """The spec of ``FUSION[+transform...]`` (transforms in any order, each once)."""
    parts = [p.strip() for p in str(name).strip().lower().split("+")]
    fusion, extra = parts[0], parts[1:]
    if fusion not in FUSIONS:
        raise InvalidArgumentError(
            f"unknown method {name!r}: a method is a preset ({', '.join(PRESETS)}) or "
            f"FUSION[+{'][+'.join(TRANSFORMS)}] with FUSION one of {', '.join(FUSIONS)}"
        )
    bad = [p for p in extra if p not in TRANSFORMS]
    if bad or len(set(extra)) != len(extra):
        raise InvalidArgumentError(
            f"method {name!r}: transforms are {', '.join(TRANSFORMS)}, each at most once"
        )
    return MethodSpec(fusion, centre="centre" in extra, tcentre="tcentre" in extra,
                      project="project" in extra, qe="qe" in extra)


PRESETS: dict[str, MethodSpec] = {}
_DESCRIPTIONS = {
    "image": "image similarity only",
    "text": "text similarity only",
    "average": "mean of the image and text similarities",
    "sum": "sum of the image and text similarities",
    "product": "product of the image and text similarities",
    "weicom": "WeiCom: λ·Φ(z_text) + (1−λ)·Φ(z_image), z over the whole archive (moments)",
}
for _m in METHODS:
    PRESETS[_m] = MethodSpec(_m, description=_DESCRIPTIONS[_m])
PRESETS["minmax"] = MethodSpec(
    "minmax", description="λ-weighted sum of per-query min-max normalized similarities"
)
PRESETS["harris"] = MethodSpec(
    "harris", description="λ-weighted Harris criterion A·B − h(A+B)² of min-max normalized "
    "similarities (BASIC's fusion)"
)
PRESETS["basic"] = _preset(
    "basic", "harris+centre+tcentre+project+qe",
    "BASIC (Psomas et al., NeurIPS 2025) with rscir's archive statistics: centring, "
    "contrastive-PCA projection, query expansion, min-max normalization, Harris fusion",
)
PRESETS["weicom-x"] = _preset(
    "weicom-x", "weicom+centre+tcentre+qe",
    "WeiCom on centred features (archive mean; text by the object-word mean) with query "
    "expansion: the best combination measured on real tiles (TA/ANN-capable after a "
    "neighbour search)",
)


def method_spec(name: str | MethodSpec) -> MethodSpec:
    """A preset by name, or a composed ``FUSION+transform...`` name."""
    if isinstance(name, MethodSpec):
        return name
    key = str(name).strip().lower()
    if key in PRESETS:
        return PRESETS[key]
    return parse_method(key)


def method_names() -> tuple[str, ...]:
    """The preset names (what a menu lists; composed names are accepted everywhere too)."""
    return tuple(PRESETS)
