"""Temperature scaling of logits: labels as targets, the NLL of a temperature, and its fit.

``fit_temperature`` minimises the held-out NLL (multiclass) or BCE (binary, multilabel) of
``logits / T`` over ``log T`` by LBFGS, within :data:`TEMPERATURE_BOUNDS`; the logit scores of
:mod:`selectorch.functional.logits` then take the fitted ``T``.
"""

from __future__ import annotations

import math
import warnings

import torch

from selectorch.functional.logits import (
    Temperature,
    _categorical,
    _upcast,
    check_logits,
)

#: Range of temperatures that :func:`fit_temperature` searches.
TEMPERATURE_BOUNDS = (1e-2, 1e2)


def _targets(labels: torch.Tensor, logits: torch.Tensor, task: str) -> torch.Tensor:
    """Labels as targets: ``(N,)`` long classes, or ``(N, L)`` float probabilities of positives."""
    if task == "multiclass":
        return labels.long()
    dtype = logits.dtype if logits.dtype == torch.float64 else torch.float32
    return labels.reshape(labels.shape[0], -1).to(dtype)


def check_labels(
    labels: object,
    logits: torch.Tensor,
    task: str = "multiclass",
    *,
    ensemble: bool = False,
    name: str = "y",
) -> torch.Tensor:
    """Check labels against checked ``logits``; return them as targets.

    Args:
        labels: Multiclass: ``(N,)`` integer class indices in ``[0, C)``. Binary: ``(N,)`` or
            ``(N, 1)`` values in ``[0, 1]`` (bool, integer or float, soft labels allowed).
            Multilabel: ``(N, C)`` values in ``[0, 1]``.
        logits: The logits the labels belong to (already checked for ``task``).
        task: ``"multiclass"``, ``"binary"`` or ``"multilabel"``.
        ensemble: Whether ``logits`` has a last axis of ensemble members.
        name: The argument's name, used in the error messages.

    Returns:
        Multiclass: ``(N,)`` long. Binary and multilabel: ``(N, L)`` float probabilities of the
        positive label (``L = 1`` binary, ``C`` multilabel).

    Raises:
        ValueError: Wrong type, shape, dtype or values; the message says what was expected.
    """
    n = logits.shape[0]
    if not isinstance(labels, torch.Tensor) or labels.ndim == 0 or labels.shape[0] != n:
        got = tuple(labels.shape) if isinstance(labels, torch.Tensor) else type(labels).__name__
        raise ValueError(f"Expected argument `{name}` to have {n} rows like `X`, got {got}.")
    shape = tuple(labels.shape)
    if task == "multiclass":
        classes = logits.shape[1]
        if labels.ndim != 1 or labels.is_floating_point() or labels.dtype == torch.bool:
            raise ValueError(
                f"Expected argument `{name}` to be (N,) integer class indices for "
                f"task='multiclass', got shape {shape} and dtype {labels.dtype}."
            )
        if n and (labels.min() < 0 or labels.max() >= classes):
            raise ValueError(
                f"Expected argument `{name}` to hold class indices in [0, {classes}), got "
                f"values in [{int(labels.min())}, {int(labels.max())}]."
            )
    elif task == "binary" and shape not in ((n,), (n, 1)):
        raise ValueError(
            f"Expected argument `{name}` to have shape (N,) or (N, 1) for task='binary', got "
            f"{shape}."
        )
    elif task == "multilabel" and shape != (n, logits.shape[1]):
        raise ValueError(
            f"Expected argument `{name}` to have shape (N, C) = {(n, logits.shape[1])} like the "
            f"logits for task='multilabel', got {shape}."
        )
    targets = _targets(labels, logits, task)
    if task != "multiclass" and n and not bool(((targets >= 0) & (targets <= 1)).all()):
        raise ValueError(
            f"Expected argument `{name}` to hold values in [0, 1] for task={task!r}, got values "
            f"in [{float(targets.min()):g}, {float(targets.max()):g}]."
        )
    return targets


