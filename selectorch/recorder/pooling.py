"""Pooling of a layer's output into one ``(B, D)`` row per sample, with einops."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from einops import rearrange, reduce
from torch import nn

POOLS = ("auto", "avg", "avg_last", "cls", "mean", "flatten", "none")

#: Layers whose outputs are channels-first: ``(B, C, L)`` or ``(B, C, H, W, ...)``.
_CHANNELS_FIRST = (
    nn.modules.conv._ConvNd,
    nn.modules.batchnorm._BatchNorm,
    nn.modules.instancenorm._InstanceNorm,
    nn.modules.pooling._MaxPoolNd,
    nn.modules.pooling._AvgPoolNd,
    nn.modules.pooling._AdaptiveAvgPoolNd,
    nn.modules.pooling._AdaptiveMaxPoolNd,
    nn.GroupNorm,
)

#: A pooling choice: one of :data:`POOLS` or a callable ``(Tensor) -> Tensor``.
Pool = str | Callable[[torch.Tensor], torch.Tensor]


def check_pool(pool: Any, name: str = "pool") -> Pool:
    """Return ``pool`` if it is a known pooling name or a callable, else raise ``ValueError``."""
    if callable(pool) or pool in POOLS:
        return pool
    raise ValueError(
        f"Expected argument `{name}` to be one of {POOLS} or a callable, got {pool!r}."
    )


def first_tensor(output: Any, layer: str) -> torch.Tensor:
    """The tensor in a layer's output: itself, the first tensor of a tuple/list or mapping.

    Raises:
        TypeError: The output holds no tensor.
    """
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, Mapping):
        candidates = list(output.values())
    elif isinstance(output, (tuple, list)):
        candidates = list(output)
    else:
        candidates = []
    for value in candidates:
        if isinstance(value, torch.Tensor):
            return value
    raise TypeError(
        f"Layer {layer!r} returned {type(output).__name__}, which holds no tensor to record; "
        "record another layer or pass pool=callable to extract one."
    )


def resolve_auto(x: torch.Tensor, module: nn.Module | None, layer: str) -> str:
    """The pooling that ``"auto"`` means for this output (and the layer that produced it).

    Raises:
        ValueError: A 4-D output looks channels-last ``(B, H, W, C)``; the choice must be explicit.
    """
    if x.ndim == 2:
        return "none"
    channels_first = isinstance(module, _CHANNELS_FIRST)
    if x.ndim == 3:
        return "avg" if channels_first else "cls"
    if x.ndim == 4 and not channels_first and x.shape[1] == x.shape[2] != x.shape[3]:
        raise ValueError(
            f"Layer {layer!r} output has shape {tuple(x.shape)}, which looks channels-last "
            "(B, H, W, C) as in Swin or ConvNeXt blocks: pass pool='avg_last' to average over "
            "H and W, or pool='avg' if it is (B, C, H, W)."
        )
    return "avg"


def pool_features(
    x: torch.Tensor, pool: Pool = "auto", layer: str = "layer", module: nn.Module | None = None
) -> torch.Tensor:
    """Pool one layer's batch-first output into ``(B, D)``.

    * ``"auto"``: ``(B, D)`` unchanged; ``(B, T, D)`` token sequences -> class token (``"cls"``,
      robust to padding), but ``(B, C, L)`` from a 1-D conv, norm or pool layer -> ``"avg"``;
      ``(B, C, *spatial)`` feature maps of 4 or more dims -> ``"avg"``; a 4-D output that looks
      channels-last ``(B, H, W, C)`` (``H == W != C``, not from a conv layer) is an error asking
      for an explicit choice.
    * ``"avg"``: mean over every dim after the channel dim: ``(B, C, ...) -> (B, C)``.
    * ``"avg_last"``: mean over every dim between batch and channels: ``(B, ..., C) -> (B, C)``.
    * ``"cls"``: first token of ``(B, T, D)``.
    * ``"mean"``: mean over the tokens of ``(B, T, D)`` (padding tokens included).
    * ``"flatten"``: ``(B, ...) -> (B, prod(...))``.
    * ``"none"``: unchanged, any shape.
    * a callable ``f(x) -> Tensor`` for anything else (channels-last maps, masked means, ...).

    Args:
        x: The layer's output, batch first.
        pool: The pooling choice.
        layer: The layer's name, for error messages.
        module: The layer itself, which tells ``"auto"`` whether a 3-D output is channels-first.

    Returns:
        The pooled tensor, ``(B, D)`` for every choice but ``"none"`` and callables. It never
        shares memory with ``x``: results that would be views are cloned, so in-place operations
        the model applies later (``ReLU(inplace=True)``, ``out += identity``) cannot change it.

    Raises:
        ValueError: The choice does not apply to the output's shape.
    """
    if callable(pool):
        return pool(x).clone()
    if pool == "none":
        return x.clone()
    if pool == "auto":
        pool = resolve_auto(x, module, layer)
        if pool == "none":
            return x.clone()
    if x.ndim < 2:
        raise ValueError(
            f"Layer {layer!r} output has shape {tuple(x.shape)}; expected a batch-first tensor "
            "with at least 2 dims. Record another layer or pass pool=callable."
        )
    if pool == "flatten":
        return rearrange(x, "b ... -> b (...)").clone()
    if pool == "avg":
        return reduce(x, "b c ... -> b c", "mean") if x.ndim > 2 else x.clone()
    if pool == "avg_last":
        return reduce(x, "b ... c -> b c", "mean") if x.ndim > 2 else x.clone()
    if x.ndim != 3:
        raise ValueError(
            f"pool={pool!r} expects a (B, T, D) token sequence from layer {layer!r}, "
            f"got shape {tuple(x.shape)}."
        )
    if pool == "cls":
        return x[:, 0].clone()
    return reduce(x, "b t d -> b d", "mean")
