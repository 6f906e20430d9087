"""kNN distance scores: distance to the nearest reference embeddings."""

from __future__ import annotations

import os
from typing import Any

import torch

from selectorch._checks import check_choice, check_int
from selectorch.functional.distances import METRICS, prepare_bank
from selectorch.functional.gaussian import (
    fit_gaussian_stats,
    pooled_covariance,
    whiten,
    whitening_matrix,
)
from selectorch.functional.knn import DEFAULT_CHUNK_SIZE, STATS, knn_search, knn_statistic
from selectorch.scores.base import Score
from selectorch.scores.mahalanobis import DEFAULT_SHRINKAGE, check_shrinkage
from selectorch.scores.registry import register_score
from selectorch.search.hnsw import (
    DEFAULT_EF_CONSTRUCTION,
    DEFAULT_M,
    HNSWIndex,
    build_or_load_index,
    check_hnsw_args,
    hnsw_search,
    resolve_ef,
)

#: Metrics of :class:`KNNScore`: those of the search, plus Euclidean after whitening.
KNN_METRICS = (*METRICS, "mahalanobis")
#: Search backends: exact chunked search on the bank's device, or hnswlib's graph on the CPU.
BACKENDS = ("exact", "hnsw")
#: Options of the search alone: a state saved with one value loads into a score with another.
SEARCH_OPTIONS = ("backend", "M", "ef_construction", "ef", "num_threads", "save_index")


