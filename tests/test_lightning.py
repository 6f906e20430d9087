"""selectorch.lightning with a real Lightning Trainer on the CPU."""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score

import selectorch as st

L = pytest.importorskip("lightning")
from selectorch.lightning import SelectiveCalibrationCallback, SelectiveInferenceTask  # noqa: E402


class Blobs(L.LightningModule):
    """A small classifier of three Gaussian blobs."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 3))
        self.test_metrics = MulticlassAccuracy(num_classes=3, average="micro")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", nn.functional.cross_entropy(self(x), y))

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=0.05)


def blobs(n: int, seed: int, shift: float = 0.0, noise: float = 1.5):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 3
    return torch.eye(3, 4)[y] * 4 + noise * torch.randn(n, 4, generator=g) + shift, y


def loader(data, **kwargs) -> DataLoader:
    return DataLoader(TensorDataset(*data), batch_size=64, **kwargs)


def trainer(**kwargs) -> L.Trainer:
    return L.Trainer(
        accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, **kwargs,
    )


@pytest.fixture(scope="module")
def fitted():
    """A task trained by a real Trainer; the callback fitted and calibrated its score."""
    torch.manual_seed(0)
    task = Blobs()
    sel = st.SelectiveModel(task, st.scores.KNNScore(k=5), layer="net.1")
    callback = SelectiveCalibrationCallback(sel, coverage=0.9)
    trainer(max_epochs=5, callbacks=[callback]).fit(
        task, loader(blobs(600, 0), shuffle=True), loader(blobs(300, 1))
    )
    return task, sel


def test_callback_fits_and_calibrates_at_the_end_of_training(fitted):
    task, sel = fitted
    assert sel.score.is_fitted and sel.score.is_calibrated
    assert sel.score.bank_.shape == (600, 16)  # the whole training loader
    report = sel.calibration_report()
    assert report["n"] == 300 and report["target_coverage"] == 0.9


def test_test_reports_the_task_metric_on_full_selected_and_rejected(fitted):
    task, sel = fitted
    x, y = blobs(400, 2)
    results = trainer().test(SelectiveInferenceTask(task, sel), loader((x, y)), verbose=False)[0]
    with torch.no_grad():
        logits, score, selected = sel(x)
    correct = logits.argmax(1) == y
    assert results["full/MulticlassAccuracy"] == pytest.approx(correct.float().mean().item())
    assert results["selected/MulticlassAccuracy"] == pytest.approx(
        correct[selected].float().mean().item()
    )
    assert results["rejected/MulticlassAccuracy"] == pytest.approx(
        correct[~selected].float().mean().item()
    )
    assert results["selective/coverage"] == pytest.approx(selected.float().mean().item())
    assert results["selective/aurc"] == pytest.approx(
        st.functional.aurc(score, (~correct).double()).item(), abs=1e-6
    )
    assert "selective/augrc" in results


def test_test_with_a_metric_collection_and_two_dataloaders(fitted):
    task, sel = fitted
    metrics = MetricCollection(
        {"acc": MulticlassAccuracy(num_classes=3), "f1": MulticlassF1Score(num_classes=3)}
    )
    evaluator = SelectiveInferenceTask(task, sel, metrics=metrics)
    results = trainer().test(
        evaluator, [loader(blobs(200, 3)), loader(blobs(200, 4, shift=6.0))], verbose=False
    )
    keys = set(results[0]) | set(results[1])
    assert {"full/acc/dataloader_idx_0", "selected/f1/dataloader_idx_1",
            "selective/coverage/dataloader_idx_1"} <= keys
    near = results[0]["selective/coverage/dataloader_idx_0"]
    far = results[1]["selective/coverage/dataloader_idx_1"]
    assert near > 0.8 and far < 0.1  # shifted data is rejected


def test_predict_returns_predictions_scores_and_selection(fitted):
    task, sel = fitted
    x, y = blobs(150, 5)
    batches = trainer().predict(SelectiveInferenceTask(task, sel), loader((x, y)))
    assert len(batches) == 3 and set(batches[0]) == {"predictions", "score", "selected"}
    predictions = torch.cat([b["predictions"] for b in batches])
    score = torch.cat([b["score"] for b in batches])
    selected = torch.cat([b["selected"] for b in batches])
    with torch.no_grad():
        assert torch.allclose(predictions, task(x), atol=1e-6)
    assert score.shape == (150,) and selected.dtype == torch.bool
    assert torch.equal(selected, score <= sel.get_threshold())


def test_task_refuses_a_selective_model_of_another_network(fitted):
    task, _ = fitted
    other = st.SelectiveModel(Blobs(), st.scores.EnergyScore())
    with pytest.raises(ValueError, match="wrap `task` or one of its sub-modules"):
        SelectiveInferenceTask(task, other)
    with pytest.raises(TypeError, match="to be a selectorch.SelectiveModel"):
        SelectiveInferenceTask(task, st.scores.EnergyScore())
    bare = nn.Sequential(nn.Linear(4, 3))
    with pytest.raises(ValueError, match="`test_metrics` attribute on the Sequential"):
        SelectiveInferenceTask(bare, st.SelectiveModel(bare, st.scores.EnergyScore()))


def test_test_batches_need_labels(fitted):
    task, sel = fitted
    x, _ = blobs(10, 6)
    with pytest.raises(ValueError, match="test batches with labels"):
        trainer().test(SelectiveInferenceTask(task, sel), DataLoader(x, batch_size=5))


def test_callback_with_explicit_data_and_a_risk_target():
    torch.manual_seed(0)
    task = Blobs()
    sel = st.SelectiveModel(task, st.scores.SoftmaxScore())
    fit_data, cal_data = blobs(300, 7), blobs(600, 8)
    callback = SelectiveCalibrationCallback(
        sel, fit_data=loader(fit_data), calibrate_data=loader(cal_data), risk=0.05, delta=0.1
    )
    trainer(max_epochs=3, callbacks=[callback], limit_val_batches=0).fit(
        task, loader(blobs(600, 9), shuffle=True)
    )
    report = sel.calibration_report()
    assert report["target_risk"] == 0.05 and report["n"] == 600
    assert report["risk"] <= 0.05


def test_callback_without_validation_data_says_what_is_missing():
    task = Blobs()
    sel = st.SelectiveModel(task, st.scores.EnergyScore())
    callback = SelectiveCalibrationCallback(sel)
    with pytest.raises(ValueError, match="has no calibrate_data"):
        trainer(max_epochs=1, callbacks=[callback], limit_val_batches=0).fit(
            task, loader(blobs(64, 10))
        )


def test_selectorch_does_not_import_lightning():
    code = "import selectorch, sys; print('lightning' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_missing_lightning_gives_an_install_hint(monkeypatch):
    monkeypatch.setitem(sys.modules, "lightning", None)
    monkeypatch.delitem(sys.modules, "selectorch.lightning", raising=False)
    with pytest.raises(ImportError, match=r"pip install 'selectorch\[lightning\]'"):
        importlib.import_module("selectorch.lightning")
