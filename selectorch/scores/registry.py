"""Scores by name: ``create_score("knn", k=50)`` and ``list_scores()``."""

from __future__ import annotations

import difflib
import warnings
from collections.abc import Callable
from typing import Any, Literal, TypeVar, overload

T = TypeVar("T", bound=type)

_REGISTRY: dict[str, type] = {}


def register_score(name: str) -> Callable[[T], T]:
    """Class decorator that registers a score class under ``name`` (a clash warns)."""

    def decorator(cls: T) -> T:
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            warnings.warn(
                f"Score name {name!r} re-registered: {_REGISTRY[name].__name__} replaced by "
                f"{cls.__name__}.",
                stacklevel=2,
            )
        _REGISTRY[name] = cls
        cls.registry_name = name
        return cls

    return decorator


@overload
def list_scores(details: Literal[False] = False) -> list[str]: ...


@overload
def list_scores(details: Literal[True]) -> list[dict[str, Any]]: ...


def list_scores(details: bool = False) -> list[str] | list[dict[str, Any]]:
    """Names of every registered score, sorted; with ``details=True``, one row per score.

    Args:
        details: Return a dict per score instead of its name, read from the class (no score
            is built): ``name``, ``class``, ``input`` (``"embedding"``, ``"logits"`` or
            ``"multi"``), ``requires_grad`` (needs input gradients, so runs under
            ``torch.enable_grad()``), ``passes`` (model forward passes per batch),
            ``compile_clean`` (a SelectiveModel with it compiles with ``fullgraph=True``),
            ``needs_fit`` (has state that ``fit`` fills), ``needs_head`` (a SelectiveModel
            needs ``head=``), ``needs_preds`` (works on the predicted class) and
            ``calibrates_on_labels`` (``calibrate`` uses the held-out rows' true labels).

    Returns:
        Sorted names, or the rows in the same order.

    Example:
        >>> "knn" in list_scores()
        True
        >>> row = next(r for r in list_scores(details=True) if r["name"] == "energy")
        >>> row["input"], row["requires_grad"], row["passes"], row["compile_clean"]
        ('logits', False, 1, True)
    """
    if not details:
        return sorted(_REGISTRY)
    return [_details(name, _REGISTRY[name]) for name in sorted(_REGISTRY)]


def _details(name: str, cls: type) -> dict[str, Any]:
    return {
        "name": name,
        "class": cls.__name__,
        "input": cls.input,
        "requires_grad": bool(cls.requires_grad),
        "passes": int(cls.passes),
        "compile_clean": bool(cls.compile_clean),
        "needs_fit": bool(cls.fitted_buffers),
        "needs_head": bool(getattr(cls, "needs_head", False)),
        "needs_preds": bool(getattr(cls, "needs_preds", False)),
        "calibrates_on_labels": bool(cls.calibrates_on_labels),
    }


def get_score_class(name: str) -> type:
    """The class registered as ``name``.

    Raises:
        ValueError: Unknown name; the message lists the known ones.
    """
    if name not in _REGISTRY:
        close = difflib.get_close_matches(name, list(_REGISTRY), n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"Unknown score {name!r}.{hint} Known scores: {list_scores()}.")
    return _REGISTRY[name]


def create_score(name: str, **kwargs: Any) -> Any:
    """Build a registered score by name with keyword hyperparameters.

    Example:
        >>> create_score("knn", k=5)
        KNNScore(k=5, metric='euclidean', stat='max')
    """
    return get_score_class(name)(**kwargs)
