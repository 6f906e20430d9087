"""Checks and conversions of what the metrics' ``update`` receives (shapes and dtypes only).

Value checks (NaN scores, losses outside [0, 1]) run once, in ``compute``, through the
functions of :mod:`selectorch.functional.selective`, so ``update`` never synchronizes a device.
"""

from __future__ import annotations

from typing import Any

import torch


def check_tensor(name: str, value: Any) -> torch.Tensor:
    """Return ``value`` if it is a tensor, else raise ``TypeError`` naming the argument."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(
            f"Expected argument `{name}` to be a torch.Tensor, got {type(value).__name__}."
        )
    return value


def check_score(score: Any) -> torch.Tensor:
    """Check that ``score`` is a real ``(N,)`` tensor; integers become float64.

    Raises:
        TypeError: Not a tensor, or a bool/complex tensor.
        ValueError: Not one-dimensional.
    """
    score = check_tensor("score", score)
    if score.dtype == torch.bool or score.is_complex():
        raise TypeError(f"Expected argument `score` to be real-valued, got dtype {score.dtype}.")
    if score.ndim != 1:
        raise ValueError(f"Expected argument `score` to have shape (N,), got {tuple(score.shape)}.")
    return score if score.is_floating_point() else score.double()


def check_same_length(name: str, value: torch.Tensor, score: torch.Tensor) -> None:
    """Raise ``ValueError`` unless ``value`` has shape ``(N,)`` like ``score``."""
    if value.shape != score.shape:
        raise ValueError(
            f"Expected argument `{name}` to have shape {tuple(score.shape)} like `score`, got "
            f"{tuple(value.shape)}."
        )


def to_loss(
    score: torch.Tensor,
    correct_or_preds: Any,
    target: Any | None,
    dtype: torch.dtype,
) -> torch.Tensor:
    """Per-sample losses in ``dtype`` from ``correct`` or from ``(preds, target)``.

    Args:
        score: ``(N,)`` checked scores.
        correct_or_preds: Without ``target``: ``(N,)`` bool ``correct`` (loss ``1 - correct``)
            or ``(N,)`` floating losses in [0, 1]. With ``target``: ``(N,)`` predicted class ids
            or ``(N, C)`` class scores (the arg-max is the prediction).
        target: ``(N,)`` integer class ids, or ``None``.
        dtype: The floating dtype of the stored losses.

    Returns:
        ``(N,)`` losses.

    Raises:
        TypeError: A non-tensor or an ambiguous dtype (integer ``correct``).
        ValueError: Shapes that do not match ``score``.
    """
    if target is None:
        correct = check_tensor("correct", correct_or_preds)
        check_same_length("correct", correct, score)
        if correct.dtype == torch.bool:
            return (~correct).to(dtype)
        if correct.is_floating_point():
            return correct.to(dtype)
        raise TypeError(
            "Expected argument `correct` to be bool (True = right prediction) or a floating "
            f"tensor of losses in [0, 1], got dtype {correct.dtype}; pass `correct.bool()` or "
            "`loss.float()`."
        )
    preds = check_tensor("preds", correct_or_preds)
    target = check_tensor("target", target)
    check_same_length("target", target, score)
    if target.is_floating_point() or target.dtype == torch.bool:
        raise TypeError(
            f"Expected argument `target` to hold integer class ids, got dtype {target.dtype}."
        )
    if preds.ndim == 2 and preds.shape[0] == score.shape[0]:
        preds = preds.argmax(dim=1)
    elif preds.shape != score.shape or preds.is_floating_point():
        raise ValueError(
            f"Expected argument `preds` to be ({score.shape[0]},) integer class ids or "
            f"({score.shape[0]}, C) class scores, got shape {tuple(preds.shape)} and dtype "
            f"{preds.dtype}."
        )
    return (preds != target).to(dtype)


def to_is_ood(score: torch.Tensor, is_ood: Any, dtype: torch.dtype) -> torch.Tensor:
    """``(N,)`` OOD labels as 0/1 in ``dtype`` (their values are checked in ``compute``)."""
    is_ood = check_tensor("is_ood", is_ood)
    check_same_length("is_ood", is_ood, score)
    if is_ood.is_complex():
        raise TypeError(f"Expected argument `is_ood` to be bool or 0/1, got dtype {is_ood.dtype}.")
    return is_ood.to(dtype)
