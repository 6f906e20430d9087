"""Selective prediction on real data: a pretrained MNIST CNN that rejects what it does not know.

The network (ccexam's MNISTNet) is wrapped unchanged. Each score is fitted on MNIST digits,
calibrated for 95% coverage on held-out digits, then run in a plain eval loop over new digits
(in-distribution) and Animal-MNIST drawings (out-of-distribution). A good score keeps about 95%
of the digits, is more accurate on what it keeps, and rejects most animals.

Run: python3 dev.py demo   (or .venv/bin/python tutorials/mnist_selective.py)
Set SELECTORCH_TUTORIAL_SMALL=1 for a quick run on fewer images.
"""

from __future__ import annotations

import os

import torch
from torch.utils.data import DataLoader, TensorDataset

import selectorch as st
from selectorch.datasets import animal_mnist, mnist5k, mnist_net

SMALL = os.environ.get("SELECTORCH_TUTORIAL_SMALL") == "1"
COVERAGE = 0.95


def main() -> dict[str, dict[str, float]]:
    torch.manual_seed(0)
    net = mnist_net()
    images, labels = mnist5k()
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))
    images, labels = images[order], labels[order]
    n_fit, n_cal = (600, 300) if SMALL else (2500, 1000)
    n_test = 300 if SMALL else 1500
    fit = DataLoader(TensorDataset(images[:n_fit], labels[:n_fit]), batch_size=256)
    cal = DataLoader(TensorDataset(images[n_fit : n_fit + n_cal]), batch_size=256)
    test = DataLoader(
        TensorDataset(images[n_fit + n_cal :][:n_test], labels[n_fit + n_cal :][:n_test]),
        batch_size=256,
    )
    animals = DataLoader(TensorDataset(animal_mnist()[:n_test]), batch_size=256)

    candidates = {
        "knn (k=10, penultimate)": (st.scores.KNNScore(k=10), "classifier.1"),
        "cosine knn (k=10)": (st.scores.CosineScore(k=10), "classifier.1"),
        "energy": (st.scores.EnergyScore(), None),
        "softmax": (st.scores.SoftmaxScore(), None),
    }
    results = {}
    for name, (score, layer) in candidates.items():
        sel = st.SelectiveModel(net, score, layer=layer)
        sel.fit(fit, progress=False).calibrate(cal, coverage=COVERAGE, progress=False)

        # a plain eval loop: one forward pass gives the logits, the score and the decision
        correct, kept, id_scores = [], [], []
        with torch.no_grad():
            for x, y in test:
                logits, s, keep = sel(x)
                correct.append(logits.argmax(1) == y)
                kept.append(keep)
                id_scores.append(s)
            ood = [sel(x) for (x,) in animals]
        correct, kept, id_scores = torch.cat(correct), torch.cat(kept), torch.cat(id_scores)
        ood_scores = torch.cat([o.score for o in ood])
        ood_kept = torch.cat([o.selected for o in ood])
        is_ood = torch.cat([torch.zeros_like(id_scores), torch.ones_like(ood_scores)])
        results[name] = {
            "kept digits": kept.float().mean().item(),
            "accuracy (all)": correct.float().mean().item(),
            "accuracy (kept)": correct[kept].float().mean().item(),
            "kept animals": ood_kept.float().mean().item(),
            "AUROC digits vs animals": st.functional.auroc(
                torch.cat([id_scores, ood_scores]), is_ood
            ).item(),
        }
        sel.close()

    columns = list(next(iter(results.values())))
    width = max(map(len, results)) + 2
    print(f"Target coverage {COVERAGE:.0%}; {n_test} new digits, {n_test} Animal-MNIST drawings\n")
    print("score".ljust(width) + " | ".join(columns))
    for name, row in results.items():
        print(name.ljust(width) + " | ".join(f"{row[c]:.3f}".rjust(len(c)) for c in columns))
    return results


if __name__ == "__main__":
    main()
