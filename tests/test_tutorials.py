"""Every tutorial runs on small inputs and prints what it promises."""

from __future__ import annotations

import runpy
from pathlib import Path

import pytest

TUTORIALS = Path(__file__).resolve().parents[1] / "tutorials"


def run_tutorial(name: str, monkeypatch) -> object:
    monkeypatch.setenv("SELECTORCH_TUTORIAL_SMALL", "1")
    namespace = runpy.run_path(str(TUTORIALS / name), run_name="tutorial")
    return namespace["main"]()


def test_every_tutorial_is_tested():
    tested = {
        "quickstart_tensors.py",
        "torchvision_compile.py",
        "mnist_selective.py",
        "bench_scores.py",
        "risk_control.py",
        "lightning_task.py",
    }
    assert {p.name for p in TUTORIALS.glob("*.py")} == tested


def test_quickstart_rejects_the_far_query(monkeypatch, capsys):
    result = run_tutorial("quickstart_tensors.py", monkeypatch)
    assert result["score"].shape == (10,)
    assert not result["selected"][-1]
    assert "threshold for 90% coverage" in capsys.readouterr().out


def test_torchvision_tutorial_compiled_matches_eager(monkeypatch):
    assert run_tutorial("torchvision_compile.py", monkeypatch) < 1e-3


def test_mnist_demo_keeps_digits_and_rejects_animals(monkeypatch, capsys):
    results = run_tutorial("mnist_selective.py", monkeypatch)
    cosine = results["cosine knn (k=10)"]
    assert 0.85 <= cosine["kept digits"] <= 1.0
    assert cosine["AUROC digits vs animals"] >= 0.93
    assert results["energy"]["AUROC digits vs animals"] >= 0.9
    assert "AUROC digits vs animals" in capsys.readouterr().out


def test_bench_tutorial_picks_cosine_knn_and_deploys_it(monkeypatch, capsys):
    report = run_tutorial("bench_scores.py", monkeypatch)
    rows = {row["score"]: row for row in report.rows}
    assert report.best("auroc_mean").startswith("knn cosine")
    for ood in ("fashion", "animals"):
        assert rows["knn cosine k=1"][f"auroc:{ood}"] >= 0.95
        assert rows["energy"][f"auroc:{ood}"] >= 0.93
    out = capsys.readouterr().out
    assert "best mean AUROC: knn cosine" in out and "deployed 'knn cosine" in out


def test_risk_control_tutorial_keeps_its_promise(monkeypatch, capsys):
    result = run_tutorial("risk_control.py", monkeypatch)
    assert result["coverage_only_risk"] > 0.2  # a coverage target keeps the clothing images
    assert result["risk_controlled_risk"] <= 0.05
    assert result["broken_fraction"] <= 0.1
    assert 0.6 <= result["mean_coverage"] <= 0.75  # the digits are 70% of the stream
    assert "calibration draws" in capsys.readouterr().out


def test_lightning_tutorial_rejects_errors_and_clothes(monkeypatch, capsys):
    pytest.importorskip("lightning")
    result = run_tutorial("lightning_task.py", monkeypatch)
    assert result["selected/MulticlassAccuracy"] > result["full/MulticlassAccuracy"]
    assert result["selected/MulticlassAccuracy"] > result["rejected/MulticlassAccuracy"]
    assert 0.8 <= result["selective/coverage"] <= 1.0
    assert result["kept_clothes"] < 0.2
    assert "Fashion-MNIST images kept" in capsys.readouterr().out
