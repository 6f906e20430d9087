"""The two-pass run of scores that need input gradients (``Score.requires_grad``), e.g. ODIN.

:class:`~selectorch.SelectiveModel` calls :func:`gradient_run` instead of one plain forward
pass: the model runs on its first positional input with gradients on (even inside
``torch.no_grad()``), the score moves that input (``score.perturb(x, logits)``), and the model
runs again on the moved input without gradients; the score reads the second pass. Gradients
are taken with respect to the input only: while the outer code runs without gradients, the
parameters' ``requires_grad`` flags are turned off for the first pass (less memory) and
restored after, and no ``.grad`` is ever written.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_map

from selectorch.functional.odin import check_gradient_input

__all__ = ["gradient_run", "input_gradients_off"]


@contextlib.contextmanager
def input_gradients_off(model: nn.Module, enabled: bool = True) -> Iterator[None]:
    """Turn off ``requires_grad`` of ``model``'s parameters while inside; restore every flag."""
    frozen = [p for p in model.parameters() if p.requires_grad] if enabled else []
    for p in frozen:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in frozen:
            p.requires_grad_(True)


def _detached(output: Any) -> Any:
    return tree_map(lambda t: t.detach() if isinstance(t, torch.Tensor) else t, output)


def _gradient_run(
    model: nn.Module,
    score: Any,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    *,
    logits_of: Callable[[Any], torch.Tensor | None],
    second_pass: Callable[[tuple[Any, ...], dict[str, Any]], tuple[Any, Any]],
) -> tuple[Any, Any]:
    """Run the model twice for a ``requires_grad`` score; return the first output and what the
    score reads from the second pass.

    Args:
        model: The wrapped model.
        score: A score with ``perturb(x, logits, retain_graph=...) -> x'``.
        args: The model's positional inputs; the first is perturbed.
        kwargs: The model's keyword inputs, passed unchanged to both passes.
        logits_of: Finds the logits in the model's output (``None`` when there are none).
        second_pass: Runs the model on ``(x', *args[1:])`` and returns ``(output, features)``.

    Returns:
        ``(output, features)``: the first pass's output (detached when the caller runs without
        gradients) and the score's input from the second pass.

    Raises:
        RuntimeError: Under ``torch.inference_mode()``.
        TypeError: No positional input, a non-floating one, or an output without logits.
    """
    who = type(score).__name__
    if not args:
        raise TypeError(
            f"{who} perturbs the model's first positional input, but the model got only keyword "
            f"inputs {sorted(kwargs)}; pass the input to perturb positionally."
        )
    x = args[0]
    check_gradient_input(x, who)
    outer = torch.is_grad_enabled()
    if outer and x.requires_grad:
        leaf = x  # the caller's graph stays intact; torch.autograd.grad writes no .grad
    else:
        leaf = (x.clone() if x.is_inference() else x.detach()).requires_grad_(True)
    with torch.enable_grad(), input_gradients_off(model, enabled=not outer):
        output = model(leaf, *args[1:], **kwargs)
        logits = logits_of(output)
        if logits is None:
            raise TypeError(
                f"{who} perturbs the input against the model's predicted class, but the model's "
                f"output of type {type(output).__name__} holds no logits."
            )
        moved = score.perturb(leaf, logits, retain_graph=outer)
    if not outer:
        output = _detached(output)
    with torch.no_grad():
        _, features = second_pass((moved, *args[1:]), kwargs)
    return output, features


_REASON = (
    "a score with requires_grad=True (e.g. ODINScore) takes torch.autograd.grad of the model "
    "with respect to its input between two forward passes, which cannot be one graph: compile "
    "the SelectiveModel without fullgraph=True (this step then runs eagerly)"
)

#: :func:`_gradient_run`, run eagerly by ``torch.compile`` (``fullgraph=True`` raises, saying why).
gradient_run = torch.compiler.disable(_gradient_run, reason=_REASON)
