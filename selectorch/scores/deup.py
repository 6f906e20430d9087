"""DEUP: a learned predictor of the base model's per-sample loss (Lahlou et al. 2023)."""

from __future__ import annotations

import contextlib
import numbers
from collections.abc import Iterator
from typing import Any, ClassVar

import torch

from selectorch._checks import check_int, check_positive_float
from selectorch.functional.deup import (
    deup_score,
    head_losses,
    kfold_indices,
    out_of_fold_predictions,
    train_error_predictor,
)
from selectorch.scores.base import Score
from selectorch.scores.registry import register_score

_PARAMS = (
    "layer0_weight_",
    "layer0_bias_",
    "layer1_weight_",
    "layer1_bias_",
    "output_weight_",
    "output_bias_",
)


def _check_nonnegative(name: str, value: Any, *, allow_inf: bool = False) -> float:
    """Return ``value`` as a float if it is a number ``>= 0`` (finite unless ``allow_inf``)."""
    top = float("inf")
    number = isinstance(value, numbers.Real) and not isinstance(value, bool)
    if not number or not (0 <= value < top or (allow_inf and value == top)):
        kind = "a number >= 0 (or inf)" if allow_inf else "a finite number >= 0"
        raise ValueError(f"Expected argument `{name}` to be {kind}, got {value!r}.")
    return float(value)


