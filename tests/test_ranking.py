"""AUROC by midranks against a pairwise count."""

from __future__ import annotations

import itertools

import pytest
import torch

from selectorch.functional import auroc, midranks


def pairwise_auroc(scores, positive):
    pos = [s for s, p in zip(scores, positive, strict=True) if p]
    neg = [s for s, p in zip(scores, positive, strict=True) if not p]
    wins = sum(1.0 if a > b else 0.5 if a == b else 0.0 for a, b in itertools.product(pos, neg))
    return wins / (len(pos) * len(neg))


@pytest.mark.parametrize("seed", range(5))
def test_auroc_equals_pairwise_count_with_ties_and_large_values(seed):
    g = torch.Generator().manual_seed(seed)
    scores = torch.randint(0, 6, (40,), generator=g).double() * 1e3  # ties, values far from [0, 1]
    scores[0] = float("inf")
    positive = torch.rand(40, generator=g) < 0.4
    assert auroc(scores, positive).item() == pytest.approx(
        pairwise_auroc(scores.tolist(), positive.tolist())
    )


def test_midranks_average_ties():
    assert midranks(torch.tensor([5.0, 1.0, 5.0, 2.0])).tolist() == [3.5, 1.0, 3.5, 2.0]


def test_auroc_errors():
    with pytest.raises(ValueError, match="both classes"):
        auroc(torch.rand(4), torch.zeros(4))
    with pytest.raises(ValueError, match="NaN"):
        auroc(torch.tensor([float("nan"), 1.0]), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="same length"):
        auroc(torch.rand(3), torch.tensor([0, 1]))
