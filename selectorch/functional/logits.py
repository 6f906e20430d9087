"""Scores computed from a classifier's logits, as uncertainties (higher = less trustworthy).

Every function takes the logits of one ``task``:

- ``"multiclass"``: ``(N, C)`` logits of one softmax over ``C >= 2`` classes.
- ``"binary"``: ``(N,)`` or ``(N, 1)`` log-odds ``z`` of the positive class, or ``(N, 2)`` logits
  (then exactly multiclass with ``C = 2``).
- ``"multilabel"``: ``(N, C)`` log-odds of ``C`` independent labels.

A log-odds ``z`` is scored as the centred pair of logits ``(-z/2, z/2)``, whose softmax is
``(1 - sigmoid(z), sigmoid(z))``: the multiclass formulas apply unchanged, and ``z`` and ``-z``
(a confident positive and a confident negative) get the same score. A multilabel score is the
mean over the ``C`` labels of the per-label binary scores. Ensembles stack their ``M`` members'
logits in a last axis: ``(N, C, M)``, or ``(N, 1, M)`` / ``(N, 2, M)`` for binary.

Logits are divided by ``temperature`` first (a float or a 0-dim tensor). Half-precision logits are
computed in float32. Nothing here branches on tensor values, so every score compiles to one graph.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

LOGIT_TASKS = ("multiclass", "binary", "multilabel")

Temperature = float | torch.Tensor


def _upcast(logits: torch.Tensor) -> torch.Tensor:
    return logits if logits.dtype in (torch.float32, torch.float64) else logits.float()


def _shape_error(name: str, logits: torch.Tensor, expected: str, task: str) -> ValueError:
    return ValueError(
        f"Expected argument `{name}` to have shape {expected} for task={task!r}, "
        f"got {tuple(logits.shape)}."
    )


def check_logits(
    logits: object, task: str = "multiclass", *, ensemble: bool = False, name: str = "logits"
) -> torch.Tensor:
    """Check that ``logits`` is a floating tensor shaped as ``task`` needs; return it.

    Args:
        logits: The object to check.
        task: ``"multiclass"``, ``"binary"`` or ``"multilabel"``.
        ensemble: Whether a last axis of ``M >= 1`` ensemble members is expected.
        name: The argument's name, used in the error messages.

    Returns:
        ``logits`` itself.

    Raises:
        TypeError: ``logits`` is not a floating-point tensor.
        ValueError: Unknown ``task`` or a shape that ``task`` does not take.
    """
    if task not in LOGIT_TASKS:
        raise ValueError(f"Expected argument `task` to be one of {LOGIT_TASKS}, got {task!r}.")
    if not isinstance(logits, torch.Tensor):
        raise TypeError(
            f"Expected argument `{name}` to be a torch.Tensor, got {type(logits).__name__}."
        )
    if not logits.is_floating_point():
        raise TypeError(
            f"Expected argument `{name}` to be a floating-point tensor, got dtype {logits.dtype}."
        )
    shape = tuple(logits.shape)
    if ensemble:
        expected = "(N, 1, M) or (N, 2, M)" if task == "binary" else "(N, C, M)"
        if logits.ndim != 3:
            raise _shape_error(name, logits, f"{expected} (M ensemble members last)", task)
        if shape[2] < 1:
            raise _shape_error(name, logits, f"{expected} with at least 1 member", task)
        classes = shape[1]
    elif task == "binary":
        if logits.ndim == 1:
            return logits
        expected = "(N,), (N, 1) or (N, 2)"
        if logits.ndim != 2:
            raise _shape_error(name, logits, expected, task)
        classes = shape[1]
    else:
        if logits.ndim != 2:
            # the wording every score shares: (N, D) rows of features
            raise ValueError(
                f"Expected argument `{name}` to have shape (N, D), got {shape}; task={task!r} "
                "takes (N, C) logits."
            )
        classes = shape[1]
    if task == "multiclass" and classes < 2:
        raise ValueError(
            f"Expected argument `{name}` to have at least 2 classes for task='multiclass', got "
            f"shape {shape}; one log-odds per sample is task='binary'."
        )
    if task == "binary" and classes not in (1, 2):
        raise ValueError(
            f"Expected argument `{name}` to have 1 or 2 logits per sample for task='binary', got "
            f"shape {shape}; more classes are task='multiclass' or task='multilabel'."
        )
    if task == "multilabel" and classes < 1:
        raise ValueError(
            f"Expected argument `{name}` to have at least 1 label for task='multilabel', got "
            f"shape {shape}."
        )
    return logits


def _check_temperature(temperature: Temperature) -> None:
    if isinstance(temperature, torch.Tensor):
        return  # a buffer: its value is not checked in a compiled forward
    if (
        isinstance(temperature, bool)
        or not isinstance(temperature, (int, float))
        or not 0 < temperature < math.inf
    ):
        raise ValueError(
            f"Expected argument `temperature` to be a positive number, got {temperature!r}."
        )


def _categorical(
    logits: torch.Tensor, temperature: Temperature, task: str, ensemble: bool
) -> torch.Tensor:
    """Scaled logits of ``L`` independent categoricals: ``(N, L, K)``, ``(N, M, L, K)`` ensembles.

    Multiclass is ``L = 1, K = C``; each log-odds becomes the centred pair ``K = 2``.
    """
    check_logits(logits, task, ensemble=ensemble)
    _check_temperature(temperature)
    z = _upcast(logits) / temperature
    if ensemble:
        z = z.movedim(-1, 1)  # (N, M, C)
    elif z.ndim == 1:
        z = z[:, None]  # binary (N,) -> (N, 1)
    if task == "multiclass" or (task == "binary" and z.shape[-1] == 2):
        return z.unsqueeze(-2)
    half = z / 2
    return torch.stack([-half, half], dim=-1)


def _log_probs(scaled: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(log p, log(1 - p))`` over the last axis, accurate even when ``p`` is close to 1.

    ``log_softmax`` rounds ``log p`` to 0 once ``p > 1 - 6e-8`` in float32, which erases the
    tails that entropy and GEN measure. Here everything is taken relative to the top logit ``t``:
    with ``r = log sum_{i != t} exp(z_i - z_t)``, ``log p_i = z_i - z_t - softplus(r)`` and
    ``log(1 - p_t) = r - softplus(r)``; every other class has ``p <= 1/2``, where ``log1p(-p)`` is
    accurate.
    """
    top = scaled.argmax(dim=-1, keepdim=True)
    is_top = torch.zeros_like(scaled, dtype=torch.bool).scatter(-1, top, True)
    shifted = scaled - scaled.gather(-1, top)
    r = shifted.masked_fill(is_top, float("-inf")).logsumexp(dim=-1, keepdim=True)
    log_norm = F.softplus(r)
    logp = shifted - log_norm
    log1m = torch.where(is_top, r - log_norm, torch.log1p(-logp.exp()))
    return logp, log1m


