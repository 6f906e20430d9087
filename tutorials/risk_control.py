"""Risk-controlled calibration: keep as much as possible while the error rate stays below 5%.

A coverage target (``coverage=0.95``) promises how much is kept, not how good it is. When the
deployment stream holds inputs the model cannot know, a risk target is the promise you want:
``calibrate(..., risk=0.05, delta=0.1)`` picks the largest coverage whose error rate among kept
predictions is at most 5%, with probability at least 90% over the calibration draw (a
Clopper-Pearson bound, corrected for the thresholds it tries).

The stream: MNIST digits mixed with 30% Fashion-MNIST images for the pretrained ccexam MNIST
CNN. A prediction on a clothing image is always wrong, so those images carry the label -1.
The model runs once (``st.record``); every calibration below reads that recording.

Run: .venv/bin/python tutorials/risk_control.py
Set SELECTORCH_TUTORIAL_SMALL=1 for a quick run on fewer images and splits.
"""

from __future__ import annotations

import os

import torch
from torch.utils.data import DataLoader, TensorDataset

import selectorch as st
from selectorch.datasets import fashion_mnist, mnist5k, mnist_net

SMALL = os.environ.get("SELECTORCH_TUTORIAL_SMALL") == "1"
RISK, DELTA, LAYER = 0.05, 0.1, "classifier.0"


def main() -> dict[str, float]:
    net = mnist_net()
    images, labels = mnist5k()
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))
    images, labels = images[order], labels[order]
    n_fit = 600 if SMALL else 2500
    n_digits = 1400 if SMALL else 2500
    digits, digit_labels = images[n_fit:][:n_digits], labels[n_fit:][:n_digits]
    n_foreign = round(len(digits) * 0.3 / 0.7)  # 30% of the stream
    clothes = fashion_mnist()[0][:n_foreign]
    stream = torch.cat([digits, clothes])
    stream_labels = torch.cat([digit_labels, torch.full((n_foreign,), -1)])  # -1: never right

    def loader(*tensors: torch.Tensor) -> DataLoader:
        return DataLoader(TensorDataset(*tensors), batch_size=512)

    options = {"layers": [LAYER], "progress": False}
    reference = st.record(net, loader(images[:n_fit], labels[:n_fit]), **options)
    recorded = st.record(net, loader(stream, stream_labels), **options)
    sel = st.SelectiveModel(net, st.scores.CosineScore(k=1), layer=LAYER)
    sel.fit(reference)

    # one calibration / test split of the stream
    n_cal = 500 if SMALL else 1000
    split = torch.randperm(len(stream), generator=torch.Generator().manual_seed(1))
    cal, test = split[:n_cal], split[n_cal:]
    scores = sel.score.score(recorded[LAYER])
    wrong = recorded["logits"].argmax(1) != recorded["labels"]

    def on_test(threshold: float, rows: torch.Tensor) -> tuple[float, float]:
        kept = scores[rows] <= threshold
        return kept.float().mean().item(), wrong[rows][kept].float().mean().item()

    sel.calibrate(recorded[cal], coverage=0.95)
    coverage_only = on_test(sel.get_threshold(), test)
    sel.calibrate(recorded[cal], risk=RISK, delta=DELTA)
    report = sel.calibration_report()
    risk_controlled = on_test(sel.get_threshold(), test)
    print(f"stream: {len(digits)} digits + {n_foreign} clothing images; calibrate on {n_cal}")
    print(f"{'target':28s} coverage  risk (on {len(test)} new stream samples)")
    print(f"{'coverage 0.95':28s} {coverage_only[0]:8.3f}  {coverage_only[1]:.3f}")
    print(
        f"{f'risk <= {RISK}, delta {DELTA}':28s} {risk_controlled[0]:8.3f}  "
        f"{risk_controlled[1]:.3f}   (bound on calibration: {report['risk_upper_bound']:.3f})"
    )

    # the promise is about the calibration draw: repeat it and count how often it is broken
    repeats = 20 if SMALL else 200
    generator = torch.Generator().manual_seed(2)
    broken, coverages = 0, []
    for _ in range(repeats):
        split = torch.randperm(len(stream), generator=generator)
        cal, test = split[:n_cal], split[n_cal:]
        sel.score.calibrate_scores(scores[cal], risk=RISK, delta=DELTA, correct=~wrong[cal])
        coverage, risk = on_test(sel.get_threshold(), test)
        broken += risk > RISK
        coverages.append(coverage)
    mean_coverage = sum(coverages) / repeats
    print(
        f"over {repeats} calibration draws: risk above {RISK} in {broken} "
        f"({broken / repeats:.1%}, allowed {DELTA:.0%}); mean coverage {mean_coverage:.3f} "
        f"(the digits are {len(digits) / len(stream):.0%} of the stream)"
    )
    sel.close()
    return {
        "coverage_only_risk": coverage_only[1],
        "risk_controlled_risk": risk_controlled[1],
        "risk_controlled_coverage": risk_controlled[0],
        "broken_fraction": broken / repeats,
        "mean_coverage": mean_coverage,
    }


if __name__ == "__main__":
    main()
