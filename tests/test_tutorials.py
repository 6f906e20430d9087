"""Every tutorial runs on small inputs and prints what it promises."""

from __future__ import annotations

import runpy
from pathlib import Path

TUTORIALS = Path(__file__).resolve().parents[1] / "tutorials"


def run_tutorial(name: str, monkeypatch) -> object:
    monkeypatch.setenv("SELECTORCH_TUTORIAL_SMALL", "1")
    namespace = runpy.run_path(str(TUTORIALS / name), run_name="tutorial")
    return namespace["main"]()


def test_every_tutorial_is_tested():
    tested = {"quickstart_tensors.py", "torchvision_compile.py", "mnist_selective.py"}
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