def softmax_score(
    logits: torch.Tensor, temperature: Temperature = 1.0, *, task: str = "multiclass"
) -> torch.Tensor:
    """Negative maximum softmax probability (Hendrycks & Gimpel 2017).

    Binary: ``-max(p, 1 - p)`` with ``p = sigmoid(z / T)``; multilabel: its mean over labels.

    Args:
        logits: Logits shaped as ``task`` needs (see the module); half is computed in float32.
        temperature: Divides the logits before the softmax.
        task: ``"multiclass"``, ``"binary"`` or ``"multilabel"``.

    Returns:
        Tensor of shape ``(N,)`` in ``[-1, -1/C]`` (``[-1, -1/2]`` binary and multilabel).

    Example:
        >>> softmax_score(torch.tensor([[0.0, 0.0]])).item()
        -0.5
        >>> softmax_score(torch.tensor([-10.0, 10.0]), task="binary").tolist()
        [-0.9999545812606812, -0.9999545812606812]
    """
    scaled = _categorical(logits, temperature, task, ensemble=False)
    return -scaled.softmax(dim=-1).amax(dim=-1).mean(dim=-1)


def max_logit_score(
    logits: torch.Tensor, temperature: Temperature = 1.0, *, task: str = "multiclass"
) -> torch.Tensor:
    """Negative maximum logit ``-max(z / T)`` (Hendrycks et al. 2022, "MaxLogit").

    Binary: ``-|z| / (2T)``, the larger of the centred logits ``±z / 2``; multilabel: its mean
    over labels. Unlike the softmax, it keeps the logits' scale, which helps to flag unusual
    inputs.

    Args:
        logits: Logits shaped as ``task`` needs; half is computed in float32.
        temperature: Divides the logits.
        task: ``"multiclass"``, ``"binary"`` or ``"multilabel"``.

    Returns:
        Tensor of shape ``(N,)``.

    Example:
        >>> max_logit_score(torch.tensor([[3.0, -1.0]])).item()
        -3.0
    """
    scaled = _categorical(logits, temperature, task, ensemble=False)
    return -scaled.amax(dim=-1).mean(dim=-1)


