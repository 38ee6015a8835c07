"""Binary hashing for large-archive retrieval: scikit-learn-style estimators that map vectors
to packed bit codes, and Hamming ranking over FAISS binary indexes.

Methods: random-hyperplane LSH, PCA-ITQ, kernelized LSH, KSH (supervised, kernels), deep
metric and hash-code learning (supervised, a small network with triplet, quantization and
bit-balance losses), a multi-code wrapper (one code per image crop, summed Hamming matching) and
cluster-sensitive multi-code hashing (one code per primitive region cluster, Reato et al.).
"""

from __future__ import annotations

from ..errors import InvalidArgumentError
from .base import BaseHasher, check_n_bits, hamming_distances, pack_bits, unpack_bits
from .clustercode import (
    ClusterMultiCodeHasher,
    cluster_multicode_distances,
    split_cluster_codes,
)
from .deep import DeepMetricHasher
from .itq import ITQHasher
from .klsh import KernelLSHHasher
from .ksh import KSHHasher
from .lsh import LSHHasher
from .multicode import MultiCodeHasher, multicode_distances
from .ranking import (
    CodeMoments,
    HammingIndex,
    HashSearch,
    canonical_topk,
    composed_hamming_scores,
    composed_hamming_search,
    hamming_similarity,
    hamming_topk,
    rerank,
)
from .regions import RegionDescriber

HASHERS: dict[str, type[BaseHasher]] = {
    "lsh": LSHHasher,
    "itq": ITQHasher,
    "klsh": KernelLSHHasher,
    "ksh": KSHHasher,
    "deep": DeepMetricHasher,
}


def make_hasher(name: str, n_bits: int, random_state: int | None = 0, **params: object) -> BaseHasher:
    """A hasher by short name (``lsh``, ``itq``, ``klsh``, ``ksh``, ``deep``)."""
    if name not in HASHERS:
        raise InvalidArgumentError(f"unknown hashing method {name!r}; choose from {', '.join(HASHERS)}")
    return HASHERS[name](n_bits, random_state=random_state, **params)


__all__ = [
    "HASHERS",
    "BaseHasher",
    "ClusterMultiCodeHasher",
    "CodeMoments",
    "DeepMetricHasher",
    "HammingIndex",
    "HashSearch",
    "ITQHasher",
    "KSHHasher",
    "KernelLSHHasher",
    "LSHHasher",
    "MultiCodeHasher",
    "RegionDescriber",
    "canonical_topk",
    "cluster_multicode_distances",
    "check_n_bits",
    "composed_hamming_scores",
    "composed_hamming_search",
    "hamming_distances",
    "hamming_similarity",
    "hamming_topk",
    "make_hasher",
    "multicode_distances",
    "pack_bits",
    "rerank",
    "split_cluster_codes",
    "unpack_bits",
]
