"""Recordings as score inputs: what ``SelectiveModel.fit`` / ``calibrate`` read instead of a loader.

A recording is the TensorDict returned by :func:`selectorch.record` or the directory of its
cache. A cache also says what produced it, so it is checked against the model that will score.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from tensordict import TensorDictBase
from torch import nn

from selectorch.cache import META_FILE, CacheMismatchError, load_cache, read_meta
from selectorch.fingerprint import describe_pool, model_fingerprint
from selectorch.recorder.pooling import Pool


def is_recorded(data: Any) -> bool:
    """Whether ``data`` is a recording (a TensorDict) or the path of a cache, not a loader."""
    return isinstance(data, (TensorDictBase, str, os.PathLike))


def _plain(t: torch.Tensor | None) -> torch.Tensor | None:
    """A plain ``torch.Tensor`` view of a (memory-mapped) tensor, without copying."""
    return None if t is None else t.as_subclass(torch.Tensor)


def _check_cache_source(
    root: Path, meta: Mapping[str, Any], key: str, pool: Pool, model: nn.Module | None
) -> None:
    """Refuse a cache whose layer, pooling or model differ from those that will score."""
    fingerprint = meta["fingerprint"]
    if key != "logits":
        layers = fingerprint.get("layers", {})
        if layers.get(key) != key:
            raise ValueError(
                f"The cache at {root} holds no recording of layer {key!r} (it recorded "
                f"{layers}); record that layer, e.g. selectorch.record(model, loader, "
                f"layers=[{key!r}], cache=...)."
            )
        recorded, wanted = fingerprint["pool"][key], describe_pool(pool)
        if recorded != wanted:
            raise ValueError(
                f"The cache at {root} pooled layer {key!r} with {recorded!r}, but the model "
                f"that scores pools it with {wanted!r}; record again with pool={wanted!r}."
            )
    if model is not None:
        now = model_fingerprint(model)
        if now["checksum"] != fingerprint["model"]["checksum"]:
            raise CacheMismatchError(
                f"The cache at {root} was recorded from another model (parameter checksum "
                f"{fingerprint['model']['checksum']}, this model has {now['checksum']}); "
                "record it again with this model."
            )


def recorded_inputs(
    data: TensorDictBase | str | os.PathLike,
    *,
    key: str,
    pool: Pool = "auto",
    model: nn.Module | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """The features, labels and logits of a recording, for fitting or calibrating a score.

    A cache path is checked against the scorer: it must hold the layer ``key`` pooled with
    ``pool`` and have been recorded from ``model`` (same parameters). A TensorDict carries no
    such record; only its keys are checked.

    Args:
        data: A TensorDict from :func:`selectorch.record`, or the path of its cache.
        key: The layer whose features are scored, or ``"logits"``.
        pool: The pooling the scorer applies to that layer.
        model: The model that will score, or ``None`` to skip the model check.

    Returns:
        ``(features (N, D), labels (N,) or None, logits (N, C) or None)``, plain CPU tensors
        (memory-mapped for a cache, never copied here).

    Raises:
        ValueError: ``key`` is not in the recording, or the cache was made with another layer,
            pooling or model.
    """
    if isinstance(data, TensorDictBase):
        td = data
        where = "the recorded TensorDict"
    else:
        root = Path(data)
        meta = read_meta(root)
        if meta is None:
            raise FileNotFoundError(f"No selectorch cache at {root} ({META_FILE} is missing).")
        _check_cache_source(root, meta, key, pool, model)
        td = load_cache(root)
        where = f"the cache at {root}"
    keys = list(td.keys())
    if key not in keys:
        raise ValueError(
            f"Expected {where} to hold {key!r} (the scored layer, or 'logits' for logit scores), "
            f"got keys {keys}. Record it with selectorch.record(..., layers=[...])."
        )
    return _plain(td.get(key)), _plain(td.get("labels", None)), _plain(td.get("logits", None))


def recorded_layers(
    data: TensorDictBase | str | os.PathLike,
    *,
    keys: Sequence[str],
    pool: Pool | Mapping[str, Pool] = "auto",
    model: nn.Module | None = None,
) -> tuple[dict[str, torch.Tensor], torch.Tensor | None, torch.Tensor | None]:
    """The features of several layers (and the logits) of a recording, for a multi-input score.

    As :func:`recorded_inputs`, for every key at once: a cache must hold each layer pooled as
    ``pool`` says (one choice, or one per layer) and come from ``model``, checked once.

    Args:
        data: A TensorDict from :func:`selectorch.record`, or the path of its cache.
        keys: The layers the score reads, and ``"logits"`` for the model's logits.
        pool: The pooling the scorer applies, one for all layers or a mapping per layer.
        model: The model that will score, or ``None`` to skip the model check.

    Returns:
        ``({key: (N, D_key)}, labels (N,) or None, logits (N, C) or None)``, plain CPU tensors.

    Raises:
        ValueError: A key is not in the recording, or the cache was made with another layer,
            pooling or model.
    """
    if isinstance(data, TensorDictBase):
        td, where = data, "the recorded TensorDict"
    else:
        root = Path(data)
        meta = read_meta(root)
        if meta is None:
            raise FileNotFoundError(f"No selectorch cache at {root} ({META_FILE} is missing).")
        for i, key in enumerate(keys):
            layer_pool = pool.get(key, "auto") if isinstance(pool, Mapping) else pool
            _check_cache_source(root, meta, key, layer_pool, model if i == 0 else None)
        td, where = load_cache(root), f"the cache at {root}"
    missing = [key for key in keys if key not in td.keys()]
    if missing:
        raise ValueError(
            f"Expected {where} to hold {missing} (the layers the score reads, and 'logits'), "
            f"got keys {list(td.keys())}. Record them with selectorch.record(..., layers=[...])."
        )
    features = {key: _plain(td.get(key)) for key in keys}
    return features, _plain(td.get("labels", None)), _plain(td.get("logits", None))
