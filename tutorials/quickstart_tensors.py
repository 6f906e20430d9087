"""Quickstart on tensors: fit a score on embeddings you already have (the seapig flow).

Run: .venv/bin/python tutorials/quickstart_tensors.py
"""

from __future__ import annotations

import torch

import selectorch as st


def main() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    # latent representations of shapes (N, D), (M, D), (Q, D)
    ref_emb, val_emb, query_emb = torch.randn(1000, 32), torch.randn(200, 32), torch.randn(10, 32)
    query_emb[-1] += 10.0  # one query far from the reference data

    score = st.scores.EuclideanScore(k=5, stat="mean").fit(ref_emb)
    score.calibrate(val_emb, coverage=0.90)  # finite-sample guarantee: >= 90% kept on average
    print(f"threshold for 90% coverage: {score.get_threshold():.3f}")
    result = score.select(query_emb)
    print(result)

    score.set_threshold(q=0.80)  # seapig's rule: the 0.8-quantile of the calibration scores
    print(f"threshold at the 0.8-quantile: {score.get_threshold():.3f}")
    return result


if __name__ == "__main__":
    main()
