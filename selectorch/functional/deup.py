"""DEUP's error predictor (Lahlou et al. 2023): an MLP that predicts a model's per-sample loss.

The predictor is a plain list of tensors ``[W0, b0, W1, b1, W2, b2]`` (two hidden ReLU layers,
a softplus output), so that a score module can keep it in buffers and run it compile-clean.
Training is seeded by a ``torch.Generator`` (initialisation, folds and mini-batch order), and
is deterministic on the CPU.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def kfold_indices(
    n: int, folds: int, generator: torch.Generator | None = None
) -> list[torch.Tensor]:
    """Split ``range(n)`` at random into ``folds`` disjoint parts whose sizes differ by at most 1.

    Args:
        n: Number of rows, at least ``folds``.
        folds: Number of parts, at least 2.
        generator: CPU generator for the permutation.

    Returns:
        ``folds`` CPU tensors of row indices, each sorted; together they hold every row once.

    Example:
        >>> parts = kfold_indices(5, 2, torch.Generator().manual_seed(0))
        >>> sorted(torch.cat(parts).tolist()), [len(p) for p in parts]
        ([0, 1, 2, 3, 4], [3, 2])
    """
    if folds < 2 or n < folds:
        raise ValueError(f"Expected 2 <= folds <= n rows, got folds={folds} and n={n}.")
    perm = torch.randperm(n, generator=generator)
    return [part.sort().values for part in perm.tensor_split(folds)]


def init_error_predictor(
    in_dim: int,
    hidden: int,
    *,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> list[torch.Tensor]:
    """Initial weights ``[W0 (H, D), b0 (H,), W1 (H, H), b1 (H,), W2 (1, H), b2 (1,)]``.

    Uniform in ``+-1/sqrt(fan_in)`` like ``nn.Linear``, drawn on the CPU from ``generator``.
    """
    shapes = [(hidden, in_dim), (hidden,), (hidden, hidden), (hidden,), (1, hidden), (1,)]
    fan_ins = [in_dim, in_dim, hidden, hidden, hidden, hidden]
    params = []
    for shape, fan_in in zip(shapes, fan_ins, strict=True):
        bound = 1.0 / math.sqrt(fan_in)
        w = (torch.rand(shape, generator=generator, dtype=torch.float64) * 2 - 1) * bound
        params.append(w.to(device=device, dtype=dtype))
    return params


def error_predictor(z: torch.Tensor, params: list[torch.Tensor]) -> torch.Tensor:
    """Predicted loss ``softplus(W2 relu(W1 relu(W0 z + b0) + b1) + b2) >= 0`` of each row.

    Args:
        z: ``(N, D)`` standardised features.
        params: ``[W0, b0, W1, b1, W2, b2]`` from :func:`train_error_predictor`.

    Returns:
        ``(N,)`` non-negative predictions.
    """
    w0, b0, w1, b1, w2, b2 = params
    h = F.relu(F.linear(z, w0, b0))
    h = F.relu(F.linear(h, w1, b1))
    return F.softplus(F.linear(h, w2, b2)).squeeze(1)


def train_error_predictor(
    z: torch.Tensor,
    targets: torch.Tensor,
    *,
    hidden: int = 64,
    epochs: int = 60,
    lr: float = 1e-3,
    batch_size: int = 512,
    weight_decay: float = 0.0,
    generator: torch.Generator | None = None,
) -> list[torch.Tensor]:
    """Fit :func:`error_predictor` to ``targets`` by mean squared error with Adam.

    A fixed number of epochs over mini-batches in a random order drawn from ``generator``.

    Args:
        z: ``(N, D)`` standardised features.
        targets: ``(N,)`` losses to predict (scaled to about 1 for a stable learning rate).
        hidden: Width of the two hidden layers.
        epochs: Passes over the rows.
        lr: Adam's learning rate.
        batch_size: Rows per step.
        weight_decay: Adam's L2 penalty.
        generator: CPU generator for the initialisation and the batch order.

    Returns:
        Trained ``[W0, b0, W1, b1, W2, b2]`` (detached).
    """
    params = init_error_predictor(
        z.shape[1], hidden, generator=generator, dtype=z.dtype, device=z.device
    )
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    targets = targets.to(z.dtype)
    with torch.enable_grad():
        for _ in range(epochs):
            order = torch.randperm(z.shape[0], generator=generator).to(z.device)
            for rows in order.split(batch_size):
                loss = F.mse_loss(error_predictor(z[rows], params), targets[rows])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
    return [p.detach() for p in params]


def out_of_fold_predictions(
    z: torch.Tensor,
    targets: torch.Tensor,
    folds: list[torch.Tensor],
    *,
    hidden: int = 64,
    epochs: int = 60,
    lr: float = 1e-3,
    batch_size: int = 512,
    weight_decay: float = 0.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Each row's loss as predicted by an error predictor trained on the other folds only.

    These are DEUP's generalisation-error targets: the prediction for a row never saw that row.

    Args:
        z: ``(N, D)`` standardised features.
        targets: ``(N,)`` observed losses.
        folds: Disjoint row indices covering ``range(N)`` (:func:`kfold_indices`).
        hidden, epochs, lr, batch_size, weight_decay: As for :func:`train_error_predictor`.
        generator: CPU generator, consumed fold after fold.

    Returns:
        ``(N,)`` out-of-fold predictions.
    """
    out = torch.empty(z.shape[0], dtype=z.dtype, device=z.device)
    for held_out in folds:
        held_out = held_out.to(z.device)
        train = torch.ones(z.shape[0], dtype=torch.bool, device=z.device)
        train[held_out] = False
        params = train_error_predictor(
            z[train],
            targets[train],
            hidden=hidden,
            epochs=epochs,
            lr=lr,
            batch_size=batch_size,
            weight_decay=weight_decay,
            generator=generator,
        )
        with torch.no_grad():
            out[held_out] = error_predictor(z[held_out], params)
    return out


