"""Memory checks: refuse, with the needed and the available bytes, what would not fit.

A reference bank that does not fit on its device should fail with a message that says so and
by how much, before the allocation that would run out of memory (on CUDA an out-of-memory in
the middle of a fit leaves a fragmented cache; on the CPU the kernel may kill the process
instead of raising). The checks here are eager, cheap and never run inside ``forward``.

* CUDA: free bytes from :func:`torch.cuda.mem_get_info` (what the driver reports) plus what
  PyTorch's caching allocator holds but does not use (it can hand that out again).
* CPU: ``MemAvailable`` from psutil when installed, else from ``/proc/meminfo``; where neither
  exists (macOS without psutil, ...) nothing is checked.
* Other devices (``meta``, ``mps``, ...): nothing is checked.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping
from typing import Any

import torch

__all__ = [
    "MemoryLimitError",
    "available_bytes",
    "check_fits",
    "check_stacking",
    "format_bytes",
    "nbytes",
    "tensor_nbytes",
]


class MemoryLimitError(MemoryError):
    """Raised before an allocation that would not fit in the device's available memory.

    The message names what was about to be allocated, the bytes it needs, the bytes available
    on the device and what to do (a smaller bank, another device, an approximate search).
    """


def format_bytes(n: float) -> str:
    """``n`` bytes in a readable unit, e.g. ``"1.5 GiB (1610612736 bytes)"``."""
    value, unit = float(n), "bytes"
    for name in ("KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024:
            break
        value, unit = value / 1024, name
    if unit == "bytes":
        return f"{int(n)} bytes"
    return f"{value:.1f} {unit} ({int(n)} bytes)"


def _cpu_available() -> int | None:
    try:
        import psutil  # type: ignore[import-not-found]
    except ImportError:
        psutil = None
    if psutil is not None:
        return int(psutil.virtual_memory().available)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024  # the file counts kB
    except OSError:
        return None
    return None


def available_bytes(device: torch.device | str) -> int | None:
    """Bytes that can still be allocated on ``device``, or ``None`` where this is unknown.

    Args:
        device: A CUDA device, ``"cpu"``, or any other device (unknown: ``None``).

    Returns:
        The available bytes, or ``None``.

    Example:
        >>> available_bytes("meta") is None
        True
    """
    device = torch.device(device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return None
        index = device.index if device.index is not None else torch.cuda.current_device()
        free, _ = torch.cuda.mem_get_info(index)
        cached = torch.cuda.memory_reserved(index) - torch.cuda.memory_allocated(index)
        return int(free + max(cached, 0))
    if device.type == "cpu":
        return _cpu_available()
    return None


def tensor_nbytes(shape: Iterable[int], dtype: torch.dtype) -> int:
    """Bytes of a tensor of ``shape`` and ``dtype`` (without allocating it)."""
    return math.prod(int(s) for s in shape) * dtype.itemsize


def check_fits(needed: int, device: torch.device | str, what: str, *, hint: str = "") -> None:
    """Raise :class:`MemoryLimitError` if ``needed`` bytes exceed what ``device`` has free.

    Set the environment variable ``SELECTORCH_SKIP_MEMORY_CHECK=1`` to skip the check (for
    systems whose free-memory report is misleading, e.g. with overcommitted swap).

    Args:
        needed: Bytes about to be allocated.
        device: Where they would be allocated.
        what: What is allocated, for the message (e.g. ``"the reference bank of KNNScore"``).
        hint: What the user can do instead, appended to the message.

    Raises:
        MemoryLimitError: ``needed`` is more than the available bytes.

    Example:
        >>> check_fits(16, "cpu", "a tiny tensor")  # fits: returns None
    """
    if os.environ.get("SELECTORCH_SKIP_MEMORY_CHECK") == "1":
        return
    device = torch.device(device)
    available = available_bytes(device)
    if available is None or needed <= available:
        return
    advice = hint or (
        "Use fewer reference rows, a smaller dtype, another device, or set "
        "SELECTORCH_SKIP_MEMORY_CHECK=1 to try anyway."
    )
    raise MemoryLimitError(
        f"{what} needs {format_bytes(needed)} on {device}, but only {format_bytes(available)} "
        f"are available there. {advice}"
    )


def _tensors(features: Any) -> list[torch.Tensor]:
    if isinstance(features, torch.Tensor):
        return [features]
    if isinstance(features, Mapping):
        return [t for t in features.values() if isinstance(t, torch.Tensor)]
    return [t for part in features for t in _tensors(part)]


def nbytes(features: Any) -> int:
    """Bytes of a tensor, a mapping of tensors, or a list of either."""
    return sum(t.numel() * t.element_size() for t in _tensors(features))


def check_stacking(
    parts: list[Any], batches: int | None, what: str, *, preallocate: bool = False
) -> None:
    """Refuse a pass over a dataset whose stacked features would not fit, as early as possible.

    Called after the first batch (``len(parts) == 1``) with the number of batches when the
    loader has a length: the projected total is checked before the model has run over the
    whole dataset. With ``preallocate=True`` the batches are copied into one buffer allocated
    now, which needs the total once; otherwise they are kept and concatenated at the end, which
    needs it twice. Called again before stacking (``batches=None``), when the concatenation
    needs as many bytes again as the batches already hold.

    Args:
        parts: The batches of features recorded so far (tensors or mappings of tensors).
        batches: Total number of batches, or ``None`` to check the concatenation of ``parts``.
        what: What is being collected, for the message.
        preallocate: Whether the batches go into one buffer of ``batches`` times the first
            batch's bytes (with ``batches`` given).

    Raises:
        MemoryLimitError: The features (and their concatenation) would not fit.

    Example:
        >>> check_stacking([torch.zeros(4, 2)], 3, "features", preallocate=True)  # fits
    """
    tensors = _tensors(parts)
    if not tensors:
        return
    held = nbytes(parts)
    if batches is None:
        needed, detail = held, f"concatenating {len(parts)} batches"
    elif preallocate:
        # one buffer for every batch; the batches themselves come and go one at a time
        needed = nbytes(parts[0]) * batches
        detail = f"{batches} batches of {format_bytes(nbytes(parts[0]))}, preallocated"
    else:
        # the batches, then their concatenation: twice the total, minus what is already held
        needed = 2 * nbytes(parts[0]) * batches - held
        detail = f"{batches} batches of {format_bytes(nbytes(parts[0]))}, stacked"
    check_fits(
        needed,
        tensors[0].device,
        f"{what} ({detail})",
        hint="Use fewer rows (a subset of the data), a smaller layer or dtype, or another device.",
    )
