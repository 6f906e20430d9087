"""A random baseline score: a seeded hash of each sample, carrying no information."""

from __future__ import annotations

import numbers

import torch

from selectorch.functional.hashing import hash_uniform
from selectorch.scores.base import Score
from selectorch.scores.registry import register_score


@register_score("random")
class RandomScore(Score):
    """Uniform pseudo-random score in ``[0, 1)``: the baseline that knows nothing.

    Any selective-prediction result should beat it: calibrated at coverage ``c`` it keeps about
    ``c`` of the samples, chosen independently of whether the model is right (its AUROC for
    errors or for out-of-distribution inputs is 0.5 up to sampling noise). The score of a row
    is a hash of its content and ``seed`` (see :func:`~selectorch.functional.hash_uniform`),
    not a draw from a generator: the same row gets the same score in every call, on every
    device, eagerly or compiled, whatever else is in its batch. Identical rows get identical
    scores.

    It reads any ``(N, D)`` tensor; it is declared a logit score, so that a
    :class:`~selectorch.SelectiveModel` needs no ``layer`` for it (pass one to hash a layer's
    output instead). It has nothing to fit; ``fit`` is accepted and ignored.

    Args:
        seed: Integer seed of the hash; another seed gives independent scores.

    Example:
        >>> score = RandomScore(seed=1).calibrate(torch.randn(100, 10), coverage=0.9)
        >>> score.select(torch.randn(4, 10))["score"].shape
        torch.Size([4])
    """

    input = "logits"
    #: The score carries no information about errors or shift by design.
    informative = False

    def __init__(self, *, seed: int = 0) -> None:
        super().__init__()
        if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
            raise ValueError(f"Expected argument `seed` to be an integer, got {seed!r}.")
        self.seed = int(seed)

    def _score(self, X: torch.Tensor) -> torch.Tensor:
        return hash_uniform(X, self.seed)

    def extra_repr(self) -> str:
        return f"seed={self.seed}"
