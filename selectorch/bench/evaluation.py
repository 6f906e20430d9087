"""``selectorch.evaluate``: compare scores on one model, running the model once per dataset.

Every dataset is recorded once with :func:`selectorch.record` (the union of the layers the
scores read, plus logits and labels); each score is then fitted, calibrated and scored from
those recordings, so all rows of the report see exactly the same embeddings and logits.
"""

from __future__ import annotations

import math
import os
import platform
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from tensordict import TensorDictBase
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from selectorch._checks import check_fraction, check_int, check_open_fraction
from selectorch._version import __version__
from selectorch.bench.entries import Entry, LayerSpec, cost, entries
from selectorch.bench.live import Scored, check_raw, is_recording, live_scores
from selectorch.bench.report import BenchReport
from selectorch.cache import load_cache
from selectorch.data import module_device
from selectorch.functional.ranking import auroc
from selectorch.functional.selective import augrc, aurc, fpr_at_tpr
from selectorch.progress import progress_bar
from selectorch.record import record
from selectorch.recorder.layers import get_layer
from selectorch.scores.base import Score
from selectorch.selective import SelectiveModel, class_predictions

__all__ = ["BenchError", "Data", "evaluate"]

#: What ``evaluate`` takes as a dataset: a DataLoader (or any iterable of batches), an
#: ``(N, ...)`` input tensor, an ``(inputs, labels)`` pair of tensors, or a recording made by
#: :func:`selectorch.record` (used as it is; the model does not run on it).
Data = DataLoader | Iterable[Any] | torch.Tensor | tuple | TensorDictBase

#: Split names that the OOD sets may not use.
_ID_SPLITS = ("fit", "calibrate", "test")


class BenchError(ValueError):
    """A score of :func:`evaluate` could not be fitted, calibrated or scored.

    The message names the score; the original error is chained as ``__cause__``.
    """


def _loader(data: Any, name: str, batch_size: int) -> Any:
    """A DataLoader for tensors and ``(inputs, labels)`` pairs; other data unchanged."""
    if isinstance(data, torch.Tensor):
        return DataLoader(TensorDataset(data), batch_size=batch_size)
    if isinstance(data, tuple) and data and all(isinstance(t, torch.Tensor) for t in data):
        if len(data) != 2 or data[0].shape[0] != data[1].shape[0]:
            shapes = [tuple(t.shape) for t in data]
            raise ValueError(
                f"Expected argument `{name}` as an (inputs, labels) pair of tensors with the "
                f"same number of rows, got shapes {shapes}."
            )
        return DataLoader(TensorDataset(*data), batch_size=batch_size)
    if data is None or isinstance(data, (str, bytes)):
        raise TypeError(
            f"Expected argument `{name}` to be a DataLoader, a tensor, an (inputs, labels) pair "
            f"or a recording, got {type(data).__name__}."
        )
    return data


def _record_split(
    model: nn.Module,
    data: Any,
    name: str,
    layers: list[str],
    *,
    batch_size: int,
    progress: bool,
) -> tuple[TensorDictBase, dict[str, Any]]:
    """Record one dataset (or check a given recording); return it and its timing."""
    if isinstance(data, (str, os.PathLike)):  # the directory of a recording cache
        data = load_cache(data)
    if isinstance(data, TensorDictBase):
        missing = [key for key in (*layers, "logits") if key not in data.keys()]
        if missing:
            raise ValueError(
                f"The recording given as `{name}` lacks {missing} (it holds "
                f"{sorted(data.keys())}); record it with layers={layers}."
            )
        return data, {"rows": int(data.batch_size[0]), "record_s": 0.0}
    start = time.perf_counter()
    recording = record(
        model, _loader(data, name, batch_size), layers=layers, progress=progress
    )
    seconds = time.perf_counter() - start
    if "logits" not in recording.keys():
        raise ValueError(
            f"The model's output on `{name}` holds no logits (a tensor, a 'logits' key or "
            "attribute); evaluate needs class logits for accuracy and logit scores."
        )
    rows = int(recording.batch_size[0])
    return recording, {"rows": rows, "record_s": seconds, "rows_per_s": rows / seconds}


