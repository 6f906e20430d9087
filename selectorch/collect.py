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

from selectorch._checks import check_int
from selectorch.data import iter_batches, module_device, to_device
from selectorch.distributed.collectives import gather_dataset, is_distributed, sampler_indices
from selectorch.functional.logits import logit_predictions
from selectorch.memory import check_stacking
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

    def stacked(self) -> Collected:
        return Collected(
            _concat(self.features),
            torch.cat(self.labels) if self.labels else None,
            torch.cat(self.preds) if self.preds else None,
            self.num_classes,
            torch.cat(self.logits) if self.logits else None,
        )


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


@torch.no_grad()
def collect(
    sel: Any, data: Any, y: torch.Tensor | None, batch_size: int, progress: bool, desc: str
) -> Collected:
    """Run the model over ``data``; stack the score inputs, labels and predictions."""
    if is_recorded(data):  # a TensorDict from selectorch.record, or its cache directory
        return collect_recorded(sel, data, y, desc)
    check_int("batch_size", batch_size)
    device = module_device(sel.model)
    parts = Collected([], [], [], logits=[])
    keep_logits = getattr(sel.score, "needs_losses", False)  # DEUP fits on the model loss
    total = batch_count(data, batch_size)
    batches = iter_batches(data, y, batch_size=batch_size)
    with eval_mode(sel.model):
        for batch in progress_bar(batches, desc=desc, total=total, enabled=progress):
            args, kwargs = to_device(batch.args, device), to_device(batch.kwargs, device)
            output, feats = sel._run(args, kwargs)
            parts.features.append(feats)
            if len(parts.features) == 1:  # refuse now a bank that will not fit
                check_stacking(parts.features, total, f"Recording features for {desc}")
            first = next(iter(feats.values())) if isinstance(feats, dict) else feats
            if batch.labels is not None:
                parts.labels.append(batch.labels.to(first.device))
            logits = logits_from_output(output)
            preds, num_classes = class_predictions(logits, first.shape[0], sel.score)
            if preds is not None:
                parts.preds.append(preds.to(first.device))
                parts.num_classes = num_classes
            if keep_logits and logits is not None:
                parts.logits.append(logits.to(first.device))
    if not parts.features:
        raise ValueError(
            f"Expected argument `data` to yield at least one batch for {desc}, got none."
        )
    for name in ("labels", "preds"):
        got = len(getattr(parts, name))
        if got and got != len(parts.features):
            raise ValueError(
                f"Only {got} of {len(parts.features)} batches carried {name}; every batch "
                "must, or none."
            )
    check_stacking(parts.features, None, f"Recording features for {desc}")
    return parts.stacked()