def deup_score(
    X: torch.Tensor,
    params: list[torch.Tensor],
    *,
    mean: torch.Tensor,
    scale: torch.Tensor,
    low: torch.Tensor,
    high: torch.Tensor,
    target_scale: torch.Tensor,
    log_targets: bool = True,
    support_margin: float = 3.0,
) -> torch.Tensor:
    """DEUP score: the predicted loss, plus a term that grows far outside the training range.

    The error predictor runs on features clamped into the per-feature range ``[low, high]``
    seen at fit, where it was trained (a ReLU network extrapolates in an arbitrary direction):
    ``g = error_predictor((clamp(X, low, high) - mean) / scale)``, read as a loss
    ``target_scale * expm1(g)`` (``log_targets``) or ``target_scale * g``. Added to it is
    ``target_scale * relu(r - support_margin)``, where ``r = |(X - clamp(X, low, high)) / scale|``
    is how many standard deviations the input lies outside that range: zero near the training
    data, growing by one mean loss per standard deviation beyond the margin, so that inputs
    far from anything seen at fit score high (fail closed).

    Args:
        X: ``(N, D)`` features.
        params: Error predictor weights.
        mean, scale: ``(D,)`` standardisation of the features.
        low, high: ``(D,)`` per-feature range of the training features.
        target_scale: 0-dim loss unit (the mean training loss).
        log_targets: Whether the predictor was trained on ``log1p(loss / target_scale)``.
        support_margin: Standard deviations outside the range before the second term starts;
            ``inf`` turns it off.

    Returns:
        ``(N,)`` scores, ``>= 0``.
    """
    inside = torch.minimum(torch.maximum(X, low), high)
    g = error_predictor((inside - mean) / scale, params)
    predicted = torch.expm1(g) if log_targets else g
    outside = ((X - inside) / scale).norm(dim=1)
    return target_scale * (predicted + F.relu(outside - support_margin))


def head_losses(
    X: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """``(N,)`` cross-entropy of a linear classifier head ``X W^T + b`` against labels ``y``."""
    logits = F.linear(X, weight.to(X.dtype), None if bias is None else bias.to(X.dtype))
    return F.cross_entropy(logits, y.long(), reduction="none")