def _plain(t: torch.Tensor) -> torch.Tensor:
    return t.as_subclass(torch.Tensor)


def _set_head(model: nn.Module, score: Score, head: str) -> None:
    """Give a score that can use a head (DEUP) the model's head without SelectiveModel."""
    module = get_layer(model, head)
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.ndim != 2:
        raise ValueError(
            f"Expected head={head!r} to be a linear layer with a (C, D) weight, got "
            f"{type(module).__name__}."
        )
    bias = getattr(module, "bias", None)
    score.set_head(weight.detach(), None if bias is None else bias.detach())  # type: ignore[operator]


def _correct(recording: TensorDictBase, score: Score) -> torch.Tensor | None:
    """``(N,)`` bool, whether the model's prediction is right; ``None`` without labels."""
    labels = recording.get("labels", None)
    if labels is None:
        return None
    logits = _plain(recording["logits"])
    preds, _ = class_predictions(logits, logits.shape[0], score)
    if preds is None or labels.ndim != 1:
        return None
    return preds.cpu() == _plain(labels).cpu()


def _nan() -> float:
    return float("nan")


def _risk_metrics(
    scores: torch.Tensor, selected: torch.Tensor, correct: torch.Tensor | None
) -> dict[str, float]:
    """Accuracy, AURC, AUGRC, coverage and selective risk on in-distribution test data."""
    coverage = selected.double().mean().item()
    if correct is None:
        return {"accuracy": _nan(), "aurc": _nan(), "augrc": _nan(), "coverage": coverage,
                "risk": _nan()}
    loss = (~correct).double()
    kept = int(selected.sum())
    return {
        "accuracy": correct.double().mean().item(),
        "aurc": aurc(scores, loss).item(),
        "augrc": augrc(scores, loss).item(),
        "coverage": coverage,
        "risk": loss[selected].mean().item() if kept else _nan(),
    }


def _ood_metrics(
    test: torch.Tensor, ood: Mapping[str, torch.Tensor], selected: Mapping[str, torch.Tensor],
    tpr: float,
) -> dict[str, float]:
    """AUROC, FPR at ``tpr`` and kept fraction per OOD set, and their means."""
    row: dict[str, float] = {}
    for name, scores in ood.items():
        both = torch.cat([test, scores])
        is_ood = torch.arange(both.numel()) >= test.numel()
        row[f"auroc:{name}"] = auroc(both, is_ood).item()
        row[f"fpr:{name}"] = fpr_at_tpr(both, is_ood, tpr).item()
        row[f"kept:{name}"] = selected[name].double().mean().item()
    if ood:
        for key in ("auroc", "fpr"):
            values = [row[f"{key}:{name}"] for name in ood]
            row[f"{key}_mean"] = sum(values) / len(values)
    return row


