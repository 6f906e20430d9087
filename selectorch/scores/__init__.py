"""Uncertainty scores: higher = less trustworthy; a sample is kept when ``score <= threshold_``."""

from __future__ import annotations

from selectorch.scores.base import Score
from selectorch.scores.classwise import ClassWiseKNNScore
from selectorch.scores.deup import DEUPScore
from selectorch.scores.fusion import FusionScore
from selectorch.scores.head import ASHScore, HeadMixin, ReActScore, ViMScore
from selectorch.scores.knn import CosineScore, EuclideanScore, KNNScore
from selectorch.scores.logits import (
    EnergyScore,
    EntropyScore,
    GENScore,
    LogitScore,
    MarginScore,
    MaxLogitScore,
    MutualInformationScore,
    PredictiveVarianceScore,
    SoftmaxScore,
)
from selectorch.scores.mahalanobis import MahalanobisScore, RelativeMahalanobisScore
from selectorch.scores.pca import PCAScore
from selectorch.scores.random import RandomScore
from selectorch.scores.registry import create_score, get_score_class, list_scores, register_score

__all__ = [
    "ASHScore",
    "ClassWiseKNNScore",
    "CosineScore",
    "DEUPScore",
    "EnergyScore",
    "EntropyScore",
    "EuclideanScore",
    "FusionScore",
    "GENScore",
    "HeadMixin",
    "KNNScore",
    "LogitScore",
    "MahalanobisScore",
    "MarginScore",
    "MaxLogitScore",
    "MutualInformationScore",
    "PCAScore",
    "PredictiveVarianceScore",
    "RandomScore",
    "ReActScore",
    "RelativeMahalanobisScore",
    "Score",
    "SoftmaxScore",
    "ViMScore",
    "create_score",
    "get_score_class",
    "list_scores",
    "register_score",
]
