"""kNN distance scores: distance to the nearest reference embeddings."""

from __future__ import annotations

import os
from typing import Any

import torch

from selectorch._checks import check_choice, check_int
from selectorch.distributed.collectives import (
    agreed_steps,
    inputs_are_replicated,
    is_distributed,
)
from selectorch.distributed.search import locate_shard, sharded_search, take_shard
from selectorch.functional.distances import METRICS, prepare_bank
from selectorch.functional.gaussian import (
    fit_gaussian_stats,
    pooled_covariance,
    whiten,
    whitening_matrix,
)
from selectorch.functional.knn import (
    DEFAULT_CHUNK_SIZE,
    STATS,
    knn_search,
    knn_statistic,
    row_sq_norms,
)
from selectorch.functional.outliers import check_outlier_q, drop_self_matches, inlier_rows
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
from selectorch.search.triton_knn import fused_knn_search, use_fused

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
        outlier_q: Fraction in ``[0, 1)`` of the reference rows dropped at fit before the bank
            is built (seapig's ``q``): the ``floor(outlier_q * N)`` rows with the highest
            leave-one-out kNN score (each row against the others, exact search in the bank's
            space; for mahalanobis the whitening is then refitted on the rows kept).
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
        shard: Under ``torch.distributed``, keep only this rank's contiguous slice of the bank
            (exact backend). ``fit`` takes the whole reference set, the same on every rank
            (:meth:`SelectiveModel.fit <selectorch.SelectiveModel.fit>` gathers it), and keeps a
            slice; every search then runs on all ranks together and returns exactly the
            neighbours of an unsplit search, with indices into the whole bank (see
            :func:`selectorch.distributed.sharded_search`). Every rank must score at the same
            time, as with DDP. Save with :func:`selectorch.distributed.save_sharded`.

    Attributes:
        bank_: ``(M, D)`` reference embeddings: centred on ``mean_`` for euclidean (distances do
            not change, precision improves), L2-normalised for cosine, centred and whitened for
            mahalanobis. With ``shard=True``, this rank's rows of them.
        shard_sizes_: ``(W,)`` rows held by each of the ``W`` ranks (``shard=True`` only).
        shard_rank_: 0-dim, the rank whose rows ``bank_`` holds (``shard=True`` only).
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
        outlier_q: float = 0.0,
        backend: str = "exact",
        M: int = DEFAULT_M,
        ef_construction: int = DEFAULT_EF_CONSTRUCTION,
        ef: int | None = None,
        num_threads: int = 1,
        save_index: str | os.PathLike[str] | None = None,
        shard: bool = False,
    ) -> None:
        super().__init__()
        if not isinstance(shard, bool):
            raise ValueError(f"Expected argument `shard` to be a bool, got {shard!r}.")
        if shard and backend != "exact":
            raise ValueError(
                f"Argument `shard=True` needs backend='exact', got backend={backend!r} (each "
                "rank would build and save its own approximate index)."
            )
        self.shard = shard
        self.outlier_q = check_outlier_q(outlier_q)
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
        if shard:  # which rows of the whole bank this rank holds
            self.register_buffer("shard_sizes_", torch.empty(0, dtype=torch.int64))
            self.register_buffer("shard_rank_", torch.empty(0, dtype=torch.int64))
        self._shard_offset, self._bank_rows = 0, 0

    def _expected_dim(self) -> int | None:
        return self.bank_.shape[1] if self.is_fitted else None

    def _check_k(self, bank_size: int) -> None:
        if self.k > bank_size:
            raise ValueError(
                f"Expected argument `k` to be at most the bank size {bank_size}, got k={self.k}."
            )

    def _fit(self, X: torch.Tensor, y: torch.Tensor | None) -> None:
        overwrite = self._fit_may_overwrite
        if self.outlier_q > 0:
            self._build_bank(X, overwrite=False)  # X is read again below
            X, overwrite = X[self._inlier_rows()], True  # indexing made a copy: ours
        self._build_bank(X, overwrite=overwrite)
        if self.shard:
            bank, sizes, rank = take_shard(self.bank_)
            self.bank_ = bank
            self.shard_sizes_ = torch.tensor(sizes, device=bank.device)
            self.shard_rank_ = torch.tensor(rank, device=bank.device)

    def _inlier_rows(self) -> torch.Tensor:
        """Rows of ``bank_`` kept by ``outlier_q`` (leave-one-out kNN scores, exact search)."""
        n = self.bank_.shape[0]
        if n < self.k + 1:
            raise ValueError(
                f"Expected at least k + 1 = {self.k + 1} reference rows for the leave-one-out "
                f"search of outlier_q={self.outlier_q}, got {n}."
            )
        metric = "cosine" if self.metric == "cosine" else "euclidean"
        d, i = knn_search(
            self.bank_,
            self.bank_,
            self.k + 1,
            metric=metric,
            chunk_size=self.chunk_size,
            bank_normalized=True,
        )
        rows = inlier_rows(knn_statistic(drop_self_matches(d, i)[0], self.stat), self.outlier_q)
        if rows.numel() < self.k:
            raise ValueError(
                f"Expected argument `outlier_q` to leave at least k = {self.k} reference rows, "
                f"got outlier_q={self.outlier_q} leaving {rows.numel()} of {n}."
            )
        return rows

    def _build_bank(self, X: torch.Tensor, *, overwrite: bool = False) -> None:
        """``bank_`` from ``X``: a new tensor, or ``X`` itself changed in place if ``overwrite``.

        In place, the euclidean and cosine banks need no memory beyond ``X``; the mahalanobis
        bank (a matrix product) is always a new tensor.
        """
        self._check_k(X.shape[0])
        X = X.detach()
        overwrite = overwrite and X.is_contiguous()  # never write through expanded rows
        if self.metric == "mahalanobis":
            stats = fit_gaussian_stats(X)
            whitener = whitening_matrix(pooled_covariance(stats), self.shrinkage)
            self._set_buffer("mean_", stats.means[0])
            self._set_buffer("whitener_", whitener)
            self.bank_ = whiten(X, self.mean_, self.whitener_)
        elif self.metric == "euclidean":
            self._set_buffer("mean_", X.mean(dim=0))
            self.bank_ = X.sub_(self.mean_) if overwrite else X - self.mean_
        else:
            self.bank_ = prepare_bank(X, self.metric, inplace=overwrite)

    def _refresh_derived(self) -> None:
        self._shard_offset, self._bank_rows = 0, self.bank_.shape[0]
        if self.shard:
            sizes, rank = self.shard_sizes_.tolist(), int(self.shard_rank_)
            self._shard_offset, self._bank_rows = locate_shard(sizes, rank, self.bank_.shape[0])
        self._check_k(self._bank_rows)
        work = torch.promote_types(self.bank_.dtype, torch.float32)
        # float32 even for half banks (float64 for float64 ones)
        self.bank_sq_norms_ = row_sq_norms(self.bank_, work)  # no (M, D) temporary
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
        if self.metric == "cosine":  # the distances ignore the norms; the CPU path checks them
            return X, "cosine", self.bank_sq_norms_
        if self.metric == "mahalanobis":
            X = whiten(X.to(self.whitener_.dtype), self.mean_, self.whitener_)
        else:
            X = X.to(self.mean_.dtype) - self.mean_
        return X, "euclidean", self.bank_sq_norms_

    def _exact_search(
        self, X: torch.Tensor, k: int, metric: str, norms: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Exact search of ``bank_`` (this rank's slice when sharded), queries in its space."""
        if use_fused(X, self.bank_, k):  # large searches on CUDA: one fused Triton kernel
            return fused_knn_search(X, self.bank_, k, metric=metric, bank_sq_norms=norms)
        return knn_search(
            X,
            self.bank_,
            k,
            metric=metric,
            bank_sq_norms=norms,
            chunk_size=self.chunk_size,
            bank_normalized=True,
        )

    def _search(self, X: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        X, metric, norms = self._query(X)
        if self.shard:  # every rank searches its slice; candidates are exchanged and merged
            return sharded_search(
                X,
                lambda queries, k_local: self._exact_search(queries, k_local, metric, norms),
                k,
                offset=self._shard_offset,
                local_rows=self.bank_.shape[0],
                total_rows=self._bank_rows,
            )
        if self.backend == "hnsw":
            if self.hnsw_index is None:
                raise RuntimeError(
                    f"This {type(self).__name__} has no hnsw index: its last build or load "
                    "failed. Call fit or load_state_dict again."
                )
            return hnsw_search(X, self.bank_, self.hnsw_index, k)
        return self._exact_search(X, k, metric, norms)

    def _score(self, X: torch.Tensor) -> torch.Tensor:
        return knn_statistic(self._search(X, self.k)[0], self.stat)

    @property
    def sharded_buffers(self) -> tuple[str, ...]:
        """Buffers split by rows across ranks: ``("bank_",)`` with ``shard=True``."""
        return ("bank_",) if self.shard else ()

    @torch.no_grad()
    def score(self, X: torch.Tensor, *, batch_size: int = 4096) -> torch.Tensor:
        """Scores of many rows, ``batch_size`` at a time; see :meth:`Score.score`.

        With ``shard=True`` under ``torch.distributed``, every rank runs as many steps as the
        rank with the most rows (some on empty batches), since every step searches together.
        """
        if not (self.shard and is_distributed()) or inputs_are_replicated():
            return super().score(X, batch_size=batch_size)
        check_int("batch_size", batch_size)
        self._check_fitted()
        X = self._check_input(X)
        steps = agreed_steps(X.shape[0], batch_size)
        parts = [self(X[step * batch_size : (step + 1) * batch_size]) for step in range(steps)]
        return torch.cat(parts) if parts else self(X)

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
        chunk += f", outlier_q={self.outlier_q}" if self.outlier_q else ""
        hnsw = ""
        if self.backend == "hnsw":
            hnsw = (
                f", backend='hnsw', M={self.M}, ef_construction={self.ef_construction}, "
                f"ef={resolve_ef(self.ef, self.k)}"
            )
        shard = ", shard=True" if self.shard else ""
        return f"k={self.k}{metric}, stat={self.stat!r}{shrinkage}{chunk}{hnsw}{shard}"

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
        outlier_q: Fraction of reference rows dropped at fit (see :class:`KNNScore`).
        backend: ``"exact"`` or ``"hnsw"``; ``M``, ``ef_construction``, ``ef``, ``num_threads``
            and ``save_index`` tune ``"hnsw"`` (see :class:`KNNScore`).
        shard: Keep only this rank's slice of the bank under ``torch.distributed`` (see
            :class:`KNNScore`).
    """

    def __init__(
        self,
        *,
        k: int = 1,
        stat: str = "max",
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        outlier_q: float = 0.0,
        backend: str = "exact",
        M: int = DEFAULT_M,
        ef_construction: int = DEFAULT_EF_CONSTRUCTION,
        ef: int | None = None,
        num_threads: int = 1,
        save_index: str | os.PathLike[str] | None = None,
        shard: bool = False,
    ) -> None:
        super().__init__(
            k=k,
            metric="euclidean",
            stat=stat,
            chunk_size=chunk_size,
            outlier_q=outlier_q,
            backend=backend,
            M=M,
            ef_construction=ef_construction,
            ef=ef,
            num_threads=num_threads,
            save_index=save_index,
            shard=shard,
        )


@register_score("cosine")
class CosineScore(KNNScore):
    """kNN score with cosine distance ``1 - cos`` (seapig's name). See :class:`KNNScore`.

    Args:
        k: Number of neighbours.
        stat: ``"max"``, ``"mean"``, ``"median"`` or ``"min"`` over the k distances.
        chunk_size: Bank rows searched at a time.
        outlier_q: Fraction of reference rows dropped at fit (see :class:`KNNScore`).
        backend: ``"exact"`` or ``"hnsw"``; ``M``, ``ef_construction``, ``ef``, ``num_threads``
            and ``save_index`` tune ``"hnsw"`` (see :class:`KNNScore`).
        shard: Keep only this rank's slice of the bank under ``torch.distributed`` (see
            :class:`KNNScore`).
    """

    def __init__(
        self,
        *,
        k: int = 1,
        stat: str = "max",
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        outlier_q: float = 0.0,
        backend: str = "exact",
        M: int = DEFAULT_M,
        ef_construction: int = DEFAULT_EF_CONSTRUCTION,
        ef: int | None = None,
        num_threads: int = 1,
        save_index: str | os.PathLike[str] | None = None,
        shard: bool = False,
    ) -> None:
        super().__init__(
            k=k,
            metric="cosine",
            stat=stat,
            chunk_size=chunk_size,
            outlier_q=outlier_q,
            backend=backend,
            M=M,
            ef_construction=ef_construction,
            ef=ef,
            num_threads=num_threads,
            save_index=save_index,
            shard=shard,
        )
