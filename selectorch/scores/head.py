"""Scores that re-apply the classifier head to penultimate features: ViM, ReAct and ASH.

They read the embedding of the layer before the head (``layer="avgpool"`` for a ResNet) and the
head's weight and bias (``head="fc"`` in :class:`~selectorch.SelectiveModel`, or
:meth:`HeadMixin.set_head` standalone), and recompute logits from reshaped features. The
model's returned output is never changed.
"""

from __future__ import annotations

import warnings
from typing import Any, ClassVar

import torch

from selectorch._checks import check_int, check_matrix
from selectorch.exceptions import NotFittedError
from selectorch.functional.shaping import (
    ASH_VARIANTS,
    activation_percentile,
    ash_keep,
    ash_score,
    check_percentile,
    fit_vim,
    react_score,
    vim_default_dim,
    vim_score,
)
from selectorch.scores.base import Score
from selectorch.scores.registry import register_score


def _check_head_tensor(name: str, value: Any, shape: str, ndim: int) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(
            f"Expected argument `{name}` to be a torch.Tensor, got {type(value).__name__}."
        )
    if not value.is_floating_point():
        raise TypeError(
            f"Expected argument `{name}` to be a floating-point tensor, got dtype {value.dtype}."
        )
    if value.ndim != ndim or 0 in value.shape:
        raise ValueError(
            f"Expected argument `{name}` to have shape {shape}, got {tuple(value.shape)}."
        )
    if not bool(torch.isfinite(value).all()):
        raise ValueError(f"Argument `{name}` holds NaN or Inf; a classifier head must be finite.")
    return value


