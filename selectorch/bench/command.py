"""``selectorch bench``: the command line around :func:`selectorch.evaluate`.

Without arguments it runs the embedded default (:func:`selectorch.bench.default_setup`); with
``--model`` it runs the user's model on image folders. Every mistake in the arguments (a bad
path, a missing layer, weights that do not fit) is reported as one line by the caller.
"""

from __future__ import annotations

import argparse
import ast
import os
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from tensordict import TensorDictBase
from torch import nn
from torch.utils.data import DataLoader, Dataset

from selectorch.bench.default import (
    DEFAULT_OPTIONS,
    DEFAULT_SCORES,
    EMBEDDING_LAYER,
    HEAD,
    MULTI_LAYERS,
    BenchSetup,
    build_scores,
    default_setup,
    score_layers,
)
from selectorch.bench.evaluation import evaluate
from selectorch.cache import META_FILE, load_cache
from selectorch.scores.base import Score
from selectorch.scores.registry import create_score

__all__ = ["BenchArgumentError", "add_bench_parser", "guess_head", "parse_scores", "run_bench"]

#: Arguments that describe the user's own model and data (they need ``--model``).
_USER_ONLY = ("weights", "train", "val", "test", "ood", "transform", "image_size")
#: Arguments of the built-in benchmark only (they make no sense with ``--model``).
_DEFAULT_ONLY = ("small",)
_IMAGENET_MEAN, _IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class BenchArgumentError(ValueError):
    """An argument of ``selectorch bench`` is wrong; the message is one line for the user."""


