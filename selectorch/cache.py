"""On-disk recordings: a directory of raw memory-mappable files plus JSON metadata.

Layout of a cache directory (one recording of one split)::

    selectorch-cache.json   format, fingerprint, row count, and each entry's file/dtype/shape
    progress.json           rows written so far, replaced atomically after the data is synced
    writer.lock             while a process writes: its host and pid (one writer at a time)
    00-avgpool.bin ...      one raw file per entry, (rows, *shape) in C order, no header

Nothing is ever unpickled: metadata is JSON and data is raw bytes, mapped with
``tensordict.MemoryMappedTensor`` when read. Rows are written with ordinary file writes rather
than through a writable mapping, so pages written are not counted in the process's resident
memory and extraction of data larger than RAM stays flat.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import socket
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
from tensordict import MemoryMappedTensor, TensorDict

from selectorch.fingerprint import diff_fingerprints

logger = logging.getLogger(__name__)

META_FILE = "selectorch-cache.json"
PROGRESS_FILE = "progress.json"
LOCK_FILE = "writer.lock"
FORMAT = "selectorch-cache"
FORMAT_VERSION = 1

#: Keys a recording reserves next to its layer keys.
RESERVED_KEYS = ("logits", "labels")

# progress is synced to disk at most this often while recording (and always at the end)
COMMIT_EVERY_S = 1.0


class CacheMismatchError(ValueError):
    """A cache was made by another model, layer, pooling or dataset than the current call's."""


@dataclass(frozen=True)
class Entry:
    """One recorded tensor: its key, its file and the dtype and shape of one row."""

    key: str
    file: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def row_bytes(self) -> int:
        numel = 1
        for size in self.shape:
            numel *= size
        return numel * self.dtype.itemsize

    def to_json(self) -> dict[str, Any]:
        return {"key": self.key, "file": self.file, "dtype": str(self.dtype), "shape": self.shape}

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> Entry:
        name = str(obj["dtype"]).removeprefix("torch.")
        dtype = getattr(torch, name, None)
        if not isinstance(dtype, torch.dtype):
            raise ValueError(f"Unknown dtype {obj['dtype']!r} in cache metadata.")
        file = str(obj["file"])
        if Path(file).name != file:
            raise ValueError(f"Cache metadata names a file outside its directory: {file!r}.")
        return cls(str(obj["key"]), file, dtype, tuple(int(s) for s in obj["shape"]))


def schema_of(tensors: Mapping[str, torch.Tensor]) -> dict[str, tuple[torch.dtype, tuple]]:
    """``{key: (dtype, row shape)}`` of one batch of recorded tensors."""
    return {key: (t.dtype, tuple(t.shape[1:])) for key, t in tensors.items()}


def check_schema(
    expected: Mapping[str, tuple[torch.dtype, tuple]],
    tensors: Mapping[str, torch.Tensor],
    row: int,
) -> None:
    """Raise ``ValueError`` naming the key when a batch's keys, dtypes or shapes differ."""
    if list(expected) != list(tensors):
        raise ValueError(
            f"The batch starting at row {row} gave entries {list(tensors)}, the first batch "
            f"gave {list(expected)}; every batch must carry the same (e.g. labels in all or none)."
        )
    for key, (dtype, shape) in expected.items():
        got = tensors[key]
        if got.dtype != dtype or tuple(got.shape[1:]) != shape:
            raise ValueError(
                f"Entry {key!r} of the batch starting at row {row} has rows of shape "
                f"{tuple(got.shape[1:])} and dtype {got.dtype}; expected {shape} and {dtype} like "
                "the first batch. Pool variable-size outputs to a fixed size (pool='avg', ...)."
            )


def _file_name(index: int, key: str) -> str:
    return f"{index:02d}-{re.sub(r'[^A-Za-z0-9_.-]', '_', key)[:60]}.bin"


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write JSON to ``path`` so that readers see the old or the new file, never a partial one."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_meta(path: str | os.PathLike) -> dict[str, Any] | None:
    """The metadata of the cache at ``path``, or ``None`` when there is none.

    Raises:
        ValueError: The metadata file is not a selectorch cache of a known format version.
    """
    file = Path(path) / META_FILE
    if not file.is_file():
        return None
    try:
        meta = json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"Cache metadata {file} is not valid JSON: {err}.") from err
    if meta.get("format") != FORMAT or meta.get("version") != FORMAT_VERSION:
        raise ValueError(
            f"{file} is not a selectorch cache of format version {FORMAT_VERSION} (got format "
            f"{meta.get('format')!r}, version {meta.get('version')!r}); rebuild it with "
            "overwrite=True."
        )
    return meta


