"""Scores of :func:`selectorch.evaluate` that run the model themselves (ODIN, Gram, ...).

A score that needs input gradients, several forward passes or its own pooling of the layers
cannot be fitted from the shared recordings: it is fitted, calibrated and scored through a
:class:`~selectorch.SelectiveModel` on the raw data, exactly as it would run in deployment.
Its fit time and its scoring rate therefore include the model's forward (and backward) passes.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from tensordict import TensorDictBase
from torch import nn

from selectorch.bench.entries import Entry
from selectorch.collect import eval_mode
from selectorch.data import iter_batches, module_device, to_device
from selectorch.scores.base import Score
from selectorch.selective import SelectiveModel, class_predictions, logits_from_output

__all__ = ["Scored", "check_raw", "live_scores"]


@dataclass
class Scored:
    """What one score gave on every split.

    Attributes:
        scores: ``{split: (N,)}`` CPU scores of ``"test"`` and each OOD set (``"ood:NAME"``
            keys are plain OOD names here).
        selected: ``{split: (N,) bool}`` at the calibrated threshold.
        correct: ``(N,)`` bool, whether the model is right on ``test``; ``None`` without labels.
        calibration: Sorted calibration scores.
        threshold: The calibrated threshold (``nan`` for per-class thresholds).
        fit_s: Seconds of ``fit``.
        score_s: Seconds spent scoring ``test`` and the OOD sets.
    """

    scores: dict[str, torch.Tensor]
    selected: dict[str, torch.Tensor]
    correct: torch.Tensor | None
    calibration: torch.Tensor
    threshold: float
    fit_s: float
    score_s: float


def is_recording(data: Any) -> bool:
    """Whether ``data`` is a recording (a TensorDict of :func:`selectorch.record` or its cache)."""
    return isinstance(data, (TensorDictBase, str, os.PathLike))


def check_raw(entries: list[Entry], datasets: Mapping[str, Any]) -> None:
    """Refuse recordings for the scores that must run the model; name the score and the splits.

    Raises:
        ValueError: A score that runs the model got a recording for some split.
    """
    recorded = [name for name, data in datasets.items() if is_recording(data)]
    for entry in entries:
        if entry.live is not None and recorded:
            raise ValueError(
                f"Score {entry.label!r} cannot be evaluated from recordings: {entry.live}, so "
                "it runs the model itself through a SelectiveModel. Pass the raw data (a "
                "DataLoader, tensors or an (inputs, labels) pair) instead of the recordings "
                f"given for {', '.join(recorded)}, or leave this score out."
            )


def _run_split(
    sel: SelectiveModel, data: Any, batch_size: int, *, with_correct: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Scores, selections and (for ``with_correct``) correctness of one split, batch by batch."""
    device = module_device(sel.model)
    scores, selected, correct = [], [], []
    with eval_mode(sel.model), torch.no_grad():  # a requires_grad score re-enables grad
        for batch in iter_batches(data, batch_size=batch_size):
            args, kwargs = to_device(batch.args, device), to_device(batch.kwargs, device)
            out = sel(*args, **kwargs)
            scores.append(out.score.detach().cpu())
            selected.append(out.selected.cpu())
            if with_correct and batch.labels is not None and batch.labels.ndim == 1:
                logits = logits_from_output(out.output)
                preds, _ = class_predictions(logits, out.score.shape[0], sel.score)
                if preds is not None:
                    correct.append(preds.cpu() == batch.labels.cpu())
    if not scores:
        raise ValueError("Expected the data to yield at least one batch, got none.")
    right = torch.cat(correct) if correct and len(correct) == len(scores) else None
    return torch.cat(scores), torch.cat(selected), right


def _nothing_to_fit(score: Score) -> bool:
    """Whether ``fit`` would change nothing: no fitted buffers and the base class's no-op."""
    return not score.fitted_buffers and type(score)._fit is Score._fit


def live_scores(
    model: nn.Module,
    entry: Entry,
    data: Mapping[str, Any],
    *,
    head: str | None,
    target: dict[str, Any],
    batch_size: int,
) -> Scored:
    """Fit, calibrate and score ``entry`` through a SelectiveModel on the raw ``data``.

    Args:
        model: The classifier.
        entry: The score and its layers.
        data: ``{"fit", "calibrate", "test", NAME...}`` loaders (OOD sets under their names).
        head: The final linear layer, for scores that re-apply it.
        target: ``{"coverage": c}`` or ``{"risk": r, "delta": d}``.
        batch_size: Rows per model call.

    Returns:
        The scores of ``test`` and every OOD set; ``fit_s`` and ``score_s`` include the
        model's passes.
    """
    score = entry.score
    needs_head = bool(getattr(score, "needs_head", False))
    sel = SelectiveModel(model, score, layer=entry.layer, head=head if needs_head else None)
    try:
        start = time.perf_counter()
        if not _nothing_to_fit(score):  # ODIN: no pass over the fit data for a no-op
            sel.fit(data["fit"], batch_size=batch_size, progress=False)
        fit_s = time.perf_counter() - start
        sel.calibrate(data["calibrate"], batch_size=batch_size, progress=False, **target)
        scores, selected, correct = {}, {}, None
        start = time.perf_counter()
        for name, split in data.items():
            if name in ("fit", "calibrate"):
                continue
            scores[name], selected[name], right = _run_split(
                sel, split, batch_size, with_correct=name == "test"
            )
            correct = right if name == "test" else correct
        score_s = time.perf_counter() - start
        threshold = sel.get_threshold() if sel.threshold_.ndim == 0 else float("nan")
    finally:
        sel.close()
    return Scored(
        scores=scores,
        selected=selected,
        correct=correct,
        calibration=score.calibration_scores_.detach().cpu(),
        threshold=threshold,
        fit_s=fit_s,
        score_s=score_s,
    )
