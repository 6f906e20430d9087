"""Uncertainty scores: higher = less trustworthy; a sample is kept when ``score <= threshold_``."""

from __future__ import annotations

from selectorch.scores.base import Score
from selectorch.scores.knn import CosineScore, EuclideanScore, KNNScore
from selectorch.scores.logits import EnergyScore, LogitScore, SoftmaxScore
from selectorch.scores.registry import create_score, get_score_class, list_scores, register_score

__all__ = [
    "CosineScore",
    "EnergyScore",
    "EuclideanScore",
    "KNNScore",
    "LogitScore",
    "Score",
    "SoftmaxScore",
    "create_score",
    "get_score_class",
    "list_scores",
    "register_score",
]