def _recorded_scores(
    model: nn.Module,
    entry: Entry,
    recordings: Mapping[str, TensorDictBase],
    ood_names: list[str],
    *,
    head: str | None,
    target: dict[str, Any],
) -> Scored:
    """Fit, calibrate and score one entry from the recordings (the model does not run)."""
    score = entry.score
    needs_head = bool(getattr(score, "needs_head", False))
    sel = SelectiveModel(model, score, layer=entry.layer, head=head if needs_head else None)
    try:
        if head is not None and not needs_head and hasattr(score, "set_head"):
            _set_head(model, sel.score, head)
        device = module_device(model)
        start = time.perf_counter()
        sel.fit(recordings["fit"], progress=False)  # DEUP: the model's loss from the logits
        fit_s = time.perf_counter() - start
        sel.calibrate(recordings["calibrate"], progress=False, **target)
        splits = {"test": recordings["test"]}
        splits.update({name: recordings[f"ood:{name}"] for name in ood_names})
        scores, selected = {}, {}
        start = time.perf_counter()
        for name, rec in splits.items():
            inputs, preds = _score_inputs(rec, entry, device)
            kwargs = {"preds": preds} if getattr(score, "needs_preds", False) else {}
            scores[name] = sel.score.score(inputs, **kwargs).cpu()
            per_class = preds is not None and sel.threshold_.ndim == 1
            selected[name] = sel.score.selected(scores[name], preds.cpu() if per_class else None)
        score_s = time.perf_counter() - start
        threshold = sel.get_threshold() if sel.threshold_.ndim == 0 else _nan()
    finally:
        sel.close()
    return Scored(
        scores=scores,
        selected=selected,
        correct=_correct(recordings["test"], score),
        calibration=sel.score.calibration_scores_.detach().cpu(),
        threshold=threshold,
        fit_s=fit_s,
        score_s=score_s,
    )


def _score_inputs(
    rec: TensorDictBase, entry: Entry, device: torch.device
) -> tuple[Any, torch.Tensor | None]:
    """What the score reads from a recording, and the model's predicted classes."""
    logits = _plain(rec["logits"]).to(device)
    if entry.score.input == "multi":
        inputs: Any = {name: _plain(rec[name]).to(device) for name in entry.layers}
        inputs["logits"] = logits
    else:
        inputs = _plain(rec[entry.layer or "logits"]).to(device)
    preds, _ = class_predictions(logits, logits.shape[0], entry.score)
    return inputs, preds


def _row(entry: Entry, result: Scored, ood_names: list[str], tpr: float) -> dict[str, Any]:
    """The report's row of one score: risk, OOD and cost columns."""
    scored, correct = result.scores, result.correct
    row: dict[str, Any] = {"score": entry.label, "layer": entry.layer_label}
    row.update(_risk_metrics(scored["test"], result.selected["test"], correct))
    row.update(
        _ood_metrics(
            scored["test"], {n: scored[n] for n in ood_names}, result.selected, tpr
        )
    )
    if ood_names and correct is not None:
        # a deployment stream of test and OOD samples, where every OOD prediction is wrong
        stream = torch.cat([scored[name] for name in ("test", *ood_names)])
        loss = torch.cat([(~correct).double(), torch.ones(stream.numel() - correct.numel())])
        row["aurc_open"] = aurc(stream, loss).item()
    rows = sum(s.numel() for s in scored.values())
    row["threshold"] = result.threshold
    row.update(cost(entry.score))
    row.update(
        {
            "fit_s": result.fit_s,
            "score_rows_per_s": rows / result.score_s if result.score_s > 0 else math.inf,
            "rate_includes_model": entry.live is not None,
        }
    )
    return row


