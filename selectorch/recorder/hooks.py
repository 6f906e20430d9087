"""Read-and-clear forward hooks on chosen layers, shared by Recorder and SelectiveModel."""

from __future__ import annotations

import weakref
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from selectorch.recorder.layers import check_not_compiled, get_layer
from selectorch.recorder.pooling import Pool, check_pool, first_tensor, pool_features


class _StoreHook:
    """Forward hook that stores one layer's pooled output in its owner while it records.

    A class rather than a closure so that models carrying it can be pickled and deep-copied: a
    deep copy of the model alone gets a copy of the owner that never records.
    """

    def __init__(self, owner: LayerHooks, layer: str, key: str, pool: Pool, detach: bool):
        self.owner = owner
        self.layer = layer
        self.key = key
        self.pool = pool
        self.detach = detach

    def __call__(self, module: nn.Module, args: Any, output: Any) -> None:
        owner = self.owner
        if not owner.recording:
            return
        x = first_tensor(output, self.layer)
        if self.detach:
            x = x.detach()
        pooled = pool_features(x, self.pool, self.layer, module)
        if pooled.ndim == 0:
            raise ValueError(
                f"Layer {self.layer!r} gave a 0-dim tensor after pooling; expected a batch-first "
                "tensor (B, ...). Check the pool callable or record another layer."
            )
        if self.key in owner.store:
            owner.repeated.add(self.layer)
        owner.store[self.key] = pooled


class LayerHooks:
    """Forward hooks on the named layers of one model; they record only between start and pop.

    Args:
        model: The model to hook; refused if already compiled.
        layers: Mapping from layer name (as in ``model.named_modules()``) to output key.
        pool: One pooling choice for all layers, or a mapping from layer name to choice.
        detach: Detach recorded outputs from the autograd graph.

    Raises:
        ValueError: A layer name is unknown, two layers share a key, or a pooling choice is bad.
        TypeError: ``model`` is already compiled.
    """

    def __init__(
        self,
        model: nn.Module,
        layers: Mapping[str, str],
        pool: Pool | Mapping[str, Pool] = "auto",
        detach: bool = True,
    ):
        check_not_compiled(model)
        if isinstance(pool, Mapping):
            unknown = sorted(set(pool) - set(layers))
            if unknown:
                raise ValueError(
                    f"Argument `pool` names layers that are not recorded: {unknown}; "
                    f"recorded layers: {sorted(layers)}."
                )
            pools = {name: check_pool(pool.get(name, "auto"), f"pool[{name!r}]") for name in layers}
        else:
            pools = {name: check_pool(pool) for name in layers}
        keys = list(layers.values())
        if len(set(keys)) != len(keys):
            raise ValueError(f"Expected distinct output keys for the layers, got {dict(layers)}.")
        modules = {name: get_layer(model, name) for name in layers}
        self.model = model
        self.layers = dict(layers)
        self.store: dict[str, torch.Tensor] = {}
        self.repeated: set[str] = set()
        self.recording = False
        self._hook_ids: dict[str, int] = {}
        self._finalizer: weakref.finalize | None = None
        for name, module in modules.items():
            hook = _StoreHook(self, name, layers[name], pools[name], detach)
            self._hook_ids[name] = module.register_forward_hook(hook).id

    def tie_to(self, owner: object) -> None:
        """Remove the hooks when ``owner`` (the wrapper holding this object) is garbage-collected.

        The hooks live on the model, which usually outlives its wrappers; without this, a
        dropped Recorder or SelectiveModel would leave its hooks (and this object) behind.
        Wrappers call it in ``__init__`` and again in ``__setstate__`` (copies, unpickling).
        """
        if self._finalizer is not None:
            self._finalizer.detach()
            self._finalizer = None
        if not self.closed:
            self._finalizer = weakref.finalize(owner, self.close)
            self._finalizer.atexit = False

    def __getstate__(self) -> dict[str, Any]:
        # a finalizer belongs to one owner: a copy is tied to its own by the wrapper
        return {**self.__dict__, "_finalizer": None}

    def start(self) -> None:
        """Clear what an interrupted run may have left, and start recording."""
        self.store.clear()
        self.repeated.clear()
        self.recording = True

    def stop(self) -> None:
        """Stop recording and drop what was recorded (after the model raised)."""
        self.recording = False
        self.store.clear()
        self.repeated.clear()

    def run(
        self, model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[Any, dict[str, torch.Tensor]]:
        """Call ``model(*args, **kwargs)`` while recording; return its output and the records.

        Recording stops even when the model raises, so later direct calls record nothing.
        """
        self.start()
        try:
            output = model(*args, **kwargs)
        except BaseException:
            self.stop()
            raise
        return output, self.pop()

    def pop(self) -> dict[str, torch.Tensor]:
        """Stop recording and hand over what was recorded, leaving nothing behind.

        Returns:
            Mapping from output key to the pooled tensor.

        Raises:
            RuntimeError: A layer did not run, or ran more than once, during the forward pass.
        """
        self.recording = False
        missing = [name for name, key in self.layers.items() if key not in self.store]
        if missing:
            self.store.clear()
            raise RuntimeError(
                f"Layer(s) {missing} did not run during the forward pass, so nothing was recorded."
                " Pick layers the model's forward calls (see selectorch.list_layers(model))."
            )
        if self.repeated:
            repeated = sorted(self.repeated)
            self.store.clear()
            self.repeated.clear()
            raise RuntimeError(
                f"Layer(s) {repeated} ran more than once in one forward pass (a module reused "
                "by the model), so which output to record is ambiguous; record a layer that "
                "runs once."
            )
        out = dict(self.store)
        self.store.clear()
        return out

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` removed the hooks."""
        return not self._hook_ids

    def close(self) -> None:
        """Remove exactly the hooks this object added; other hooks on the model stay."""
        for name, hook_id in self._hook_ids.items():
            module = self.model.get_submodule(name)
            module._forward_hooks.pop(hook_id, None)
            module._forward_hooks_with_kwargs.pop(hook_id, None)
            module._forward_hooks_always_called.pop(hook_id, None)
        self._hook_ids = {}
        self.recording = False
        self.store.clear()
        finalizer, self._finalizer = getattr(self, "_finalizer", None), None
        if finalizer is not None:
            finalizer.detach()
