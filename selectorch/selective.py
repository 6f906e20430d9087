"""SelectiveModel: a model's output, an uncertainty score and a keep/reject decision in one pass."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import nn
from tqdm.auto import tqdm

from selectorch._checks import check_int
from selectorch.calibration import check_target
from selectorch.data import iter_batches, module_device, to_device
from selectorch.functional.finite import finite_rows
from selectorch.recorder.hooks import LayerHooks
from selectorch.recorder.layers import check_not_compiled
from selectorch.recorder.pooling import Pool
from selectorch.scores.base import Score

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


def _predictions(logits: torch.Tensor | None, batch: int) -> torch.Tensor:
    """``(B,)`` predicted classes from ``(B, C)`` logits, for per-class thresholds."""
    if logits is None or logits.ndim != 2 or logits.shape[0] != batch:
        raise ValueError(
            "Per-class thresholds select by the predicted class, but the model's output holds "
            "no (B, C) logits."
        )
    return logits.argmax(dim=1)


@dataclass
class _Collected:
    """What one pass over a dataset recorded (lists while collecting, tensors once stacked)."""

    features: Any
    labels: Any
    preds: Any
    num_classes: int | None = None

    def stacked(self) -> _Collected:
        return _Collected(
            torch.cat(self.features),
            torch.cat(self.labels) if self.labels else None,
            torch.cat(self.preds) if self.preds else None,
            self.num_classes,
        )


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
            required for embedding scores.
        pool: How the layer's output becomes ``(B, D)``; see
            :func:`selectorch.recorder.pool_features`.

    Raises:
        ValueError: No ``layer`` for an embedding score, or an unknown layer.
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
        layer: str | None = None,
        pool: Pool = "auto",
    ) -> None:
        super().__init__()
        if not isinstance(score, Score):
            raise TypeError(
                f"Expected argument `score` to be a selectorch Score, got {type(score).__name__}."
            )
        check_not_compiled(model)
        if layer is None and score.input == "embedding":
            raise ValueError(
                f"{type(score).__name__} scores embeddings: pass layer=... naming the layer to "
                "record, e.g. layer='avgpool' for a torchvision ResNet (see "
                "selectorch.list_layers(model))."
            )
        hooks = LayerHooks(model, {layer: _FEATURES}, pool) if layer is not None else None
        self.model = model
        self.score = score.to(module_device(model))
        self.layer = layer
        # not a submodule: its hooks live on `model`
        object.__setattr__(self, "_hooks", hooks)

    @property
    def threshold_(self) -> torch.Tensor:
        """The score's threshold buffer (empty until calibrated)."""
        return self.score.threshold_

    def get_threshold(self) -> float:
        """The current threshold as a float; raises ``NotFittedError`` before calibration."""
        return self.score.get_threshold()

    def _run(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, torch.Tensor]:
        """Run the model once; return its output and what the score reads."""
        hooks = self._hooks
        if hooks is not None:
            if hooks.closed:
                raise RuntimeError("This SelectiveModel was closed; its hooks are gone.")
            output, records = hooks.run(self.model, args, kwargs)
            return output, records[_FEATURES]
        output = self.model(*args, **kwargs)
        logits = logits_from_output(output)
        if logits is None:
            raise TypeError(
                f"Cannot find logits in the model's output of type {type(output).__name__}; "
                "pass layer=... naming the layer whose output is the logits."
            )
        return output, logits

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
            preds = _predictions(logits, scores.shape[0])
        return SelectiveOutput(output, scores, self.score.selected(scores, preds))

    @torch.no_grad()
    def _collect(
        self, data: Any, y: torch.Tensor | None, batch_size: int, progress: bool, desc: str
    ) -> _Collected:
        """Run the model over ``data``; stack the score inputs, labels and predictions."""
        check_int("batch_size", batch_size)
        device = module_device(self.model)
        parts = _Collected([], [], [])
        total = (
            len(data) if hasattr(data, "__len__") and not isinstance(data, torch.Tensor) else None
        )
        batches = iter_batches(data, y, batch_size=batch_size)
        with _eval_mode(self.model):
            for batch in tqdm(batches, desc=desc, total=total, disable=not progress, leave=False):
                args, kwargs = to_device(batch.args, device), to_device(batch.kwargs, device)
                output, feats = self._run(args, kwargs)
                parts.features.append(feats)
                if batch.labels is not None:
                    parts.labels.append(batch.labels.to(feats.device))
                logits = logits_from_output(output)
                if logits is not None and logits.ndim == 2 and logits.shape[0] == feats.shape[0]:
                    parts.preds.append(logits.argmax(dim=1).to(feats.device))
                    parts.num_classes = logits.shape[1]
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
            data: A DataLoader (batches: tensor, ``(x, y, ...)`` tuple or dict) or an
                ``(N, ...)`` tensor of inputs.
            y: Optional ``(N,)`` labels with a tensor ``data``.
            batch_size: Rows per model call for a tensor ``data``.
            progress: Show a progress bar.

        Returns:
            ``self``.
        """
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
          (``argmax(logits) != label``) is at most ``r`` with probability ``1 - d``; needs labels.
          Nothing is kept if no threshold can be certified.

        See :meth:`selectorch.scores.Score.calibrate` and :meth:`calibration_report`.

        Args:
            data: Held-out data, as for :meth:`fit`.
            y: Optional labels with a tensor ``data``.
            coverage: Target fraction of kept samples, in (0, 1].
            risk: Target selective risk, in (0, 1).
            delta: Allowed failure probability of the risk promise.
            per_class: One threshold per predicted class (``argmax`` of the logits).
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