def energy_score(
    logits: torch.Tensor, temperature: Temperature = 1.0, *, task: str = "multiclass"
) -> torch.Tensor:
    """Free energy ``-T * logsumexp(z / T)`` (Liu et al. 2020): higher = less in-distribution.

    Binary: the energy of the centred pair, ``-T * log(2 cosh(z / 2T))``, the same for ``z`` and
    ``-z`` (the energy of ``(0, z)``, ``-T * softplus(z / T)``, would call a confident negative
    the most unusual sample); multilabel: its mean over labels.

    Args:
        logits: Logits shaped as ``task`` needs; half is computed in float32.
        temperature: The energy temperature ``T``.
        task: ``"multiclass"``, ``"binary"`` or ``"multilabel"``.

    Returns:
        Tensor of shape ``(N,)``.

    Example:
        >>> round(energy_score(torch.zeros(1, 4)).item(), 4)  # -log(4)
        -1.3863
    """
    scaled = _categorical(logits, temperature, task, ensemble=False)
    return -(temperature * scaled.logsumexp(dim=-1)).mean(dim=-1)


def entropy_score(
    logits: torch.Tensor, temperature: Temperature = 1.0, *, task: str = "multiclass"
) -> torch.Tensor:
    """Shannon entropy ``-sum_c p_c log p_c`` of the predicted distribution, in nats.

    Binary: the entropy of ``sigmoid(z / T)``; multilabel: its mean over labels. Probabilities
    are taken relative to the top logit, so the entropy of a near one-hot row stays accurate
    (tiny, not 0) in float32.

    Args:
        logits: Logits shaped as ``task`` needs; half is computed in float32.
        temperature: Divides the logits before the softmax.
        task: ``"multiclass"``, ``"binary"`` or ``"multilabel"``.

    Returns:
        Tensor of shape ``(N,)`` in ``[0, log C]`` (``[0, log 2]`` binary and multilabel).

    Example:
        >>> round(entropy_score(torch.zeros(1, 4)).item(), 4)  # log(4)
        1.3863
    """
    logp, _ = _log_probs(_categorical(logits, temperature, task, ensemble=False))
    return -(logp.exp() * logp).sum(dim=-1).mean(dim=-1)


def margin_score(
    logits: torch.Tensor, temperature: Temperature = 1.0, *, task: str = "multiclass"
) -> torch.Tensor:
    """Negative margin ``-(p_top1 - p_top2)`` between the two most probable classes.

    Binary: ``-|2p - 1|``; multilabel: its mean over labels.

    Args:
        logits: Logits shaped as ``task`` needs; half is computed in float32.
        temperature: Divides the logits before the softmax.
        task: ``"multiclass"``, ``"binary"`` or ``"multilabel"``.

    Returns:
        Tensor of shape ``(N,)`` in ``[-1, 0]``.

    Example:
        >>> margin_score(torch.tensor([[0.0, 0.0, -50.0]])).item()
        -0.0
    """
    p = _categorical(logits, temperature, task, ensemble=False).softmax(dim=-1)
    top2 = p.topk(2, dim=-1).values
    return -(top2[..., 0] - top2[..., 1]).mean(dim=-1)


def gen_score(
    logits: torch.Tensor,
    temperature: Temperature = 1.0,
    *,
    gamma: float = 0.1,
    M: int = 100,
    task: str = "multiclass",
) -> torch.Tensor:
    """Generalized entropy of the top-M probabilities: ``sum_{j<=M} p_(j)^g (1 - p_(j))^g``.

    GEN (Liu, Lochman & Zach, CVPR 2023, "GEN: Pushing the Limits of Softmax-Based
    Out-of-Distribution Detection"): ``p_(1) >= p_(2) >= ...`` are the sorted probabilities, not
    renormalised; the paper's confidence is ``-G``, so this returns ``G``. ``M > C`` uses all
    ``C`` classes. Binary: ``2 (p (1 - p))^gamma`` (``M >= 2``); multilabel: its mean over labels.
    Computed in log space, so a confident row keeps its small, informative value.

    Args:
        logits: Logits shaped as ``task`` needs; half is computed in float32.
        temperature: Divides the logits before the softmax.
        gamma: Exponent in ``(0, 1]``; small values weigh the tails (paper: 0.1).
        M: Number of top classes summed, ``>= 1`` (paper: 100 on ImageNet-1k).
        task: ``"multiclass"``, ``"binary"`` or ``"multilabel"``.

    Returns:
        Tensor of shape ``(N,)``, in ``[0, min(M, C) * 4^-gamma]``.

    Example:
        >>> round(gen_score(torch.zeros(1, 2), gamma=1.0).item(), 4)  # 2 * 0.5 * 0.5
        0.5
    """
    if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or not 0 < gamma <= 1:
        raise ValueError(f"Expected argument `gamma` to be a number in (0, 1], got {gamma!r}.")
    if isinstance(M, bool) or not isinstance(M, int) or M < 1:
        raise ValueError(f"Expected argument `M` to be an integer >= 1, got {M!r}.")
    scaled = _categorical(logits, temperature, task, ensemble=False)
    logp, log1m = _log_probs(scaled)
    terms = torch.exp(gamma * (logp + log1m))
    if M < scaled.shape[-1]:
        terms = terms.gather(-1, scaled.topk(M, dim=-1).indices)
    return terms.sum(dim=-1).mean(dim=-1)


