"""A seeded hash of each row's content: uniform pseudo-random scores with no information."""

from __future__ import annotations

import torch

_MASK = 0xFFFFFFFF
_GOLDEN = 0x9E3779B9


def _mix32(x):  # type: ignore[no-untyped-def]
    """Chris Wellons' ``lowbias32`` finaliser of 32-bit values (Python int or int64 tensor)."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _MASK
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _MASK
    return x ^ (x >> 16)


def hash_uniform(X: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """Uniform value in ``[0, 1)`` per row, a deterministic hash of the row's float32 bits.

    Each feature's 32 bits are mixed with a seed- and position-dependent salt, the mixed values
    are summed modulo ``2^32`` and mixed again; the top 24 bits give the value. Only integer
    operations touch the bits, so the result is identical eagerly and under ``torch.compile``,
    on the CPU and on CUDA (checked on an H100), and for any batch the row sits in. Rows are
    hashed as float32 (a float64 row that is not exactly a float32 hashes as its float32
    rounding); ``-0.0`` hashes as ``0.0``.

    Args:
        X: ``(N, D)`` floating tensor.
        seed: Any integer; other seeds give independent values.

    Returns:
        ``(N,)`` values in ``[0, 1)`` (multiples of ``2^-24``), in the dtype of ``X``.

    Example:
        >>> a = hash_uniform(torch.ones(2, 3))
        >>> bool(a[0] == a[1]), 0 <= float(a[0]) < 1
        (True, True)
    """
    x = X.to(torch.float32)
    x = torch.where(x == 0, torch.zeros((), dtype=torch.float32, device=x.device), x)
    bits = x.view(torch.int32).to(torch.int64) & _MASK
    seed = int(seed) & _MASK
    position = torch.arange(X.shape[1], device=X.device, dtype=torch.int64)
    # xor, not a product with the position: inductor would fold ``arange * constant`` into int32
    # index arithmetic on CUDA, where the constant overflows
    salt = _mix32(position ^ _mix32(seed ^ 0x2545F491))
    row = _mix32(bits ^ salt).sum(dim=1) & _MASK
    row = _mix32(row ^ _mix32(seed ^ _GOLDEN))
    return ((row >> 8).to(torch.float32) / float(1 << 24)).to(X.dtype)  # 24 bits: exact
