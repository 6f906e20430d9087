"""Exceptions raised by selectorch."""

from __future__ import annotations

__all__ = ["NotFittedError"]


class NotFittedError(RuntimeError):
    """Raised when a score or a selective model is used before the call that prepares it.

    The message names the missing call, for example ``fit(...)`` or ``calibrate(...)``.
    """
