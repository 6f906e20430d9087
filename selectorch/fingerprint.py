"""Fingerprints of what produced a recording: the model, the layers and pooling, and the data.

A fingerprint is a plain JSON-able dict. :func:`selectorch.record` stores it next to a cache and
refuses to reuse the cache when a new fingerprint differs; :func:`diff_fingerprints` says how.

* **Model**: class name plus a BLAKE2b checksum of every parameter and buffer (names, dtypes,
  shapes and bytes), so one changed weight gives another fingerprint.
* **Pooling**: the name (``"avg"``, ...); a callable by its qualified name
  (``module.function``). Editing the body of a pooling function keeps its fingerprint: rename
  it, or pass ``overwrite=True``.
* **Data** (a DataLoader over a map-style dataset): the dataset's class and length, the number
  of rows the loader yields, a checksum of the order of the indices it reads (so two subsets or
  samplers of one dataset differ) and a checksum of up to :data:`SAMPLE_ITEMS` items spread
  over that order (so two datasets of one length differ).
"""

from __future__ import annotations

import functools
import hashlib
import logging
import time
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import BatchSampler, DataLoader, IterableDataset, SequentialSampler

from selectorch._version import __version__
from selectorch.recorder.pooling import Pool

logger = logging.getLogger(__name__)

#: Items of the dataset whose content enters the data fingerprint.
SAMPLE_ITEMS = 32


def _digest() -> Any:
    return hashlib.blake2b(digest_size=16)


def _tensor_bytes(t: torch.Tensor) -> np.ndarray:
    """The raw bytes of a tensor (any dtype, any device) as a flat uint8 array."""
    flat = t.detach().to("cpu").contiguous().reshape(-1)
    return flat.view(torch.uint8).numpy()


def _update_tensor(h: Any, t: torch.Tensor) -> None:
    h.update(f"tensor {t.dtype} {tuple(t.shape)};".encode())
    h.update(_tensor_bytes(t))


def update_hash(h: Any, obj: Any, where: str = "item") -> None:
    """Feed ``obj`` (tensors, arrays, numbers, strings, nested lists/tuples/dicts) into ``h``.

    Raises:
        TypeError: ``obj`` holds something whose content cannot be read reproducibly.
    """
    if isinstance(obj, torch.Tensor):
        _update_tensor(h, obj)
    elif isinstance(obj, np.ndarray) or hasattr(obj, "__array_interface__"):
        array = np.asarray(obj)
        if array.dtype == object:
            raise TypeError(f"Cannot fingerprint {where}: a numpy array of Python objects.")
        _update_tensor(h, torch.from_numpy(np.ascontiguousarray(array)))
    elif obj is None or isinstance(obj, (bool, int, float, complex, str, bytes, np.generic)):
        h.update(f"{type(obj).__name__} {obj!r};".encode())
    elif isinstance(obj, Mapping):
        h.update(b"{")
        for key in sorted(obj, key=repr):
            h.update(f"{key!r}:".encode())
            update_hash(h, obj[key], f"{where}[{key!r}]")
        h.update(b"}")
    elif isinstance(obj, (tuple, list)):
        h.update(b"(")
        for i, value in enumerate(obj):
            update_hash(h, value, f"{where}[{i}]")
        h.update(b")")
    else:
        raise TypeError(
            f"Cannot fingerprint {where} of type {type(obj).__name__}: a cache checks the data by "
            "the content of a sample of items, which must be tensors, numpy arrays, numbers, "
            "strings or lists/tuples/dicts of them (e.g. apply ToTensor in the dataset)."
        )


def qualified_name(obj: Any) -> str:
    """``module.QualName`` of a class, function or callable object."""
    target = obj if isinstance(obj, type) or hasattr(obj, "__qualname__") else type(obj)
    module = getattr(target, "__module__", None) or "?"
    return f"{module}.{getattr(target, '__qualname__', type(target).__name__)}"


