"""Any torchmetrics metric reported on all, selected and rejected samples."""

from __future__ import annotations

import copy
import warnings
from typing import Any, ClassVar

import torch
from torch import nn
from torchmetrics import Metric, MetricCollection
from torchmetrics.classification import MulticlassCalibrationError

from selectorch._checks import check_choice, check_int
from selectorch.metrics._inputs import check_tensor

__all__ = ["SUBSETS", "SelectiveCalibrationError", "SelectiveMetric"]

#: The keys of :meth:`SelectiveMetric.compute`, in order.
SUBSETS = ("full", "selected", "rejected")


class SelectiveMetric(Metric):
    """Report a metric on all samples, on the selected (kept) ones and on the rejected ones.

    The three copies of ``metric`` are registered sub-modules (``metrics.full``,
    ``metrics.selected``, ``metrics.rejected``), so they move with ``.to()``, appear in
    ``state_dict`` when their states are persistent, and each synchronizes its own states
    under DDP when computed. The wrapper itself counts the samples of each subset (summed
    across ranks); a subset that never received a sample reports ``nan``.

    Args:
        metric: A torchmetrics ``Metric`` or ``MetricCollection`` taking per-sample inputs
            (every tensor argument of its ``update`` has the samples along dimension 0).
            It is copied; the instance passed in is left untouched.
        **kwargs: Passed to :class:`torchmetrics.Metric`.

    Raises:
        TypeError: ``metric`` is not a torchmetrics metric.

    Example:
        >>> from torchmetrics.classification import MulticlassAccuracy
        >>> m = SelectiveMetric(MulticlassAccuracy(num_classes=3, average="micro"))
        >>> preds, target = torch.tensor([0, 1, 2, 1]), torch.tensor([0, 1, 1, 0])
        >>> m.update(preds, target, selected=torch.tensor([True, True, False, False]))
        >>> {k: v.item() for k, v in m.compute().items()}
        {'full': 0.5, 'selected': 1.0, 'rejected': 0.0}
    """

    is_differentiable: ClassVar[bool] = False
    full_state_update: ClassVar[bool] = False

    n_full: torch.Tensor
    n_selected: torch.Tensor
    n_rejected: torch.Tensor

    def __init__(self, metric: Metric | MetricCollection, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if not isinstance(metric, (Metric, MetricCollection)):
            raise TypeError(
                "Expected argument `metric` to be a torchmetrics Metric or MetricCollection, "
                f"got {type(metric).__name__}."
            )
        copies = {name: copy.deepcopy(metric) for name in SUBSETS}
        for sub in copies.values():
            sub.reset()
        self.metrics = nn.ModuleDict(copies)
        for name in SUBSETS:
            self.add_state(f"n_{name}", default=torch.tensor(0), dist_reduce_fx="sum")

    def _subsets(
        self, args: tuple[Any, ...], kwargs: dict[str, Any], selected: Any
    ) -> dict[str, tuple[tuple[Any, ...], dict[str, Any]]]:
        """Split every tensor argument along dimension 0 into the three subsets."""
        selected = check_tensor("selected", selected)
        if selected.dtype != torch.bool or selected.ndim != 1:
            raise ValueError(
                "Expected argument `selected` to be a (N,) bool tensor, got shape "
                f"{tuple(selected.shape)} and dtype {selected.dtype}."
            )
        n = selected.shape[0]
        named = [(f"argument {i}", a) for i, a in enumerate(args)]
        named += [(f"argument `{k}`", v) for k, v in kwargs.items()]
        for label, value in named:
            if isinstance(value, torch.Tensor) and (value.ndim == 0 or value.shape[0] != n):
                raise ValueError(
                    f"Expected {label} to have {n} rows like `selected`, got shape "
                    f"{tuple(value.shape)}."
                )
        masks = {"full": None, "selected": selected, "rejected": ~selected}

        def cut(value: Any, mask: torch.Tensor | None) -> Any:
            if mask is None or not isinstance(value, torch.Tensor):
                return value
            return value[mask.to(value.device)]

        return {
            name: (
                tuple(cut(a, mask) for a in args),
                {k: cut(v, mask) for k, v in kwargs.items()},
            )
            for name, mask in masks.items()
        }

    def _counts(self, selected: torch.Tensor) -> dict[str, int]:
        n_selected = int(selected.sum())
        counts = {
            "full": selected.shape[0],
            "selected": n_selected,
            "rejected": selected.shape[0] - n_selected,
        }
        for name, count in counts.items():
            setattr(self, f"n_{name}", getattr(self, f"n_{name}") + count)
        return counts

    def update(self, *args: Any, selected: torch.Tensor, **kwargs: Any) -> None:
        """Update each copy with its rows of every tensor argument.

        Args:
            *args: What ``metric.update`` takes, samples along dimension 0.
            selected: ``(N,)`` bool, ``True`` where the prediction is kept.
            **kwargs: Keyword arguments of ``metric.update``, split the same way.

        Raises:
            ValueError: ``selected`` is not ``(N,)`` bool or a tensor argument lacks ``N`` rows.
        """
        parts = self._subsets(args, kwargs, selected)
        counts = self._counts(selected)
        for name, (sub_args, sub_kwargs) in parts.items():
            if counts[name]:
                self.metrics[name].update(*sub_args, **sub_kwargs)

    def forward(self, *args: Any, selected: torch.Tensor, **kwargs: Any) -> dict[str, Any]:
        """Update with a batch and return the metric on that batch's three subsets.

        A subset without rows in the batch gives ``nan``.
        """
        parts = self._subsets(args, kwargs, selected)
        counts = self._counts(selected)
        self._update_count += 1
        self._computed = None
        nan = torch.tensor(float("nan"), device=self.device)
        return {
            name: self.metrics[name](*sub_args, **sub_kwargs) if counts[name] else nan
            for name, (sub_args, sub_kwargs) in parts.items()
        }

    def compute(self) -> dict[str, Any]:
        """The metric on ``"full"``, ``"selected"`` and ``"rejected"`` samples (``nan`` if none).

        Every rank computes the same subsets (the counts are summed across ranks first), so the
        sub-metrics' synchronization never deadlocks.
        """
        out: dict[str, Any] = {}
        for name in SUBSETS:
            sub = self.metrics[name]
            if int(getattr(self, f"n_{name}")) == 0:
                out[name] = torch.tensor(float("nan"), device=self.device)
                continue
            with warnings.catch_warnings():
                # under DDP a rank may hold no rows of a subset that other ranks have
                warnings.filterwarnings("ignore", message="The ``compute`` method of metric")
                out[name] = sub.compute()
        return out

    def reset(self) -> None:
        """Reset the counts and the three copies."""
        super().reset()
        for sub in self.metrics.values():
            sub.reset()

    def persistent(self, mode: bool = False) -> None:
        """Save the states of the wrapper and of the three copies in ``state_dict`` (or not)."""
        super().persistent(mode)
        for sub in self.metrics.values():
            sub.persistent(mode)

    def set_dtype(self, dst_type: str | torch.dtype) -> SelectiveMetric:
        """Cast the floating states of the three copies (torchmetrics' guarded ``type``)."""
        for sub in self.metrics.values():
            sub.set_dtype(dst_type)
        return super().set_dtype(dst_type)


class SelectiveCalibrationError(SelectiveMetric):
    """Expected calibration error of all, selected and rejected predictions.

    :class:`SelectiveMetric` over torchmetrics' ``MulticlassCalibrationError``; its
    ``"selected"`` entry is the calibration of the predictions that are kept.

    Args:
        num_classes: Number of classes, at least 2.
        n_bins: Number of confidence bins.
        norm: ``"l1"`` (ECE), ``"l2"`` (RMS calibration error) or ``"max"`` (MCE).
        **kwargs: Passed to :class:`torchmetrics.Metric`.

    Raises:
        ValueError: An argument out of range.

    Example:
        >>> m = SelectiveCalibrationError(num_classes=2, n_bins=10)
        >>> probs = torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4]])
        >>> m.update(probs, torch.tensor([0, 1, 1]), selected=torch.tensor([True, True, False]))
        >>> round(m.compute()["selected"].item(), 4)
        0.15
    """

    def __init__(
        self, num_classes: int, *, n_bins: int = 15, norm: str = "l1", **kwargs: Any
    ) -> None:
        check_int("num_classes", num_classes, minimum=2)
        check_int("n_bins", n_bins)
        check_choice("norm", norm, ("l1", "l2", "max"))
        super().__init__(
            MulticlassCalibrationError(num_classes=num_classes, n_bins=n_bins, norm=norm),
            **kwargs,
        )
