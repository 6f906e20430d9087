"""Nearest-neighbour search backends.

:func:`fused_knn_search` is the exact search as one fused Triton kernel on CUDA;
:class:`~selectorch.scores.KNNScore` uses it where :func:`use_fused` says so and
:func:`selectorch.functional.knn_search` elsewhere. Triton is imported only when the kernel first
runs. :mod:`selectorch.search.hnsw` is hnswlib's approximate graph search on the CPU (hnswlib is
imported only when an index is built or loaded).
"""

from __future__ import annotations

from selectorch.search.hnsw import (
    HNSWIndex,
    IndexMismatchError,
    bank_fingerprint,
    build_or_load_index,
    hnsw_search,
)
from selectorch.search.triton_knn import (
    FUSED_MIN_WORK,
    MAX_K,
    fused_knn_search,
    supports,
    use_fused,
)

__all__ = [
    "FUSED_MIN_WORK",
    "HNSWIndex",
    "IndexMismatchError",
    "MAX_K",
    "bank_fingerprint",
    "build_or_load_index",
    "fused_knn_search",
    "hnsw_search",
    "supports",
    "use_fused",
]
