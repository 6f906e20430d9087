"""SelectiveModel: a model's output, an uncertainty score and a keep/reject decision in one pass."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, NamedTuple

import torch
from torch import nn
from tqdm.auto import tqdm

from selectorch._checks import check_fraction, check_int
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
        logits = logits_from_output(output) if self._hooks is not None else None
        ok = _finite_rows((*args, *kwargs.values(), logits), scores.shape[0], scores.device)
        scores = torch.where(ok, scores, torch.full_like(scores, float("inf")))
        return SelectiveOutput(output, scores, self.score.selected(scores))

    @torch.no_grad()
    def _collect(
        self, data: Any, y: torch.Tensor | None, batch_size: int, progress: bool, desc: str
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Run the model over ``data``; return the stacked score inputs and labels (if any)."""
        check_int("batch_size", batch_size)
        device = module_device(self.model)
        features: list[torch.Tensor] = []
        labels: list[torch.Tensor] = []
        total = (
            len(data) if hasattr(data, "__len__") and not isinstance(data, torch.Tensor) else None
        )
        batches = iter_batches(data, y, batch_size=batch_size)
        with _eval_mode(self.model):
            for batch in tqdm(batches, desc=desc, total=total, disable=not progress, leave=False):
                args, kwargs = to_device(batch.args, device), to_device(batch.kwargs, device)
                _, feats = self._run(args, kwargs)
                features.append(feats)
                if batch.labels is not None:
                    labels.append(batch.labels.to(feats.device))
        if not features:
            raise ValueError(
                f"Expected argument `data` to yield at least one batch for {desc}, got none."
            )
        if labels and len(labels) != len(features):
            raise ValueError(
                f"Only {len(labels)} of {len(features)} batches carried labels; give labels for "
                "every batch or for none."
            )
        return torch.cat(features), (torch.cat(labels) if labels else None)

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
        features, labels = self._collect(data, y, batch_size, progress, "fit")
        self.score.fit(features, labels)
        return self

    def calibrate(
        self,
        data: Any,
        y: torch.Tensor | None = None,
        *,
        coverage: float,
        batch_size: int = 256,
        progress: bool = True,
    ) -> SelectiveModel:
        """Set the threshold on held-out data so that at least ``coverage`` of new samples are kept.

        Uses the finite-sample rank ``ceil((n + 1) * coverage)`` of the ``n`` calibration scores;
        see :meth:`selectorch.scores.Score.calibrate`.

        Args:
            data: Held-out data, as for :meth:`fit`.
            y: Optional labels with a tensor ``data`` (not needed for a coverage target).
            coverage: Target fraction of kept samples, in (0, 1].
            batch_size: Rows per model call for a tensor ``data``.
            progress: Show a progress bar.

        Returns:
            ``self``.
        """
        coverage = check_fraction("coverage", coverage)
        self.score._check_fitted()
        features, _ = self._collect(data, y, batch_size, progress, "calibrate")
        self.score.calibrate(features, coverage=coverage)
        return self

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