def _member_log_probs(
    logits: torch.Tensor, temperature: Temperature, task: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Members' ``(log p, log(1 - p))``, both ``(N, M, L, K)``."""
    return _log_probs(_categorical(logits, temperature, task, ensemble=True))


def mutual_information_score(
    logits: torch.Tensor, temperature: Temperature = 1.0, *, task: str = "multiclass"
) -> torch.Tensor:
    """Mutual information between the prediction and the ensemble member (epistemic uncertainty).

    ``H(mean_m p_m) - mean_m H(p_m)``: the entropy of the averaged prediction minus the members'
    mean entropy (Depeweg et al. 2018; "BALD", Houlsby et al. 2011). It is 0 when all members
    agree, whatever their confidence. Binary and multilabel: per label, then the mean over labels.
    Clamped at 0 against rounding.

    Args:
        logits: Ensemble logits ``(N, C, M)`` (``(N, 1, M)`` or ``(N, 2, M)`` binary), members
            last; half is computed in float32.
        temperature: Divides every member's logits.
        task: ``"multiclass"``, ``"binary"`` or ``"multilabel"``.

    Returns:
        Tensor of shape ``(N,)`` in ``[0, log min(C, M)]``.

    Example:
        >>> agree = torch.tensor([[[2.0, 2.0], [0.0, 0.0]]])  # 1 sample, 2 classes, 2 members
        >>> mutual_information_score(agree).item()
        0.0
    """
    logp, log1m = _member_log_probs(logits, temperature, task)
    log_members = math.log(logp.shape[1])
    mean_logp = logp.logsumexp(dim=1) - log_members
    mean_log1m = log1m.logsumexp(dim=1) - log_members
    # log p of a class with p > 1/2 is best taken from its accurate log(1 - p)
    mean_logp = torch.where(mean_logp > -math.log(2), torch.log1p(-mean_log1m.exp()), mean_logp)
    total = -(mean_logp.exp() * mean_logp).sum(dim=-1)
    aleatoric = -(logp.exp() * logp).sum(dim=-1).mean(dim=1)
    return (total - aleatoric).clamp(min=0).mean(dim=-1)


def predictive_variance_score(
    logits: torch.Tensor, temperature: Temperature = 1.0, *, task: str = "multiclass"
) -> torch.Tensor:
    """Variance of the members' probabilities, averaged over classes.

    ``mean_c var_m p_m(c)``, with the population variance (divide by ``M``) over the ``M``
    members. Binary and multilabel: ``var_m sigmoid(z_m / T)`` per label, then the mean over
    labels. It is 0 when all members agree.

    Args:
        logits: Ensemble logits ``(N, C, M)`` (``(N, 1, M)`` or ``(N, 2, M)`` binary), members
            last; half is computed in float32.
        temperature: Divides every member's logits.
        task: ``"multiclass"``, ``"binary"`` or ``"multilabel"``.

    Returns:
        Tensor of shape ``(N,)`` in ``[0, 1/4]``.

    Example:
        >>> split = torch.tensor([[[50.0, -50.0], [-50.0, 50.0]]])  # members disagree
        >>> predictive_variance_score(split).item()
        0.25
    """
    p = _categorical(logits, temperature, task, ensemble=True).softmax(dim=-1)
    variance = (p - p.mean(dim=1, keepdim=True)).square().mean(dim=1)  # torch.var warns if N = 0
    return variance.mean(dim=-1).mean(dim=-1)


def logit_predictions(
    logits: torch.Tensor, *, task: str = "multiclass", ensemble: bool = False
) -> torch.Tensor:
    """The predicted classes that the logits' scores are about.

    Multiclass and two-logit binary: ``argmax``; a single binary log-odds: ``z > 0`` (an
    ``argmax`` over an ``(N, 1)`` tensor would always say 0); multilabel: ``z > 0`` per label;
    ensembles: the same on the members' mean probability.

    Args:
        logits: Logits shaped as ``task`` needs.
        task: ``"multiclass"``, ``"binary"`` or ``"multilabel"``.
        ensemble: Whether ``logits`` has a last axis of ensemble members.

    Returns:
        ``(N,)`` long classes (multiclass, binary) or ``(N, C)`` long 0/1 (multilabel).

    Example:
        >>> logit_predictions(torch.tensor([[-3.0], [2.0]]), task="binary").tolist()
        [0, 1]
    """
    probs = _categorical(logits, 1.0, task, ensemble).softmax(dim=-1)
    if ensemble:
        probs = probs.mean(dim=1)
    classes = probs.argmax(dim=-1)  # (N, L); a centred pair's argmax is z > 0
    return classes if task == "multilabel" else classes[:, 0]
