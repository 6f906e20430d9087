"""Record once, reuse everywhere: run a model over a dataset and keep what scores need.

:func:`record` runs the model once over a DataLoader and returns a TensorDict with the pooled
output of each chosen layer plus the logits and labels; with ``cache=path`` the rows go to disk
as they come (memory stays flat), an interrupted run resumes where it stopped, and a cache made
by another model, layer, pooling or dataset is refused. Every score can then be fitted,
calibrated and compared from that one recording without running the model again.
"""

from __future__ import annotations

import itertools
import logging
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
from tensordict import TensorDict
from torch import nn
from torch.utils.data import BatchSampler, DataLoader, SequentialSampler

from selectorch.cache import (
    RESERVED_KEYS,
    CacheWriter,
    cache_lock,
    check_schema,
    load_cache,
    open_cache_for,
    schema_of,
)
from selectorch.data import module_device, split_batch, to_device
from selectorch.fingerprint import check_cacheable_loader, loader_rows, make_fingerprint
from selectorch.progress import progress_bar
from selectorch.recorder.pooling import Pool
from selectorch.recorder.recorder import Recorder, layer_keys
from selectorch.selective import _eval_mode, logits_from_output

logger = logging.getLogger(__name__)

__all__ = ["load_cache", "record"]


def _check_bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"Expected argument `{name}` to be a bool, got {value!r}.")
    return value


def _layer_mapping(layers: str | Sequence[str] | Mapping[str, str]) -> dict[str, str]:
    """``{layer name: key}``; an empty list or dict records no layer (logits only)."""
    if isinstance(layers, (list, tuple, dict)) and not layers:
        return {}
    mapping = layer_keys(layers)
    clash = sorted(set(mapping.values()) & set(RESERVED_KEYS))
    if clash:
        raise ValueError(
            f"Argument `layers` uses the reserved key(s) {clash}; give those layers other keys "
            "with a dict, e.g. layers={'head': 'head_out'}."
        )
    return mapping


class _MemorySink:
    """Collects rows in memory: preallocated when the row count is known, else concatenated."""

    def __init__(self, rows: int | None) -> None:
        self.rows = rows
        self.schema: dict[str, tuple[torch.dtype, tuple]] | None = None
        self.buffers: dict[str, torch.Tensor] = {}
        self.parts: dict[str, list[torch.Tensor]] = {}

    def write(self, start: int, tensors: Mapping[str, torch.Tensor]) -> None:
        n = next(iter(tensors.values())).shape[0]
        if self.schema is None:
            self.schema = schema_of(tensors)
            if self.rows is not None:
                self.buffers = {
                    k: torch.empty((self.rows, *shape), dtype=dtype)
                    for k, (dtype, shape) in self.schema.items()
                }
            else:
                self.parts = {k: [] for k in self.schema}
        check_schema(self.schema, tensors, start)
        if self.rows is None:
            for key, t in tensors.items():
                self.parts[key].append(t.detach().to("cpu").clone())
            return
        if start + n > self.rows:
            raise ValueError(
                f"The DataLoader yielded more rows than the {self.rows} it announced (len of its "
                "sampler); does each dataset item hold one sample?"
            )
        for key, t in tensors.items():
            self.buffers[key][start : start + n].copy_(t.detach())

    def result(self, rows: int) -> TensorDict:
        if self.schema is None:
            raise ValueError("Expected argument `data` to yield at least one batch, got none.")
        if self.rows is None:
            tensors = {k: torch.cat(v) for k, v in self.parts.items()}
        else:
            tensors = self.buffers
        return TensorDict(tensors, batch_size=[rows])


def _entries(
    features: Mapping[str, torch.Tensor],
    output: Any,
    labels: Any,
    *,
    want_logits: bool,
    want_labels: bool,
    dtype: torch.dtype | None,
) -> dict[str, torch.Tensor]:
    """One batch's tensors to store, all with the same leading dim, floats cast to ``dtype``."""
    out = dict(features)
    if want_logits:
        logits = logits_from_output(output)
        if logits is not None:
            out["logits"] = logits
    if want_labels and labels is not None:
        if not isinstance(labels, torch.Tensor):
            try:
                labels = torch.as_tensor(labels)
            except (TypeError, ValueError, RuntimeError) as err:
                raise TypeError(
                    f"Cannot store the batches' labels of type {type(labels).__name__} as a "
                    "tensor; pass labels=False to record without them."
                ) from err
        out["labels"] = labels
    if not out:
        raise ValueError(
            "Nothing to record: no layers were given and the model's output holds no logits "
            "(or logits=False)."
        )
    sizes = {key: (t.shape[0] if t.ndim else None) for key, t in out.items()}
    if len(set(sizes.values())) != 1 or None in sizes.values():
        raise ValueError(
            f"Recorded entries disagree on the batch size (first dim): {sizes}; every entry must "
            "be batch-first. Pass logits=False or labels=False to leave one out."
        )
    if dtype is not None:
        out = {k: t.to(dtype) if t.is_floating_point() else t for k, t in out.items()}
    return out


