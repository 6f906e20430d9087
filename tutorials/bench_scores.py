"""Pick a score for your model with ``selectorch.evaluate`` (what ``selectorch bench`` runs).

Which score separates what your model knows from what it does not, and what coverage and risk
will its threshold give? ``st.evaluate`` answers for any classifier: it runs the model once per
dataset (recording the layers the scores read, the logits and the labels), fits every score on
the same recording, calibrates each threshold, and reports OOD AUROC / FPR@95, AURC, AUGRC,
coverage and risk at the threshold, fit time and throughput. The scores come back fitted and
calibrated, so the winner can be deployed at once.

Here: the pretrained MNIST CNN of ccexam, MNIST digits in distribution, Fashion-MNIST and
Animal-MNIST out of distribution (all offline, from the package registries).

Run: .venv/bin/python tutorials/bench_scores.py
Set SELECTORCH_TUTORIAL_SMALL=1 for a quick run on fewer images.
"""

from __future__ import annotations

import os
import tempfile

import torch

import selectorch as st
from selectorch.datasets import animal_mnist, fashion_mnist, mnist5k, mnist_net

SMALL = os.environ.get("SELECTORCH_TUTORIAL_SMALL") == "1"


def main() -> st.BenchReport:
    net = mnist_net()
    images, labels = mnist5k()
    # the file is sorted by class: shuffle with a fixed generator before splitting
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))
    images, labels = images[order], labels[order]
    n_fit, n_cal, n_test, n_ood = (600, 300, 300, 500) if SMALL else (2500, 1000, 1500, 5000)
    fit = (images[:n_fit], labels[:n_fit])
    cal = (images[n_fit : n_fit + n_cal], labels[n_fit : n_fit + n_cal])
    test = (images[n_fit + n_cal :][:n_test], labels[n_fit + n_cal :][:n_test])
    ood = {"fashion": fashion_mnist()[0][:n_ood], "animals": animal_mnist()[:n_ood]}

    # labels are yours to choose; embedding scores read the penultimate layer before its ReLU
    scores = {
        "knn euclidean k=1": st.scores.KNNScore(k=1),
        "knn cosine k=1": st.scores.CosineScore(k=1),
        "knn cosine k=10": st.scores.CosineScore(k=10),
        "mahalanobis": st.scores.MahalanobisScore(),  # takes the labels from the recording
        "energy": st.scores.EnergyScore(),
        "softmax": st.scores.SoftmaxScore(),
    }
    layer = {name: "classifier.0" for name in scores}
    layer.update(energy=None, softmax=None)  # logit scores read the logits
    report = st.evaluate(
        net, scores, layer=layer, fit=fit, calibrate=cal, test=test, ood=ood, coverage=0.95,
        progress=not SMALL,
    )
    print(report.summary())
    print(report.table())

    best = report.best("auroc_mean")
    print(f"\nbest mean AUROC: {best}")
    folder = report.save(tempfile.mkdtemp(prefix="selectorch-report-"), plots=not SMALL)
    print(f"report (Markdown, JSON, per-sample scores{'' if SMALL else ', plots'}) in {folder}")

    # the scores were fitted and calibrated by evaluate: wrap the winner and deploy it
    sel = st.SelectiveModel(net, scores[best], layer=layer[best])
    with torch.no_grad():
        _, _, kept_digits = sel(test[0])
        _, _, kept_fashion = sel(ood["fashion"])
    print(
        f"deployed {best!r}: keeps {kept_digits.float().mean():.1%} of new digits and "
        f"{kept_fashion.float().mean():.1%} of Fashion-MNIST images"
    )
    sel.close()
    return report


if __name__ == "__main__":
    main()