@contextlib.contextmanager
def _one_thread_on_cpu(device: torch.device) -> Iterator[None]:
    """Run torch on one CPU thread inside the block (restored after).

    The operations of a small MLP are too small for intra-op threads to pay off reliably: on a
    busy 2-core machine, training ran 7x slower with two threads than with one.
    """
    if device.type != "cpu":
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@register_score("deup")
class DEUPScore(Score):
    """Direct Epistemic Uncertainty Prediction: an MLP that predicts the model's loss on a sample.

    ``fit(X, losses)`` takes embeddings of **held-out** data (not the model's training set,
    where its losses are too small) and the base model's per-sample loss on each row
    (cross-entropy for a classifier). As in torch-uncertainty's DEUP (Algorithm 2 of Lahlou et
    al. 2023): the rows are split into ``folds`` folds; for each fold an error predictor is
    trained on the other folds and predicts the held-out fold, which gives every row an
    out-of-fold estimate of the loss, a proxy of the generalisation error; the final predictor
    ``g`` is trained on all rows to predict those estimates. The score is the loss ``g``
    predicts, ``>= 0``: higher means the model is more likely to be wrong.

    The predictor (two hidden ReLU layers of width ``hidden``, softplus output) is trained by
    mean squared error with Adam for a fixed number of epochs, on standardised features. With
    ``log_targets`` it regresses ``log1p(loss / mean loss)``, and its output is mapped back to
    a loss: cross-entropy is heavy-tailed, and a few confident mistakes would otherwise
    dominate the squared error (on noisy MNIST: AUROC for errors 0.77 against 0.74). Folds,
    initialisation and batch order come from ``torch.Generator().manual_seed(seed)``, so a fit
    is reproducible (bit for bit on the CPU, where training runs on one thread; the defaults fit
    2000 x 128 rows in about 1.5 s on one core). The weights are buffers,
    so ``state_dict``, ``.to()`` and ``torch.compile`` treat them like any fitted state.

    **Far from the training data** a ReLU network extrapolates in an arbitrary direction, so
    ``g`` runs on features clamped into the per-feature range seen at fit, and the score adds
    one mean loss per standard deviation that the input lies outside that range beyond
    ``support_margin`` standard deviations: far-away inputs score high instead of arbitrarily
    (fail closed), while inputs near the data are untouched. (Without the margin, the 3.5% of
    held-out noisy digits that exceed the range a little, often confident ones, cost 0.02
    AUROC.)

    **Integer labels.** ``y`` holds per-sample losses (float). If it holds integer class labels
    instead, the losses are the cross-entropy of a linear classifier head given by
    :meth:`set_head` (the model's last layer, when ``X`` is its input); without a head that is
    an error.

    Args:
        hidden: Width of the hidden layers.
        folds: Number of folds for the out-of-fold targets, at least 2.
        epochs: Training passes over the rows, for each of the ``folds + 1`` predictors.
        lr: Adam's learning rate.
        batch_size: Rows per training step.
        weight_decay: Adam's L2 penalty.
        seed: Seed of the training's random generator.
        log_targets: Regress ``log1p(loss / mean loss)`` instead of ``loss / mean loss``.
        support_margin: Standard deviations outside the fitted feature range before the score
            starts to grow; ``float("inf")`` turns that term off.

    Attributes:
        feature_mean_, feature_scale_: ``(D,)`` standardisation of the inputs.
        feature_low_, feature_high_: ``(D,)`` per-feature range of the fit rows.
        target_scale_: 0-dim mean training loss (the unit of the predictor's output).
        layer0_weight_ ... output_bias_: the predictor's weights, ``(H, D)`` to ``(1,)``.
        head_weight_, head_bias_: ``(C, D)`` and ``(C,)`` head set by :meth:`set_head` (empty
            otherwise).

    Example:
        >>> X = torch.randn(500, 16)
        >>> losses = (X[:, 0] > 1).float() * 2.0  # the model fails where feature 0 is large
        >>> score = DEUPScore(epochs=20).fit(X, losses)
        >>> score(torch.randn(4, 16)).shape
        torch.Size([4])
    """

    input = "embedding"
    fitted_buffers = ("feature_mean_", "layer0_weight_", "output_weight_")
    #: ``fit`` needs the base model's per-sample losses as ``y`` (or class labels and a head).
    needs_losses: ClassVar[bool] = True

    feature_mean_: torch.Tensor
    feature_scale_: torch.Tensor
    feature_low_: torch.Tensor
    feature_high_: torch.Tensor
    target_scale_: torch.Tensor
    head_weight_: torch.Tensor
    head_bias_: torch.Tensor

    def __init__(
        self,
        *,
        hidden: int = 64,
        folds: int = 5,
        epochs: int = 60,
        lr: float = 1e-3,
        batch_size: int = 512,
        weight_decay: float = 0.0,
        seed: int = 0,
        log_targets: bool = True,
        support_margin: float = 3.0,
    ) -> None:
        super().__init__()
        self.hidden = check_int("hidden", hidden)
        self.folds = check_int("folds", folds, minimum=2)
        self.epochs = check_int("epochs", epochs)
        self.lr = check_positive_float("lr", lr)
        self.batch_size = check_int("batch_size", batch_size)
        self.weight_decay = _check_nonnegative("weight_decay", weight_decay)
        self.seed = check_int("seed", seed, minimum=0)
        if not isinstance(log_targets, bool):
            raise ValueError(f"Expected argument `log_targets` to be a bool, got {log_targets!r}.")
        self.log_targets = log_targets
        self.support_margin = _check_nonnegative("support_margin", support_margin, allow_inf=True)
        for name in ("feature_mean_", "feature_scale_", "feature_low_", "feature_high_"):
            self.register_buffer(name, torch.empty(0))
        self.register_buffer("target_scale_", torch.empty(0))
        for name in _PARAMS:
            self.register_buffer(name, torch.empty(0, 0) if "weight" in name else torch.empty(0))
        self.register_buffer("head_weight_", torch.empty(0, 0))
        self.register_buffer("head_bias_", torch.empty(0))

    def _expected_dim(self) -> int | None:
        return self.feature_mean_.shape[0] if self.is_fitted else None

    @torch.no_grad()
    def set_head(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> DEUPScore:
        """Set a linear classifier head, used by ``fit`` to turn integer labels into losses.

        Args:
            weight: ``(C, D)`` weight of the model's final linear layer.
            bias: ``(C,)`` bias, or ``None`` for zeros.

        Returns:
            ``self``.

        Raises:
            TypeError: ``weight`` is not a floating-point tensor.
            ValueError: The shapes do not fit.

        Example:
            >>> fc = torch.nn.Linear(16, 3)
            >>> score = DEUPScore(epochs=5).set_head(fc.weight, fc.bias)
            >>> score = score.fit(torch.randn(50, 16), torch.randint(3, (50,)))
        """
        if not isinstance(weight, torch.Tensor) or not weight.is_floating_point():
            got = weight.dtype if isinstance(weight, torch.Tensor) else type(weight).__name__
            raise TypeError(f"Expected argument `weight` to be a floating-point tensor, got {got}.")
        if weight.ndim != 2 or 0 in weight.shape:
            raise ValueError(
                f"Expected argument `weight` to have shape (C, D), got {tuple(weight.shape)}."
            )
        if bias is None:
            bias = torch.zeros(weight.shape[0], dtype=weight.dtype, device=weight.device)
        if not isinstance(bias, torch.Tensor) or bias.shape != (weight.shape[0],):
            got = tuple(bias.shape) if isinstance(bias, torch.Tensor) else type(bias).__name__
            raise ValueError(
                f"Expected argument `bias` to have shape ({weight.shape[0]},) like the rows of "
                f"`weight`, got {got}."
            )
        dtype, device = self.threshold_.dtype, self.threshold_.device
        self.head_weight_ = weight.detach().to(device=device, dtype=dtype).clone()
        self.head_bias_ = bias.detach().to(device=device, dtype=dtype).clone()
        return self

    def _losses(self, X: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        name = type(self).__name__
        if y is None:
            raise ValueError(
                f"{name} needs the base model's per-sample losses: expected argument `y` to be "
                "an (N,) float tensor of losses on the rows of `X`, got None. Call fit(X, losses)."
            )
        if y.ndim != 1 or y.dtype == torch.bool or y.is_complex():
            raise ValueError(
                f"Expected argument `y` to be (N,) float losses or (N,) integer labels, got shape "
                f"{tuple(y.shape)} and dtype {y.dtype}."
            )
        if not y.is_floating_point():
            if self.head_weight_.numel() == 0:
                raise ValueError(
                    f"{name} got integer labels as `y` but no classifier head to compute losses "
                    "from: pass the base model's per-sample losses as a float tensor, or call "
                    "set_head(weight, bias) first."
                )
            n_classes = self.head_weight_.shape[0]
            if y.numel() and not bool(((y >= 0) & (y < n_classes)).all()):
                raise ValueError(
                    f"Expected argument `y` to hold labels in [0, {n_classes}) (the head's "
                    f"classes), got values from {int(y.min())} to {int(y.max())}."
                )
            if self.head_weight_.shape[1] != X.shape[1]:
                raise ValueError(
                    f"Expected the head's weight to have {X.shape[1]} columns like `X`, got "
                    f"{tuple(self.head_weight_.shape)}."
                )
            return head_losses(X, y, self.head_weight_, self.head_bias_)
        bad = ~torch.isfinite(y) | (y < 0)
        if bool(bad.any()):
            raise ValueError(
                f"Expected argument `y` to hold finite losses >= 0, got {int(bad.sum())} other "
                f"values (first rows: {bad.nonzero().flatten()[:5].tolist()})."
            )
        return y

    def _fit(self, X: torch.Tensor, y: torch.Tensor | None) -> None:
        losses = self._losses(X, y)
        if X.shape[0] < self.folds:
            raise ValueError(
                f"Expected at least folds = {self.folds} rows in `X`, got {X.shape[0]}."
            )
        work = torch.promote_types(X.dtype, torch.float32)  # train in float32 at least
        X, losses = X.to(work), losses.to(work)
        mean = X.mean(dim=0)
        std = X.std(dim=0, unbiased=False)
        scale = torch.where(std > 0, std, torch.ones_like(std))
        z = (X - mean) / scale
        target_scale = losses.mean()
        target_scale = torch.where(target_scale > 0, target_scale, torch.ones_like(target_scale))
        generator = torch.Generator().manual_seed(self.seed)
        options = {
            "hidden": self.hidden,
            "epochs": self.epochs,
            "lr": self.lr,
            "batch_size": self.batch_size,
            "weight_decay": self.weight_decay,
            "generator": generator,
        }
        parts = kfold_indices(X.shape[0], self.folds, generator)
        with _one_thread_on_cpu(X.device):
            targets = losses / target_scale
            targets = torch.log1p(targets) if self.log_targets else targets
            targets = out_of_fold_predictions(z, targets, parts, **options)
            params = train_error_predictor(z, targets, **options)
        for name, value in (
            ("feature_mean_", mean),
            ("feature_scale_", scale),
            ("feature_low_", X.min(dim=0).values),
            ("feature_high_", X.max(dim=0).values),
            ("target_scale_", target_scale),
            *zip(_PARAMS, params, strict=True),
        ):
            self._set_buffer(name, value)

    def _score(self, X: torch.Tensor) -> torch.Tensor:
        dtype = torch.promote_types(X.dtype, self.feature_mean_.dtype)
        params = [getattr(self, name).to(dtype) for name in _PARAMS]
        return deup_score(
            X.to(dtype),
            params,
            mean=self.feature_mean_.to(dtype),
            scale=self.feature_scale_.to(dtype),
            low=self.feature_low_.to(dtype),
            high=self.feature_high_.to(dtype),
            target_scale=self.target_scale_.to(dtype),
            log_targets=self.log_targets,
            support_margin=self.support_margin,
        )

    def extra_repr(self) -> str:
        return f"hidden={self.hidden}, folds={self.folds}, epochs={self.epochs}, seed={self.seed}"