def temperature_nll(
    logits: torch.Tensor,
    labels: torch.Tensor,
    temperature: Temperature,
    *,
    task: str = "multiclass",
    ensemble: bool = False,
) -> torch.Tensor:
    """Mean negative log-likelihood of ``labels`` under the temperature-scaled logits.

    Multiclass: cross-entropy; binary and multilabel: binary cross-entropy (mean over samples
    and labels); ensembles: the likelihood of the members' mean probability. The labels are not
    checked here (see :func:`check_labels`).

    Args:
        logits: Logits shaped as ``task`` needs.
        labels: Labels as :func:`check_labels` takes them.
        temperature: The temperature ``T`` (a tensor that requires grad, to fit it).
        task: ``"multiclass"``, ``"binary"`` or ``"multilabel"``.
        ensemble: Whether ``logits`` has a last axis of ensemble members.

    Returns:
        0-dim tensor.

    Example:
        >>> z, y = torch.tensor([[2.0, 0.0]]), torch.tensor([0])
        >>> round(temperature_nll(z, y, 1.0).item(), 4)  # cross_entropy(z, y)
        0.1269
    """
    logp = _categorical(logits, temperature, task, ensemble).log_softmax(dim=-1)
    if ensemble:
        logp = logp.logsumexp(dim=1) - math.log(logp.shape[1])  # (N, L, K)
    targets = _targets(labels, logp, task)
    if task == "multiclass":
        return -logp[:, 0].gather(-1, targets[:, None]).mean()
    # binary and multilabel pairs, single or two-logit, are ordered (negative, positive)
    pair = torch.stack([1 - targets, targets], dim=-1)  # (N, L, 2)
    return -(pair * logp).sum(dim=-1).mean()


def fit_temperature(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    task: str = "multiclass",
    ensemble: bool = False,
    max_iter: int = 100,
) -> torch.Tensor:
    """The temperature that minimises the NLL (or BCE) of ``labels`` (Guo et al. 2017).

    LBFGS with a strong-Wolfe line search on ``log T`` (so that ``T > 0``), from ``T = 1``,
    inside ``torch.enable_grad()`` (it works under ``torch.no_grad()``) and deterministic. ``T``
    is kept in :data:`TEMPERATURE_BOUNDS`; reaching a bound warns, since it usually means the
    labels are (almost) perfectly separated by the logits: fit on held-out data, not the
    training set.

    Args:
        logits: Logits shaped as ``task`` needs, without NaN or Inf.
        labels: Labels as :func:`check_labels` takes them.
        task: ``"multiclass"``, ``"binary"`` or ``"multilabel"``.
        ensemble: Whether ``logits`` has a last axis of ensemble members.
        max_iter: LBFGS iterations.

    Returns:
        0-dim tensor ``T`` in float32 (float64 for float64 logits), on ``logits``' device.

    Example:
        >>> z = torch.randn(2000, 5) * 3
        >>> y = torch.distributions.Categorical(logits=z / 2.0).sample()
        >>> T = fit_temperature(z, y)  # close to 2.0
    """
    check_logits(logits, task, ensemble=ensemble)
    targets = check_labels(labels, logits, task, ensemble=ensemble, name="labels")
    z = _upcast(logits).detach()
    lo, hi = (math.log(bound) for bound in TEMPERATURE_BOUNDS)
    log_t = torch.zeros((), dtype=z.dtype, device=z.device, requires_grad=True)
    optimizer = torch.optim.LBFGS(
        [log_t],
        lr=1.0,
        max_iter=max_iter,
        line_search_fn="strong_wolfe",
        tolerance_grad=1e-9,
        tolerance_change=1e-12,
    )

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = temperature_nll(z, targets, log_t.clamp(lo, hi).exp(), task=task, ensemble=ensemble)
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    log_t = log_t.detach().clamp(lo, hi)
    if not bool((log_t > lo + 1e-6) & (log_t < hi - 1e-6)):
        warnings.warn(
            f"The fitted temperature reached the bound {math.exp(float(log_t)):g} of "
            f"{TEMPERATURE_BOUNDS}: the labels are (almost) perfectly predicted, or unrelated to "
            "the logits. Fit the temperature on held-out data, not on the training set.",
            stacklevel=2,
        )
    return log_t.exp()
