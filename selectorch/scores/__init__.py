"""Uncertainty scores: higher = less trustworthy; a sample is kept when ``score <= threshold_``."""

from __future__ import annotations

from selectorch.scores.base import Score
from selectorch.scores.classwise import ClassWiseKNNScore
from selectorch.scores.deup import DEUPScore
from selectorch.scores.dknn import DkNNScore
from selectorch.scores.fusion import FusionScore
from selectorch.scores.gradnorm import GradNormScore
from selectorch.scores.gram import GramScore
from selectorch.scores.head import ASHScore, HeadMixin, ReActScore, ViMScore
from selectorch.scores.joint_energy import JointEnergyScore
from selectorch.scores.knn import CosineScore, EuclideanScore, KNNScore
from selectorch.scores.lid import LIDScore
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
from selectorch.scores.odin import ODINScore
from selectorch.scores.pca import PCAScore
from selectorch.scores.pyod import PyODScore
from selectorch.scores.random import RandomScore
from selectorch.scores.registry import create_score, get_score_class, list_scores, register_score
from selectorch.scores.she import SHEScore
from selectorch.scores.trust import TrustScore

__all__ = [
    "ASHScore",
    "ClassWiseKNNScore",
    "CosineScore",
    "DEUPScore",
    "DkNNScore",
    "EnergyScore",
    "EntropyScore",
    "EuclideanScore",
    "FusionScore",
    "GENScore",
    "GradNormScore",
    "GramScore",
    "HeadMixin",
    "JointEnergyScore",
    "KNNScore",
    "LIDScore",
    "LogitScore",
    "MahalanobisScore",
    "MarginScore",
    "MaxLogitScore",
    "MutualInformationScore",
    "ODINScore",
    "PCAScore",
    "PredictiveVarianceScore",
    "PyODScore",
    "RandomScore",
    "ReActScore",
    "RelativeMahalanobisScore",
    "SHEScore",
    "Score",
    "SoftmaxScore",
    "TrustScore",
    "ViMScore",
    "create_score",
    "get_score_class",
    "list_scores",
    "register_score",
]