@register_score("knn")
class KNNScore(Score):
    """Distance to the k nearest reference embeddings (Sun et al. 2022, "deep nearest neighbors").

    By default the search is exact and runs on the bank's device: a chunked matrix product with a
    running top-k, so memory stays bounded by a block of distances and the full query x bank
    matrix is never built. ``backend="hnsw"`` searches an approximate hnswlib graph on the CPU.

    Args:
        k: Number of neighbours, ``1 <= k <= bank size``.
        metric: ``"euclidean"``, ``"cosine"`` (``1 - cosine similarity``) or ``"mahalanobis"``
            (Euclidean after whitening with the reference covariance, seapig's
            ``MahalanobisScore``: the bank is whitened at fit, each query at scoring).
        stat: How the k distances become one score: ``"max"`` (k-th neighbour), ``"mean"``,
            ``"median"`` or ``"min"``.
        shrinkage: For ``"mahalanobis"`` only: ``a`` in ``[0, 1]``, the whitening uses
            ``(1 - a) * S + a * (trace(S) / D) * I`` so that a singular covariance ``S`` still
            whitens; ``0`` raises at fit if ``S`` is singular (the metric never falls back).
        chunk_size: Bank rows searched at a time: memory is bounded by a ``(B, chunk_size)``
            block of distances (float32).
        backend: ``"exact"`` (the search above) or ``"hnsw"``: hnswlib's approximate graph
            search on the CPU (:mod:`selectorch.search.hnsw`), for banks too large for exact
            search there. The index is derived from ``bank_`` at ``fit`` and ``load_state_dict``
            (built, or loaded from ``save_index``) and is not part of the ``state_dict``. Queries
            on another device are copied to the CPU and back (a synchronisation per batch).
        M: For ``"hnsw"``: links per graph node, at least 2.
        ef_construction: For ``"hnsw"``: candidates kept while building the graph.
        ef: For ``"hnsw"``: candidates kept while searching, at least ``k``; ``None`` uses
            ``max(64, 2 * k)``.
        num_threads: For ``"hnsw"``: threads that build and search the graph; ``1`` builds the
            same graph on every run (fixed seed), more build faster but not reproducibly.
        save_index: For ``"hnsw"``: file where the index persists, with a fingerprint of the
            bank at ``save_index + ".json"``. If it exists it is loaded instead of built, and an
            index of another bank or other options raises
            :class:`~selectorch.search.hnsw.IndexMismatchError`; else it is built and saved.

    Attributes:
        bank_: ``(M, D)`` reference embeddings: centred on ``mean_`` for euclidean (distances do
            not change, precision improves), L2-normalised for cosine, centred and whitened for
            mahalanobis.
        mean_: ``(D,)`` mean of the reference embeddings (euclidean and mahalanobis).
        whitener_: ``(D, D)`` inverse square root of the shrunk covariance (mahalanobis only).
        hnsw_index: The :class:`~selectorch.search.hnsw.HNSWIndex` of ``bank_`` (``"hnsw"``
            backend, once fitted), else ``None``.

    Example:
        >>> score = KNNScore(k=5, stat="mean").fit(torch.randn(1000, 32))
        >>> score = score.calibrate(torch.randn(200, 32), coverage=0.9)
        >>> score.select(torch.randn(10, 32))["selected"].shape
        torch.Size([10])
    """

    input = "embedding"
    fitted_buffers = ("bank_",)

    bank_: torch.Tensor
    bank_sq_norms_: torch.Tensor

    def __init__(
        self,
        *,
        k: int = 1,
        metric: str = "euclidean",
        stat: str = "max",
        shrinkage: float = DEFAULT_SHRINKAGE,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        backend: str = "exact",
        M: int = DEFAULT_M,
        ef_construction: int = DEFAULT_EF_CONSTRUCTION,
        ef: int | None = None,
        num_threads: int = 1,
        save_index: str | os.PathLike[str] | None = None,
    ) -> None:
        super().__init__()
        self.k = check_int("k", k)
        self.metric = check_choice("metric", metric, KNN_METRICS)
        self.stat = check_choice("stat", stat, STATS)
        self.shrinkage = check_shrinkage(shrinkage)
        self.chunk_size = check_int("chunk_size", chunk_size)
        self.backend = check_choice("backend", backend, BACKENDS)
        check_hnsw_args(
            k=self.k,
            M=M,
            ef_construction=ef_construction,
            ef=ef,
            num_threads=num_threads,
            save_index=save_index,
        )
        if save_index is not None and backend != "hnsw":
            raise ValueError(
                f"Argument `save_index` needs backend='hnsw', got backend={backend!r} (the "
                "exact search has no index to save)."
            )
        self.M, self.ef_construction, self.ef = M, ef_construction, ef
        self.num_threads, self.save_index = num_threads, save_index
        self.hnsw_index: HNSWIndex | None = None
        self.register_buffer("bank_", torch.empty(0, 0))
        if self.metric != "cosine":
            self.register_buffer("mean_", torch.empty(0))
        if self.metric == "mahalanobis":
            self.register_buffer("whitener_", torch.empty(0, 0))
        # derived from bank_ (not saved): squared row norms for euclidean search
        self.register_buffer("bank_sq_norms_", torch.empty(0), persistent=False)

    def _expected_dim(self) -> int | None:
        return self.bank_.shape[1] if self.is_fitted else None

    def _check_k(self, bank_size: int) -> None:
        if self.k > bank_size:
            raise ValueError(
                f"Expected argument `k` to be at most the bank size {bank_size}, got k={self.k}."
            )

    def _fit(self, X: torch.Tensor, y: torch.Tensor | None) -> None:
        self._check_k(X.shape[0])
        if self.metric == "mahalanobis":
            stats = fit_gaussian_stats(X)
            whitener = whitening_matrix(pooled_covariance(stats), self.shrinkage)
            self._set_buffer("mean_", stats.means[0])
            self._set_buffer("whitener_", whitener)
            self.bank_ = whiten(X.detach(), self.mean_, self.whitener_)
        elif self.metric == "euclidean":
            self._set_buffer("mean_", X.mean(dim=0))
            self.bank_ = X.detach() - self.mean_
        else:
            self.bank_ = prepare_bank(X.detach(), self.metric).clone()

    def _refresh_derived(self) -> None:
        self._check_k(self.bank_.shape[0])
        self.bank_sq_norms_ = self.bank_.pow(2).sum(dim=1)
        if self.backend == "hnsw":
            self.hnsw_index = None  # never left pointing at another bank if the next step fails
            self.hnsw_index = build_or_load_index(
                self.bank_,
                "cosine" if self.metric == "cosine" else "euclidean",
                path=self.save_index,
                M=self.M,
                ef_construction=self.ef_construction,
                ef=resolve_ef(self.ef, self.k),
                num_threads=self.num_threads,
            )

    def _query(self, X: torch.Tensor) -> tuple[torch.Tensor, str, torch.Tensor | None]:
        """Queries in the bank's space, the search metric and the bank's squared norms."""
        if self.metric == "cosine":
            return X, "cosine", None
        if self.metric == "mahalanobis":
            X = whiten(X.to(self.whitener_.dtype), self.mean_, self.whitener_)
        else:
            X = X.to(self.mean_.dtype) - self.mean_
        return X, "euclidean", self.bank_sq_norms_

    def _search(self, X: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        X, metric, norms = self._query(X)
        if self.backend == "hnsw":
            if self.hnsw_index is None:
                raise RuntimeError(
                    f"This {type(self).__name__} has no hnsw index: its last build or load "
                    "failed. Call fit or load_state_dict again."
                )
            return hnsw_search(X, self.bank_, self.hnsw_index, k)
        return knn_search(
            X,
            self.bank_,
            k,
            metric=metric,
            bank_sq_norms=norms,
            chunk_size=self.chunk_size,
            bank_normalized=True,
        )

    def _score(self, X: torch.Tensor) -> torch.Tensor:
        return knn_statistic(self._search(X, self.k)[0], self.stat)

    def knn_search(
        self, X: torch.Tensor, k: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Distances to and indices of the nearest reference rows (seapig's ``knn_search``).

        Args:
            X: ``(B, D)`` query embeddings, on the bank's device.
            k: Number of neighbours, ``1 <= k <= bank size``; the score's ``k`` when ``None``.

        Returns:
            ``(distances, indices)``, both ``(B, k)`` and sorted by increasing distance, in the
            score's metric (Euclidean after whitening for ``"mahalanobis"``). ``indices`` are
            rows of the data passed to :meth:`fit` (and of ``bank_``).

        Raises:
            NotFittedError: ``fit`` was not called.
            ValueError: ``X`` has the wrong shape or device, or ``k`` is out of range.

        Example:
            >>> score = KNNScore(k=3).fit(torch.randn(100, 8))
            >>> d, i = score.knn_search(torch.randn(5, 8), k=2)
            >>> d.shape, i.shape
            (torch.Size([5, 2]), torch.Size([5, 2]))
        """
        self._check_fitted()
        X = self._check_input(X)
        k = self.k if k is None else check_int("k", k)
        return self._search(X, k)

    def extra_repr(self) -> str:
        metric = "" if type(self) is not KNNScore else f", metric={self.metric!r}"
        shrinkage = f", shrinkage={self.shrinkage}" if self.metric == "mahalanobis" else ""
        chunk = "" if self.chunk_size == DEFAULT_CHUNK_SIZE else f", chunk_size={self.chunk_size}"
        hnsw = ""
        if self.backend == "hnsw":
            hnsw = (
                f", backend='hnsw', M={self.M}, ef_construction={self.ef_construction}, "
                f"ef={resolve_ef(self.ef, self.k)}"
            )
        return f"k={self.k}{metric}, stat={self.stat!r}{shrinkage}{chunk}{hnsw}"

    def check_compatible(self, state: dict[str, Any]) -> None:
        """As :meth:`Score.check_compatible`, ignoring the search options: ``bank_`` fitted
        with one backend (or index file) loads into a score with another."""
        hparams = state.get("hparams", {})
        kept = {key: value for key, value in hparams.items() if key not in SEARCH_OPTIONS}
        super().check_compatible({**state, "hparams": kept})


@register_score("euclidean")
class EuclideanScore(KNNScore):
    """kNN score with Euclidean distance (seapig's name). See :class:`KNNScore`.

    Args:
        k: Number of neighbours.
        stat: ``"max"``, ``"mean"``, ``"median"`` or ``"min"`` over the k distances.
        chunk_size: Bank rows searched at a time.
        backend: ``"exact"`` or ``"hnsw"``; ``M``, ``ef_construction``, ``ef``, ``num_threads``
            and ``save_index`` tune ``"hnsw"`` (see :class:`KNNScore`).
    """

    def __init__(
        self,
        *,
        k: int = 1,
        stat: str = "max",
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        backend: str = "exact",
        M: int = DEFAULT_M,
        ef_construction: int = DEFAULT_EF_CONSTRUCTION,
        ef: int | None = None,
        num_threads: int = 1,
        save_index: str | os.PathLike[str] | None = None,
    ) -> None:
        super().__init__(
            k=k,
            metric="euclidean",
            stat=stat,
            chunk_size=chunk_size,
            backend=backend,
            M=M,
            ef_construction=ef_construction,
            ef=ef,
            num_threads=num_threads,
            save_index=save_index,
        )


@register_score("cosine")
class CosineScore(KNNScore):
    """kNN score with cosine distance ``1 - cos`` (seapig's name). See :class:`KNNScore`.

    Args:
        k: Number of neighbours.
        stat: ``"max"``, ``"mean"``, ``"median"`` or ``"min"`` over the k distances.
        chunk_size: Bank rows searched at a time.
        backend: ``"exact"`` or ``"hnsw"``; ``M``, ``ef_construction``, ``ef``, ``num_threads``
            and ``save_index`` tune ``"hnsw"`` (see :class:`KNNScore`).
    """

    def __init__(
        self,
        *,
        k: int = 1,
        stat: str = "max",
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        backend: str = "exact",
        M: int = DEFAULT_M,
        ef_construction: int = DEFAULT_EF_CONSTRUCTION,
        ef: int | None = None,
        num_threads: int = 1,
        save_index: str | os.PathLike[str] | None = None,
    ) -> None:
        super().__init__(
            k=k,
            metric="cosine",
            stat=stat,
            chunk_size=chunk_size,
            backend=backend,
            M=M,
            ef_construction=ef_construction,
            ef=ef,
            num_threads=num_threads,
            save_index=save_index,
        )
