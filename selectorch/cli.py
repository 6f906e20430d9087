"""The ``selectorch`` command line."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from typing import Any

from torch import nn

from selectorch._version import __version__


def load_attribute(spec: str) -> Any:
    """The object named by ``module:attribute`` (e.g. ``selectorch.datasets:mnist_net``).

    Raises:
        ValueError: The spec is malformed, or the module or attribute cannot be loaded.
    """
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"expected 'module:function', got {spec!r}")
    try:
        return getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"cannot load {spec!r}: {err}") from None


def build_model(spec: str) -> nn.Module:
    """Build a model from ``torchvision:NAME`` (random weights) or ``module:function``.

    Raises:
        ValueError: The spec is malformed or names nothing that builds an ``nn.Module``.
    """
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"expected MODEL as 'torchvision:NAME' or 'module:function', got {spec!r}")
    if module_name == "torchvision":
        import torchvision

        try:
            return torchvision.models.get_model(attr, weights=None)
        except ValueError as err:
            raise ValueError(f"unknown torchvision model {attr!r}: {err}") from None
    factory = load_attribute(spec)
    if not callable(factory):
        raise ValueError(f"{spec!r} is a {type(factory).__name__}, not a function building a model")
    try:
        model = factory()
    except Exception as err:  # the user's factory: report it on one line
        first = (str(err).strip().splitlines() or [""])[0]
        raise ValueError(f"{spec!r} failed: {type(err).__name__}: {first}") from None
    if not isinstance(model, nn.Module):
        raise ValueError(f"{spec!r} returned {type(model).__name__}, not an nn.Module")
    return model


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``selectorch`` console script."""
    parser = argparse.ArgumentParser(prog="selectorch", description=__doc__)
    parser.add_argument("--version", action="version", version=f"selectorch {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    layers = sub.add_parser("layers", help="list the layer names a model offers to record")
    layers.add_argument("model", help="'torchvision:NAME' or 'module:function'")
    sub.add_parser(
        "scores",
        help="list the registered scores: input, input gradients, forward passes, one graph",
    )
    from selectorch.bench.command import add_bench_parser

    add_bench_parser(sub)
    args = parser.parse_args(argv)

    if args.command == "bench":
        return _bench(args)
    if args.command == "scores":
        from selectorch.scores import list_scores

        yes = {True: "yes", False: "no"}
        print(
            f"{'name':22s} {'class':26s} {'input':10s} {'input grad':>10s} {'passes':>6s} "
            f"{'full graph':>10s}"
        )
        for row in list_scores(details=True):
            print(
                f"{row['name']:22s} {row['class']:26s} {row['input']:10s} "
                f"{yes[row['requires_grad']]:>10s} {row['passes']:>6d} "
                f"{yes[row['compile_clean']]:>10s}"
            )
        return 0
    try:
        model = build_model(args.model)
    except ValueError as err:
        print(f"selectorch: error: {err}", file=sys.stderr)
        return 2
    for name, module in model.named_modules():
        if name:
            print(f"{name}\t{type(module).__name__}")
    return 0


def _bench(args: argparse.Namespace) -> int:
    """``selectorch bench``: user mistakes (paths, layers, weights) end in one line, exit 2."""
    from selectorch.bench.command import run_bench

    try:
        return run_bench(args)
    except (ValueError, FileNotFoundError, NotADirectoryError, PermissionError) as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        print(f"selectorch: error: {first}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
