"""JointEnergy of a multi-label classifier (Wang et al., NeurIPS 2021).

"Can multi-label classification networks know what they don't know?" sums the free energies of
the ``C`` independent labels: each label ``c`` with log-odds ``z_c`` is a two-way choice whose
logits are ``(0, z_c)``, with free energy ``-T log(1 + exp(z_c / T)) = -T softplus(z_c / T)``;
the joint energy of the sample is the sum over labels,

``E_joint(x) = -sum_c T softplus(z_c / T)``.

A sample on which some label fires confidently (a large positive ``z_c``) has a very negative
energy; a sample on which no label fires (every ``z_c`` negative) has an energy close to 0, the
top of the range. Higher = more unusual, so the energy is already an uncertainty.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from selectorch.functional.logits import check_logits

Temperature = float | torch.Tensor


def joint_energy_score(
    logits: torch.Tensor, temperature: Temperature = 1.0, *, task: str = "multilabel"
) -> torch.Tensor:
    """JointEnergy ``-sum_c T * softplus(z_c / T)`` of every row (higher = more unusual).

    The logits are read as independent per-output log-odds whatever the ``task``: for
    ``"multilabel"`` (the paper's setting) ``(N, C)`` log-odds of ``C`` labels; for
    ``"multiclass"`` the ``(N, C)`` logits of a softmax classifier, each output treated as a
    label (the energy of the sum of the outputs' two-way softplus terms); for ``"binary"``
    ``(N,)`` or ``(N, 1)`` log-odds of one label (``-T softplus(z / T)``: a confident negative
    counts as "no label", the most unusual answer) or ``(N, 2)`` logits summed over both.
    Half-precision logits are computed in float32.

    Args:
        logits: Logits shaped as ``task`` needs (see
            :func:`~selectorch.functional.logits.check_logits`).
        temperature: The energy temperature ``T`` > 0 (a float or a 0-dim tensor).
        task: ``"multilabel"``, ``"multiclass"`` or ``"binary"``.

    Returns:
        ``(N,)`` energies, in ``(-inf, 0)``.

    Raises:
        TypeError: ``logits`` is not a floating-point tensor.
        ValueError: A shape that ``task`` does not take, or a temperature that is not > 0.

    Example:
        >>> round(joint_energy_score(torch.zeros(1, 3)).item(), 4)  # -3 log 2
        -2.0794
        >>> joint_energy_score(torch.tensor([[20.0, -20.0]])).round(decimals=4)
        tensor([-20.])
    """
    check_logits(logits, task)
    if not isinstance(temperature, torch.Tensor) and (
        isinstance(temperature, bool)
        or not isinstance(temperature, (int, float))
        or not 0 < temperature < float("inf")
    ):
        raise ValueError(
            f"Expected argument `temperature` to be a positive number, got {temperature!r}."
        )
    z = logits if logits.dtype in (torch.float32, torch.float64) else logits.float()
    if z.ndim == 1:  # binary (N,) log-odds: one label
        z = z[:, None]
    return -(temperature * F.softplus(z / temperature)).sum(dim=1)
