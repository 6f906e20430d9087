"""SelectiveModel: a model's output, an uncertainty score and a keep/reject decision in one pass."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import nn

from selectorch._checks import check_int
from selectorch.calibration import check_target
from selectorch.data import iter_batches, module_device, to_device
from selectorch.functional.finite import finite_rows
from selectorch.functional.logits import logit_predictions
from selectorch.progress import progress_bar
from selectorch.recorded import is_recorded, recorded_inputs
from selectorch.recorder.hooks import LayerHooks
from selectorch.recorder.layers import check_not_compiled, get_layer
from selectorch.recorder.pooling import Pool
from selectorch.scores.base import Score
from selectorch.scores.logits import LogitScore

_FEATURES = "features"


class SelectiveOutput(NamedTuple):
    """What :class:`SelectiveModel` returns.

    Attributes:
        output: Exactly what the wrapped model returned (same object, untouched).
        score: ``(B,)`` uncertainty, higher = less trustworthy; ``+inf`` for non-finite samples.
        selected: ``(B,)`` bool, ``True`` where the prediction is kept (``score <= threshold_``).
    """

    output: Any
    score: torch.Tensor
    selected: torch.Tensor


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


def _finite_rows(tensors: Iterable[Any], batch: int, device: torch.device) -> torch.Tensor:
    """``(B,)`` bool: rows where every floating tensor with leading dim ``batch`` is finite."""
    ok = torch.ones(batch, dtype=torch.bool, device=device)
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.is_floating_point() and t.ndim and t.shape[0] == batch:
            ok = ok & finite_rows(t).to(device)
    return ok


def _layer_map(score: Score, layer: str | Sequence[str] | None) -> dict[str, str]:
    """Which layers to hook, and under which key the score finds each one."""
    if score.input == "multi":
        names = [layer] if isinstance(layer, str) else list(layer or [])
        if not all(isinstance(name, str) for name in names):
            raise TypeError(f"Expected argument `layer` to hold layer names, got {layer!r}.")
        unknown = [key for key in score.keys if key not in names and key != "logits"]
        if unknown:
            raise ValueError(
                f"{type(score).__name__} reads the keys {unknown}, which are neither recorded "
                f"layers (layer={names}) nor 'logits'."
            )
        return {name: name for name in names}
    if layer is not None and not isinstance(layer, str):
        raise TypeError(
            f"Expected argument `layer` to be a layer name (str) or None, got {layer!r} "
            "(several layers feed a FusionScore)."
        )
    if layer is None and score.input == "embedding":
        raise ValueError(
            f"{type(score).__name__} scores embeddings: pass layer=... naming the layer to "
            "record, e.g. layer='avgpool' for a torchvision ResNet (see "
            "selectorch.list_layers(model))."
        )
    return {} if layer is None else {layer: _FEATURES}


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
class _Collected:
    """What one pass over a dataset recorded (lists while collecting, tensors once stacked)."""

    features: Any
    labels: Any
    preds: Any
    num_classes: int | None = None

    def stacked(self) -> _Collected:
        return _Collected(
            _concat(self.features),
            torch.cat(self.labels) if self.labels else None,
            torch.cat(self.preds) if self.preds else None,
            self.num_classes,
        )


def _batch_count(data: Any, batch_size: int) -> int | None:
    """Number of batches for the progress bar; ``None`` for streams without a length."""
    if isinstance(data, torch.Tensor):
        return -(-data.shape[0] // batch_size)
    try:
        return len(data)
    except TypeError:  # IterableDataset loaders, generators
        return None


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """Run ``model`` in eval mode (BatchNorm statistics untouched), then restore every flag."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in flags:
            module.training = training


