"""Argument checks shared by the whole package.

Every check raises an error that names the argument, what was expected and what was given.
"""

from __future__ import annotations

import numbers
from collections.abc import Iterable
from typing import Any

import torch


def check_int(name: str, value: Any, *, minimum: int = 1) -> int:
    """Return ``value`` if it is an ``int`` of at least ``minimum``, else raise ``ValueError``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(
            f"Expected argument `{name}` to be an integer >= {minimum}, got {value!r}."
        )
    return int(value)


def check_choice(name: str, value: Any, choices: Iterable[str]) -> str:
    """Return ``value`` if it is one of ``choices``, else raise ``ValueError``."""
    choices = tuple(choices)
    if value not in choices:
        raise ValueError(f"Expected argument `{name}` to be one of {choices}, got {value!r}.")
    return value


def check_positive_float(name: str, value: Any) -> float:
    """Return ``value`` as a float if it is a finite number > 0, else raise ``ValueError``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"Expected argument `{name}` to be a positive number, got {value!r}.")
    value = float(value)
    if not (value > 0 and value != float("inf")):
        raise ValueError(f"Expected argument `{name}` to be a positive number, got {value!r}.")
    return value


def check_fraction(name: str, value: Any) -> float:
    """Return ``value`` as a float if it lies in (0, 1], else raise ``ValueError``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 < value <= 1:
        raise ValueError(f"Expected argument `{name}` to be a number in (0, 1], got {value!r}.")
    return float(value)


def check_matrix(name: str, value: Any, *, dim: int | None = None) -> torch.Tensor:
    """Check that ``value`` is a floating ``(N, D)`` tensor, with ``D == dim`` when given.

    Args:
        name: The argument's name, used in the error message.
        value: The object to check.
        dim: The expected feature dimension ``D``, or ``None`` to accept any.

    Returns:
        The tensor itself.

    Raises:
        TypeError: ``value`` is not a floating-point tensor.
        ValueError: ``value`` is not two-dimensional or its feature dimension differs from ``dim``.
    """
    if not isinstance(value, torch.Tensor):
        raise TypeError(
            f"Expected argument `{name}` to be a torch.Tensor, got {type(value).__name__}."
        )
    if not value.is_floating_point():
        raise TypeError(
            f"Expected argument `{name}` to be a floating-point tensor, got dtype {value.dtype}."
        )
    if value.ndim != 2:
        raise ValueError(
            f"Expected argument `{name}` to have shape (N, D), got {tuple(value.shape)}."
        )
    if dim is not None and value.shape[1] != dim:
        raise ValueError(
            f"Expected argument `{name}` to have feature dimension {dim} (as fitted), "
            f"got {value.shape[1]} (shape {tuple(value.shape)})."
        )
    return value


def check_finite_rows(name: str, value: torch.Tensor) -> torch.Tensor:
    """Raise ``ValueError`` counting the rows of ``value`` that hold NaN or Inf.

    ``value`` is checked in blocks of about 2**20 entries, so the temporaries stay small
    whatever its size (a whole-tensor check would build masks of the bank's size); the count is
    read once at the end, and the first bad rows are searched for only when there are some.
    """
    # functional imports this module: import its helpers here
    from selectorch.functional.distances import pass_rows
    from selectorch.functional.finite import finite_rows

    rows = value.shape[0]
    step = pass_rows(value)
    blocks = [value[start : start + step] for start in range(0, rows, step)]
    n_bad = int(sum((~finite_rows(block)).sum() for block in blocks))  # one read, at the end
    if n_bad:
        first: list[int] = []
        for index, block in enumerate(blocks):
            bad = (~finite_rows(block)).nonzero().flatten()[: 5 - len(first)]
            first += [index * step + row for row in bad.tolist()]
            if len(first) == 5:
                break
        raise ValueError(
            f"Argument `{name}` has {n_bad} of {rows} rows with NaN or Inf "
            f"(first rows: {first}); remove them before fitting or calibrating."
        )
    return value


def check_open_fraction(name: str, value: Any) -> float:
    """Return ``value`` as a float if it lies in (0, 1), else raise ``ValueError``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 < value < 1:
        raise ValueError(f"Expected argument `{name}` to be a number in (0, 1), got {value!r}.")
    return float(value)


def check_rows(name: str, value: Any, n: int, like: str) -> torch.Tensor:
    """Check that ``value`` is a tensor with ``n`` rows, as many as argument ``like`` has."""
    if not isinstance(value, torch.Tensor) or value.ndim == 0 or value.shape[0] != n:
        got = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
        raise ValueError(f"Expected argument `{name}` to have {n} rows like `{like}`, got {got}.")
    return value