def evaluate(
    model: nn.Module,
    scores: Sequence[str | Score] | Mapping[str, str | Score],
    *,
    fit: Data,
    calibrate: Data,
    test: Data,
    ood: Mapping[str, Data] | None = None,
    layer: str | Mapping[str, LayerSpec] | None = None,
    head: str | None = None,
    coverage: float | None = 0.95,
    risk: float | None = None,
    delta: float = 0.1,
    tpr: float = 0.95,
    batch_size: int = 256,
    progress: bool = True,
) -> BenchReport:
    """Compare uncertainty scores on one model: OOD detection, selective risk and cost.

    The model runs once per dataset: :func:`selectorch.record` keeps the union of the layers
    the scores read, the logits and the labels, and every score is fitted on ``fit``,
    calibrated on ``calibrate`` (for ``coverage``, or for ``risk`` with confidence
    ``1 - delta``) and scored on ``test`` and each ``ood`` set from those recordings. Scores
    that need labels (Mahalanobis) take them from the recording of ``fit``; scores that work
    on the predicted class (Trust, class-wise kNN) get the recorded logits' argmax.

    Scores that cannot be fitted from a recording run the model themselves, through a
    :class:`~selectorch.SelectiveModel` on the raw data, as in deployment: those that need
    input gradients (``requires_grad``, e.g. ODIN), several forward passes (``passes > 1``)
    or their own pooling of the layers (a ``pool`` attribute, e.g. Gram). They need the raw
    data: recordings given for any split are refused for them with a ``ValueError``.

    Metrics of each score (the report's rows; see :class:`~selectorch.BenchReport`):

    * ``accuracy`` of the model on ``test`` (the same for every score);
    * ``auroc:NAME`` and ``fpr:NAME``: AUROC and FPR at ``tpr`` of ``test`` (in-distribution)
      against each OOD set, OOD = positive; ``auroc_mean`` / ``fpr_mean`` over the sets;
      ``kept:NAME``: the fraction of the OOD set kept at the calibrated threshold;
    * ``aurc``, ``augrc``: area under the risk-coverage / generalized risk-coverage curve on
      ``test`` (loss = wrong prediction); ``aurc_open``: the AURC of ``test`` and every OOD set
      together, where a prediction on an OOD sample always counts as wrong;
    * ``coverage``, ``risk``: fraction kept and error rate among kept ``test`` samples at the
      calibrated ``threshold``;
    * cost: ``requires_grad``, ``passes`` and ``compile_clean`` (the score's class
      attributes); ``fit_s``: seconds of ``fit``; ``score_rows_per_s``: rows of ``test`` and
      the OOD sets scored per second; ``rate_includes_model``: whether those two include the
      model's passes. They do for the scores that run the model (``True``); for the others
      they measure the score alone on recorded features, and the recording speed of each
      dataset (one forward pass) is in ``report.meta["splits"]``.

    Args:
        model: The classifier, any ``nn.Module`` returning logits (not compiled).
        scores: Score names (see :func:`selectorch.list_scores`) or
            :class:`~selectorch.scores.Score` instances, or a dict ``{label: score}``; a
            list's labels are the registry names. Fusion scores are not supported.
        fit: Reference data the scores are fitted on (in-distribution, with labels for
            scores that need them). See :data:`Data` for the accepted forms.
        calibrate: Held-out in-distribution data for the threshold.
        test: In-distribution test data, with labels for accuracy and the risk metrics.
        ood: ``{name: data}`` out-of-distribution sets; labels, if any, are ignored.
        layer: The layer embedding scores read (a name from :func:`selectorch.list_layers`),
            or a dict ``{label: layer}`` per score: a name, a list of names for multi-layer
            scores (``{"dknn": ["features.5", "classifier.0"]}``), or ``None`` for logits.
            Logit scores read the model's logits unless the dict names a layer for them.
        head: Name of the final linear layer, for scores that re-apply it (ViM, ReAct, ASH,
            GradNorm, SHE) or compute losses with it (DEUP); their ``layer`` must be the
            head's input.
        coverage: Target coverage of the calibrated threshold, in (0, 1].
        risk: Target selective risk instead of ``coverage`` (needs labels in ``calibrate``).
        delta: Failure probability allowed for the ``risk`` target.
        tpr: True positive rate of the FPR metric (OOD = positive).
        batch_size: Rows per model call for tensor data.
        progress: Show progress bars.

    Returns:
        A :class:`~selectorch.BenchReport`: ``.table()``, ``.to_markdown()``, ``.to_json()``,
        ``.save(dir)``.

    Raises:
        ValueError: Bad arguments, a missing layer, data without logits, OOD names that clash,
            recordings for a score that must run the model.
        BenchError: A score failed to fit, calibrate or score; the message names it.

    Example:
        >>> import torchvision
        >>> net = torchvision.models.resnet18(num_classes=3).eval()
        >>> x, y = torch.randn(48, 3, 32, 32), torch.arange(48) % 3
        >>> report = evaluate(net, ["knn", "energy"], layer="avgpool", fit=(x, y),
        ...                   calibrate=(x[:24], y[:24]), test=(x[24:], y[24:]),
        ...                   ood={"noise": torch.rand(16, 3, 32, 32) * 9}, coverage=0.9,
        ...                   progress=False)
        >>> [row["score"] for row in report.rows], "auroc:noise" in report.rows[0]
        (['knn', 'energy'], True)
        >>> report.rows[0]["passes"], report.rows[0]["rate_includes_model"]
        (1, False)
    """
    todo = entries(scores, layer)
    check_int("batch_size", batch_size)
    tpr = check_fraction("tpr", tpr)
    if (coverage is None) == (risk is None):
        raise ValueError(
            f"Expected exactly one of `coverage` and `risk`, got coverage={coverage!r} and "
            f"risk={risk!r}."
        )
    if risk is None:
        target: dict[str, Any] = {"coverage": check_fraction("coverage", coverage)}
    else:
        target = {
            "risk": check_open_fraction("risk", risk),
            "delta": check_open_fraction("delta", delta),
        }
    ood = dict(ood or {})
    for name in ood:
        if not isinstance(name, str) or not name or name in _ID_SPLITS:
            raise ValueError(
                f"Expected the keys of `ood` to be non-empty names other than {_ID_SPLITS}, "
                f"got {name!r}."
            )
    datasets = {"fit": fit, "calibrate": calibrate, "test": test}
    datasets.update({f"ood:{name}": data for name, data in ood.items()})
    check_raw(todo, datasets)  # before anything runs
    recorded = [e for e in todo if e.live is None]
    layers = sorted({name for e in recorded for name in e.layers})
    for name in sorted({name for e in todo for name in e.layers}):
        get_layer(model, name)  # an unknown layer fails here, before any data is recorded
    if head is not None:
        get_layer(model, head)

    started = time.perf_counter()
    bar = progress_bar(
        desc="bench", total=len(datasets) + len(todo), unit="step", enabled=progress,
        leave=True,
    )
    recordings: dict[str, TensorDictBase] = {}
    splits: dict[str, dict[str, Any]] = {}
    loaders: dict[str, Any] = {}
    try:
        for name, data in datasets.items():
            bar.set_postfix_str(f"record {name}")
            if not is_recording(data):  # the loader is kept for the scores that run the model
                data = loaders[name.removeprefix("ood:")] = _loader(data, name, batch_size)
            recordings[name], splits[name] = _record_split(
                model, data, name, layers, batch_size=batch_size, progress=progress
            )
            bar.update()
        rows, raw = [], {}
        for entry in todo:
            bar.set_postfix_str(f"score {entry.label}")
            try:
                if entry.live is None:
                    result = _recorded_scores(
                        model, entry, recordings, list(ood), head=head, target=target
                    )
                else:
                    result = live_scores(
                        model, entry, loaders, head=head, target=target, batch_size=batch_size
                    )
            except Exception as err:
                raise BenchError(
                    f"Score {entry.label!r} failed: {type(err).__name__}: {err}"
                ) from err
            rows.append(_row(entry, result, list(ood), tpr))
            raw[entry.label] = {
                "calibration": result.calibration,
                "test": result.scores["test"],
                "ood": {name: result.scores[name] for name in ood},
                "correct": result.correct,
                "threshold": result.threshold,
            }
            bar.update()
    finally:
        bar.close()
    meta = {
        "model": type(model).__name__,
        "device": str(module_device(model)),
        "target": target,
        "tpr": tpr,
        "ood": list(ood),
        "splits": splits,
        "seconds": time.perf_counter() - started,
        "versions": {
            "selectorch": __version__,
            "torch": torch.__version__,
            "python": platform.python_version(),
        },
        "threads": torch.get_num_threads(),
    }
    return BenchReport(rows=rows, meta=meta, raw=raw)