def _run(
    model: nn.Module,
    batches: Iterable[Any],
    layers: dict[str, str],
    pool: Pool | Mapping[str, Pool],
    sink: Any,
    *,
    start: int,
    total: int | None,
    logits: bool,
    labels: bool,
    dtype: torch.dtype | None,
    progress: bool,
) -> int:
    """Run the model over ``batches``, writing rows from ``start``; return the row reached."""
    device = module_device(model)
    recorder = Recorder(model, layers, pool=pool) if layers else None
    bar = progress_bar(desc="record", total=total, initial=start, unit="rows", enabled=progress)
    row, first = start, True
    try:
        with _eval_mode(model):
            for batch in batches:
                parts = split_batch(batch)
                args, kwargs = to_device(parts.args, device), to_device(parts.kwargs, device)
                with torch.inference_mode():
                    if recorder is not None:
                        output, feats = recorder(*args, **kwargs)
                        feats = dict(feats.items())
                    else:
                        output, feats = model(*args, **kwargs), {}
                tensors = _entries(
                    feats, output, parts.labels, want_logits=logits, want_labels=labels, dtype=dtype
                )
                if first:
                    _note_missing(tensors, logits=logits, labels=labels)
                    first = False
                sink.write(row, tensors)
                n = next(iter(tensors.values())).shape[0]
                row += n
                bar.update(n)
    finally:
        bar.close()
        if recorder is not None:
            recorder.close()
    return row


def _note_missing(tensors: Mapping[str, torch.Tensor], *, logits: bool, labels: bool) -> None:
    if logits and "logits" not in tensors:
        logger.warning("The model's output holds no logits; recording without 'logits'.")
    if labels and "labels" not in tensors:
        logger.info("The batches carry no labels; recording without 'labels'.")


class _SkipBatches:
    """A batch sampler that leaves out the first ``skip`` batches of another one."""

    def __init__(self, batch_sampler: Iterable[list[Any]], skip: int) -> None:
        self.batch_sampler = batch_sampler
        self.skip = skip

    def __iter__(self) -> Iterator[list[Any]]:
        return itertools.islice(iter(self.batch_sampler), self.skip, None)

    def __len__(self) -> int:
        return max(len(self.batch_sampler) - self.skip, 0)  # type: ignore[arg-type]


def resume_loader(loader: DataLoader, rows_done: int) -> tuple[DataLoader, int]:
    """A copy of ``loader`` that starts at the first batch not fully within ``rows_done`` rows.

    Skipped batches are never loaded: only their indices are read from the batch sampler.

    Returns:
        ``(loader, first row of its first batch)``.
    """
    if rows_done == 0:
        return loader, 0
    batches = loader.batch_sampler
    if type(batches) is BatchSampler and type(batches.sampler) is SequentialSampler:
        skip = rows_done // batches.batch_size
        start = skip * batches.batch_size
    else:
        skip = start = 0
        for batch in batches:
            if start + len(batch) > rows_done:
                break
            skip, start = skip + 1, start + len(batch)
    options: dict[str, Any] = {
        "num_workers": loader.num_workers,
        "collate_fn": loader.collate_fn,
        "pin_memory": loader.pin_memory,
        "timeout": loader.timeout,
        "worker_init_fn": loader.worker_init_fn,
        "multiprocessing_context": loader.multiprocessing_context,
        "generator": loader.generator,
        "prefetch_factor": loader.prefetch_factor,
        "persistent_workers": loader.persistent_workers,
        "pin_memory_device": loader.pin_memory_device,
    }
    if hasattr(loader, "in_order"):
        options["in_order"] = loader.in_order
    skipped = DataLoader(loader.dataset, batch_sampler=_SkipBatches(batches, skip), **options)
    return skipped, start


