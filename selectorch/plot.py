"""Plots for selective prediction; each function returns a matplotlib ``Figure``.

matplotlib (the ``plot`` extra: ``pip install 'selectorch[plot]'``) is imported inside the
functions. Figures are built with ``matplotlib.figure.Figure``, not ``pyplot``: nothing needs a
display, no global backend is switched, and ``fig.savefig("x.png")`` renders with Agg. In a
notebook the returned figure shows itself.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from selectorch._checks import check_int, check_matrix
from selectorch.embeddings_plot import project_2d, resolve_method
from selectorch.functional.selective import aurc, oracle_aurc, risk_coverage_curve
from selectorch.metrics._inputs import check_score, check_tensor, to_loss

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = [
    "plot_embeddings",
    "plot_risk_coverage",
    "plot_score_densities",
    "plot_threshold_sweep",
]

# most points drawn per curve; longer curves are thinned evenly (the last point is kept)
_MAX_CURVE_POINTS = 2000


def _axes(ax: Axes | None, figsize: tuple[float, float]) -> tuple[Figure, Axes]:
    """A new figure with one axes (or the figure of ``ax``), matplotlib imported lazily."""
    try:
        from matplotlib.figure import Figure
    except ImportError as err:
        raise ImportError(
            "selectorch.plot needs matplotlib; install it with pip install 'selectorch[plot]'."
        ) from err
    if ax is not None:
        return ax.figure, ax
    fig = Figure(figsize=figsize, layout="constrained")
    return fig, fig.add_subplot()


def _thin(*curves: torch.Tensor) -> list[Any]:
    """At most ``_MAX_CURVE_POINTS`` evenly spaced points of each (equally long) curve, as numpy."""
    n = curves[0].numel()
    if n > _MAX_CURVE_POINTS:
        index = torch.linspace(0, n - 1, _MAX_CURVE_POINTS).round().long().unique()
        curves = tuple(c[index] for c in curves)
    return [c.detach().double().cpu().numpy() for c in curves]


def _score_and_loss(score: Any, correct: Any) -> tuple[torch.Tensor, torch.Tensor]:
    score = check_score(score)
    return score, to_loss(score, correct, None, torch.float64).to(score.device)


def _check_threshold(threshold: Any) -> float | None:
    if threshold is None:
        return None
    if isinstance(threshold, torch.Tensor) and threshold.numel() == 1:
        threshold = threshold.item()
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)):
        raise TypeError(f"Expected argument `threshold` to be a number, got {threshold!r}.")
    return float(threshold)


def plot_risk_coverage(
    score: torch.Tensor,
    correct: torch.Tensor,
    *,
    threshold: float | torch.Tensor | None = None,
    oracle: bool = True,
    ax: Axes | None = None,
    figsize: tuple[float, float] = (5.0, 4.0),
) -> Figure:
    """Selective risk versus coverage, with the oracle and the chosen operating point.

    The model's curve has one point per distinct score (see
    :func:`selectorch.functional.risk_coverage_curve`); the oracle keeps the smallest losses
    first. The legend gives both AURCs.

    Args:
        score: ``(N,)`` uncertainties, higher = less trustworthy.
        correct: ``(N,)`` bool (``True`` = right) or float losses in [0, 1].
        threshold: Operating point to mark: samples with ``score <= threshold`` are kept.
        oracle: Whether to draw the oracle curve.
        ax: Axes to draw into; a new figure when ``None``.
        figsize: Size in inches of a new figure.

    Returns:
        The figure.

    Raises:
        ImportError: matplotlib is not installed.
        TypeError, ValueError: Inputs as for :class:`selectorch.metrics.AURC`.

    Example:
        >>> fig = plot_risk_coverage(torch.rand(100), torch.rand(100) > 0.2, threshold=0.8)
        >>> fig.savefig("risk_coverage.png")  # doctest: +SKIP
    """
    score, loss = _score_and_loss(score, correct)
    threshold = _check_threshold(threshold)
    fig, ax = _axes(ax, figsize)
    curve = risk_coverage_curve(score, loss)
    x, y = _thin(curve.coverage, curve.risk)
    ax.plot(
        x, y, marker="." if len(x) < 50 else None, label=f"score (AURC {aurc(score, loss):.4f})"
    )
    if oracle:
        sorted_loss = torch.sort(loss).values
        kept = torch.arange(1, loss.numel() + 1, dtype=torch.float64, device=loss.device)
        ox, oy = _thin(kept / loss.numel(), sorted_loss.cumsum(0) / kept)
        ax.plot(
            ox, oy, linestyle="--", color="gray", label=f"oracle (AURC {oracle_aurc(loss):.4f})"
        )
    if threshold is not None:
        kept_mask = score <= threshold
        coverage = kept_mask.double().mean().item()
        risk = loss[kept_mask].mean().item() if kept_mask.any() else float("nan")
        ax.scatter(
            [coverage],
            [risk],
            color="red",
            zorder=3,
            label=f"threshold {threshold:.4g}: coverage {coverage:.3f}, risk {risk:.3f}",
        )
    ax.set_xlabel("coverage")
    ax.set_ylabel("selective risk")
    ax.set_xlim(0, 1)
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", fontsize="small")
    return fig


def plot_score_densities(
    *,
    calibration: torch.Tensor | None = None,
    test: torch.Tensor | None = None,
    ood: torch.Tensor | None = None,
    threshold: float | torch.Tensor | None = None,
    bins: int = 50,
    ax: Axes | None = None,
    figsize: tuple[float, float] = (5.0, 4.0),
) -> Figure:
    """Histograms (as densities) of calibration, test and OOD scores, with the threshold.

    Non-finite scores cannot be drawn; their number is given in the legend.

    Args:
        calibration: ``(N,)`` scores of the calibration set.
        test: ``(M,)`` scores of in-distribution test samples.
        ood: ``(K,)`` scores of out-of-distribution samples.
        threshold: Vertical line at the selection threshold.
        bins: Number of bins, shared by all groups.
        ax: Axes to draw into; a new figure when ``None``.
        figsize: Size in inches of a new figure.

    Returns:
        The figure.

    Raises:
        ValueError: No group given, or ``bins`` < 1.
    """
    check_int("bins", bins)
    threshold = _check_threshold(threshold)
    given = {"calibration": calibration, "test": test, "ood": ood}
    groups = {
        name: check_score(s).detach().double().cpu() for name, s in given.items() if s is not None
    }
    if not groups:
        raise ValueError(
            "Expected at least one of `calibration`, `test` or `ood` scores, got none."
        )
    finite = {name: s[torch.isfinite(s)] for name, s in groups.items()}
    pooled = torch.cat(list(finite.values()))
    fig, ax = _axes(ax, figsize)
    if pooled.numel():
        low, high = pooled.min().item(), pooled.max().item()
        if low == high:
            low, high = low - 0.5, high + 0.5
        edges = torch.linspace(low, high, bins + 1).numpy()
        for name, values in finite.items():
            n_bad = groups[name].numel() - values.numel()
            label = f"{name} (n={groups[name].numel()}" + (
                f", {n_bad} non-finite)" if n_bad else ")"
            )
            if values.numel():
                ax.hist(
                    values.numpy(),
                    bins=edges,
                    density=True,
                    histtype="step",
                    linewidth=1.5,
                    label=label,
                )
            else:
                ax.plot([], [], label=label)
    if threshold is not None:
        ax.axvline(threshold, color="red", linestyle="--", label=f"threshold {threshold:.4g}")
    ax.set_xlabel("score (higher = less trustworthy)")
    ax.set_ylabel("density")
    ax.legend(fontsize="small")
    return fig


def plot_threshold_sweep(
    score: torch.Tensor,
    correct: torch.Tensor,
    *,
    threshold: float | torch.Tensor | None = None,
    ax: Axes | None = None,
    figsize: tuple[float, float] = (5.0, 4.0),
) -> Figure:
    """Coverage and selective risk versus the threshold (finite thresholds only).

    Args:
        score: ``(N,)`` uncertainties, higher = less trustworthy.
        correct: ``(N,)`` bool (``True`` = right) or float losses in [0, 1].
        threshold: Vertical line at the chosen threshold.
        ax: Axes to draw into; a new figure when ``None``.
        figsize: Size in inches of a new figure.

    Returns:
        The figure.
    """
    score, loss = _score_and_loss(score, correct)
    threshold = _check_threshold(threshold)
    fig, ax = _axes(ax, figsize)
    curve = risk_coverage_curve(score, loss)
    finite = torch.isfinite(curve.threshold)
    t, coverage, risk = _thin(curve.threshold[finite], curve.coverage[finite], curve.risk[finite])
    ax.plot(t, coverage, drawstyle="steps-post", label="coverage")
    ax.plot(t, risk, drawstyle="steps-post", label="selective risk")
    if threshold is not None:
        ax.axvline(threshold, color="red", linestyle="--", label=f"threshold {threshold:.4g}")
    ax.set_xlabel("threshold (keep score <= threshold)")
    ax.set_ylabel("fraction")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    return fig


def plot_embeddings(
    embeddings: torch.Tensor,
    selected: torch.Tensor,
    *,
    method: str = "pca",
    max_points: int = 5000,
    seed: int = 0,
    ax: Axes | None = None,
    figsize: tuple[float, float] = (5.0, 4.0),
) -> Figure:
    """2-D view of embeddings, coloured by selected (kept) or rejected.

    Rows with NaN or Inf are left out (their number is in the title); at most ``max_points``
    rows, drawn at random with ``seed``, are shown.

    Args:
        embeddings: ``(N, D)`` floating embeddings.
        selected: ``(N,)`` bool, ``True`` where the prediction is kept.
        method: ``"pca"`` (default), ``"tsne"`` (scikit-learn), ``"umap"`` (umap-learn) or
            ``"auto"``; see :func:`selectorch.embeddings_plot.project_2d`.
        max_points: Most rows to project and draw.
        seed: Seed of the subsample and of t-SNE.
        ax: Axes to draw into; a new figure when ``None``.
        figsize: Size in inches of a new figure.

    Returns:
        The figure.

    Raises:
        ImportError: ``method="tsne"`` without scikit-learn, ``"umap"`` without umap-learn.
        ValueError: Bad shapes, an unknown ``method``, or fewer than 2 finite rows.
    """
    embeddings = check_matrix("embeddings", embeddings)
    selected = check_tensor("selected", selected)
    if selected.dtype != torch.bool or selected.shape != (embeddings.shape[0],):
        raise ValueError(
            f"Expected argument `selected` to be a ({embeddings.shape[0]},) bool tensor like the "
            f"rows of `embeddings`, got shape {tuple(selected.shape)} and dtype {selected.dtype}."
        )
    method = resolve_method(method)
    check_int("max_points", max_points, minimum=2)
    points = embeddings.detach().double().cpu()
    selected = selected.detach().cpu()
    ok = torch.isfinite(points).all(dim=1)
    n_bad = int((~ok).sum())
    points, selected = points[ok], selected[ok]
    if points.shape[0] < 2:
        raise ValueError(f"Expected at least 2 finite rows in `embeddings`, got {points.shape[0]}.")
    if points.shape[0] > max_points:
        keep = torch.randperm(points.shape[0], generator=torch.Generator().manual_seed(seed))
        keep = keep[:max_points]
        points, selected = points[keep], selected[keep]
    xy = project_2d(points, method, seed=seed).numpy()
    fig, ax = _axes(ax, figsize)
    for mask, label, color in (
        (selected, "selected", "tab:blue"),
        (~selected, "rejected", "tab:red"),
    ):
        m = mask.numpy()
        ax.scatter(
            xy[m, 0], xy[m, 1], s=6, alpha=0.6, color=color, label=f"{label} ({int(m.sum())})"
        )
    shown = {"pca": "PCA", "tsne": "t-SNE", "umap": "UMAP"}[method]
    title = f"{shown} of {points.shape[0]} embeddings"
    ax.set_title(
        title + (f" ({n_bad} non-finite rows left out)" if n_bad else ""), fontsize="small"
    )
    ax.set_xlabel(f"{shown} 1")
    ax.set_ylabel(f"{shown} 2")
    ax.legend(fontsize="small", markerscale=2)
    return fig
