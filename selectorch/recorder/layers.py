"""Finding layers of a model by their qualified name."""

from __future__ import annotations

import difflib

from torch import nn


def list_layers(model: nn.Module) -> list[str]:
    """Names of the layers a :class:`~selectorch.Recorder` can hook, in definition order.

    The names are those of ``model.named_modules()`` (dotted paths such as ``"layer4.1.conv2"``),
    without the root module.

    Args:
        model: Any ``nn.Module``.

    Returns:
        List of layer names.

    Example:
        >>> list_layers(nn.Sequential(nn.Linear(2, 3), nn.ReLU()))
        ['0', '1']
    """
    return [name for name, _ in model.named_modules() if name]


def check_not_compiled(model: nn.Module) -> None:
    """Refuse a model that ``torch.compile`` already wrapped.

    Raises:
        TypeError: ``model`` is compiled; hooks added now would be skipped by its graph.
    """
    from torch._dynamo.eval_frame import OptimizedModule

    if isinstance(model, OptimizedModule) or getattr(model, "_compiled_call_impl", None):
        raise TypeError(
            "Expected argument `model` to be an uncompiled nn.Module, got a model already "
            "compiled with torch.compile: forward hooks added after compiling are skipped by the "
            "compiled graph, so nothing would be recorded. Wrap the original model first and "
            "compile the wrapper instead, e.g. torch.compile(SelectiveModel(model, ...))."
        )


def get_layer(model: nn.Module, name: str) -> nn.Module:
    """Return the submodule called ``name``, with a suggestion when there is none.

    Args:
        model: The model to search.
        name: A dotted name as in ``model.named_modules()``.

    Returns:
        The submodule.

    Raises:
        ValueError: No layer has that name; the message lists the closest names.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"Expected a layer name (a non-empty str), got {name!r}.")
    modules = dict(model.named_modules())
    if name in modules:
        return modules[name]
    names = [n for n in modules if n]
    close = difflib.get_close_matches(name, names, n=3, cutoff=0.5)
    hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    raise ValueError(
        f"Layer {name!r} not found in {type(model).__name__}.{hint} "
        "See selectorch.list_layers(model) for every valid name."
    )