class SelectiveModel(nn.Module):
    """Wrap any model for selective prediction, without changing it.

    One forward pass returns the model's output, a per-sample uncertainty and whether the
    prediction is kept. Embedding scores (kNN, ...) read a hooked ``layer``; logit scores read
    the model's output (or ``layer`` when given). Hooks are registered once, here, so
    ``torch.compile(sel, fullgraph=True)`` gives one graph.

    Args:
        model: Any ``nn.Module``, not yet compiled.
        score: A :class:`~selectorch.scores.Score`.
        layer: Name of the layer whose output is scored (see :func:`selectorch.list_layers`);
            required for embedding scores. A list of names feeds a
            :class:`~selectorch.scores.FusionScore`, whose keys are those names (and
            ``"logits"`` for the model's output).
        pool: How the layer's output becomes ``(B, D)``; see
            :func:`selectorch.recorder.pool_features`.
        head: Name of the classifier's final linear layer, for scores that re-apply the head to
            the recorded features (ViM, ReAct, ASH); its weight and bias are copied into the
            score at init and again at every ``fit`` and ``calibrate``.

    Raises:
        ValueError: No ``layer`` for an embedding score, an unknown layer, a FusionScore key
            that names no recorded layer, or a missing or unusable ``head``.
        TypeError: ``score`` is not a Score, or ``model`` is already compiled.

    Example:
        >>> import torchvision
        >>> net = torchvision.models.resnet18(num_classes=3).eval()
        >>> sel = SelectiveModel(net, scores.KNNScore(k=2), layer="avgpool")
        >>> sel = sel.fit(torch.randn(8, 3, 32, 32), progress=False)
        >>> sel = sel.calibrate(torch.randn(9, 3, 32, 32), coverage=0.8, progress=False)
        >>> out = sel(torch.randn(4, 3, 32, 32))
        >>> out.output.shape, out.score.shape, out.selected.dtype
        (torch.Size([4, 3]), torch.Size([4]), torch.bool)
    """

    def __init__(
        self,
        model: nn.Module,
        score: Score,
        *,
        layer: str | Sequence[str] | None = None,
        pool: Pool = "auto",
        head: str | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(score, Score):
            raise TypeError(
                f"Expected argument `score` to be a selectorch Score, got {type(score).__name__}."
            )
        check_not_compiled(model)
        layers = _layer_map(score, layer)
        hooks = LayerHooks(model, layers, pool) if layers else None
        self.model = model
        self.score = score.to(module_device(model))
        self.layer = layer
        self.head = head
        self._sync_head()
        # not a submodule: its hooks live on `model`
        object.__setattr__(self, "_hooks", hooks)
        object.__setattr__(self, "_pool", pool)  # to check recordings passed to fit/calibrate

    def _sync_head(self) -> None:
        """Copy the classifier head's weight and bias into a score that re-applies it."""
        if not getattr(self.score, "needs_head", False):
            if self.head is not None:
                raise ValueError(
                    f"{type(self.score).__name__} does not use a classifier head; drop head=."
                )
            return
        if self.head is None:
            raise ValueError(
                f"{type(self.score).__name__} re-applies the classifier head: pass head=... naming "
                "the final linear layer, e.g. head='fc' for a torchvision ResNet."
            )
        module = get_layer(self.model, self.head)
        weight = getattr(module, "weight", None)
        if not isinstance(weight, torch.Tensor) or weight.ndim != 2:
            raise ValueError(
                f"Expected head={self.head!r} to be a linear layer with a (C, D) weight, got "
                f"{type(module).__name__}."
            )
        bias = getattr(module, "bias", None)
        self.score.set_head(weight.detach(), None if bias is None else bias.detach())

    @property
    def threshold_(self) -> torch.Tensor:
        """The score's threshold buffer (empty until calibrated)."""
        return self.score.threshold_

    def get_threshold(self) -> float:
        """The current threshold as a float; raises ``NotFittedError`` before calibration."""
        return self.score.get_threshold()

    def _run(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, Any]:
        """Run the model once; return its output and what the score reads (a dict for fusion)."""
        hooks = self._hooks
        records: dict[str, torch.Tensor] = {}
        if hooks is not None:
            if hooks.closed:
                raise RuntimeError("This SelectiveModel was closed; its hooks are gone.")
            output, records = hooks.run(self.model, args, kwargs)
        else:
            output = self.model(*args, **kwargs)
        multi = self.score.input == "multi"
        if not multi and hooks is not None:
            return output, records[_FEATURES]
        if multi and "logits" not in self.score.keys:
            return output, records
        logits = logits_from_output(output)
        if logits is None:
            raise TypeError(
                f"Cannot find logits in the model's output of type {type(output).__name__}; "
                "pass layer=... naming the layer whose output is the logits."
            )
        return output, {**records, "logits": logits} if multi else logits

    def forward(self, *args: Any, **kwargs: Any) -> SelectiveOutput:
        """Run the model once and score and select every sample of the batch.

        Args:
            *args: What the model takes, positionally.
            **kwargs: What the model takes by keyword (e.g. ``attention_mask``).

        Returns:
            :class:`SelectiveOutput` ``(output, score, selected)``. A sample with NaN or Inf in a
            floating input, in the scored features or in the logits gets ``score = +inf`` and
            ``selected = False``.

        Raises:
            NotFittedError: ``fit`` or ``calibrate`` is missing.
        """
        self.score._check_fitted()
        self.score._check_calibrated()
        output, features = self._run(args, kwargs)
        scores = self.score(features)
        logits = logits_from_output(output)
        ok = _finite_rows((*args, *kwargs.values(), logits), scores.shape[0], scores.device)
        scores = torch.where(ok, scores, torch.full_like(scores, float("inf")))
        preds = None
        if self.score.threshold_.ndim == 1:  # per-class thresholds: select by predicted class
            preds, _ = class_predictions(logits, scores.shape[0], self.score)
            if preds is None:
                raise ValueError(
                    "Per-class thresholds select by the predicted class, but the model's output "
                    "holds no class logits."
                )
        return SelectiveOutput(output, scores, self.score.selected(scores, preds))

    def _collect_recorded(self, data: Any, y: torch.Tensor | None, desc: str) -> _Collected:
        """Score inputs, labels and predictions of a recording; the model does not run."""
        if y is not None:
            raise ValueError(
                f"Argument `y` is not used when {desc} gets a recording: its labels come from it."
            )
        if self.score.input == "multi":
            raise ValueError(
                "A FusionScore is fitted and calibrated from loaders or tensors, not recordings."
            )
        key = self.layer if self.layer is not None else "logits"
        feats, labels, logits = recorded_inputs(data, key=key, pool=self._pool, model=self.model)
        device = module_device(self.model)
        preds, num_classes = class_predictions(logits, feats.shape[0], self.score)
        return _Collected(
            feats.to(device),
            None if labels is None else labels.to(device),
            None if preds is None else preds.to(device),
            num_classes,
        )

    @torch.no_grad()
    def _collect(
        self, data: Any, y: torch.Tensor | None, batch_size: int, progress: bool, desc: str
    ) -> _Collected:
        """Run the model over ``data``; stack the score inputs, labels and predictions."""
        if is_recorded(data):  # a TensorDict from selectorch.record, or its cache directory
            return self._collect_recorded(data, y, desc)
        check_int("batch_size", batch_size)
        device = module_device(self.model)
        parts = _Collected([], [], [])
        total = _batch_count(data, batch_size)
        batches = iter_batches(data, y, batch_size=batch_size)
        with _eval_mode(self.model):
            for batch in progress_bar(batches, desc=desc, total=total, enabled=progress):
                args, kwargs = to_device(batch.args, device), to_device(batch.kwargs, device)
                output, feats = self._run(args, kwargs)
                parts.features.append(feats)
                first = next(iter(feats.values())) if isinstance(feats, dict) else feats
                if batch.labels is not None:
                    parts.labels.append(batch.labels.to(first.device))
                preds, num_classes = class_predictions(
                    logits_from_output(output), first.shape[0], self.score
                )
                if preds is not None:
                    parts.preds.append(preds.to(first.device))
                    parts.num_classes = num_classes
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
        return parts.stacked()

    def fit(
        self,
        data: Any,
        y: torch.Tensor | None = None,
        *,
        batch_size: int = 256,
        progress: bool = True,
    ) -> SelectiveModel:
        """Run the model once over reference data and fit the score on what it records.

        The model runs in eval mode under ``torch.no_grad()`` (its flags are restored after).

        Args:
            data: A DataLoader (batches: tensor, ``(x, y, ...)`` tuple or dict), an
                ``(N, ...)`` tensor of inputs, or a recording: the TensorDict returned by
                :func:`selectorch.record` or its cache directory (the model does not run; the
                recording must hold ``layer``, or ``"logits"`` for logit scores, and a cache
                must come from this model with this pooling).
            y: Optional ``(N,)`` labels with a tensor ``data``.
            batch_size: Rows per model call for a tensor ``data``.
            progress: Show a progress bar.

        Returns:
            ``self``.
        """
        self._sync_head()
        run = self._collect(data, y, batch_size, progress, "fit")
        self.score.fit(run.features, run.labels)
        return self

    def calibrate(
        self,
        data: Any,
        y: torch.Tensor | None = None,
        *,
        coverage: float | None = None,
        risk: float | None = None,
        delta: float = 0.1,
        per_class: bool = False,
        bound: str = "clopper-pearson",
        method: str = "sgr",
        batch_size: int = 256,
        progress: bool = True,
    ) -> SelectiveModel:
        """Set the threshold on held-out data for a coverage or a risk target.

        * ``coverage=c``: at least ``c`` of new samples kept in expectation (finite-sample rank
          ``ceil((n + 1) * c)`` of the calibration scores).
        * ``risk=r, delta=d``: the largest coverage whose error rate among kept predictions
          (predicted class != label) is at most ``r`` with probability ``1 - d``; needs labels.
          Nothing is kept if no threshold can be certified.

        See :meth:`selectorch.scores.Score.calibrate` and :meth:`calibration_report`.

        Args:
            data: Held-out data, as for :meth:`fit` (a recording too).
            y: Optional labels with a tensor ``data``.
            coverage: Target fraction of kept samples, in (0, 1].
            risk: Target selective risk, in (0, 1).
            delta: Allowed failure probability of the risk promise.
            per_class: One threshold per predicted class (see :func:`class_predictions`).
            bound: ``"clopper-pearson"`` or ``"hoeffding-bentkus"``.
            method: ``"sgr"`` or ``"fixed-sequence"``.
            batch_size: Rows per model call for a tensor ``data``.
            progress: Show a progress bar.

        Returns:
            ``self``.

        Raises:
            ValueError: Bad targets; a risk target without labels; per-class thresholds for a
                model whose output has no class logits.
        """
        check_target(coverage, risk, delta, bound, method)
        self.score._check_fitted()
        self._sync_head()
        run = self._collect(data, y, batch_size, progress, "calibrate")
        needs_preds = per_class or risk is not None
        if needs_preds and run.preds is None:
            raise ValueError(
                "per_class=True and risk targets need class predictions, but the model's output "
                "holds no (B, C) logits."
            )
        correct = None
        if run.labels is not None and run.preds is not None and run.labels.ndim == 1:
            correct = run.preds == run.labels
        if risk is not None and correct is None:
            raise ValueError(
                "A `risk` target needs labels in the calibration data ((x, y) batches, a 'label' "
                "key, or `y` with a tensor) to know which kept predictions are wrong."
            )
        self.score.calibrate(
            run.features,
            coverage=coverage,
            risk=risk,
            delta=delta,
            correct=correct,
            preds=run.preds,
            per_class=per_class,
            num_classes=run.num_classes,
            bound=bound,
            method=method,
        )
        return self

    def calibration_report(self) -> dict[str, Any]:
        """What the last calibration promised and achieved; see :meth:`Score.calibration_report`."""
        return self.score.calibration_report()

    def close(self) -> None:
        """Remove exactly the hooks this wrapper added to the model."""
        if self._hooks is not None:
            self._hooks.close()

    def __enter__(self) -> SelectiveModel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def extra_repr(self) -> str:
        return f"layer={self.layer!r}"
