"""Scores by name: ``create_score("knn", k=50)`` and ``list_scores()``."""

from __future__ import annotations

import difflib
import warnings
from collections.abc import Callable
from typing import Any, TypeVar

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


def list_scores() -> list[str]:
    """Names of every registered score, sorted.

    Example:
        >>> "knn" in list_scores()
        True
    """
    return sorted(_REGISTRY)


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
