"""The Recorder: run a model once and get its output plus pooled embeddings of chosen layers."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from tensordict import TensorDict
from torch import nn

from selectorch.recorder.hooks import LayerHooks
from selectorch.recorder.pooling import Pool


def layer_keys(layers: str | Sequence[str] | Mapping[str, str]) -> dict[str, str]:
    """Normalise the ``layers`` argument to a mapping from layer name to output key.

    Raises:
        ValueError: ``layers`` is empty or of the wrong type.
    """
    if isinstance(layers, str):
        return {layers: layers}
    if isinstance(layers, Mapping):
        mapping = {str(k): str(v) for k, v in layers.items()}
    elif isinstance(layers, Sequence) and all(isinstance(n, str) for n in layers):
        if len(set(layers)) != len(layers):
            raise ValueError(
                f"Expected argument `layers` to name each layer once, got {list(layers)}."
            )
        mapping = {name: name for name in layers}
    else:
        raise ValueError(
            "Expected argument `layers` to be a layer name, a list of names or a dict "
            f"name -> key, got {layers!r}."
        )
    if not mapping:
        raise ValueError("Expected argument `layers` to name at least one layer, got none.")
    return mapping


class Recorder(nn.Module):
    """Record pooled outputs of named layers while the model runs, with no change to the model.

    Forward hooks are registered once, on the named layers only, and record only while the
    recorder itself runs the model: calling the wrapped model directly records nothing.

    Args:
        model: Any ``nn.Module``, not yet compiled.
        layers: A layer name, a list of names, or a dict ``{name: key}`` giving the keys of the
            returned TensorDict. Names are those of ``model.named_modules()``; see
            :func:`selectorch.list_layers`.
        pool: How each output becomes ``(B, D)``: one of :data:`selectorch.recorder.POOLS`, a
            callable, or a dict ``{name: pool}``; see :func:`selectorch.recorder.pool_features`.
        detach: Detach the recorded tensors from the autograd graph.

    Raises:
        ValueError: An unknown layer (with the closest names) or a bad ``pool``.
        TypeError: ``model`` is already compiled.

    Example:
        >>> import torchvision
        >>> net = torchvision.models.resnet18().eval()
        >>> with Recorder(net, ["layer3", "avgpool"]) as rec:
        ...     logits, feats = rec(torch.randn(2, 3, 64, 64))
        >>> feats["layer3"].shape, feats["avgpool"].shape
        (torch.Size([2, 256]), torch.Size([2, 512]))
    """

    def __init__(
        self,
        model: nn.Module,
        layers: str | Sequence[str] | Mapping[str, str],
        *,
        pool: Pool | Mapping[str, Pool] = "auto",
        detach: bool = True,
    ):
        super().__init__()
        mapping = layer_keys(layers)
        hooks = LayerHooks(model, mapping, pool, detach)
        self.model = model
        # not a submodule: its hooks live on `model`, which is registered once, above
        object.__setattr__(self, "_hooks", hooks)
        hooks.tie_to(self)  # a recorder that is garbage-collected leaves no hook behind

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._hooks.tie_to(self)  # a copy (deepcopy, unpickling) removes its own hooks too

    @property
    def layers(self) -> dict[str, str]:
        """Mapping from recorded layer name to its key in the returned TensorDict."""
        return dict(self._hooks.layers)

    def forward(self, *args: Any, **kwargs: Any) -> tuple[Any, TensorDict]:
        """Run the model once on ``*args, **kwargs``.

        Returns:
            ``(output, features)``: ``output`` is exactly what ``model(*args, **kwargs)`` returns;
            ``features`` is a TensorDict with batch size ``[B]`` holding one pooled ``(B, D)``
            tensor per layer key.

        Raises:
            RuntimeError: The recorder was closed, or a layer did not run (or ran twice).
            ValueError: Recorded layers disagree on the batch size.
        """
        if self._hooks.closed:
            raise RuntimeError("This Recorder was closed; create a new one to record again.")
        output, features = self._hooks.run(self.model, args, kwargs)
        sizes = {key: t.shape[0] for key, t in features.items()}
        if len(set(sizes.values())) > 1:
            raise ValueError(
                f"Recorded layers disagree on the batch size (first dim): {sizes}. Record "
                "batch-first layers, or pass pool=callable to make them batch-first."
            )
        batch = next(iter(sizes.values()))
        return output, TensorDict(features, batch_size=[batch])

    def close(self) -> None:
        """Remove exactly the hooks this recorder added."""
        self._hooks.close()

    def __enter__(self) -> Recorder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def extra_repr(self) -> str:
        return f"layers={list(self._hooks.layers)}"
