"""Approximate k-nearest-neighbour search with hnswlib on the CPU, persisted with a fingerprint.

For banks too large for exact search on the CPU. The bank tensor stays the source of truth: an
:class:`HNSWIndex` is derived from it (built, or loaded from a file whose fingerprint matches
it) and is never part of a ``state_dict``.

* **Graph.** hnswlib's HNSW graph with ``M`` links per node, built with ``ef_construction``
  candidates and searched with ``ef`` (recall rises with ``ef``, and so does the query time).
  It holds a float32 copy of the bank besides the graph, so the bank's memory is needed again.
* **Determinism.** The graph is built with a fixed ``random_seed``. With ``num_threads=1`` the
  same bank gives the same graph on every run; more threads build faster, but then the order of
  insertion, hence the graph, depends on scheduling. A search of a given graph is deterministic.
* **Compile.** The search is the custom op ``torch.ops.selectorch.hnsw_knn`` with a fake
  implementation, so ``torch.compile(fullgraph=True)`` keeps it in the graph as one opaque call.
  The op finds its index by an integer handle in a registry of live indexes (weak references:
  an index lives as long as the score holding it).
* **Devices.** hnswlib runs on the CPU: queries on another device are copied to the CPU (a
  device synchronisation plus ``B x D`` floats each way per batch), and the chosen rows' exact
  distances are recomputed on the bank's device.
* **Persistence.** :meth:`HNSWIndex.save` writes hnswlib's binary file at ``path`` and a JSON
  fingerprint at ``path + ".json"``: the bank's rows, dimension, dtype and SHA-256 of its bytes,
  the graph's parameters, and the index file's size and SHA-256. :meth:`HNSWIndex.load` checks
  all of it *before* hnswlib reads the file, so a stale, foreign, truncated or garbled index is
  refused with an :class:`IndexMismatchError`, never used. Nothing is unpickled.

Example:
    >>> bank = torch.randn(500, 8)
    >>> index = HNSWIndex.build(bank, "euclidean")
    >>> d, i = hnsw_search(torch.randn(4, 8), bank, index, 3)
    >>> d.shape, i.shape
    (torch.Size([4, 3]), torch.Size([4, 3]))
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import weakref
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from selectorch._checks import check_int

__all__ = [
    "DEFAULT_EF",
    "DEFAULT_EF_CONSTRUCTION",
    "DEFAULT_M",
    "HNSWIndex",
    "IndexMismatchError",
    "bank_fingerprint",
    "build_or_load_index",
    "check_hnsw_args",
    "hnsw_search",
    "resolve_ef",
]

#: Search metric -> hnswlib space. ``"l2"`` gives squared distances, ``"cosine"`` ``1 - cos``.
SPACES = {"euclidean": "l2", "cosine": "cosine"}
DEFAULT_M = 16
DEFAULT_EF_CONSTRUCTION = 200
#: Least ``ef`` used when none is given: ``max(DEFAULT_EF, 2 * k)``.
DEFAULT_EF = 64
#: Seed of hnswlib's level generator (hnswlib's own default).
DEFAULT_SEED = 100
FORMAT = "selectorch.hnsw"
FORMAT_VERSION = 1

_INDEXES: weakref.WeakValueDictionary[int, HNSWIndex] = weakref.WeakValueDictionary()
_HANDLES = itertools.count(1)


class IndexMismatchError(ValueError):
    """A saved hnsw index does not belong to the bank (or is damaged): it is refused, not used."""


def _hnswlib() -> ModuleType:
    try:
        import hnswlib
    except ImportError as err:  # pragma: no cover - hnswlib is a dependency
        raise ImportError(
            "backend='hnsw' needs hnswlib (pip install hnswlib); backend='exact' does not."
        ) from err
    return hnswlib


def resolve_ef(ef: int | None, k: int) -> int:
    """The ``ef`` searched with: ``ef`` itself, or ``max(DEFAULT_EF, 2 * k)`` when ``None``."""
    return max(DEFAULT_EF, 2 * k) if ef is None else ef


def check_hnsw_args(
    *, k: int, M: Any, ef_construction: Any, ef: Any, num_threads: Any, save_index: Any
) -> None:
    """Check the hnsw options of a score; each error names the argument.

    Raises:
        ValueError: ``M < 2``, ``ef_construction < 1``, ``ef < k``, ``num_threads < 1``, or
            ``save_index`` is neither ``None``, a string nor a path.
    """
    check_int("M", M, minimum=2)
    check_int("ef_construction", ef_construction)
    check_int("num_threads", num_threads)
    if ef is not None and check_int("ef", ef) < k:
        raise ValueError(f"Expected argument `ef` to be at least k={k} (or None), got {ef!r}.")
    if save_index is not None and not isinstance(save_index, (str, os.PathLike)):
        raise ValueError(
            f"Expected argument `save_index` to be a path (str or os.PathLike) or None, got "
            f"{type(save_index).__name__}."
        )


def bank_fingerprint(bank: torch.Tensor) -> dict[str, Any]:
    """Rows, dimension, dtype and SHA-256 of the bytes of a ``(M, D)`` bank (any device).

    Hashing reads the whole bank (about 1 GB/s): one changed bit gives another fingerprint.

    Example:
        >>> bank_fingerprint(torch.zeros(3, 2))["rows"]
        3
    """
    flat = bank.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()
    rows, dim = bank.shape
    return {
        "rows": int(rows),
        "dim": int(dim),
        "dtype": str(bank.dtype).removeprefix("torch."),
        "sha256": hashlib.sha256(flat).hexdigest(),
    }


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _register(index: HNSWIndex) -> int:
    handle = next(_HANDLES)
    _INDEXES[handle] = index
    return handle


class HNSWIndex:
    """An hnswlib graph over the rows of a bank, registered for ``selectorch::hnsw_knn``.

    Build one with :meth:`build` or :meth:`load` (or :func:`build_or_load_index`).

    Attributes:
        handle: Key of this index in the registry the custom op reads.
        metric: ``"euclidean"`` or ``"cosine"``.
        fingerprint: :func:`bank_fingerprint` of the bank it indexes.
        loaded_from: The file it was loaded from, ``None`` if it was built here.
    """

    def __init__(
        self,
        index: Any,
        *,
        metric: str,
        fingerprint: dict[str, Any],
        num_threads: int = 1,
        loaded_from: Path | None = None,
    ) -> None:
        self._index = index
        self.metric = metric
        self.fingerprint = fingerprint
        self.num_threads = num_threads
        self.loaded_from = loaded_from
        self.handle = _register(self)

    # copies (deepcopy, pickle in memory) get their own handle; hnswlib copies its graph itself
    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "handle"}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.handle = _register(self)

    def __repr__(self) -> str:
        return (
            f"HNSWIndex(metric={self.metric!r}, rows={self.size}, dim={self.dim}, M={self.M}, "
            f"ef_construction={self.ef_construction}, ef={self.ef})"
        )

    @property
    def size(self) -> int:
        return int(self._index.element_count)

    @property
    def dim(self) -> int:
        return int(self._index.dim)

    @property
    def M(self) -> int:
        return int(self._index.M)

    @property
    def ef_construction(self) -> int:
        return int(self._index.ef_construction)

    @property
    def ef(self) -> int:
        return int(self._index.ef)

    @classmethod
    def build(
        cls,
        bank: torch.Tensor,
        metric: str,
        *,
        M: int = DEFAULT_M,
        ef_construction: int = DEFAULT_EF_CONSTRUCTION,
        ef: int = DEFAULT_EF,
        num_threads: int = 1,
        seed: int = DEFAULT_SEED,
    ) -> HNSWIndex:
        """Build the graph of a ``(M, D)`` bank (copied to the CPU as float32).

        Args:
            bank: ``(N, D)`` reference rows; cosine banks need not be normalised.
            metric: ``"euclidean"`` or ``"cosine"``.
            M: Links per node (memory and recall grow with it).
            ef_construction: Candidates kept while inserting (build time and recall).
            ef: Candidates kept while searching (query time and recall).
            num_threads: Threads used to build and search; 1 builds the same graph every run.
            seed: Seed of the random levels.

        Returns:
            The index, registered.
        """
        data = bank.detach().to(device="cpu", dtype=torch.float32).contiguous().numpy()
        index = _hnswlib().Index(space=SPACES[metric], dim=data.shape[1])
        index.init_index(
            max_elements=data.shape[0], M=M, ef_construction=ef_construction, random_seed=seed
        )
        index.set_num_threads(num_threads)
        index.add_items(data, np.arange(data.shape[0]), num_threads=num_threads)
        index.set_ef(ef)
        fingerprint = bank_fingerprint(bank)
        return cls(index, metric=metric, fingerprint=fingerprint, num_threads=num_threads)

    def _meta(self, index_file: Path) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "space": SPACES[self.metric],
            "M": self.M,
            "ef_construction": self.ef_construction,
            "bank": self.fingerprint,
            "index": {"bytes": index_file.stat().st_size, "sha256": _file_sha256(index_file)},
        }

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the index to ``path`` and its fingerprint to ``path + ".json"`` (atomically).

        Args:
            path: File of the index; its folder must exist.
        """
        path = Path(path)
        tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
        self._index.save_index(str(tmp))
        meta = self._meta(tmp)
        os.replace(tmp, path)
        meta_tmp = tmp.with_name(tmp.name + ".json")
        meta_tmp.write_text(json.dumps(meta, indent=1))
        os.replace(meta_tmp, _meta_path(path))

    @classmethod
    def load(
        cls,
        path: str | os.PathLike[str],
        bank: torch.Tensor,
        metric: str,
        *,
        M: int = DEFAULT_M,
        ef_construction: int = DEFAULT_EF_CONSTRUCTION,
        ef: int = DEFAULT_EF,
        num_threads: int = 1,
    ) -> HNSWIndex:
        """Load the index saved at ``path`` if its fingerprint matches ``bank`` and the options.

        Args:
            path: File written by :meth:`save` (with ``path + ".json"`` beside it).
            bank: The ``(N, D)`` bank the index must have been built from.
            metric: ``"euclidean"`` or ``"cosine"``.
            M: Links per node the index must have.
            ef_construction: ``ef_construction`` the index must have been built with.
            ef: Candidates kept while searching.
            num_threads: Threads used to search.

        Returns:
            The index, registered, with ``loaded_from=path``.

        Raises:
            IndexMismatchError: The fingerprint file is missing or malformed, the bank or the
                options differ from those saved (the message gives both), or the index file's
                size or checksum differs from the one recorded (truncated or replaced).
        """
        path = Path(path)
        saved = _read_meta(path)
        wanted = {"space": SPACES[metric], "M": M, "ef_construction": ef_construction}
        for key, value in wanted.items():
            if saved.get(key) != value:
                raise IndexMismatchError(
                    f"The hnsw index at '{path}' was built with {key}={saved.get(key)!r}, this "
                    f"score asks for {key}={value!r}. Delete '{path}' (and its .json) or pass "
                    "another `save_index` path to build a new one."
                )
        fingerprint = bank_fingerprint(bank)
        if saved.get("bank") != fingerprint:
            differ = [k for k in fingerprint if saved.get("bank", {}).get(k) != fingerprint[k]]
            raise IndexMismatchError(
                f"The hnsw index at '{path}' is stale or foreign: it was built for the bank "
                f"{saved.get('bank')}, but this score's bank is {fingerprint} (they differ in "
                f"{', '.join(differ)}). Delete '{path}' (and its .json) or pass another "
                "`save_index` path to build a new one."
            )
        _check_index_file(path, saved)
        index = _hnswlib().Index(space=SPACES[metric], dim=fingerprint["dim"])
        try:
            index.load_index(str(path), max_elements=fingerprint["rows"])
        except (RuntimeError, ValueError, MemoryError) as err:
            raise IndexMismatchError(f"hnswlib could not read the index at '{path}'.") from err
        if index.element_count != fingerprint["rows"] or index.dim != fingerprint["dim"]:
            raise IndexMismatchError(
                f"The hnsw index at '{path}' holds {index.element_count} rows of dimension "
                f"{index.dim}, expected {fingerprint['rows']} of dimension {fingerprint['dim']}."
            )
        index.set_num_threads(num_threads)
        index.set_ef(ef)
        return cls(
            index,
            metric=metric,
            fingerprint=fingerprint,
            num_threads=num_threads,
            loaded_from=path,
        )

    def query(self, query: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """hnswlib's search of ``(B, D)`` float32 rows: ``(labels, distances)``, both ``(B, k)``.

        Distances are hnswlib's: squared Euclidean for ``"euclidean"``, ``1 - cos`` for cosine.
        """
        if query.shape[0] == 0:
            return np.empty((0, k), np.uint64), np.empty((0, k), np.float32)
        try:
            return self._index.knn_query(query, k=k, num_threads=self.num_threads)
        except RuntimeError as err:
            raise RuntimeError(
                f"hnswlib found fewer than k={k} neighbours in {self!r}; raise `ef` or `M`."
            ) from err


def _meta_path(path: Path) -> Path:
    return path.with_name(path.name + ".json")


def _read_meta(path: Path) -> dict[str, Any]:
    meta_path = _meta_path(path)
    if not meta_path.is_file():
        raise IndexMismatchError(
            f"Found the hnsw index '{path}' but not its fingerprint '{meta_path}': an index whose "
            "bank is unknown is never used. Delete it or pass another `save_index` path."
        )
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise IndexMismatchError(f"The fingerprint file '{meta_path}' is not valid JSON.") from err
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise IndexMismatchError(
            f"The fingerprint file '{meta_path}' was not written by selectorch's hnsw backend."
        )
    if meta.get("version") != FORMAT_VERSION:
        raise IndexMismatchError(
            f"The fingerprint file '{meta_path}' has format version {meta.get('version')!r}, "
            f"this selectorch reads version {FORMAT_VERSION}; rebuild the index."
        )
    return meta


def _check_index_file(path: Path, meta: dict[str, Any]) -> None:
    """Refuse an index file whose size or checksum differs from the recorded ones."""
    recorded = meta.get("index", {})
    size = path.stat().st_size
    if size != recorded.get("bytes"):
        raise IndexMismatchError(
            f"The hnsw index file '{path}' has {size} bytes, its fingerprint records "
            f"{recorded.get('bytes')}: it is truncated or was replaced. Delete it to rebuild."
        )
    digest = _file_sha256(path)
    if digest != recorded.get("sha256"):
        raise IndexMismatchError(
            f"The hnsw index file '{path}' has SHA-256 {digest}, its fingerprint records "
            f"{recorded.get('sha256')}: it is damaged or was replaced. Delete it to rebuild."
        )


def build_or_load_index(
    bank: torch.Tensor,
    metric: str,
    *,
    path: str | os.PathLike[str] | None = None,
    M: int = DEFAULT_M,
    ef_construction: int = DEFAULT_EF_CONSTRUCTION,
    ef: int = DEFAULT_EF,
    num_threads: int = 1,
) -> HNSWIndex:
    """Load the index at ``path`` if it exists (checked), else build it (and save it there).

    Args:
        bank: ``(N, D)`` reference rows.
        metric: ``"euclidean"`` or ``"cosine"``.
        path: Where the index is persisted; ``None`` builds in memory only.
        M: Links per node.
        ef_construction: Candidates kept while inserting.
        ef: Candidates kept while searching.
        num_threads: Threads used to build and search.

    Returns:
        The index.

    Raises:
        IndexMismatchError: ``path`` exists but does not belong to ``bank`` (see
            :meth:`HNSWIndex.load`).
    """
    options = {"M": M, "ef_construction": ef_construction, "ef": ef, "num_threads": num_threads}
    if path is not None and Path(path).exists():
        return HNSWIndex.load(path, bank, metric, **options)
    index = HNSWIndex.build(bank, metric, **options)
    if path is not None:
        index.save(path)
    return index


@torch.library.custom_op("selectorch::hnsw_knn", mutates_args=(), device_types="cpu")
def _hnsw_knn(query: torch.Tensor, handle: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    index = _INDEXES.get(handle)
    if index is None:
        raise RuntimeError(
            f"No hnsw index is registered under handle {handle}: the score that built it was "
            "deleted or refitted. Re-run fit or load_state_dict."
        )
    labels, distances = index.query(query.numpy(), k)
    return torch.from_numpy(distances), torch.from_numpy(labels.astype(np.int64))


@_hnsw_knn.register_fake
def _(query: torch.Tensor, handle: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    rows = query.shape[0]
    return query.new_empty(rows, k), query.new_empty(rows, k, dtype=torch.int64)


def hnsw_search(
    query: torch.Tensor, bank: torch.Tensor, index: HNSWIndex, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Approximate k nearest neighbours of ``query`` among the rows of ``bank`` (compile-clean).

    hnswlib picks the neighbours on the CPU; their distances are then recomputed exactly on
    ``bank``'s device (float32, or float64 if an input is) and sorted, so they equal exact
    search's wherever the neighbours agree. Rows with NaN or Inf are searched as zeros (scores
    reject them anyway).

    Args:
        query: ``(B, D)`` queries, on any device.
        bank: ``(N, D)`` rows the index was built from (same order).
        index: The :class:`HNSWIndex` of ``bank``.
        k: Number of neighbours, ``1 <= k <= N``.

    Returns:
        ``(distances, indices)``, both ``(B, k)`` on ``bank``'s device, by increasing distance:
        Euclidean, or ``1 - cos`` for a cosine index.

    Raises:
        ValueError: ``k`` is out of range.

    Example:
        >>> bank = torch.tensor([[0.0, 0.0], [1.0, 0.0], [5.0, 0.0]])
        >>> index = HNSWIndex.build(bank, "euclidean")
        >>> hnsw_search(torch.tensor([[0.9, 0.0]]), bank, index, 2)[1].tolist()
        [[1, 0]]
    """
    if not 1 <= k <= bank.shape[0]:
        raise ValueError(
            f"Expected argument `k` to be in [1, {bank.shape[0]}] (the bank size), got {k}."
        )
    q = query.detach().to(device="cpu", dtype=torch.float32)
    q = torch.where(torch.isfinite(q).all(dim=1, keepdim=True), q, torch.zeros_like(q))
    _, indices = torch.ops.selectorch.hnsw_knn(q.contiguous(), index.handle, k)
    indices = indices.to(bank.device)
    dtype = torch.promote_types(torch.float32, torch.promote_types(query.dtype, bank.dtype))
    rows = bank[indices].to(dtype)  # (B, k, D)
    query = query.to(device=bank.device, dtype=dtype).unsqueeze(1)
    if index.metric == "cosine":
        distances = 1.0 - (F.normalize(query, dim=-1) * F.normalize(rows, dim=-1)).sum(dim=-1)
    else:
        distances = (query - rows).pow(2).sum(dim=-1).sqrt()
    distances, order = distances.sort(dim=1)
    return distances, indices.gather(1, order)