def read_progress(path: str | os.PathLike) -> int:
    """Rows of the cache at ``path`` whose data is known to be on disk (0 when none)."""
    file = Path(path) / PROGRESS_FILE
    if not file.is_file():
        return 0
    try:
        return int(json.loads(file.read_text(encoding="utf-8"))["rows_done"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
        raise ValueError(f"Cache progress file {file} is damaged ({err}).") from err


def remove_cache(path: str | os.PathLike, meta: Mapping[str, Any]) -> None:
    """Delete exactly the files a cache made (its entries, metadata and progress), nothing else."""
    root = Path(path)
    names = [Entry.from_json(e).file for e in meta.get("entries", [])]
    for name in (*names, PROGRESS_FILE, META_FILE):
        (root / name).unlink(missing_ok=True)


def _lock_is_stale(lock: Path) -> bool:
    """Whether the process named in ``lock`` is known to be gone (or is this one)."""
    try:
        owner = json.loads(lock.read_text(encoding="utf-8"))
        pid, host = int(owner["pid"]), str(owner["host"])
    except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError):
        return False  # being written right now, or unreadable: do not take it over
    if host != socket.gethostname():
        return False
    if pid == os.getpid():
        return True
    if os.name != "posix":
        return False
    try:
        os.kill(pid, 0)  # signal 0: only checks that the process exists
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


@contextlib.contextmanager
def cache_lock(path: str | os.PathLike) -> Iterator[None]:
    """Hold the cache directory ``path`` for this process while it writes.

    Raises:
        ValueError: ``path`` is a file.
        RuntimeError: Another live process holds the cache.
    """
    root = Path(path)
    if root.exists() and not root.is_dir():
        raise ValueError(f"Expected argument `cache` to be a directory, got the file {root}.")
    root.mkdir(parents=True, exist_ok=True)
    lock = root / LOCK_FILE
    for attempt in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            if attempt == 0 and _lock_is_stale(lock):
                lock.unlink(missing_ok=True)
                continue
            raise RuntimeError(
                f"The cache at {root} is being written by another process ({lock.read_text()}); "
                f"wait for it to finish, or delete {lock} if that process is gone."
            ) from None
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump({"pid": os.getpid(), "host": socket.gethostname()}, f)
        break
    try:
        yield
    finally:
        lock.unlink(missing_ok=True)


class CacheState(NamedTuple):
    """What :func:`open_cache_for` found: ``"new"``, ``"resume"`` or ``"complete"``."""

    state: str
    rows_done: int
    meta: dict[str, Any] | None


def open_cache_for(
    path: str | os.PathLike, fingerprint: Mapping[str, Any], *, overwrite: bool
) -> CacheState:
    """Decide what to do with the cache at ``path`` for a recording with ``fingerprint``.

    Args:
        path: The cache directory (created when missing).
        fingerprint: What the current call would record (see :mod:`selectorch.fingerprint`).
        overwrite: Delete an existing cache, whatever made it, and start again.

    Returns:
        A :class:`CacheState`.

    Raises:
        CacheMismatchError: The cache was made by something else; the message lists each
            difference.
        ValueError: ``path`` is a file, or a non-empty directory that is not a selectorch cache.
    """
    root = Path(path)
    if root.exists() and not root.is_dir():
        raise ValueError(f"Expected argument `cache` to be a directory, got the file {root}.")
    meta = read_meta(root)
    if meta is None:
        if root.exists() and any(p.name != LOCK_FILE for p in root.iterdir()):
            raise ValueError(
                f"Argument `cache` points to {root}, a non-empty directory that is not a "
                "selectorch cache; pass a new or empty directory (one per split)."
            )
        root.mkdir(parents=True, exist_ok=True)
        return CacheState("new", 0, None)
    if overwrite:
        logger.info("Deleting the cache at %s (overwrite=True)", root)
        remove_cache(root, meta)
        return CacheState("new", 0, None)
    diffs = diff_fingerprints(meta["fingerprint"], fingerprint)
    if diffs:
        raise CacheMismatchError(
            f"The cache at {root} was recorded from something else, so it is not used:\n  - "
            + "\n  - ".join(diffs)
            + "\nPass overwrite=True to rebuild it, or another `cache` directory (one per "
            "model, layer set and split)."
        )
    rows_done = read_progress(root)
    if rows_done >= meta["rows"]:
        return CacheState("complete", rows_done, meta)
    return CacheState("resume", rows_done, meta)


class CacheWriter:
    """Writes batches of rows into a cache directory and records how far it got.

    Args:
        path: The cache directory.
        fingerprint: What produced the rows.
        rows: Total rows of the recording.
        state: What :func:`open_cache_for` returned (a resumed cache keeps its files).
    """

    def __init__(
        self, path: str | os.PathLike, fingerprint: Mapping[str, Any], rows: int, state: CacheState
    ) -> None:
        self.root = Path(path)
        self.fingerprint = dict(fingerprint)
        self.rows = rows
        self.done = state.rows_done
        self.entries: list[Entry] | None = None
        self.files: dict[str, Any] = {}
        self._committed = self.done
        self._last_commit = time.monotonic()
        if state.meta is not None:
            self.entries = [Entry.from_json(e) for e in state.meta["entries"]]
            self._open_files("r+b")

    def _open_files(self, mode: str) -> None:
        assert self.entries is not None
        for entry in self.entries:
            file = self.root / entry.file
            if mode == "r+b" and (
                not file.is_file() or file.stat().st_size != self.rows * entry.row_bytes
            ):
                raise ValueError(
                    f"Cache file {file} is missing or has the wrong size; the cache is damaged. "
                    "Rebuild it with overwrite=True."
                )
            self.files[entry.key] = open(file, mode)  # noqa: SIM115 - closed in close()
            if mode == "w+b":
                self.files[entry.key].truncate(self.rows * entry.row_bytes)

    def _create(self, tensors: Mapping[str, torch.Tensor]) -> None:
        self.entries = [
            Entry(key, _file_name(i, key), t.dtype, tuple(t.shape[1:]))
            for i, (key, t) in enumerate(tensors.items())
        ]
        self._open_files("w+b")
        meta = {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "rows": self.rows,
            "fingerprint": self.fingerprint,
            "entries": [e.to_json() for e in self.entries],
        }
        write_json_atomic(self.root / PROGRESS_FILE, {"rows_done": 0})
        write_json_atomic(self.root / META_FILE, meta)

    def write(self, start: int, tensors: Mapping[str, torch.Tensor]) -> None:
        """Write one batch: ``tensors`` maps each key to ``(B, *shape)`` rows at ``start``.

        Raises:
            ValueError: The batch differs from the first in keys, dtypes or row shapes, or it
                runs past the expected number of rows.
        """
        if self.entries is None:
            self._create(tensors)
        assert self.entries is not None
        check_schema({e.key: (e.dtype, e.shape) for e in self.entries}, tensors, start)
        n = next(iter(tensors.values())).shape[0]
        if start + n > self.rows:
            raise ValueError(
                f"The DataLoader yielded more rows than the {self.rows} it announced (len of its "
                "sampler); the dataset changed while recording."
            )
        for entry in self.entries:
            data = tensors[entry.key].detach().to("cpu").contiguous()
            f = self.files[entry.key]
            f.seek(start * entry.row_bytes)
            f.write(data.reshape(-1).view(torch.uint8).numpy().data)
        self.done = max(self.done, start + n)
        if time.monotonic() - self._last_commit >= COMMIT_EVERY_S:
            self.commit()

    def commit(self) -> None:
        """Sync the data files, then record the rows done (atomically)."""
        if self.done == self._committed:
            return
        for f in self.files.values():
            f.flush()
            os.fsync(f.fileno())
        write_json_atomic(self.root / PROGRESS_FILE, {"rows_done": self.done})
        self._committed = self.done
        self._last_commit = time.monotonic()

    def close(self) -> None:
        """Commit what was written and close the files (also after an error)."""
        try:
            if self.files:
                self.commit()
        finally:
            for f in self.files.values():
                f.close()
            self.files = {}


def load_cache(path: str | os.PathLike) -> TensorDict:
    """Open a complete cache as a TensorDict of memory-mapped tensors (read copy-on-write).

    Rows are read from disk only when touched, so a cache larger than RAM opens at once. In-place
    changes to the returned tensors stay in memory and never reach the files.

    Args:
        path: A directory written by :func:`selectorch.record` with ``cache=path``.

    Returns:
        TensorDict with batch size ``[N]``: one entry per layer key, plus ``"logits"`` and
        ``"labels"`` when recorded.

    Raises:
        FileNotFoundError: No cache at ``path``.
        ValueError: The cache is incomplete (the message says how far it got) or damaged.

    Example:
        >>> td = load_cache("cache/train")  # doctest: +SKIP
        >>> td["avgpool"].shape  # doctest: +SKIP
        torch.Size([50000, 512])
    """
    root = Path(path)
    meta = read_meta(root)
    if meta is None:
        raise FileNotFoundError(
            f"No selectorch cache at {root} ({META_FILE} is missing); create one with "
            f"selectorch.record(model, loader, layers=..., cache={str(root)!r})."
        )
    rows, done = int(meta["rows"]), read_progress(root)
    if done < rows:
        raise ValueError(
            f"The cache at {root} is incomplete: {done} of {rows} rows were recorded. Call "
            "selectorch.record(...) again with the same arguments to resume it."
        )
    tensors = {}
    for entry in (Entry.from_json(e) for e in meta["entries"]):
        file = root / entry.file
        if not file.is_file() or file.stat().st_size != rows * entry.row_bytes:
            raise ValueError(
                f"Cache file {file} is missing or has the wrong size; rebuild the cache with "
                "overwrite=True."
            )
        shape = (rows, *entry.shape)
        tensors[entry.key] = MemoryMappedTensor.from_filename(file, entry.dtype, shape, mode="r")
    return TensorDict(tensors, batch_size=[rows])
