"""Scores that re-apply a classifier's linear head to penultimate features: ViM, ReAct, ASH.

Each function takes ``(B, D)`` penultimate features and the head's ``(C, D)`` weight and
``(C,)`` bias, so ``logits = X @ W.T + b``. The features are reshaped (clipped, pruned, or
projected) before the head is applied again; the model's own output is never touched. Half and
bfloat16 inputs are computed in float32. Scores are uncertainties: higher = more unusual.

* ViM (Wang et al., CVPR 2022): ``alpha * |residual of x outside a principal subspace| -
  logsumexp(logits)``.
* ReAct (Sun, Guo & Li, NeurIPS 2021): energy of the head on ``min(x, c)``, ``c`` a percentile
  of the training activations.
* ASH (Djurisic et al., ICLR 2023): energy of the head on each row's top activations, pruned
  (``"p"``), binarized (``"b"``) or pruned and scaled (``"s"``).
"""

from __future__ import annotations

import math
import numbers
from typing import NamedTuple

import torch

from selectorch.functional.pca import principal_components

#: ASH variants: scale (ASH-S), prune (ASH-P), binarize (ASH-B).
ASH_VARIANTS = ("s", "p", "b")

#: Rows per step when :func:`fit_vim` accumulates its statistics.
VIM_CHUNK_ROWS = 4096


def check_percentile(value: object, name: str = "percentile") -> float:
    """Return ``value`` as a float if it lies in ``[0, 100)``, else raise ``ValueError``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 <= value < 100:
        raise ValueError(f"Expected argument `{name}` to be a number in [0, 100), got {value!r}.")
    return float(value)


def _compute_dtype(X: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    return torch.promote_types(torch.promote_types(X.dtype, weight.dtype), torch.float32)


def head_logits(X: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Logits ``X @ W.T + b`` of a linear head, in at least float32.

    Args:
        X: ``(B, D)`` features.
        weight: ``(C, D)`` head weight.
        bias: ``(C,)`` head bias.

    Returns:
        ``(B, C)`` logits.

    Example:
        >>> head_logits(torch.ones(1, 2), torch.eye(2), torch.tensor([0.0, 1.0]))
        tensor([[1., 2.]])
    """
    dtype = _compute_dtype(X, weight)
    return torch.addmm(bias.to(dtype), X.to(dtype), weight.to(dtype).T)