def record(
    model: nn.Module,
    data: DataLoader | Iterable[Any],
    *,
    layers: str | Sequence[str] | Mapping[str, str],
    pool: Pool | Mapping[str, Pool] = "auto",
    logits: bool = True,
    labels: bool = True,
    cache: str | os.PathLike | None = None,
    overwrite: bool = False,
    dtype: torch.dtype | None = None,
    progress: bool = True,
) -> TensorDict:
    """Run ``model`` once over ``data`` and return the pooled layer outputs, logits and labels.

    The model runs in eval mode (its flags are restored after) under ``torch.inference_mode``,
    with each batch moved to the model's device; what it records is copied to CPU tensors that
    are ordinary (not inference) tensors, so later autograd or ``torch.compile`` use works. Batches
    are split as in :meth:`SelectiveModel.fit`: a tensor, an ``(x, y, ...)`` tuple or a dict.

    With ``cache=path`` the rows are written to files in that directory as they come, so data
    larger than RAM can be recorded, and the result is memory-mapped from there. The cache is
    keyed by a fingerprint (model parameters, layers, pooling, logits/labels/dtype options,
    selectorch version, and the data: dataset length, loader order and a checksum of sampled
    items; see :mod:`selectorch.fingerprint`):

    * same fingerprint, complete: loaded, the model does not run;
    * same fingerprint, interrupted (an error, Ctrl-C, a killed job): resumed from the last
      synced row, loading and running only the remaining batches;
    * another fingerprint: refused with :class:`~selectorch.cache.CacheMismatchError` listing
      what differs, or rebuilt when ``overwrite=True``. One directory holds one split.

    Args:
        model: Any ``nn.Module`` (not compiled when layers are hooked).
        data: A DataLoader (any iterable of batches without ``cache``; with ``cache``, a
            DataLoader over a map-style dataset in a fixed order, i.e. ``shuffle=False``).
        layers: A layer name, a list of names or a dict ``{name: key}`` (see
            :func:`selectorch.list_layers`); ``[]`` records only logits and labels.
        pool: How each layer's output becomes one row per sample; see
            :func:`selectorch.recorder.pool_features`.
        logits: Record the model's logits under ``"logits"`` (when its output holds them).
        labels: Record the batches' labels under ``"labels"`` (when they carry them).
        cache: Directory to write the recording to (created; one per split), or ``None`` to
            keep it in memory.
        overwrite: Delete an existing cache in ``cache`` and record again.
        dtype: Cast floating entries to this dtype (e.g. ``torch.float16`` halves the disk).
        progress: Show a progress bar (see also :mod:`selectorch.progress`).

    Returns:
        TensorDict with batch size ``[N]`` (the rows the loader yields): one ``(N, D)`` entry per
        layer key, ``"logits"`` ``(N, C)`` and ``"labels"`` ``(N,)``. CPU tensors, memory-mapped
        read-only (copy-on-write) from ``cache`` when given.

    Raises:
        CacheMismatchError: ``cache`` holds a recording of something else.
        ValueError: Bad arguments, batches that disagree in entries or shapes, or a loader whose
            order changes between passes (with ``cache``).
        TypeError: ``data`` cannot be fingerprinted (with ``cache``), or ``model`` is compiled.

    Example:
        >>> import torchvision
        >>> from torch.utils.data import DataLoader, TensorDataset
        >>> net = torchvision.models.resnet18(num_classes=10)
        >>> data = DataLoader(TensorDataset(torch.randn(64, 3, 32, 32), torch.arange(64) % 10),
        ...                   batch_size=16)
        >>> rec = record(net, data, layers=["avgpool"], progress=False)
        >>> rec["avgpool"].shape, rec["logits"].shape, rec["labels"].shape
        (torch.Size([64, 512]), torch.Size([64, 10]), torch.Size([64]))
    """
    mapping = _layer_mapping(layers)
    for name, value in (("logits", logits), ("labels", labels)):
        _check_bool(name, value)
    for name, value in (("overwrite", overwrite), ("progress", progress)):
        _check_bool(name, value)
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise ValueError(f"Expected argument `dtype` to be a floating torch.dtype, got {dtype!r}.")
    options = {"logits": logits, "labels": labels, "dtype": dtype, "progress": progress}
    if cache is None:
        rows = loader_rows(data)
        sink = _MemorySink(rows)
        done = _run(model, data, mapping, pool, sink, start=0, total=rows, **options)
        if rows is not None and done != rows:
            raise ValueError(f"The DataLoader yielded {done} rows, but announced {rows}.")
        return sink.result(done)

    loader = check_cacheable_loader(data)
    fingerprint = make_fingerprint(
        model, loader, layers=mapping, pool=pool, logits=logits, labels=labels, dtype=dtype
    )
    with cache_lock(cache):
        return _record_cached(model, loader, mapping, pool, cache, fingerprint, overwrite, options)


def _record_cached(
    model: nn.Module,
    loader: DataLoader,
    layers: dict[str, str],
    pool: Pool | Mapping[str, Pool],
    cache: str | os.PathLike,
    fingerprint: dict[str, Any],
    overwrite: bool,
    options: dict[str, Any],
) -> TensorDict:
    """Load, resume or start the cache at ``cache`` (held by this process) and return it."""
    rows = fingerprint["data"]["rows"]
    if rows == 0:
        raise ValueError("Expected argument `data` to yield at least one row, got an empty loader.")
    state = open_cache_for(cache, fingerprint, overwrite=overwrite)
    if state.state == "complete":
        logger.info("Cache %s is complete (%d rows); the model does not run.", cache, rows)
        return load_cache(cache)
    batches, start = resume_loader(loader, state.rows_done)
    if state.state == "resume":
        logger.info("Resuming cache %s at row %d of %d.", cache, start, rows)
    else:
        logger.info("Recording %d rows into cache %s.", rows, cache)
    writer = CacheWriter(cache, fingerprint, rows, state)
    try:
        done = _run(model, batches, layers, pool, writer, start=start, total=rows, **options)
    finally:
        writer.close()
    if done != rows:
        raise ValueError(
            f"The DataLoader yielded {done} rows, but announced {rows}; the cache at {cache} "
            "stays incomplete."
        )
    return load_cache(cache)
