"""Wrap a torchvision model, use it in a plain eval loop, then deploy it with torch.compile.

The ResNet-18 here has random weights and the images are random (no download is possible
offline); swap in `weights=ResNet18_Weights.DEFAULT` and your loaders for real use.

Run: .venv/bin/python tutorials/torchvision_compile.py
Set SELECTORCH_TUTORIAL_SMALL=1 for a quick run.
"""

from __future__ import annotations

import os

import torch
import torchvision
from torch.utils.data import DataLoader, TensorDataset

import selectorch as st

SMALL = os.environ.get("SELECTORCH_TUTORIAL_SMALL") == "1"


def main() -> float:
    torch.manual_seed(0)
    n = 64 if SMALL else 512
    size = 32 if SMALL else 64
    model = torchvision.models.resnet18(num_classes=10).eval()  # untouched by selectorch
    print("some layers:", st.list_layers(model)[-4:])

    train = DataLoader(TensorDataset(torch.randn(n, 3, size, size)), batch_size=32)
    val = DataLoader(TensorDataset(torch.randn(n, 3, size, size)), batch_size=32)
    sel = st.SelectiveModel(model, st.scores.KNNScore(k=5), layer="avgpool")
    sel.fit(train).calibrate(val, coverage=0.9)

    # a plain eval loop
    kept = 0
    with torch.no_grad():
        for (x,) in val:
            logits, score, selected = sel(x)
            kept += int(selected.sum())
    print(f"kept {kept} of {n} validation images")

    # deployment: one graph, reused across batches and across recalibration
    fast = torch.compile(sel, fullgraph=True)
    x = torch.randn(8, 3, size, size)
    with torch.no_grad():
        eager, compiled = sel(x), fast(x)
    diff = (eager.score - compiled.score).abs().max().item()
    print(f"compiled vs eager: max score difference {diff:.2e}")
    return diff


if __name__ == "__main__":
    main()
