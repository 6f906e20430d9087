"""Drop the rows of fit or calibration data that hold NaN or Inf, and say how many.

By default a score refuses such rows with an error that counts them (a bank or a threshold
computed from them would be wrong without a trace). :func:`drop_nonfinite` is the explicit
alternative: it removes them, keeps the other tensors (labels, predictions) aligned, and
warns with the count, so the loss is never silent.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

import torch

from selectorch.functional.finite import finite_rows

__all__ = ["NonFiniteRowsWarning", "drop_nonfinite", "nonfinite_rows"]


class NonFiniteRowsWarning(UserWarning):
    """Rows with NaN or Inf were dropped from fit or calibration data."""


def _rows(X: Any) -> int:
    if isinstance(X, Mapping):
        return _rows(next(v for v in X.values() if v is not None))
    return X.shape[0]


def nonfinite_rows(X: torch.Tensor | Mapping[str, torch.Tensor]) -> torch.Tensor:
    """``(N,)`` bool, ``True`` where a row of ``X`` (of any value of a mapping) is not finite.

    Args:
        X: ``(N, ...)`` tensor, or a (nested) mapping of such tensors with the same ``N``.

    Returns:
        ``(N,)`` bool tensor.

    Example:
        >>> nonfinite_rows(torch.tensor([[1.0], [float("inf")]])).tolist()
        [False, True]
    """
    if isinstance(X, Mapping):
        bad = torch.zeros(_rows(X), dtype=torch.bool)
        for value in X.values():
            if value is not None:
                bad = bad | nonfinite_rows(value).cpu()
        return bad
    return ~finite_rows(X)


def _take(value: Any, keep: torch.Tensor) -> Any:
    if value is None:
        return None
    if isinstance(value, Mapping):
        return {key: _take(v, keep) for key, v in value.items()}
    return value[keep.to(value.device)]


def drop_nonfinite(
    X: torch.Tensor | Mapping[str, torch.Tensor],
    *aligned: torch.Tensor | None,
    name: str = "X",
    stacklevel: int = 2,
) -> tuple[Any, ...]:
    """Drop the rows of ``X`` that hold NaN or Inf, and the same rows of ``aligned`` tensors.

    Warns with a :class:`NonFiniteRowsWarning` that counts the dropped rows (and names the
    first ones); returns the inputs unchanged when every row is finite.

    Args:
        X: ``(N, ...)`` rows (embeddings or logits), or a (nested) mapping of such tensors (a
            row is dropped when any of them is not finite there).
        *aligned: ``(N, ...)`` tensors with one entry per row of ``X`` (labels, predictions,
            losses), or ``None``.
        name: The argument's name, for the warning.
        stacklevel: Passed to :func:`warnings.warn`.

    Returns:
        ``(X_kept, *aligned_kept)``.

    Raises:
        ValueError: Every row holds NaN or Inf (nothing would be left to fit on), or an
            aligned tensor has another number of rows.

    Example:
        >>> X = torch.tensor([[0.0, 1.0], [float("nan"), 2.0], [3.0, 4.0]])
        >>> y = torch.tensor([0, 1, 2])
        >>> import warnings
        >>> with warnings.catch_warnings():
        ...     warnings.simplefilter("ignore")
        ...     X_kept, y_kept = drop_nonfinite(X, y)
        >>> y_kept.tolist()
        [0, 2]
    """
    n = _rows(X)
    for i, value in enumerate(aligned):
        if value is not None and (value.ndim == 0 or value.shape[0] != n):
            raise ValueError(
                f"Expected aligned tensor {i} to have {n} rows like `{name}`, got "
                f"{tuple(value.shape)}."
            )
    bad = nonfinite_rows(X)
    n_bad = int(bad.sum())
    if n_bad == 0:
        return (X, *aligned)
    if n_bad == n:
        raise ValueError(
            f"Every one of the {n} rows of `{name}` holds NaN or Inf; nothing is left to use."
        )
    first = bad.nonzero().flatten()[:5].tolist()
    warnings.warn(
        f"Dropped {n_bad} of {n} rows of `{name}` with NaN or Inf (first rows: {first}); "
        f"{n - n_bad} rows are used.",
        NonFiniteRowsWarning,
        stacklevel=stacklevel,
    )
    keep = ~bad
    return (_take(X, keep), *(_take(value, keep) for value in aligned))
