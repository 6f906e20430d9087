"""The scores of :func:`selectorch.evaluate`: labels, the layers each reads, how each is run."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from selectorch.scores.base import Score
from selectorch.scores.layers import LayerScore
from selectorch.scores.registry import create_score

__all__ = ["COST_DEFAULTS", "Entry", "LayerSpec", "cost", "entries", "live_reason"]

#: What ``evaluate`` takes as the layers of one score: a name, a list of names (multi-layer
#: scores such as DkNN and Gram) or ``None`` (the model's logits).
LayerSpec = str | Sequence[str] | None

#: Cost attributes of a score and their values for a score that does not declare them.
COST_DEFAULTS: dict[str, Any] = {"requires_grad": False, "passes": 1, "compile_clean": True}


@dataclass
class Entry:
    """One row of the report.

    Attributes:
        label: The row's name.
        score: The score.
        layer: The layer it reads, a list of layers (multi-layer scores) or ``None`` (logits).
        live: Why the score cannot be fitted from the recordings (it then runs the model
            through a SelectiveModel on the raw data), or ``None``.
    """

    label: str
    score: Score
    layer: str | list[str] | None
    live: str | None = None

    @property
    def layers(self) -> list[str]:
        """The layers as a list (empty for logits)."""
        if self.layer is None:
            return []
        return [self.layer] if isinstance(self.layer, str) else list(self.layer)

    @property
    def layer_label(self) -> str:
        """The layers for the report: ``"logits"``, a name, or names joined by ``+``."""
        return "+".join(self.layers) or "logits"


def cost(score: Score) -> dict[str, Any]:
    """``requires_grad``, ``passes`` and ``compile_clean`` of a score (class attributes).

    Example:
        >>> cost(scores.ODINScore())
        {'requires_grad': True, 'passes': 2, 'compile_clean': False}
    """
    return {name: getattr(score, name, default) for name, default in COST_DEFAULTS.items()}


def live_reason(score: Score) -> str | None:
    """Why ``score`` cannot be fitted and scored from recordings, or ``None`` if it can.

    A recording holds each layer once, pooled the default way, and the logits of one plain
    forward pass; a score that needs input gradients, several passes or its own pooling of the
    layers must run the model itself.

    Example:
        >>> live_reason(scores.KNNScore()) is None
        True
        >>> live_reason(scores.ODINScore())
        "it needs gradients with respect to the model's input (requires_grad=True)"
    """
    info = cost(score)
    if info["requires_grad"]:
        return "it needs gradients with respect to the model's input (requires_grad=True)"
    if info["passes"] != 1:
        return f"it runs the model {info['passes']} times per batch (passes={info['passes']})"
    pool = getattr(score, "pool", None)
    if pool is not None:
        return f"it pools its layers its own way (pool={pool!r}), not as the recording does"
    return None


def _score_label(score: Score) -> str:
    return score.registry_name or type(score).__name__


def entries(
    scores: Sequence[str | Score] | Mapping[str, str | Score],
    layer: str | Mapping[str, LayerSpec] | None,
) -> list[Entry]:
    """One entry per score, labels unique, with the layers it reads.

    Raises:
        TypeError: ``scores`` or ``layer`` of the wrong type.
        ValueError: No score, a repeated label, or a score without the layers it needs.
    """
    if isinstance(scores, (str, Score)):
        scores = [scores]
    if isinstance(scores, Mapping):
        items = [(str(label), value) for label, value in scores.items()]
    elif isinstance(scores, Sequence):
        items = [(v if isinstance(v, str) else None, v) for v in scores]
    else:
        raise TypeError(
            "Expected argument `scores` to be a list of score names or Score instances, or a "
            f"dict label -> score, got {type(scores).__name__}."
        )
    if not items:
        raise ValueError("Expected argument `scores` to hold at least one score, got none.")
    out: list[Entry] = []
    for label, value in items:
        score = create_score(value) if isinstance(value, str) else value
        if not isinstance(score, Score):
            raise TypeError(
                f"Expected every score to be a score name or a selectorch Score, got "
                f"{type(value).__name__} ({value!r})."
            )
        label = label or _score_label(score)
        if any(e.label == label for e in out):
            raise ValueError(
                f"Score label {label!r} appears twice in `scores`; pass a dict "
                "{label: score} to tell them apart."
            )
        out.append(Entry(label, score, layer_for(label, score, layer), live_reason(score)))
    return out


def layer_for(
    label: str, score: Score, layer: str | Mapping[str, LayerSpec] | None
) -> str | list[str] | None:
    """The layers a score reads: per label from a dict, else ``layer`` (``None``: logits).

    Raises:
        TypeError: ``layer`` is not a name, a dict or ``None``.
        ValueError: An embedding or multi-layer score with no layer, or a FusionScore.
    """
    if score.input == "multi" and not isinstance(score, LayerScore):
        raise ValueError(
            f"Score {label!r} is a {type(score).__name__}, which names its own inputs; evaluate "
            "compares scores that read one layer, several layers (DkNN, Gram) or the logits "
            "(fit a FusionScore with SelectiveModel instead)."
        )
    if isinstance(layer, Mapping):
        if label not in layer:
            if score.input == "logits":
                return None
            raise ValueError(
                f"Score {label!r} {_needs(score)}, but argument `layer` has no entry for "
                f"it (it has {sorted(layer)})."
            )
        spec = layer[label]
    elif layer is None or isinstance(layer, str):
        spec = None if score.input == "logits" else layer
    else:
        raise TypeError(
            "Expected argument `layer` to be a layer name, a dict label -> layer name (or list "
            f"of names) or None, got {layer!r}."
        )
    return _checked(label, score, spec)


def _needs(score: Score) -> str:
    return "reads several layers" if score.input == "multi" else "scores embeddings"


def _checked(label: str, score: Score, spec: Any) -> str | list[str] | None:
    if spec is None:
        if score.input != "logits":
            raise ValueError(
                f"Score {label!r} {_needs(score)}: pass layer=... naming "
                + ("them, as a dict {label: [layer, ...]}" if score.input == "multi" else "it")
                + " (see selectorch.list_layers(model)), or a dict label -> layer."
            )
        return None
    if isinstance(spec, str):
        return [spec] if score.input == "multi" else spec
    if isinstance(spec, Sequence) and spec and all(isinstance(s, str) for s in spec):
        if score.input != "multi":
            raise ValueError(
                f"Score {label!r} reads one layer, got the list {list(spec)}; lists of layers "
                "are for multi-layer scores (DkNN, Gram)."
            )
        return list(spec)
    raise TypeError(
        f"Expected the layer of score {label!r} to be a layer name or a non-empty list of "
        f"names, got {spec!r}."
    )
