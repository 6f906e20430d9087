"""Progress bars of the whole package: one switch to silence or show them.

Every loop in selectorch that may take a while (extraction, fitting from a loader) draws its bar
through :func:`progress_bar`, so one call silences them all:

* ``selectorch.progress.disable()`` / ``selectorch.progress.enable()`` for this process;
* the environment variable ``SELECTORCH_PROGRESS=0`` (also ``false``, ``no``, ``off``) before
  or while the program runs, e.g. in CI or in batch jobs whose logs should stay short.

An explicit :func:`disable` / :func:`enable` wins over the environment variable, and a function's
own ``progress=False`` argument always silences its bar.

Example:
    >>> import selectorch.progress
    >>> selectorch.progress.disable()
    >>> selectorch.progress.is_enabled()
    False
    >>> selectorch.progress.enable()
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

from tqdm.auto import tqdm

#: Environment variable that turns the package's progress bars off when set to a false value.
ENV_VAR = "SELECTORCH_PROGRESS"

_FALSE = ("0", "false", "no", "off")

# None: follow the environment variable; True/False: set by enable()/disable()
_switch: bool | None = None


def disable() -> None:
    """Silence every selectorch progress bar in this process (until :func:`enable`)."""
    global _switch
    _switch = False


def enable() -> None:
    """Show selectorch progress bars again, whatever ``SELECTORCH_PROGRESS`` says."""
    global _switch
    _switch = True


def reset() -> None:
    """Forget :func:`disable` / :func:`enable`: follow ``SELECTORCH_PROGRESS`` again."""
    global _switch
    _switch = None


def is_enabled() -> bool:
    """Whether selectorch progress bars are shown.

    Returns:
        The last :func:`enable` / :func:`disable` call if any; otherwise ``False`` when
        ``SELECTORCH_PROGRESS`` is one of ``0``, ``false``, ``no``, ``off`` (any case) and
        ``True`` else.
    """
    if _switch is not None:
        return _switch
    return os.environ.get(ENV_VAR, "1").strip().lower() not in _FALSE


def progress_bar(
    iterable: Iterable[Any] | None = None,
    *,
    desc: str,
    total: int | None = None,
    unit: str = "it",
    enabled: bool = True,
    **kwargs: Any,
) -> tqdm:
    """A tqdm bar that follows the package switch; the one way selectorch draws progress.

    Args:
        iterable: What to iterate over, or ``None`` for a bar updated by hand.
        desc: Short label shown before the bar.
        total: Expected number of steps (``unit``s), if known.
        unit: What one step is (``"it"``, ``"rows"``, ...).
        enabled: The caller's own switch (a ``progress=`` argument); ``False`` always silences.
        **kwargs: Passed on to ``tqdm`` (e.g. ``initial`` when resuming).

    Returns:
        The bar; ``bar.disable`` is ``True`` when it draws nothing.
    """
    kwargs.setdefault("leave", False)
    kwargs.setdefault("dynamic_ncols", True)
    return tqdm(
        iterable,
        desc=desc,
        total=total,
        unit=unit,
        disable=not (enabled and is_enabled()),
        **kwargs,
    )