def head_energy(X: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Free energy ``-logsumexp(X @ W.T + b)`` of a linear head (temperature 1).

    Args:
        X: ``(B, D)`` features.
        weight: ``(C, D)`` head weight.
        bias: ``(C,)`` head bias.

    Returns:
        ``(B,)`` energies, higher = more unusual.

    Example:
        >>> round(head_energy(torch.zeros(1, 3), torch.ones(4, 3), torch.zeros(4)).item(), 4)
        -1.3863
    """
    return -head_logits(X, weight, bias).logsumexp(dim=1)


# -- ViM --------------------------------------------------------------------------------------


class ViMFit(NamedTuple):
    """What :func:`fit_vim` learns (float64)."""

    #: ``(D,)`` origin ``u = -pinv(W) b``, where the logits are zero.
    origin: torch.Tensor
    #: ``(D, D - dim)`` orthonormal basis of the complement of the principal subspace.
    residual_basis: torch.Tensor
    #: 0-dim scale that matches the mean residual norm to the mean maximum logit.
    alpha: torch.Tensor


def vim_default_dim(n_features: int) -> int:
    """The principal-subspace size ViM uses for ``D`` features when none is given.

    1000 for ``D >= 2048`` and 512 for ``D >= 768`` (the choices of Wang et al. 2022 for
    ResNet/BiT and ViT/DeiT/Swin features), else ``D // 2`` (at least 1).

    Example:
        >>> vim_default_dim(2048), vim_default_dim(768), vim_default_dim(128)
        (1000, 512, 64)
    """
    if n_features >= 2048:
        return 1000
    if n_features >= 768:
        return 512
    return max(1, n_features // 2)


def vim_origin(weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """The point ``u = -pinv(W) b`` that ViM centres the features on, in float64.

    ``W u + b = 0`` when ``W`` has full row rank (``C <= D``); otherwise ``u`` is the
    minimum-norm least-squares solution of ``W u = -b``, so that ``W^T (W u + b) = 0``.

    Args:
        weight: ``(C, D)`` head weight.
        bias: ``(C,)`` head bias.

    Returns:
        ``(D,)`` float64 origin.

    Example:
        >>> vim_origin(torch.eye(2), torch.tensor([1.0, -2.0])).tolist()
        [-1.0, 2.0]
    """
    return -(torch.linalg.pinv(weight.double()) @ bias.double())


def fit_vim(
    X: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    dim: int,
    *,
    chunk_rows: int = VIM_CHUNK_ROWS,
) -> ViMFit:
    """Fit ViM on training features, as the reference code of Wang et al. (2022) does.

    1. Origin ``u = -pinv(W) b``.
    2. Principal subspace: the ``dim`` leading eigenvectors of the second moment
       ``(X - u)^T (X - u) / N`` (centred on ``u``, not on the mean); the residual basis ``R``
       is the other ``D - dim`` eigenvectors.
    3. ``alpha = mean_i max_c logit_ic / mean_i |(x_i - u) R|``, so that the virtual logit
       ``alpha * |(x - u) R|`` is on the scale of the real logits.

    Statistics are accumulated in float64, ``chunk_rows`` rows at a time; one ``D x D``
    eigen-decomposition costs ``O(D^3)``.

    Args:
        X: ``(N, D)`` finite training features.
        weight: ``(C, D)`` head weight.
        bias: ``(C,)`` head bias.
        dim: Size of the principal subspace, ``1 <= dim < D``.
        chunk_rows: Rows per step.

    Returns:
        A :class:`ViMFit` of float64 tensors.

    Raises:
        ValueError: ``dim`` is not below ``D``, every row equals ``u``, or the training
            features have no residual outside the principal subspace (beyond rounding).

    Example:
        >>> X, W, b = torch.randn(100, 6), torch.randn(3, 6), torch.randn(3)
        >>> fitted = fit_vim(X, W, b, dim=3)
        >>> fitted.residual_basis.shape
        torch.Size([6, 3])
    """
    n, d = X.shape
    if not 1 <= dim < d:
        raise ValueError(
            f"Expected argument `dim` to be an integer in [1, D) = [1, {d}) (ViM keeps the "
            f"residual outside a dim-dimensional principal subspace of the D={d} features), "
            f"got {dim}."
        )
    origin = vim_origin(weight, bias)
    moment = torch.zeros(d, d, dtype=torch.float64, device=X.device)
    for chunk in X.split(chunk_rows):
        centred = chunk.double() - origin
        moment += centred.T @ centred
    components, _ = principal_components(moment / n, d)
    residual_basis = components[:, dim:].contiguous()
    max_logit, residual_norm, centred_norm = torch.zeros(3, dtype=torch.float64, device=X.device)
    for chunk in X.split(chunk_rows):
        centred = chunk.double() - origin
        max_logit += head_logits(chunk.double(), weight, bias).amax(dim=1).sum()
        residual_norm += (centred @ residual_basis).norm(dim=1).sum()
        centred_norm += centred.norm(dim=1).sum()
    # below ~100 rounding errors of X's dtype, the residual is noise and alpha meaningless
    if not residual_norm > 100 * torch.finfo(X.dtype).eps * centred_norm:
        raise ValueError(
            f"The training features have no component outside the principal subspace of "
            f"dim={dim}, so ViM's scale alpha is undefined; pass a smaller `dim`."
        )
    return ViMFit(origin, residual_basis, max_logit / residual_norm)


def vim_score(
    X: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    origin: torch.Tensor,
    residual_basis: torch.Tensor,
    alpha: torch.Tensor,
) -> torch.Tensor:
    """ViM score ``alpha * |(x - u) R| - logsumexp(x W^T + b)`` (Wang et al. 2022).

    The virtual logit ``alpha * |(x - u) R|`` is large for features off the training data's
    principal subspace; the paper's ViM is the softmax probability of that virtual class among
    the real logits, ``sigmoid(score)``, so this score ranks rows exactly as the paper does.

    Args:
        X: ``(B, D)`` features.
        weight: ``(C, D)`` head weight.
        bias: ``(C,)`` head bias.
        origin: ``(D,)`` origin ``u`` from :func:`fit_vim`.
        residual_basis: ``(D, D - dim)`` residual basis ``R``.
        alpha: 0-dim scale.

    Returns:
        ``(B,)`` scores, higher = more unusual.

    Example:
        >>> X, W, b = torch.randn(100, 6), torch.randn(3, 6), torch.randn(3)
        >>> vim_score(torch.randn(4, 6), W, b, *fit_vim(X, W, b, dim=3)).shape
        torch.Size([4])
    """
    dtype = _compute_dtype(X, weight)
    Xd = X.to(dtype)
    residual = (Xd - origin.to(dtype)) @ residual_basis.to(dtype)
    return alpha.to(dtype) * residual.norm(dim=1) - head_logits(Xd, weight, bias).logsumexp(dim=1)


# -- ReAct ------------------------------------------------------------------------------------


def activation_percentile(X: torch.Tensor, percentile: float) -> torch.Tensor:
    """Exact ``percentile`` of all entries of ``X``, as ``numpy.percentile`` (linear) computes.

    Uses two :func:`torch.kthvalue` selections on the flattened tensor: no sample is drawn, so
    the result is exact for any size, in linear time (a copy of ``X`` is made).
    :func:`torch.quantile` sorts everything, and before PyTorch 2.6 refused more than 2^24
    elements, fewer than ImageNet-scale features hold.

    Args:
        X: ``(N, D)`` activations, ``N * D >= 1``.
        percentile: In ``[0, 100]``.

    Returns:
        0-dim tensor in ``X``'s dtype.

    Example:
        >>> activation_percentile(torch.arange(11.0).reshape(1, 11), 90).item()
        9.0
    """
    flat = X.reshape(-1)
    pos = percentile / 100.0 * (flat.numel() - 1)
    lo = math.floor(pos)
    frac = pos - lo
    low = flat.kthvalue(lo + 1).values
    if frac == 0.0 or lo + 1 >= flat.numel():
        return low
    high = flat.kthvalue(lo + 2).values
    return (low.double() + frac * (high.double() - low.double())).to(X.dtype)


def react_score(
    X: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, clip: torch.Tensor | float
) -> torch.Tensor:
    """ReAct: the energy of the head on activations clipped from above at ``clip``.

    ``-logsumexp(min(x, c) W^T + b)`` (Sun, Guo & Li 2021). Clipping removes the few very
    large activations that unusual inputs produce and that inflate their logits.

    Args:
        X: ``(B, D)`` penultimate activations.
        weight: ``(C, D)`` head weight.
        bias: ``(C,)`` head bias.
        clip: Upper bound ``c`` (a float or 0-dim tensor), usually a high percentile of the
            training activations (see :func:`activation_percentile`).

    Returns:
        ``(B,)`` energies, higher = more unusual.

    Example:
        >>> X, W, b = torch.tensor([[1.0, 9.0]]), torch.eye(2), torch.zeros(2)
        >>> react_score(X, W, b, 2.0)  # clipped to (1, 2)
        tensor([-2.3133])
    """
    dtype = _compute_dtype(X, weight)
    clip = torch.as_tensor(clip, dtype=dtype, device=X.device)
    return head_energy(torch.minimum(X.to(dtype), clip), weight, bias)


# -- ASH --------------------------------------------------------------------------------------


def ash_keep(n_features: int, percentile: float) -> int:
    """How many activations per row ASH keeps: ``D - round(D * p / 100)``, at least 1.

    The rounding is the reference code's (``numpy.round``, half to even).

    Example:
        >>> ash_keep(2048, 90), ash_keep(8, 90), ash_keep(8, 99)
        (205, 1, 1)
    """
    percentile = check_percentile(percentile)
    return max(1, n_features - round(n_features * percentile / 100.0))


def ash_shape(X: torch.Tensor, percentile: float = 90.0, variant: str = "s") -> torch.Tensor:
    """Activation shaping (Djurisic et al. 2023): keep each row's top activations.

    With ``k = ash_keep(D, percentile)`` and ``s1`` the row's sum before pruning:

    * ``"p"`` (ASH-P): keep the ``k`` largest activations, zero the rest.
    * ``"b"`` (ASH-B): set the ``k`` kept positions to ``s1 / k``, the rest to zero.
    * ``"s"`` (ASH-S): prune as ASH-P, then multiply by ``exp(s1 / s2)``, ``s2`` the sum of the
      kept activations. A row whose kept activations sum to 0 (an all-zero row of ReLU
      features) is left unscaled rather than divided by zero.

    Among equal activations (the zeros of a row with fewer than ``k`` positive ones) the lowest
    indices are kept, deterministically; ASH-B writes ``s1 / k`` there too, as the reference
    code does at whichever positions ``torch.topk`` returns.

    ASH assumes non-negative (post-ReLU) activations, as at the penultimate layer of a ResNet;
    with negative activations ``s1 / s2`` can be large and ``exp`` overflow (such rows then
    score ``+inf`` in a :class:`~selectorch.scores.Score`).

    Args:
        X: ``(B, D)`` activations.
        percentile: ``p`` in ``[0, 100)``: the share of each row's activations removed.
        variant: ``"s"``, ``"p"`` or ``"b"``.

    Returns:
        ``(B, D)`` shaped activations, in at least float32.

    Example:
        >>> ash_shape(torch.tensor([[1.0, 4.0, 2.0, 3.0]]), 50, "p")
        tensor([[0., 4., 0., 3.]])
    """
    if variant not in ASH_VARIANTS:
        raise ValueError(
            f"Expected argument `variant` to be one of {ASH_VARIANTS}, got {variant!r}."
        )
    k = ash_keep(X.shape[1], percentile)
    X = X if X.dtype in (torch.float32, torch.float64) else X.float()
    # a stable sort, not topk: ties (the many zeros of ReLU features) keep the lowest indices,
    # the same on every device, batch and compiled graph; ASH-B fills the kept positions
    values, index = X.sort(dim=1, descending=True, stable=True)
    values, index = values[:, :k], index[:, :k]
    if variant == "p":
        kept = values
    elif variant == "b":
        kept = (X.sum(dim=1, keepdim=True) / k).expand_as(values)
    else:
        s1 = X.sum(dim=1, keepdim=True)
        s2 = values.sum(dim=1, keepdim=True)
        nonzero = s2 != 0
        ratio = torch.where(nonzero, s1 / torch.where(nonzero, s2, torch.ones_like(s2)), 0.0)
        kept = values * ratio.exp()
    return torch.zeros_like(X).scatter(1, index, kept)


def ash_score(
    X: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    percentile: float = 90.0,
    variant: str = "s",
) -> torch.Tensor:
    """ASH: the energy of the head on shaped activations (see :func:`ash_shape`).

    Args:
        X: ``(B, D)`` penultimate activations.
        weight: ``(C, D)`` head weight.
        bias: ``(C,)`` head bias.
        percentile: ``p`` in ``[0, 100)``: the share of each row's activations removed.
        variant: ``"s"``, ``"p"`` or ``"b"``.

    Returns:
        ``(B,)`` energies, higher = more unusual.

    Example:
        >>> X, W, b = torch.tensor([[1.0, 4.0, 2.0, 3.0]]), torch.ones(2, 4), torch.zeros(2)
        >>> ash_score(X, W, b, 50, "p")  # -logsumexp([7, 7])
        tensor([-7.6931])
    """
    return head_energy(ash_shape(X, percentile, variant), weight, bias)