def model_fingerprint(model: nn.Module) -> dict[str, Any]:
    """Class and checksum of every parameter and buffer of ``model``.

    Args:
        model: Any ``nn.Module``; tensors on any device are read one at a time.

    Returns:
        ``{"class": ..., "checksum": ..., "tensors": ...}``.
    """
    start = time.perf_counter()
    h = _digest()
    count = 0
    for name, tensor in (*model.named_parameters(), *model.named_buffers()):
        h.update(f"{name};".encode())
        if tensor.device.type == "meta":
            h.update(f"meta {tensor.dtype} {tuple(tensor.shape)};".encode())
        else:
            _update_tensor(h, tensor)
        count += 1
    logger.debug("Model checksum of %d tensors in %.2f s", count, time.perf_counter() - start)
    return {"class": qualified_name(model), "checksum": h.hexdigest(), "tensors": count}


def describe_pool(pool: Pool) -> str:
    """A pooling choice as a string: its name, or ``callable:module.qualname``."""
    if isinstance(pool, str):
        return pool
    if isinstance(pool, functools.partial):
        args = ", ".join([*map(repr, pool.args), *(f"{k}={v!r}" for k, v in pool.keywords.items())])
        return f"callable:partial({qualified_name(pool.func)}, {args})"
    return f"callable:{qualified_name(pool)}"


def pool_fingerprint(pool: Pool | Mapping[str, Pool], layers: Mapping[str, str]) -> dict[str, str]:
    """The pooling of each recorded layer, as strings."""
    if isinstance(pool, Mapping):
        return {name: describe_pool(pool.get(name, "auto")) for name in layers}
    return {name: describe_pool(pool) for name in layers}


def check_cacheable_loader(data: Any) -> DataLoader:
    """Return ``data`` if it is a DataLoader a cache can fingerprint and resume.

    Raises:
        TypeError: ``data`` is not a DataLoader over a map-style dataset with a length and a
            batch size (or batch sampler).
    """
    if not isinstance(data, DataLoader):
        raise TypeError(
            "Expected argument `data` to be a torch DataLoader when `cache` is given (its dataset "
            f"is fingerprinted and its batches resumed), got {type(data).__name__}. Wrap tensors "
            "as DataLoader(TensorDataset(x, y), batch_size=...)."
        )
    if isinstance(data.dataset, IterableDataset) or not hasattr(data.dataset, "__len__"):
        raise TypeError(
            "A cache needs a DataLoader over a map-style dataset with a length (dataset[i], "
            f"len(dataset)), got a {type(data.dataset).__name__}; pass cache=None to record it "
            "in memory."
        )
    if data.batch_sampler is None:
        raise TypeError(
            "A cache needs a DataLoader that batches (batch_size=... or batch_sampler=...), got "
            "batch_size=None."
        )
    return data


def _sample_positions(rows: int) -> list[int]:
    k = min(SAMPLE_ITEMS, rows)
    if k <= 1:
        return [0] * k
    return sorted({round(i * (rows - 1) / (k - 1)) for i in range(k)})


def _is_sequential(loader: DataLoader) -> bool:
    batches = loader.batch_sampler
    return type(batches) is BatchSampler and type(batches.sampler) is SequentialSampler


def loader_rows(loader: Any) -> int | None:
    """Rows a DataLoader yields per pass, when known without loading data; else ``None``."""
    if not isinstance(loader, DataLoader) or isinstance(loader.dataset, IterableDataset):
        return None
    batches = loader.batch_sampler
    if type(batches) is not BatchSampler or not hasattr(batches.sampler, "__len__"):
        return None
    n = len(batches.sampler)
    return n - n % batches.batch_size if batches.drop_last else n


def _order_pass(loader: DataLoader, positions: list[int]) -> tuple[int, str, list[Any]]:
    """One pass over the batch sampler: rows, checksum of the index order, indices at positions."""
    h = _digest()
    rows = 0
    wanted = iter(positions)
    nxt = next(wanted, None)
    picked = []
    for batch in loader.batch_sampler:
        indices = list(batch)
        try:
            h.update(np.asarray(indices, dtype=np.int64).tobytes())
        except (TypeError, ValueError):
            update_hash(h, indices, "sampler indices")
        while nxt is not None and nxt < rows + len(indices):
            picked.append(indices[nxt - rows])
            nxt = next(wanted, None)
        rows += len(indices)
    return rows, h.hexdigest(), picked


