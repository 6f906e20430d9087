"""Plots render to PNG without a display and show what they promise."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("matplotlib")

import matplotlib  # noqa: E402
import matplotlib.image  # noqa: E402

from selectorch import plot  # noqa: E402

DPI = 40
SIZE = (5.0, 4.0)  # inches -> 200 x 160 pixels at DPI


def render(fig, tmp_path, name="figure.png"):
    """Save ``fig`` as PNG and return the image read back, (H, W, channels)."""
    path = tmp_path / name
    fig.savefig(path, dpi=DPI)
    return matplotlib.image.imread(path)


def legend_texts(fig):
    return [t.get_text() for ax in fig.axes if ax.get_legend() for t in ax.get_legend().get_texts()]


def case(n=300, seed=0):
    g = torch.Generator().manual_seed(seed)
    score = torch.randn(n, generator=g, dtype=torch.float64)
    correct = torch.rand(n, generator=g, dtype=torch.float64) > torch.sigmoid(score)
    score[:3] = float("inf")  # fail-closed samples
    return score, correct


def test_risk_coverage_plot_renders_png_of_the_requested_size(tmp_path):
    score, correct = case()
    fig = plot.plot_risk_coverage(score, correct, threshold=0.5, figsize=SIZE)
    image = render(fig, tmp_path)
    assert image.shape[:2] == (SIZE[1] * DPI, SIZE[0] * DPI)
    assert image[..., :3].std() > 0.01  # something was drawn
    texts = legend_texts(fig)
    assert texts[0].startswith("score (AURC ") and texts[1].startswith("oracle (AURC ")
    kept = score <= 0.5
    coverage, risk = kept.double().mean().item(), (~correct[kept]).double().mean().item()
    assert texts[2] == f"threshold 0.5: coverage {coverage:.3f}, risk {risk:.3f}"


def test_score_density_plot_shows_each_group_and_the_threshold(tmp_path):
    score, _ = case()
    fig = plot.plot_score_densities(
        calibration=score[:100],
        test=score[100:200],
        ood=score[200:] + 2,
        threshold=1.0,
        figsize=SIZE,
    )
    assert render(fig, tmp_path).shape[:2] == (160, 200)
    texts = legend_texts(fig)
    assert "calibration (n=100, 3 non-finite)" in texts
    assert "test (n=100)" in texts and "ood (n=100)" in texts and "threshold 1" in texts


def test_threshold_sweep_plot_draws_coverage_and_risk(tmp_path):
    score, correct = case()
    fig = plot.plot_threshold_sweep(score, correct, threshold=0.0, figsize=SIZE)
    assert render(fig, tmp_path).shape[:2] == (160, 200)
    coverage_line = fig.axes[0].get_lines()[0]
    assert coverage_line.get_ydata()[-1] == pytest.approx(297 / 300)  # the +inf rows not drawn
    assert legend_texts(fig)[:2] == ["coverage", "selective risk"]


def test_embedding_plot_pca_colours_kept_and_rejected(tmp_path):
    emb = torch.randn(400, 16)
    emb[0, 3] = float("nan")
    selected = torch.arange(400) % 3 != 0
    fig = plot.plot_embeddings(emb, selected, figsize=SIZE)
    assert render(fig, tmp_path).shape[:2] == (160, 200)
    assert legend_texts(fig) == ["selected (266)", "rejected (133)"]
    assert "1 non-finite rows left out" in fig.axes[0].get_title()


def test_embedding_plot_tsne_when_scikit_learn_is_installed(tmp_path):
    pytest.importorskip("sklearn")
    fig = plot.plot_embeddings(
        torch.randn(50, 8), torch.rand(50) > 0.5, method="tsne", max_points=30, figsize=SIZE
    )
    assert render(fig, tmp_path).shape[:2] == (160, 200)
    assert fig.axes[0].get_title() == "t-SNE of 30 embeddings"


def test_plots_draw_into_a_given_axes():
    from matplotlib.figure import Figure

    fig = Figure()
    left, right = fig.subplots(1, 2)
    score, correct = case()
    assert plot.plot_risk_coverage(score, correct, ax=left) is fig
    assert plot.plot_threshold_sweep(score, correct, ax=right) is fig
    assert len(left.get_lines()) == 2 and len(right.get_lines()) == 2


def test_plot_errors_name_the_argument():
    with pytest.raises(ValueError, match="at least one of `calibration`, `test` or `ood`"):
        plot.plot_score_densities()
    with pytest.raises(ValueError, match="`method` to be one of"):
        plot.plot_embeddings(torch.randn(5, 3), torch.ones(5, dtype=torch.bool), method="umop")
    with pytest.raises(ValueError, match=r"`selected` to be a \(5,\) bool tensor"):
        plot.plot_embeddings(torch.randn(5, 3), torch.ones(4, dtype=torch.bool))
    with pytest.raises(TypeError, match="`threshold` to be a number"):
        plot.plot_risk_coverage(torch.rand(4), torch.ones(4, dtype=torch.bool), threshold="0.5")


def test_matplotlib_is_imported_lazily_with_a_hint_when_missing(monkeypatch):
    source = Path(plot.__file__).read_text()
    top_level = [
        node
        for node in ast.parse(source).body
        if isinstance(node, (ast.Import, ast.ImportFrom))
        and any("matplotlib" in (getattr(node, "module", None) or a.name) for a in node.names)
    ]
    assert top_level == []  # only under TYPE_CHECKING or inside functions
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # as if not installed
    with pytest.raises(ImportError, match=r"pip install 'selectorch\[plot\]'"):
        plot.plot_threshold_sweep(torch.rand(4), torch.ones(4, dtype=torch.bool))


def test_plots_leave_pyplot_alone():
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    before = plt.get_fignums()
    score, correct = case()
    plot.plot_risk_coverage(score, correct)
    plot.plot_embeddings(torch.randn(20, 4), correct[:20])
    assert plt.get_fignums() == before
