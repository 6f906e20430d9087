"""ODIN (Liang, Li & Srikant, ICLR 2018): temperature scaling after one input perturbation step.

The input is moved one signed-gradient step in the direction that raises the softmax score of
the predicted class, then the temperature-scaled maximum softmax probability of the moved
input is read. In-distribution inputs gain more from the step than unfamiliar ones, which
separates them better than the plain softmax score.

The gradient of the sum of per-sample losses gives each sample its own gradient, as long as
the model treats the samples of a batch independently: models in eval mode. A batch-norm layer
in train mode mixes the samples of a batch (its statistics are the batch's), and so would the
gradients.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Sequence
from typing import Any

import torch

from selectorch.functional.logits import softmax_score

#: A normalisation std: one number, or one per input channel.
Std = float | Sequence[float]


def check_std(std: Any) -> float | tuple[float, ...]:
    """Return ``std`` as a positive float, or a tuple of positive floats; else raise.

    Example:
        >>> check_std([0.229, 0.224, 0.225])
        (0.229, 0.224, 0.225)
    """

    def positive(value: Any) -> bool:
        return (
            isinstance(value, numbers.Real)
            and not isinstance(value, bool)
            and 0 < float(value) < float("inf")
        )

    if positive(std):
        return float(std)
    if isinstance(std, (list, tuple)) and std and all(positive(v) for v in std):
        return tuple(float(v) for v in std)
    raise ValueError(
        "Expected argument `std` to be a positive number or a non-empty sequence of positive "
        f"numbers (one per input channel), got {std!r}."
    )


def std_tensor(std: Std, x: torch.Tensor) -> torch.Tensor:
    """``std`` shaped to divide ``(B, C, ...)`` inputs channel by channel.

    Raises:
        ValueError: A sequence whose length is not the number of channels ``x.shape[1]``.
    """
    if isinstance(std, float):
        return torch.tensor(std, dtype=x.dtype, device=x.device)
    if x.ndim < 2 or x.shape[1] != len(std):
        raise ValueError(
            f"Argument `std` gives {len(std)} per-channel values, but the input has shape "
            f"{tuple(x.shape)}: expected (B, {len(std)}, ...) inputs, channels in dim 1."
        )
    shape = (1, len(std)) + (1,) * (x.ndim - 2)
    return torch.tensor(std, dtype=x.dtype, device=x.device).reshape(shape)


def odin_perturbation(
    x: torch.Tensor,
    logits: torch.Tensor,
    *,
    temperature: float = 1000.0,
    epsilon: float = 0.0014,
    std: Std = 1.0,
    retain_graph: bool = False,
) -> torch.Tensor:
    """The input moved one step against the loss of its predicted class.

    ``x' = x - epsilon * sign(grad_x(-log softmax(logits / T)[pred])) / std``, with
    ``pred = argmax(logits)``. ``epsilon`` is a step in pixel units; dividing by the
    normalisation ``std`` makes it a step in the normalised units the model reads.

    Args:
        x: ``(B, C, ...)`` input that requires grad (a leaf, or part of a graph).
        logits: ``(B, K)`` logits computed from ``x`` with gradients on.
        temperature: ``T`` > 0.
        epsilon: Step size >= 0 (0 returns ``x`` unchanged).
        std: Normalisation std: a number, or ``C`` numbers (one per channel of ``x``).
        retain_graph: Keep the graph of ``logits`` (for a caller that backpropagates later).

    Returns:
        ``(B, C, ...)`` detached perturbed input; the parameters' ``.grad`` are not touched.

    Raises:
        ValueError: ``logits`` is not ``(B, K)``, or ``std`` does not match the channels.

    Example:
        >>> x = torch.tensor([[1.0, 2.0]], requires_grad=True)
        >>> logits = torch.stack([x[:, 0], -x[:, 1]], dim=1)  # predicts class 0
        >>> odin_perturbation(x, logits, temperature=1.0, epsilon=0.5)
        tensor([[1.5000, 2.5000]])
    """
    if logits.ndim != 2 or logits.shape[0] != x.shape[0]:
        raise ValueError(
            f"Expected `logits` of shape (B, K) with B = {x.shape[0]} rows like the input, got "
            f"{tuple(logits.shape)}."
        )
    scale = std_tensor(std, x)
    z = logits if logits.dtype in (torch.float32, torch.float64) else logits.float()
    log_probs = (z / temperature).log_softmax(dim=1)
    pred = logits.detach().argmax(dim=1, keepdim=True)
    # a sum of per-sample losses: each row's gradient is its own (samples do not interact)
    loss = -log_probs.gather(1, pred).sum()
    (grad,) = torch.autograd.grad(loss, x, retain_graph=retain_graph)
    return x.detach() - epsilon * grad.sign() / scale


def odin_logits(
    model: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    *,
    temperature: float = 1000.0,
    epsilon: float = 0.0014,
    std: Std = 1.0,
) -> torch.Tensor:
    """The model's logits on the ODIN-perturbed input: two passes, one with gradients.

    Gradients are turned on for the first pass (also inside ``torch.no_grad()``) and only
    with respect to a copy of ``x``: the parameters get no ``.grad``. Run the model in eval
    mode (see the module's note on batch norm).

    Args:
        model: Callable ``(B, C, ...) -> (B, K)`` logits (wrap models with other outputs).
        x: ``(B, C, ...)`` floating input, normalised as the model expects.
        temperature: ``T`` > 0 of the perturbation's loss.
        epsilon: Step size >= 0 in pixel units.
        std: Normalisation std of the input, a number or one per channel.

    Returns:
        ``(B, K)`` detached logits of the perturbed input; ``-max softmax(logits / T)`` of
        them is the ODIN score (:func:`odin_score`).

    Raises:
        RuntimeError: Called under ``torch.inference_mode()``.
        TypeError: ``x`` is not a floating tensor.

    Example:
        >>> net = torch.nn.Linear(4, 3)
        >>> odin_logits(net, torch.randn(5, 4), std=0.5).shape
        torch.Size([5, 3])
    """
    check_gradient_input(x, "ODIN")
    leaf = (x.clone() if x.is_inference() else x.detach()).requires_grad_(True)
    with torch.enable_grad():
        logits = model(leaf)
        moved = odin_perturbation(leaf, logits, temperature=temperature, epsilon=epsilon, std=std)
    with torch.no_grad():
        return model(moved)


def odin_score(logits: torch.Tensor, temperature: float = 1000.0) -> torch.Tensor:
    """``-max softmax(logits / T)`` of (perturbed) logits: higher = more uncertain.

    Args:
        logits: ``(N, K)`` logits, from :func:`odin_logits` for the full ODIN score.
        temperature: ``T`` > 0.

    Returns:
        ``(N,)`` scores in ``[-1, -1/K]``.

    Example:
        >>> odin_score(torch.tensor([[1000.0, 0.0]])).item()
        -0.7310585975646973
    """
    return softmax_score(logits, temperature)


def check_gradient_input(x: Any, who: str) -> None:
    """Refuse what cannot be differentiated: inference mode, non-tensors, integer inputs.

    Raises:
        RuntimeError: ``torch.inference_mode()`` is on.
        TypeError: ``x`` is not a floating-point tensor (token ids cannot be perturbed).
    """
    if torch.is_inference_mode_enabled():
        raise RuntimeError(
            f"{who} needs gradients with respect to the input, which torch.inference_mode() "
            "forbids. Call it under torch.no_grad() instead (gradients are turned on for the "
            "perturbation step only), or with no grad context."
        )
    if not isinstance(x, torch.Tensor):
        raise TypeError(
            f"{who} perturbs the model's first positional input, which must be a tensor; got "
            f"{type(x).__name__}."
        )
    if not x.is_floating_point():
        raise TypeError(
            f"{who} perturbs the model's first positional input along its gradient, which "
            f"needs a floating-point tensor, got dtype {x.dtype} (token ids cannot be "
            "perturbed; use a score without input gradients)."
        )
