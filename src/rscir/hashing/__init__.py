"""Binary hashing for large-archive retrieval: scikit-learn-style estimators that map vectors
to packed bit codes, and Hamming ranking over FAISS binary indexes.

Methods: random-hyperplane LSH, PCA-ITQ, kernelized LSH, KSH (supervised, kernels), and a
multi-code wrapper (one code per image region, summed Hamming matching).
"""

from __future__ import annotations

from .base import BaseHasher, check_n_bits, hamming_distances, pack_bits, unpack_bits
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

HASHERS: dict[str, type[BaseHasher]] = {
    "lsh": LSHHasher,
    "itq": ITQHasher,
    "klsh": KernelLSHHasher,
    "ksh": KSHHasher,
}


def make_hasher(name: str, n_bits: int, random_state: int | None = 0, **params: object) -> BaseHasher:
    """A hasher by short name (``lsh``, ``itq``, ``klsh``, ``ksh``)."""
    if name not in HASHERS:
        raise ValueError(f"unknown hashing method {name!r}; choose from {', '.join(HASHERS)}")
    return HASHERS[name](n_bits, random_state=random_state, **params)  # type: ignore[arg-type]


__all__ = [
    "HASHERS",
    "BaseHasher",
    "CodeMoments",
    "HammingIndex",
    "HashSearch",
    "ITQHasher",
    "KSHHasher",
    "KernelLSHHasher",
    "LSHHasher",
    "MultiCodeHasher",
    "canonical_topk",
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
    "unpack_bits",
]
