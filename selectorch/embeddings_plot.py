"""2-D views of several sets of embeddings in one projection (seapig's ``plot_embs``).

Reference, calibration and query embeddings are projected together, so the picture shows where
queries fall relative to the data a score was fitted on. Projections: PCA (built in, default),
t-SNE (needs scikit-learn) and UMAP (needs ``umap-learn``); ``method="auto"`` takes UMAP when it
is installed and PCA otherwise. matplotlib is imported lazily and figures are built with
``matplotlib.figure.Figure`` (no pyplot, no display needed).
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch

from selectorch._checks import check_choice, check_int

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

logger = logging.getLogger(__name__)

METHODS = ("auto", "pca", "tsne", "umap")


def _pca(points: torch.Tensor) -> torch.Tensor:
    centered = points - points.mean(dim=0)
    _, _, vh = torch.linalg.svd(centered, full_matrices=False)
    out = centered @ vh[:2].T
    return out if out.shape[1] == 2 else torch.cat([out, torch.zeros_like(out)], dim=1)


def resolve_method(method: str) -> str:
    """The projection ``method`` stands for: ``"auto"`` is UMAP when installed, else PCA."""
    check_choice("method", method, METHODS)
    if method == "auto":
        return "umap" if importlib.util.find_spec("umap") is not None else "pca"
    return method


def project_2d(
    points: torch.Tensor,
    method: str = "pca",
    *,
    seed: int = 0,
    method_args: Mapping[str, Any] | None = None,
) -> torch.Tensor:
    """Project ``(N, D)`` points to ``(N, 2)``.

    Args:
        points: ``(N, D)`` finite floating points, ``N >= 2``.
        method: ``"pca"``, ``"tsne"`` (scikit-learn), ``"umap"`` (umap-learn), or ``"auto"``
            (UMAP when installed, else PCA).
        seed: Random state of t-SNE and UMAP.
        method_args: Extra keyword arguments of ``TSNE`` or ``UMAP``.

    Returns:
        ``(N, 2)`` float64 tensor.

    Raises:
        ImportError: ``"tsne"`` without scikit-learn or ``"umap"`` without umap-learn; the message
            names the fallbacks.
    """
    method = resolve_method(method)
    points = points.detach().double().cpu()
    if method == "pca":
        return _pca(points)
    args = dict(method_args or {})
    if method == "tsne":
        try:
            from sklearn.manifold import TSNE
        except ImportError as err:
            raise ImportError(
                "method='tsne' needs scikit-learn (pip install scikit-learn); method='pca' needs "
                "nothing."
            ) from err
        args.setdefault("perplexity", min(30.0, max(1.0, (points.shape[0] - 1) / 3)))
        args.setdefault("init", "pca")
        args.setdefault("random_state", seed)
        return torch.from_numpy(TSNE(n_components=2, **args).fit_transform(points.numpy()))
    try:
        import umap
    except ImportError as err:
        raise ImportError(
            "method='umap' needs umap-learn (pip install umap-learn); use method='pca' or "
            "method='tsne' (scikit-learn) instead."
        ) from err
    args.setdefault("random_state", seed)
    reducer = umap.UMAP(n_components=2, **args)
    return torch.from_numpy(reducer.fit_transform(points.numpy())).double()


def _as_sets(sets: Mapping[str, torch.Tensor] | torch.Tensor) -> dict[str, torch.Tensor]:
    if isinstance(sets, torch.Tensor):
        sets = {"embeddings": sets}
    if not isinstance(sets, Mapping) or not sets:
        raise ValueError(
            "Expected argument `sets` to be an (N, D) tensor or a non-empty dict name -> tensor, "
            f"got {type(sets).__name__}."
        )
    dims = set()
    for name, value in sets.items():
        if not isinstance(value, torch.Tensor) or value.ndim != 2 or not value.is_floating_point():
            got = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise ValueError(f"Expected sets[{name!r}] to be a floating (N, D) tensor, got {got}.")
        dims.add(value.shape[1])
    if len(dims) > 1:
        shapes = {name: tuple(v.shape) for name, v in sets.items()}
        raise ValueError(f"Expected every set to have the same D, got shapes {shapes}.")
    return {str(name): value.detach().cpu() for name, value in sets.items()}


def plot_embedding_sets(
    sets: Mapping[str, torch.Tensor] | torch.Tensor,
    *,
    selected: Mapping[str, torch.Tensor] | None = None,
    method: str = "pca",
    method_args: Mapping[str, Any] | None = None,
    max_points: int = 2000,
    seed: int = 0,
    ax: Axes | None = None,
    figsize: tuple[float, float] = (5.0, 4.0),
) -> Figure:
    """Draw several sets of embeddings in one 2-D projection, one colour per set.

    Rows with NaN or Inf are left out (their number is in the title); each set is subsampled to
    at most ``max_points`` rows (at random, with ``seed``) before the joint projection.

    Args:
        sets: ``{"reference": (N, D), "query": (M, D), ...}``, or one ``(N, D)`` tensor.
        selected: Optional ``{name: (N,) bool}``: rows of that set that are rejected
            (``False``) are drawn with an ``x``.
        method: ``"pca"`` (default), ``"tsne"``, ``"umap"`` or ``"auto"``; see :func:`project_2d`.
        method_args: Extra keyword arguments of the t-SNE or UMAP constructor.
        max_points: Most rows drawn per set.
        seed: Seed of the subsample and of t-SNE/UMAP.
        ax: Axes to draw into; a new figure when ``None``.
        figsize: Size in inches of a new figure.

    Returns:
        The matplotlib ``Figure``.

    Raises:
        ValueError: Bad shapes, an unknown ``method``, or fewer than 2 finite rows in all.
        ImportError: matplotlib, or the projection's package, is missing.

    Example:
        >>> fig = plot_embedding_sets({"reference": torch.randn(200, 16),
        ...                            "query": torch.randn(50, 16) + 2})
        >>> fig.savefig("embeddings.png")  # doctest: +SKIP
    """
    data = _as_sets(sets)
    method = resolve_method(method)
    check_int("max_points", max_points, minimum=2)
    selected = dict(selected or {})
    unknown = sorted(set(selected) - set(data))
    if unknown:
        raise ValueError(f"Argument `selected` names sets {unknown} not in `sets` {list(data)}.")
    generator = torch.Generator().manual_seed(seed)
    parts, n_bad = [], 0
    for name, points in data.items():
        keep = selected.get(name)
        if keep is not None and (keep.dtype != torch.bool or keep.shape != (points.shape[0],)):
            raise ValueError(
                f"Expected selected[{name!r}] to be a ({points.shape[0]},) bool tensor, got shape "
                f"{tuple(keep.shape)} and dtype {keep.dtype}."
            )
        keep = torch.ones(points.shape[0], dtype=torch.bool) if keep is None else keep.cpu()
        ok = torch.isfinite(points).all(dim=1)
        n_bad += int((~ok).sum())
        points, keep = points[ok], keep[ok]
        if points.shape[0] > max_points:
            index = torch.randperm(points.shape[0], generator=generator)[:max_points]
            points, keep = points[index], keep[index]
        parts.append((name, points, keep))
    total = sum(p.shape[0] for _, p, _ in parts)
    if total < 2:
        raise ValueError(f"Expected at least 2 finite rows in `sets`, got {total}.")
    xy = project_2d(torch.cat([p for _, p, _ in parts]), method, seed=seed, method_args=method_args)
    fig, ax = _axes(ax, figsize)
    start = 0
    for name, points, keep in parts:
        pts = xy[start : start + points.shape[0]].numpy()
        start += points.shape[0]
        k = keep.numpy()
        label = f"{name} ({points.shape[0]})"
        scatter = ax.scatter(pts[k, 0], pts[k, 1], s=6, alpha=0.6, label=label)
        if (~k).any():
            ax.scatter(
                pts[~k, 0],
                pts[~k, 1],
                s=14,
                marker="x",
                color=scatter.get_facecolor()[0],
                label=f"{name} rejected ({int((~k).sum())})",
            )
    shown = {"pca": "PCA", "tsne": "t-SNE", "umap": "UMAP"}[method]
    title = f"{shown} of {total} embeddings"
    if n_bad:
        title += f" ({n_bad} non-finite rows left out)"
    ax.set_title(title, fontsize="small")
    ax.set_xlabel(f"{shown} 1")
    ax.set_ylabel(f"{shown} 2")
    ax.legend(fontsize="small", markerscale=2)
    return fig


def _axes(ax: Axes | None, figsize: tuple[float, float]) -> tuple[Figure, Axes]:
    """A new figure with one axes (or the figure of ``ax``), matplotlib imported lazily."""
    if ax is not None:
        return ax.figure, ax
    try:
        from matplotlib.figure import Figure
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(
            "plot_embedding_sets needs matplotlib; install it with pip install 'selectorch[plot]'."
        ) from err
    fig = Figure(figsize=figsize, layout="constrained")
    return fig, fig.add_subplot()