class HeadMixin:
    """A classifier head ``(W, b)`` stored in a score, for scores that re-apply it.

    Mix in before :class:`~selectorch.scores.Score`: ``class MyScore(HeadMixin, Score)``. The
    head lives in the persistent buffers ``head_weight_`` ``(C, D)`` and ``head_bias_`` ``(C,)``,
    so it travels with ``state_dict``, ``.to()`` and ``.double()``. A score without a head
    raises :class:`~selectorch.exceptions.NotFittedError` naming :meth:`set_head`; its inputs
    must have the head's width ``D``.

    Attributes:
        head_weight_: ``(C, D)`` weight of the head (empty until :meth:`set_head`).
        head_bias_: ``(C,)`` bias of the head (zeros for a head without bias).
    """

    #: Whether :class:`~selectorch.SelectiveModel` must pass ``head=`` (it calls ``set_head``).
    needs_head: ClassVar[bool] = True
    #: Fitted buffers computed from the head: dropped when :meth:`set_head` changes it.
    head_dependent_buffers: ClassVar[tuple[str, ...]] = ()

    head_weight_: torch.Tensor
    head_bias_: torch.Tensor
    threshold_: torch.Tensor
    calibration_scores_: torch.Tensor
    _report: dict[str, Any]

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("head_weight_", torch.empty(0, 0))  # type: ignore[attr-defined]
        self.register_buffer("head_bias_", torch.empty(0))  # type: ignore[attr-defined]

    @property
    def has_head(self) -> bool:
        """Whether :meth:`set_head` was called (or a head was loaded)."""
        return self.head_weight_.numel() > 0

    @torch.no_grad()
    def set_head(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> Any:
        """Store a copy of the classifier head: ``logits = x @ weight.T + bias``.

        The score moves to ``weight``'s device (its state lives where the model is) and keeps
        the head in its own floating dtype. Setting the same head again changes nothing; a
        different head drops the threshold and whatever was fitted from the old head (with a
        warning), since both would be stale.

        Args:
            weight: ``(C, D)`` weight of the final linear layer.
            bias: ``(C,)`` bias, or ``None`` for a layer without bias (zeros are stored).

        Returns:
            ``self``.

        Raises:
            TypeError: ``weight`` or ``bias`` is not a floating-point tensor.
            ValueError: Wrong shapes, or NaN/Inf values.

        Example:
            >>> fc = torch.nn.Linear(16, 3)
            >>> score = ASHScore().set_head(fc.weight, fc.bias)
            >>> score.head_weight_.shape, score.head_bias_.shape
            (torch.Size([3, 16]), torch.Size([3]))
        """
        weight = _check_head_tensor("weight", weight, "(C, D)", 2)
        n_classes = weight.shape[0]
        if bias is None:
            bias = torch.zeros(n_classes, dtype=weight.dtype, device=weight.device)
        bias = _check_head_tensor("bias", bias, f"(C,) = ({n_classes},) like `weight`", 1)
        if bias.shape[0] != n_classes:
            raise ValueError(
                f"Expected argument `bias` to have shape (C,) = ({n_classes},) like `weight`, "
                f"got {tuple(bias.shape)}."
            )
        dtype, device = self.threshold_.dtype, weight.device
        weight = weight.detach().to(device=device, dtype=dtype).clone()
        bias = bias.detach().to(device=device, dtype=dtype).clone()
        changed = self.has_head and not (
            self.head_weight_.shape == weight.shape
            and torch.equal(self.head_weight_.to(device), weight)
            and torch.equal(self.head_bias_.to(device), bias)
        )
        self.to(device)  # type: ignore[attr-defined]
        self._set_buffer("head_weight_", weight)  # type: ignore[attr-defined]
        self._set_buffer("head_bias_", bias)  # type: ignore[attr-defined]
        if changed:
            self._drop_head_state()
        return self

    def _drop_head_state(self) -> None:
        """Forget the threshold and the buffers fitted from a head that was just replaced."""
        fitted = [name for name in self.head_dependent_buffers if getattr(self, name).numel() > 0]
        calibrated = self.threshold_.numel() > 0 or self.calibration_scores_.numel() > 0
        for name in [*self.head_dependent_buffers, "threshold_", "calibration_scores_"]:
            old = getattr(self, name)
            empty = (0,) * max(old.ndim, 1)
            setattr(self, name, torch.empty(empty, device=old.device, dtype=old.dtype))
        if fitted or calibrated:
            self._report = {}
            dropped = fitted + (["threshold_"] if calibrated else [])
            redo = " and ".join(
                call for call, needed in (("fit", fitted), ("calibrate", calibrated)) if needed
            )
            warnings.warn(
                f"{type(self).__name__}.set_head got a different classifier head, so what was "
                f"computed from the old one was dropped ({', '.join(dropped)}). Call {redo} "
                "again.",
                stacklevel=4,  # the caller of set_head (through torch.no_grad's wrapper)
            )

    def _check_head(self) -> None:
        if not self.has_head:
            raise NotFittedError(
                f"This {type(self).__name__} has no classifier head yet. Call "
                "set_head(weight, bias) with the final linear layer's parameters, or pass "
                "head='fc' (that layer's name) to SelectiveModel."
            )

    @property
    def is_fitted(self) -> bool:
        """Whether the head is set and every fitted buffer is filled."""
        # not `super().is_fitted`: dynamo of PyTorch 2.11 cannot trace a property through super()
        buffers = self.fitted_buffers  # type: ignore[attr-defined]
        return self.has_head and all(getattr(self, name).numel() > 0 for name in buffers)

    def _check_fitted(self) -> None:
        self._check_head()
        super()._check_fitted()  # type: ignore[misc]

    def _expected_dim(self) -> int | None:
        return self.head_weight_.shape[1] if self.has_head else None

    def _check_input(self, X: Any, name: str = "X") -> torch.Tensor:
        X = check_matrix(name, X)
        if self.has_head and X.shape[1] != self.head_weight_.shape[1]:
            raise ValueError(
                f"Expected argument `{name}` to have feature dimension "
                f"{self.head_weight_.shape[1]}, the input width of the classifier head (weight "
                f"{tuple(self.head_weight_.shape)}), got {X.shape[1]} (shape {tuple(X.shape)})."
            )
        if X.device != self.head_weight_.device:
            raise ValueError(
                f"Expected argument `{name}` on {self.head_weight_.device}, where the state of "
                f"{type(self).__name__} is, got a tensor on {X.device}; move one of them "
                "with .to(...)."
            )
        return X

    def fit(self, X: torch.Tensor, y: torch.Tensor | None = None, *, copy: bool = True) -> Any:
        """Fit on training features of the head's width (see :meth:`Score.fit`).

        Args:
            X: ``(N, D)`` training features, ``D`` the head's input width.
            y: Optional ``(N,)`` labels, for scores that use them.
            copy: If False, fit may overwrite X in place (saves one copy of the bank); X must
                not be used afterwards.

        Raises:
            NotFittedError: No head was set.
            ValueError: ``X`` does not have the head's width ``D``, or see :meth:`Score.fit`.
        """
        self._check_head()
        X = check_matrix("X", X)
        if X.shape[1] != self.head_weight_.shape[1]:
            raise ValueError(
                f"Expected argument `X` to have feature dimension {self.head_weight_.shape[1]}, "
                f"the input width of the classifier head (weight "
                f"{tuple(self.head_weight_.shape)}), got {X.shape[1]} (shape {tuple(X.shape)})."
            )
        return super().fit(X, y, copy=copy)  # type: ignore[misc]


@register_score("vim")
class ViMScore(HeadMixin, Score):
    """Virtual-logit matching (Wang et al., CVPR 2022): residual norm minus energy.

    ``alpha * |(x - u) R| - logsumexp(x W^T + b)``: ``u = -pinv(W) b`` is where the logits
    vanish, ``R`` spans the directions outside the ``dim`` leading principal directions of the
    training features around ``u``, and ``alpha`` (mean training max-logit / mean training
    residual norm) puts the residual on the logits' scale. Features that leave the training
    subspace or get small logits score high; it works best with wide features (ResNet, ViT)
    whose training data fills a low-dimensional subspace. Fitting takes one ``D x D``
    eigen-decomposition; scoring costs ``O(B D (C + D - dim))``.

    Args:
        dim: Size of the principal subspace, an integer in ``[1, D)``; ``None`` picks 1000 for
            ``D >= 2048``, 512 for ``D >= 768`` and ``D // 2`` otherwise (the paper's choices,
            extended to small ``D``).

    Attributes:
        origin_: ``(D,)`` origin ``u``.
        residual_basis_: ``(D, D - dim)`` orthonormal basis ``R`` of the residual space.
        alpha_: 0-dim scale of the virtual logit.

    Example:
        >>> fc = torch.nn.Linear(16, 3)
        >>> score = ViMScore(dim=8).set_head(fc.weight, fc.bias).fit(torch.randn(200, 16))
        >>> score.residual_basis_.shape, score(torch.randn(4, 16)).shape
        (torch.Size([16, 8]), torch.Size([4]))
    """

    input = "embedding"
    fitted_buffers = ("head_weight_", "head_bias_", "origin_", "residual_basis_", "alpha_")
    head_dependent_buffers = ("origin_", "residual_basis_", "alpha_")

    origin_: torch.Tensor
    residual_basis_: torch.Tensor
    alpha_: torch.Tensor

    def __init__(self, *, dim: int | None = None) -> None:
        super().__init__()
        self.dim = None if dim is None else check_int("dim", dim)
        self.register_buffer("origin_", torch.empty(0))
        self.register_buffer("residual_basis_", torch.empty(0, 0))
        self.register_buffer("alpha_", torch.empty(0))

    def _fit(self, X: torch.Tensor, y: torch.Tensor | None) -> None:
        dim = vim_default_dim(X.shape[1]) if self.dim is None else self.dim
        fitted = fit_vim(X, self.head_weight_, self.head_bias_, dim)
        if not fitted.alpha > 0:
            warnings.warn(
                f"ViM's scale alpha = {float(fitted.alpha):.4g} is not positive: the mean "
                "maximum training logit is <= 0, so a larger residual lowers the score. ViM "
                "expects a trained classifier head.",
                stacklevel=5,  # the caller of fit (through HeadMixin.fit and torch.no_grad)
            )
        self._set_buffer("origin_", fitted.origin)
        self._set_buffer("residual_basis_", fitted.residual_basis)
        self._set_buffer("alpha_", fitted.alpha)

    def _score(self, X: torch.Tensor) -> torch.Tensor:
        return vim_score(
            X, self.head_weight_, self.head_bias_, self.origin_, self.residual_basis_, self.alpha_
        )

    def extra_repr(self) -> str:
        return f"dim={self.dim}"


@register_score("react")
class ReActScore(HeadMixin, Score):
    """ReAct (Sun, Guo & Li, NeurIPS 2021): energy of the head on clipped activations.

    ``-logsumexp(min(x, c) W^T + b)``, with ``c`` the ``percentile``-th percentile of all
    training activations (every entry of the ``(N, D)`` features), fitted exactly (see
    :func:`~selectorch.functional.shaping.activation_percentile`). Unusual inputs tend to fire a
    few penultimate units abnormally hard; clipping them keeps their logits, and so their
    energy, from looking confident. Made for non-negative (post-ReLU) features; scoring costs one
    head application, ``O(B C D)``.

    Args:
        percentile: Percentile of the training activations used as the clip, in ``[0, 100)``
            (paper: 90).

    Attributes:
        clip_: 0-dim clip value ``c``.

    Example:
        >>> fc = torch.nn.Linear(16, 3)
        >>> score = ReActScore().set_head(fc.weight, fc.bias).fit(torch.rand(200, 16))
        >>> round(score.clip_.item(), 1)  # about the 90th percentile of U(0, 1)
        0.9
    """

    input = "embedding"
    fitted_buffers = ("head_weight_", "head_bias_", "clip_")

    clip_: torch.Tensor

    def __init__(self, *, percentile: float = 90.0) -> None:
        super().__init__()
        self.percentile = check_percentile(percentile)
        self.register_buffer("clip_", torch.empty(0))

    def _fit(self, X: torch.Tensor, y: torch.Tensor | None) -> None:
        self._set_buffer("clip_", activation_percentile(X, self.percentile))

    def _score(self, X: torch.Tensor) -> torch.Tensor:
        return react_score(X, self.head_weight_, self.head_bias_, self.clip_)

    def extra_repr(self) -> str:
        return f"percentile={self.percentile}"


@register_score("ash")
class ASHScore(HeadMixin, Score):
    """Activation shaping (Djurisic et al., ICLR 2023): energy of the head on each row's top
    activations.

    Keeps the ``k = D - round(D * percentile / 100)`` largest activations of each row and zeros
    the rest; ``variant="p"`` leaves them as they are, ``"b"`` sets them all to
    ``sum(x) / k``, and ``"s"`` scales them by ``exp(sum(x) / sum(kept))``; the score is
    ``-logsumexp`` of the head on the shaped row (see
    :func:`~selectorch.functional.shaping.ash_shape`). Nothing is fitted beyond the head, so
    :meth:`fit` is optional. Made for non-negative (post-ReLU) features; scoring costs a sort
    of each row and one head application, ``O(B D log D + B C D)``. The paper's choices for
    ImageNet/ResNet-50 are ASH-S at 90, ASH-B at 65 and ASH-P at 60; ASH-B needs rows with at
    least ``k`` positive activations, or ``sum(x) / k`` lands on zero units (ties keep the
    lowest indices).

    Args:
        percentile: Share of each row's activations removed, in ``[0, 100)``.
        variant: ``"s"`` (ASH-S), ``"p"`` (ASH-P) or ``"b"`` (ASH-B).

    Example:
        >>> fc = torch.nn.Linear(16, 3)
        >>> score = ASHScore(variant="b", percentile=65).set_head(fc.weight, fc.bias)
        >>> score(torch.rand(4, 16)).shape
        torch.Size([4])
    """

    input = "embedding"
    # nothing to fit: the head is checked by HeadMixin.is_fitted
    fitted_buffers = ()

    def __init__(self, *, percentile: float = 90.0, variant: str = "s") -> None:
        super().__init__()
        self.percentile = check_percentile(percentile)
        if variant not in ASH_VARIANTS:
            raise ValueError(
                f"Expected argument `variant` to be one of {ASH_VARIANTS}, got {variant!r}."
            )
        self.variant = variant

    @property
    def n_kept(self) -> int | None:
        """Activations kept per row, ``k`` (``None`` until the head gives ``D``)."""
        return ash_keep(self.head_weight_.shape[1], self.percentile) if self.has_head else None

    def _score(self, X: torch.Tensor) -> torch.Tensor:
        return ash_score(X, self.head_weight_, self.head_bias_, self.percentile, self.variant)

    def extra_repr(self) -> str:
        return f"percentile={self.percentile}, variant={self.variant!r}"
