"""Nearest-neighbour search backends.

:func:`fused_knn_search` is the exact search as one fused Triton kernel on CUDA; use it where
:func:`supports` says so and :func:`selectorch.functional.knn_search` elsewhere. Triton is
imported only when the kernel first runs.
"""

from __future__ import annotations

from selectorch.search.triton_knn import MAX_K, fused_knn_search, supports

__all__ = ["MAX_K", "fused_knn_search", "supports"]