def _sample_digest(dataset: Any, indices: list[Any]) -> str:
    h = _digest()
    for i in indices:
        h.update(f"{i!r}:".encode())
        update_hash(h, dataset[i], f"dataset[{i!r}]")
    return h.hexdigest()


def data_fingerprint(loader: DataLoader) -> dict[str, Any]:
    """Fingerprint of the rows a DataLoader yields; refuses a loader whose order changes.

    Args:
        loader: A DataLoader accepted by :func:`check_cacheable_loader`.

    Returns:
        ``{"dataset", "length", "rows", "order", "sample"}``.

    Raises:
        ValueError: Two passes over the loader's sampler give different orders (``shuffle=True``
            or a random sampler), so rows could not be resumed or matched to items; or two
            reads of the same items differ (random transforms).
    """
    dataset = loader.dataset
    length = len(dataset)
    if _is_sequential(loader):
        rows = loader_rows(loader)
        order = f"sequential:{rows}"
        indices = _sample_positions(rows)
    else:
        rows, order, _ = _order_pass(loader, [])
        rows2, order2, indices = _order_pass(loader, _sample_positions(rows))
        if (rows2, order2) != (rows, order):
            raise ValueError(
                "The DataLoader passed as `data` reads the dataset in a different order on each "
                "pass (shuffle=True or a random sampler). A cache stores rows in loader order and "
                "resumes by position, so it needs a fixed order: use shuffle=False."
            )
    sample = _sample_digest(dataset, indices)
    if _sample_digest(dataset, indices) != sample:
        raise ValueError(
            "The dataset returned different content when the same items were read twice (random "
            "transforms or augmentation?). A cache is checked against the data's content, so it "
            "needs deterministic items: use evaluation transforms, or pass cache=None."
        )
    return {
        "dataset": qualified_name(dataset),
        "length": length,
        "rows": rows,
        "order": order,
        "sample": sample,
    }


def make_fingerprint(
    model: nn.Module,
    loader: DataLoader,
    *,
    layers: Mapping[str, str],
    pool: Pool | Mapping[str, Pool],
    logits: bool,
    labels: bool,
    dtype: torch.dtype | None,
) -> dict[str, Any]:
    """Everything that decides the content of a recording, as a JSON-able dict."""
    return {
        "selectorch": __version__,
        "model": model_fingerprint(model),
        "layers": dict(layers),
        "pool": pool_fingerprint(pool, layers),
        "logits": logits,
        "labels": labels,
        "dtype": None if dtype is None else str(dtype),
        "data": data_fingerprint(loader),
    }


_WHAT = {
    "selectorch": "selectorch version",
    "model": "model",
    "layers": "layers",
    "pool": "pooling",
    "logits": "logits flag",
    "labels": "labels flag",
    "dtype": "dtype",
    "data": "data",
}


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def diff_fingerprints(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """Human-readable differences between two fingerprints (empty when they are equal).

    Example:
        >>> diff_fingerprints({"layers": {"a": "a"}}, {"layers": {"b": "b"}})
        ["layers: cache has {'a': 'a'}, now {'b': 'b'}"]
    """
    out = []
    for key in sorted(set(old) | set(new), key=lambda k: (k not in _WHAT, k)):
        a, b = old.get(key), new.get(key)
        if a == b:
            continue
        what = _WHAT.get(key, key)
        if isinstance(a, Mapping) and isinstance(b, Mapping) and key in ("model", "data"):
            for sub in sorted(set(a) | set(b)):
                if a.get(sub) != b.get(sub):
                    out.append(
                        f"{what} {sub}: cache has {_short(a.get(sub))}, now {_short(b.get(sub))}"
                    )
        else:
            out.append(f"{what}: cache has {_short(a)}, now {_short(b)}")
    return out
