"""GradNorm (Huang, Geng & Li, NeurIPS 2021) in closed form, for a whole batch at once.

"On the importance of gradients for detecting distributional shifts in the wild" scores a
sample by the L1 norm of the gradient, with respect to the weight ``W`` of the last linear layer
``z = W h + b``, of the KL divergence from the uniform distribution ``u = 1/C`` to the
temperature-scaled softmax ``p = softmax(z / T)``.

**Closed form.** ``KL(u || p) = sum_c u_c log u_c - (1/C) sum_c log p_c``, and
``d log p_c / d z_j = (delta_cj - p_j) / T``, so the gradient with respect to the logits is

``g = dKL/dz = (1/T) (p - u)``  (a ``(C,)`` vector),

and, since ``z_j = sum_k W_jk h_k + b_j``, the gradient with respect to the weight is the outer
product ``dKL/dW = g h^T``. The L1 norm of an outer product factorises:
``sum_jk |g_j| |h_k| = ||g||_1 ||h||_1``, hence

``GradNorm(x) = (1/T) * ||softmax(z / T) - 1/C||_1 * ||h||_1``.

The paper (and its code) takes the weight's gradient only, not the bias's (that would add
``||g||_1``); so does this module. Computed for the whole batch with two reductions, no
autograd and no loop over samples: one head application, ``O(B C D)``.

GradNorm is large for in-distribution inputs (a peaked softmax and strong features), so the
uncertainty is its negative.
"""

from __future__ import annotations

import torch

from selectorch.functional.shaping import head_logits

Temperature = float | torch.Tensor


def gradnorm(
    X: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, temperature: Temperature = 1.0
) -> torch.Tensor:
    """L1 norm of ``d KL(uniform || softmax(z / T)) / d W`` for every row, in closed form.

    ``(1/T) * ||softmax(z / T) - 1/C||_1 * ||h||_1`` with ``z = h W^T + b`` (see the module).

    Args:
        X: ``(B, D)`` inputs ``h`` of the linear head (penultimate features).
        weight: ``(C, D)`` head weight ``W``.
        bias: ``(C,)`` head bias ``b``.
        temperature: ``T`` > 0, dividing the logits (a float or a 0-dim tensor).

    Returns:
        ``(B,)`` gradient norms, ``>= 0``, in at least float32.

    Example:
        >>> # a flat softmax has no gradient; zero features neither
        >>> gradnorm(torch.ones(2, 3), torch.zeros(4, 3), torch.zeros(4)).tolist()
        [0.0, 0.0]
        >>> # one-hot softmax: ||p - u||_1 = 1 for 2 classes, times ||h||_1 = 2
        >>> gradnorm(torch.tensor([[2.0, 0.0]]), torch.eye(2) * 50, torch.zeros(2)).tolist()
        [2.0]
    """
    logits = head_logits(X, weight, bias)
    p = (logits / temperature).softmax(dim=1)
    flatness = (p - 1.0 / logits.shape[1]).abs().sum(dim=1)
    return flatness * X.to(logits.dtype).abs().sum(dim=1) / temperature


def gradnorm_score(
    X: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, temperature: Temperature = 1.0
) -> torch.Tensor:
    """Uncertainty ``-GradNorm`` (see :func:`gradnorm`): higher = less in-distribution.

    Args:
        X: ``(B, D)`` inputs of the linear head.
        weight: ``(C, D)`` head weight.
        bias: ``(C,)`` head bias.
        temperature: ``T`` > 0.

    Returns:
        ``(B,)`` scores, ``<= 0``.

    Example:
        >>> gradnorm_score(torch.tensor([[2.0, 0.0]]), torch.eye(2) * 50, torch.zeros(2))
        tensor([-2.])
    """
    return -gradnorm(X, weight, bias, temperature)
