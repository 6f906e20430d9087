"""PyTorch Lightning integration: selective test and predict loops, and calibration after training.

Needs Lightning (``pip install 'selectorch[lightning]'``); ``import selectorch`` never imports
this module, so Lightning stays optional.

* :class:`SelectiveInferenceTask` wraps a trained ``LightningModule`` and a fitted, calibrated
  :class:`~selectorch.SelectiveModel`: ``trainer.test`` reports the task's metrics on all,
  selected and rejected samples (plus coverage, AURC and AUGRC), ``trainer.predict`` returns
  ``{"predictions", "score", "selected"}`` per batch.
* :class:`SelectiveCalibrationCallback` fits the score and calibrates its threshold when
  ``trainer.fit`` ends.

Example:
    >>> import lightning as L
    >>> from torch.utils.data import DataLoader, TensorDataset
    >>> from torchmetrics.classification import MulticlassAccuracy
    >>> class Task(L.LightningModule):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    ...         self.test_metrics = MulticlassAccuracy(num_classes=2)
    ...     def forward(self, x):
    ...         return self.net(x)
    >>> task = Task()
    >>> sel = st.SelectiveModel(task, st.scores.EnergyScore())
    >>> x, y = torch.randn(64, 4), torch.arange(64) % 2
    >>> sel = sel.fit(x, progress=False).calibrate(x, coverage=0.9, progress=False)
    >>> trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False,
    ...                     enable_model_summary=False)
    >>> loader = DataLoader(TensorDataset(x, y), batch_size=32)
    >>> metrics = trainer.test(SelectiveInferenceTask(task, sel), loader, verbose=False)
    >>> sorted(metrics[0])[:3]
    ['full/MulticlassAccuracy', 'rejected/MulticlassAccuracy', 'selected/MulticlassAccuracy']
    >>> batches = trainer.predict(SelectiveInferenceTask(task, sel), loader)
    >>> sorted(batches[0]), batches[0]["score"].shape
    (['predictions', 'score', 'selected'], torch.Size([32]))
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn
from torchmetrics import MeanMetric, Metric, MetricCollection

from selectorch.data import split_batch
from selectorch.metrics import AUGRC, AURC, SelectiveMetric
from selectorch.selective import SelectiveModel, SelectiveOutput

try:
    import lightning as L
except ImportError as err:  # pragma: no cover - exercised by a test that hides lightning
    raise ImportError(
        "selectorch.lightning needs Lightning: pip install 'selectorch[lightning]'."
    ) from err

__all__ = ["SelectiveCalibrationCallback", "SelectiveInferenceTask"]


def _check_selective_model(selective_model: Any) -> SelectiveModel:
    if not isinstance(selective_model, SelectiveModel):
        raise TypeError(
            "Expected argument `selective_model` to be a selectorch.SelectiveModel, got "
            f"{type(selective_model).__name__}."
        )
    return selective_model


def _is_classification(output: Any, labels: torch.Tensor) -> bool:
    """Whether ``output`` is ``(N, C)`` class scores or ``(N,)`` class ids for ``(N,)`` labels."""
    if not isinstance(output, torch.Tensor) or labels.ndim != 1 or labels.is_floating_point():
        return False
    if output.shape[0] != labels.shape[0]:
        return False
    return output.ndim == 2 or (output.ndim == 1 and not output.is_floating_point())


class SelectiveInferenceTask(L.LightningModule):
    """Test and predict a trained task with selective prediction.

    ``trainer.test(task, dataloaders=...)`` logs, at the end of the epoch, every metric of
    ``metrics`` on the full, selected and rejected samples (``full/NAME``, ``selected/NAME``,
    ``rejected/NAME``; ``nan`` for an empty subset), plus ``selective/coverage`` and, for
    classifiers, ``selective/aurc`` and ``selective/augrc``. With several test dataloaders
    each gets its own metrics and the keys end in ``/dataloader_idx_N`` (Lightning repeats
    epoch-level values in the result dict of every dataloader).

    ``trainer.predict(task, dataloaders=...)`` returns, per batch,
    ``{"predictions": output of the model, "score": (B,), "selected": (B,) bool}``.

    Batches are split as in :meth:`SelectiveModel.fit`: a tensor, an ``(x, y, ...)`` tuple or
    a dict with an input key; test batches need labels.

    Args:
        task: The trained ``LightningModule`` (or any ``nn.Module``).
        selective_model: A fitted and calibrated :class:`~selectorch.SelectiveModel` wrapping
            ``task`` or one of its sub-modules (so that predictions come from the task).
        metrics: A torchmetrics ``Metric`` or ``MetricCollection`` taking ``(output, labels)``;
            default: the task's ``test_metrics`` attribute. It is copied; the task's own
            instance is left untouched.

    Raises:
        TypeError: ``selective_model`` is not a SelectiveModel, or ``metrics`` no metric.
        ValueError: ``selective_model`` wraps another network, or no metric is found.
    """

    def __init__(
        self,
        task: nn.Module,
        selective_model: SelectiveModel,
        *,
        metrics: Metric | MetricCollection | None = None,
    ) -> None:
        super().__init__()
        selective_model = _check_selective_model(selective_model)
        if not any(module is selective_model.model for module in task.modules()):
            raise ValueError(
                "Expected argument `selective_model` to wrap `task` or one of its sub-modules, "
                f"got a SelectiveModel around a {type(selective_model.model).__name__} that is "
                f"not part of the {type(task).__name__}."
            )
        metric = metrics if metrics is not None else getattr(task, "test_metrics", None)
        if metric is None:
            raise ValueError(
                f"Expected argument `metrics` (a torchmetrics Metric or MetricCollection), or a "
                f"`test_metrics` attribute on the {type(task).__name__}; got neither."
            )
        if not isinstance(metric, (Metric, MetricCollection)):
            raise TypeError(
                "Expected argument `metrics` to be a torchmetrics Metric or MetricCollection, "
                f"got {type(metric).__name__}."
            )
        self.task = task
        self.selective_model = selective_model
        self._template = copy.deepcopy(metric)
        self._template.reset()
        self.test_results = nn.ModuleDict()  # one set of metrics per test dataloader

    def forward(self, *args: Any, **kwargs: Any) -> SelectiveOutput:
        """``(output, score, selected)`` of the selective model on one batch of inputs."""
        return self.selective_model(*args, **kwargs)

    def _run(self, batch: Any) -> tuple[SelectiveOutput, torch.Tensor | None]:
        parts = split_batch(batch)
        return self.selective_model(*parts.args, **parts.kwargs), parts.labels

    def _metrics(self, dataloader_idx: int) -> nn.ModuleDict:
        key = str(dataloader_idx)
        if key not in self.test_results:
            self.test_results[key] = nn.ModuleDict(
                {
                    "task": SelectiveMetric(self._template),
                    "coverage": MeanMetric(),
                    "aurc": AURC(),
                    "augrc": AUGRC(),
                }
            ).to(self.device)
        return self.test_results[key]

    def test_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        """Update the metrics with one batch (its labels are required)."""
        out, labels = self._run(batch)
        if labels is None:
            raise ValueError(
                "Expected test batches with labels ((x, y) tuples or a 'label' key), got a batch "
                "without them."
            )
        metrics = self._metrics(dataloader_idx)
        metrics["task"].update(out.output, labels, selected=out.selected)
        metrics["coverage"].update(out.selected.float())
        if _is_classification(out.output, labels):
            metrics["aurc"].update(out.score, out.output, labels)
            metrics["augrc"].update(out.score, out.output, labels)

    def on_test_epoch_start(self) -> None:
        for metrics in self.test_results.values():
            for metric in metrics.values():
                metric.reset()

    def on_test_epoch_end(self) -> None:
        """Compute and log every metric, then reset them."""
        logs: dict[str, torch.Tensor] = {}
        several = len(self.test_results) > 1
        if isinstance(self._template, MetricCollection):
            names = list(self._template.keys(keep_base=False))
        else:
            names = [type(self._template).__name__]
        for key, metrics in self.test_results.items():
            suffix = f"/dataloader_idx_{key}" if several else ""
            for subset, value in metrics["task"].compute().items():
                # an empty subset gives one nan, also for a collection
                values = value if isinstance(value, dict) else dict.fromkeys(names, value)
                for name, v in values.items():
                    logs[f"{subset}/{name}{suffix}"] = v
            logs[f"selective/coverage{suffix}"] = metrics["coverage"].compute()
            for name in ("aurc", "augrc"):
                if metrics[name].update_count:
                    logs[f"selective/{name}{suffix}"] = metrics[name].compute()
        self.log_dict({k: v.float() for k, v in logs.items()}, add_dataloader_idx=False)

    def predict_step(
        self, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> dict[str, Any]:
        """``{"predictions": model output, "score": (B,), "selected": (B,) bool}``."""
        out, _ = self._run(batch)
        return {"predictions": out.output, "score": out.score, "selected": out.selected}


def _first_loader(loaders: Any) -> Any:
    """The first DataLoader of what Lightning holds (one loader, a list or a dict)."""
    if loaders is None:
        return None
    if isinstance(loaders, dict):
        return next(iter(loaders.values()), None)
    if isinstance(loaders, (list, tuple)):
        return loaders[0] if loaders else None
    return loaders


class SelectiveCalibrationCallback(L.Callback):
    """Fit the score and calibrate its threshold when training ends.

    At ``on_train_end`` the selective model runs over ``fit_data`` (default: the trainer's
    training dataloader) to fit its score, then over ``calibrate_data`` (default: the first
    validation dataloader) to set the threshold for ``coverage`` (or ``risk``).

    Pass loaders without augmentation where the training loader has it: the score should see
    the data as the model sees it at test time. Under DDP each rank fits on what its loaders
    give it; pass plain (unsharded) loaders to give every rank the same reference data.

    Args:
        selective_model: A :class:`~selectorch.SelectiveModel` around the trained network.
        fit_data: Reference data (a DataLoader, tensor or recording), or ``None``.
        calibrate_data: Held-out data for the threshold, or ``None``.
        coverage: Target coverage; ignored when ``risk`` is given.
        risk: Target selective risk (needs labels in ``calibrate_data``).
        delta: Failure probability allowed for ``risk``.
        progress: Show progress bars while fitting and calibrating.

    Raises:
        TypeError: ``selective_model`` is not a SelectiveModel.
        ValueError: At the end of training, no data to calibrate on.
    """

    def __init__(
        self,
        selective_model: SelectiveModel,
        *,
        fit_data: Iterable[Any] | torch.Tensor | None = None,
        calibrate_data: Iterable[Any] | torch.Tensor | None = None,
        coverage: float = 0.95,
        risk: float | None = None,
        delta: float = 0.1,
        progress: bool = False,
    ) -> None:
        super().__init__()
        self.selective_model = _check_selective_model(selective_model)
        self.fit_data, self.calibrate_data = fit_data, calibrate_data
        self.target: dict[str, Any] = (
            {"coverage": coverage} if risk is None else {"risk": risk, "delta": delta}
        )
        self.progress = progress

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Fit and calibrate the score with the trained weights."""
        fit_data = self.fit_data if self.fit_data is not None else trainer.train_dataloader
        calibrate_data = self.calibrate_data
        if calibrate_data is None:
            calibrate_data = _first_loader(trainer.val_dataloaders)
        if fit_data is None or calibrate_data is None:
            missing = "fit_data" if fit_data is None else "calibrate_data"
            raise ValueError(
                f"SelectiveCalibrationCallback has no {missing}: pass it, or give the trainer "
                "training and validation dataloaders."
            )
        self.selective_model.fit(fit_data, progress=self.progress)
        self.selective_model.calibrate(calibrate_data, progress=self.progress, **self.target)
