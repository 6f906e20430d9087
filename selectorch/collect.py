"""Running a SelectiveModel's model over a dataset (or reading a recording) for fit and calibrate.

What one pass over the data gives a score: its inputs (a tensor, or a dict for multi-input
scores), the labels, the model's predicted classes and, for scores fitted on the model's loss,
the logits; gathered over ranks under ``torch.distributed``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from selectorch._checks import check_int
from selectorch.data import iter_batches, module_device, to_device
from selectorch.distributed.collectives import gather_dataset, is_distributed, sampler_indices
from selectorch.functional.logits import logit_predictions
from selectorch.memory import check_fits, check_stacking, tensor_nbytes
from selectorch.nonfinite import drop_nonfinite as _drop_nonfinite
from selectorch.progress import progress_bar
from selectorch.recorded import is_recorded, recorded_inputs, recorded_layers
from selectorch.scores.base import Score
from selectorch.scores.logits import LogitScore


def logits_from_output(output: Any) -> torch.Tensor | None:
    """The logits in a model's output: a tensor, a ``logits`` key or attribute, a tuple's first."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, Mapping):
        if "logits" in output:
            return output["logits"]
        return None
    logits = getattr(output, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    return None


def score_keys(score: Score) -> list[str] | None:
    """The keys a multi-input score reads; ``None``: every recorded layer plus ``"logits"``.

    A :class:`~selectorch.scores.FusionScore` names its keys; a
    :class:`~selectorch.scores.layers.LayerScore` (``keys=None``) reads whatever layers the
    SelectiveModel records and the model's logits.
    """
    keys = getattr(score, "keys", None)
    return None if keys is None else [str(key) for key in keys]


def class_predictions(
    logits: torch.Tensor | None, batch: int, score: Score
) -> tuple[torch.Tensor | None, int | None]:
    """``(B,)`` predicted classes and the number of classes, or ``(None, None)`` if unknown.

    A logit score predicts as its ``task`` says (a single binary log-odds: ``z > 0``; ensembles:
    the members' mean); otherwise ``(B, C)`` logits give their ``argmax``. Multilabel outputs
    have no single predicted class.
    """
    if logits is None or logits.ndim == 0 or logits.shape[0] != batch:
        return None, None
    task = getattr(score, "task", "multiclass")
    if isinstance(score, LogitScore):
        if task == "multilabel":
            return None, None
        preds = logit_predictions(logits, task=task, ensemble=score.ensemble)
        return preds, 2 if task == "binary" else logits.shape[1]
    if logits.ndim != 2:
        return None, None
    return logits.argmax(dim=1), logits.shape[1]


def _concat(parts: list[Any]) -> Any:
    """Concatenate batches of tensors, or of dicts of tensors (key by key)."""
    if isinstance(parts[0], dict):
        return {key: torch.cat([part[key] for part in parts]) for key in parts[0]}
    return torch.cat(parts)


@dataclass
class Collected:
    """What one pass over a dataset recorded (lists while collecting, tensors once stacked)."""

    features: Any
    labels: Any
    preds: Any
    num_classes: int | None = None
    logits: Any = None


def gather_ranks(run: Collected, data: Any) -> Collected:
    """Under ``torch.distributed``, every rank's recorded rows, the same on every rank.

    A ``DistributedSampler``'s rows are put back in dataset order and its padding removed, so
    the result is what one process reading the whole dataset in order records (see
    :func:`selectorch.distributed.gather_dataset`).
    """
    if not is_distributed():
        return run
    features, labels, preds, logits = gather_dataset(
        run.features,
        run.labels,
        run.preds,
        run.logits,
        indices=sampler_indices(data),
        warn_replicated=not is_recorded(data),
    )
    return Collected(features, labels, preds, run.num_classes, logits)


def finite_only(run: Collected, name: str) -> Collected:
    """The samples of ``run`` whose features (and logits) are finite; a warning counts the rest."""
    rows = {"features": run.features, "logits": run.logits}
    kept, labels, preds = _drop_nonfinite(rows, run.labels, run.preds, name=name, stacklevel=4)
    return Collected(kept["features"], labels, preds, run.num_classes, kept["logits"])


def batch_count(data: Any, batch_size: int) -> int | None:
    """Number of batches for the progress bar; ``None`` for streams without a length."""
    if isinstance(data, torch.Tensor):
        return -(-data.shape[0] // batch_size)
    try:
        return len(data)
    except TypeError:  # IterableDataset loaders, generators
        return None


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Run ``model`` in eval mode (BatchNorm statistics untouched), then restore every flag."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in flags:
            module.training = training


def collect_recorded(sel: Any, data: Any, y: torch.Tensor | None, desc: str) -> Collected:
    """Score inputs, labels and predictions of a recording; the model does not run."""
    if y is not None:
        raise ValueError(
            f"Argument `y` is not used when {desc} gets a recording: its labels come from it."
        )
    if sel.score.requires_grad:
        raise ValueError(
            f"{type(sel.score).__name__} needs the model itself (input gradients and a "
            f"second pass), not a recording: pass the loader or tensor to {desc}."
        )
    if sel.score.input == "multi":
        names = [sel.layer] if isinstance(sel.layer, str) else list(sel.layer or [])
        keys = score_keys(sel.score)
        keys = [*names, "logits"] if keys is None else keys
        feats, labels, logits = recorded_layers(
            data, keys=keys, pool=sel._layer_pool, model=sel.model
        )
        rows = feats[keys[0]].shape[0]
    else:
        key = sel.layer if sel.layer is not None else "logits"
        feats, labels, logits = recorded_inputs(
            data, key=key, pool=sel._layer_pool, model=sel.model
        )
        rows = feats.shape[0]
    device = module_device(sel.model)
    preds, num_classes = class_predictions(logits, rows, sel.score)
    keep_logits = getattr(sel.score, "needs_losses", False) and logits is not None
    return Collected(
        to_device(feats, device),
        None if labels is None else labels.to(device),
        None if preds is None else preds.to(device),
        num_classes,
        logits=logits.to(device) if keep_logits else None,
    )


def expected_rows(data: Any) -> int | None:
    """Rows one pass over ``data`` yields when it can be told in advance, else ``None``.

    A tensor has its rows; a DataLoader that batches a sampler with a length yields
    ``len(sampler)`` samples (less the last partial batch with ``drop_last``).
    """
    if isinstance(data, torch.Tensor):
        return data.shape[0]
    batch_size = getattr(data, "batch_size", None)
    if not isinstance(data, DataLoader) or batch_size is None:
        return None
    try:
        samples = len(data.sampler)
    except TypeError:  # IterableDataset loaders
        return None
    return samples - samples % batch_size if data.drop_last else samples


class RowBuffer:
    """One ``(capacity, ...)`` buffer that batches of rows are copied into, in order.

    A batch that does not fit (more batches, or larger ones, than announced) grows the buffer
    by at least half, so every row is kept whatever the loader does.

    Args:
        first: The first ``(B, ...)`` batch; the buffer takes its dtype, device and row shape.
        capacity: Rows to allocate (at least ``B``).
        what: What is collected, for the message of a refused growth.
    """

    def __init__(self, first: torch.Tensor, capacity: int, what: str) -> None:
        self.buffer = first.new_empty((max(capacity, first.shape[0]), *first.shape[1:]))
        self.rows, self.what = 0, what
        self.append(first)

    def accepts(self, part: Any) -> bool:
        """Whether ``part`` can be copied in as is (same row shape, dtype and device)."""
        return (
            isinstance(part, torch.Tensor)
            and part.ndim == self.buffer.ndim
            and part.shape[1:] == self.buffer.shape[1:]
            and part.dtype == self.buffer.dtype
            and part.device == self.buffer.device
        )

    def append(self, part: torch.Tensor) -> None:
        """Copy ``part``'s rows after those already held, growing the buffer if needed."""
        end = self.rows + part.shape[0]
        if end > self.buffer.shape[0]:
            capacity = max(end, self.buffer.shape[0] * 3 // 2)
            check_fits(
                tensor_nbytes((capacity, *self.buffer.shape[1:]), self.buffer.dtype),
                self.buffer.device,
                f"{self.what} (growing the buffer to {capacity} rows: more rows than announced)",
            )
            grown = self.buffer.new_empty((capacity, *self.buffer.shape[1:]))
            grown[: self.rows].copy_(self.buffer[: self.rows])
            self.buffer = grown
        self.buffer[self.rows : end].copy_(part)
        self.rows = end

    def filled(self) -> torch.Tensor:
        """The rows copied in: a view of the buffer, or a copy if most of it is unused."""
        rows = self.buffer.narrow(0, 0, self.rows)
        return rows.clone() if self.buffer.shape[0] - self.rows > self.rows else rows


class Features:
    """What a pass over a dataset records batch by batch (features, labels, ...), stacked.

    When the number of batches is known, the first batch sets the size of one buffer per
    tensor (``rows`` if known, else ``batches`` times the first batch's rows) and every batch is
    copied in: the pass holds the stacked features once, where keeping the batches and
    concatenating them needs twice as much. Batches of unknown number, or that change shape or
    dtype along the way, are kept in a list and concatenated.

    Args:
        batches: Number of batches, or ``None`` if unknown.
        rows: Total rows, if known (checked against the first batch).
        what: What is collected, for the memory messages.
    """

    def __init__(self, batches: int | None, rows: int | None, what: str) -> None:
        self.total, self.rows, self.what = batches, rows, what
        self.count = 0
        self.parts: list[Any] = []
        self.buffers: dict[Any, RowBuffer] | None = None

    def _capacity(self, first: torch.Tensor) -> int:
        size, batches = first.shape[0], self.total or 1
        if self.rows is not None and size * (batches - 1) < self.rows <= size * batches:
            return self.rows  # the first batch is a full one of the announced rows
        return size * batches

    def add(self, feats: Any) -> None:
        """Record one batch: a ``(B, ...)`` tensor or a dict of them."""
        self.count += 1
        named = feats if isinstance(feats, dict) else {None: feats}
        if self.count == 1 and self.total is not None and _tensors_with_rows(named):
            # refuse now a buffer that will not fit, before the model runs over the data
            check_stacking([feats], self.total, self.what, preallocate=True)
            self.buffers = {
                key: RowBuffer(value, self._capacity(value), self.what)
                for key, value in named.items()
            }
            return
        if self.buffers is not None:
            if named.keys() == self.buffers.keys() and all(
                self.buffers[key].accepts(value) for key, value in named.items()
            ):
                for key, value in named.items():
                    self.buffers[key].append(value)
                return
            self.parts, self.buffers = [self._filled()], None  # a batch unlike the first
        self.parts.append(feats)
        if self.count == 1 and self.total is not None:  # refuse now a bank that will not fit
            check_stacking(self.parts, self.total, self.what)

    def _filled(self) -> Any:
        named = {key: buffer.filled() for key, buffer in (self.buffers or {}).items()}
        return named[None] if None in named else named

    def stacked(self) -> Any:
        """Every batch's rows in order: a tensor, or a dict of tensors."""
        if self.buffers is not None:
            return self._filled()
        check_stacking(self.parts, None, self.what)
        return _concat(self.parts)


def _tensors_with_rows(named: Mapping[Any, Any]) -> bool:
    return bool(named) and all(
        isinstance(value, torch.Tensor) and value.ndim >= 1 for value in named.values()
    )


def fits_nothing(score: Any) -> bool:
    """Whether ``score.fit`` keeps nothing from its data: its class overrides neither ``fit``
    (as multi-layer scores do) nor ``_fit``."""
    cls = type(score)
    return cls.fit is Score.fit and cls._fit is Score._fit


@torch.no_grad()
def collect(
    sel: Any, data: Any, y: torch.Tensor | None, batch_size: int, progress: bool, desc: str
) -> Collected:
    """Run the model over ``data``; stack the score inputs, labels and predictions.

    The features are new tensors, never the caller's: a score may overwrite them while fitting.
    A ``requires_grad`` score (ODIN) that learns nothing at ``fit`` gets one plain pass there:
    its fit only checks the inputs, so the gradient step and second pass would be wasted.
    """
    if is_recorded(data):  # a TensorDict from selectorch.record, or its cache directory
        return collect_recorded(sel, data, y, desc)
    check_int("batch_size", batch_size)
    device = module_device(sel.model)
    keep_logits = getattr(sel.score, "needs_losses", False)  # DEUP fits on the model loss
    total = batch_count(data, batch_size)
    # every per-batch tensor kept goes into a buffer: none stays behind between two batches
    # (small tensors kept batch after batch would also fragment the heap under the next ones)
    rows = expected_rows(data)
    kept = {
        name: Features(total, rows, f"Recording {name} for {desc}")
        for name in ("features", "labels", "preds", "logits")
    }
    num_classes = None
    batches = iter_batches(data, y, batch_size=batch_size)
    run = sel._pass if desc == "fit" and fits_nothing(sel.score) else sel._run
    with eval_mode(sel.model):
        for batch in progress_bar(batches, desc=desc, total=total, enabled=progress):
            args, kwargs = to_device(batch.args, device), to_device(batch.kwargs, device)
            output, feats = run(args, kwargs)
            kept["features"].add(feats)
            first = next(iter(feats.values())) if isinstance(feats, dict) else feats
            if batch.labels is not None:
                kept["labels"].add(batch.labels.to(first.device))
            logits = logits_from_output(output)
            preds, classes = class_predictions(logits, first.shape[0], sel.score)
            if preds is not None:
                kept["preds"].add(preds.to(first.device))
                num_classes = classes
            if keep_logits and logits is not None:
                kept["logits"].add(logits.to(first.device))
            del batch, output, feats, first, logits, preds  # hold no batch during the next one
    count = kept["features"].count
    if not count:
        raise ValueError(
            f"Expected argument `data` to yield at least one batch for {desc}, got none."
        )
    for name in ("labels", "preds"):
        got = kept[name].count
        if got and got != count:
            raise ValueError(
                f"Only {got} of {count} batches carried {name}; every batch must, or none."
            )
    stacked = {name: part.stacked() if part.count else None for name, part in kept.items()}
    return Collected(
        stacked["features"], stacked["labels"], stacked["preds"], num_classes, stacked["logits"]
    )