def add_bench_parser(sub: Any) -> None:
    """Add the ``bench`` sub-command to the ``selectorch`` argument parser."""
    bench = sub.add_parser(
        "bench",
        help="compare uncertainty scores on a model (no arguments: the built-in MNIST benchmark)",
        description=(
            "Compare uncertainty scores: OOD AUROC / FPR@95, AURC, AUGRC, coverage and risk at "
            "the calibrated threshold, and the cost: input gradients, forward passes, "
            "compile-clean, fit time and throughput. Without --model it runs the "
            "built-in benchmark (ccexam MNIST CNN; MNIST vs Fashion-MNIST and Animal-MNIST)."
        ),
    )
    add = bench.add_argument
    add("--model", help="'torchvision:NAME' (random weights unless --weights) or 'module:function'")
    add("--weights", metavar="FILE", help="state dict to load (torch.load, weights_only=True)")
    add("--layer", help="layer the embedding scores read (default: the final linear layer's input)")
    add("--layers", metavar="A,B,...",
        help="layers multi-layer scores (dknn, gram) read (default: --layer; built-in: "
        + "; ".join(f"{k} {','.join(v)}" for k, v in MULTI_LAYERS.items()) + ")")
    add("--head", help="final linear layer, for ViM / ReAct / GradNorm / SHE (default: the last "
        "nn.Linear)")
    add("--train", metavar="DIR", help="ImageFolder the scores are fitted on")
    add("--val", metavar="DIR", help="ImageFolder the threshold is calibrated on")
    add("--test", metavar="DIR", help="ImageFolder of in-distribution test images")
    add("--ood", metavar="NAME=DIR", action="append", default=[],
        help="out-of-distribution images (class folders or a flat folder); repeatable")
    add("--scores", help=f"comma-separated names, NAME:key=value for options "
        f"(default: {','.join(DEFAULT_SCORES)})")
    add("--coverage", type=float, default=None, help="target coverage (default 0.95)")
    add("--risk", type=float, default=None, help="target selective risk instead of coverage")
    add("--delta", type=float, default=0.1, help="failure probability of --risk (default 0.1)")
    add("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    add("--batch-size", type=int, default=256, help="images per model call (default 256)")
    add("--workers", type=int, default=None, help="DataLoader workers for image folders")
    add("--image-size", type=int, default=None, help="center crop size (default 224)")
    add("--transform", metavar="MODULE:FUNCTION",
        help="function returning the image transform (replaces resize / crop / normalise)")
    add("--small", action="store_true",
        help="built-in benchmark only: a few hundred rows per split (seconds, for a first look)")
    add("--output", default="selectorch-report", help="report folder (default ./selectorch-report)")
    add("--no-plots", action="store_true", help="write tables only")


def parse_scores(
    spec: str | None, *, defaults: dict[str, dict[str, Any]] | None = None
) -> dict[str, Score]:
    """``{label: Score}`` from ``"knn,cosine:k=10,energy:temperature=2.0"``.

    Args:
        spec: The ``--scores`` text; ``None`` for :data:`DEFAULT_SCORES`.
        defaults: Keyword arguments per registry name, overridden by the options in ``spec``
            (the built-in benchmark gives ODIN the MNIST std this way).

    Raises:
        BenchArgumentError: An unknown score, a bad option or a repeated label.
    """
    defaults = defaults or {}
    if spec is None:
        return build_scores(DEFAULT_SCORES, options=defaults)
    scores: dict[str, Score] = {}
    for item in (part.strip() for part in spec.split(",")):
        if not item:
            continue
        name, *options = item.split(":")
        kwargs: dict[str, Any] = dict(defaults.get(name, {}))
        for option in options:
            key, sep, text = option.partition("=")
            if not sep or not key:
                raise BenchArgumentError(
                    f"--scores: expected NAME:key=value, got {item!r} (option {option!r})"
                )
            try:
                kwargs[key] = ast.literal_eval(text)
            except (ValueError, SyntaxError):
                kwargs[key] = text
        try:
            scores[item] = create_score(name, **kwargs)
        except (TypeError, ValueError) as err:
            raise BenchArgumentError(f"--scores {item!r}: {err}") from None
    if not scores:
        raise BenchArgumentError(f"--scores: expected at least one score name, got {spec!r}")
    return scores


def guess_head(model: nn.Module) -> tuple[str | None, str | None]:
    """``(layer, head)``: the last ``nn.Linear`` and the module just before it.

    The module before the head (in ``named_modules`` order, skipping the head's parents) is
    usually the head's input: ``avgpool`` for a torchvision ResNet, ``encoder.ln`` for a ViT.
    Either is ``None`` when not found.
    """
    names = [name for name, _ in model.named_modules() if name]
    modules = dict(model.named_modules())
    linear = [name for name in names if isinstance(modules[name], nn.Linear)]
    if not linear:
        return None, None
    head = linear[-1]
    before = [
        name
        for name in names[: names.index(head)]
        if not head.startswith(name + ".")
    ]
    return (before[-1] if before else None), head


def _load_weights(model: nn.Module, path: str) -> None:
    """Load a state dict (``weights_only=True``) into ``model``, refusing one that does not fit."""
    file = Path(path)
    if not file.is_file():
        raise BenchArgumentError(f"--weights: no such file: {path}")
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols before failing
            warnings.simplefilter("ignore")
            state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception:  # unpickling errors come in many types
        raise BenchArgumentError(
            f"--weights {path}: not readable with torch.load(weights_only=True): not a torch "
            "file, or it holds Python objects besides tensors (save model.state_dict())"
        ) from None
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise BenchArgumentError(f"--weights {path}: expected a state dict of tensors")
    if state and all(k.startswith("module.") for k in state):  # saved from DataParallel / DDP
        state = {k[len("module."):]: v for k, v in state.items()}
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    other = [k for k in expected if k in state and state[k].shape != expected[k].shape]
    if missing or unexpected or other:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (first {missing[0]!r})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (first {unexpected[0]!r})")
        if other:
            k = other[0]
            parts.append(
                f"{len(other)} of another shape (first {k!r}: file "
                f"{tuple(state[k].shape)}, model {tuple(expected[k].shape)})"
            )
        raise BenchArgumentError(
            f"--weights {path} do not fit {type(model).__name__}: {'; '.join(parts)}"
        )
    model.load_state_dict(state)


class _FlatImages(Dataset):
    """The images of one folder (no class sub-folders), without labels."""

    def __init__(self, files: list[Path], transform: Callable[[Any], Any]) -> None:
        self.files, self.transform = files, transform

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> Any:
        from torchvision.datasets.folder import default_loader

        return self.transform(default_loader(str(self.files[index])))


def _image_data(path: str, flag: str, transform: Callable[[Any], Any], *, labels: bool) -> Any:
    """An ImageFolder, a recording cache (:func:`selectorch.record`), or for OOD sets
    (``labels=False``) also a flat folder of images."""
    from torchvision.datasets import ImageFolder
    from torchvision.datasets.folder import IMG_EXTENSIONS

    root = Path(path)
    if not root.is_dir():
        raise BenchArgumentError(f"{flag}: no such directory: {path}")
    if (root / META_FILE).is_file():  # a cache made by selectorch.record: no forward pass
        try:
            return load_cache(root)
        except ValueError as err:
            raise BenchArgumentError(f"{flag} {path}: {err}") from None
    if not labels and not any(p.is_dir() for p in root.iterdir()):
        files = sorted(p for p in root.iterdir() if p.suffix.lower() in IMG_EXTENSIONS)
        if not files:
            raise BenchArgumentError(f"{flag}: no images ({', '.join(IMG_EXTENSIONS)}) in {path}")
        return _FlatImages(files, transform)
    try:
        return ImageFolder(str(root), transform=transform)
    except (FileNotFoundError, OSError) as err:
        first = (str(err).strip().splitlines() or [""])[0]
        raise BenchArgumentError(f"{flag} {path}: {first}") from None


def _transform(args: argparse.Namespace) -> Callable[[Any], Any]:
    if args.transform:
        from selectorch.cli import load_attribute

        try:
            factory = load_attribute(args.transform)
            return factory()
        except Exception as err:  # the user's factory: one line
            first = (str(err).strip().splitlines() or [""])[0]
            raise BenchArgumentError(f"--transform {args.transform!r}: {first}") from None
    from torchvision import transforms

    size = args.image_size or 224
    return transforms.Compose(
        [
            transforms.Resize(round(size * 256 / 224)),
            transforms.CenterCrop(size),
            transforms.ToTensor(),
            transforms.Normalize(_IMAGENET_MEAN, _IMAGENET_STD),
        ]
    )


def _user_setup(args: argparse.Namespace, scores: dict[str, Score]) -> BenchSetup:
    """Model, scores, layers and image-folder loaders from the command line."""
    from selectorch.cli import build_model

    missing = [flag for flag in ("train", "val", "test") if getattr(args, flag) is None]
    if missing:
        raise BenchArgumentError(
            f"--model needs --train, --val and --test image folders (missing: "
            f"{', '.join('--' + m for m in missing)})"
        )
    model = build_model(args.model)
    if args.weights:
        _load_weights(model, args.weights)
    layer, head = guess_head(model)
    layer, head = args.layer or layer, args.head or head
    if head is None:
        dropped = [k for k, s in scores.items() if getattr(s, "needs_head", False)]
        if args.scores is None:
            scores = {k: s for k, s in scores.items() if k not in dropped}
        elif dropped:
            raise BenchArgumentError(
                f"--scores {','.join(dropped)} re-apply the classifier head: pass --head NAME"
            )
    transform = _transform(args)
    workers = args.workers if args.workers is not None else min(4, os.cpu_count() or 1)
    if workers < 0:
        raise BenchArgumentError(f"--workers: expected a number >= 0, got {workers}")

    def loader(dataset: Any) -> Any:
        if isinstance(dataset, TensorDictBase):  # a recording: evaluate reads it directly
            return dataset
        return DataLoader(dataset, batch_size=args.batch_size, num_workers=workers)

    data: dict[str, Any] = {
        split: loader(_image_data(getattr(args, flag), f"--{flag}", transform, labels=True))
        for split, flag in (("fit", "train"), ("calibrate", "val"), ("test", "test"))
    }
    ood = {}
    for item in args.ood:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise BenchArgumentError(f"--ood: expected NAME=DIR, got {item!r}")
        if name in ood:
            raise BenchArgumentError(f"--ood: the name {name!r} is given twice")
        ood[name] = loader(_image_data(path, f"--ood {name}", transform, labels=False))
    data["ood"] = ood
    return BenchSetup(
        model=model,
        scores=scores,
        layer=score_layers(
            scores, embedding=layer, head_input=layer, multi=_layer_list(args.layers)
        ),
        head=head,
        data=data,
        description=f"{args.model}; layer {layer}; head {head}; "
        + "; ".join(f"{k} {_rows(v):,}" for k, v in data.items() if k != "ood")
        + "".join(f"; OOD {k} {_rows(v):,}" for k, v in ood.items()),
    )


def _rows(data: Any) -> int:
    """Rows of a loader's dataset or of a recording."""
    return int(data.batch_size[0]) if isinstance(data, TensorDictBase) else len(data.dataset)


def _device(spec: str | None) -> torch.device:
    if spec is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except RuntimeError as err:
        raise BenchArgumentError(f"--device {spec!r}: {err}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise BenchArgumentError(f"--device {spec}: CUDA is not available on this machine")
    return device


def _layer_list(text: str | None) -> list[str] | None:
    """``--layers A,B`` as a list (``None`` when not given)."""
    if text is None:
        return None
    names = [name.strip() for name in text.split(",") if name.strip()]
    if not names:
        raise BenchArgumentError(f"--layers: expected comma-separated layer names, got {text!r}")
    return names


def _setup(args: argparse.Namespace) -> BenchSetup:
    if args.batch_size < 1:
        raise BenchArgumentError(f"--batch-size: expected a number >= 1, got {args.batch_size}")
    if args.model is not None:
        given = [f"--{name}" for name in _DEFAULT_ONLY if getattr(args, name)]
        if given:
            raise BenchArgumentError(
                f"{', '.join(given)} is for the built-in benchmark; drop it with --model"
            )
        return _user_setup(args, parse_scores(args.scores))
    scores = parse_scores(args.scores, defaults=DEFAULT_OPTIONS)
    given = [f"--{name.replace('_', '-')}" for name in _USER_ONLY if getattr(args, name)]
    if given:
        raise BenchArgumentError(
            f"{', '.join(given)} need --model (without it the built-in MNIST benchmark runs "
            "on its own data)"
        )
    setup = default_setup(scores, small=args.small)
    layer = args.layer or EMBEDDING_LAYER
    head_input = args.layer or "classifier.1"
    multi = _layer_list(args.layers) or MULTI_LAYERS
    setup.layer = score_layers(scores, embedding=layer, head_input=head_input, multi=multi)
    setup.head = args.head or HEAD
    return setup


def run_bench(args: argparse.Namespace, out: Callable[[str], None] = print) -> int:
    """Run ``selectorch bench`` with parsed arguments; print the table and write the report.

    Raises:
        BenchArgumentError: A bad argument, path, layer or weights file.
        ValueError, FileNotFoundError: From :func:`selectorch.evaluate` or the data loaders.
    """
    started = time.perf_counter()
    setup = _setup(args)
    device = _device(args.device)
    setup.model.to(device).eval()
    coverage = args.coverage if args.coverage is not None or args.risk is not None else 0.95
    report = evaluate(
        setup.model,
        setup.scores,
        layer=setup.layer,
        head=setup.head,
        fit=setup.data["fit"],
        calibrate=setup.data["calibrate"],
        test=setup.data["test"],
        ood=setup.data["ood"],
        coverage=coverage,
        risk=args.risk,
        delta=args.delta,
        batch_size=args.batch_size,
    )
    report.meta["setup"] = setup.description
    folder = report.save(args.output, plots=not args.no_plots)
    out(setup.description)
    out(report.summary())
    out("")
    out(report.table())
    out("")
    for line in report.notes():
        out(line)
    if report.ood_names:
        out(f"best mean AUROC: {report.best('auroc_mean')}")
    out(f"report written to {folder}/ in {time.perf_counter() - started:.1f} s")
    return 0
