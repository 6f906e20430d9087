"""SelectiveModel: a model's output, an uncertainty score and a keep/reject decision in one pass."""

from __future__ import annotations

import functools
import inspect
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, NamedTuple

import torch
from torch import nn

from selectorch.calibration import check_target
from selectorch.collect import (
    class_predictions,
    collect,
    finite_only,
    gather_ranks,
    logits_from_output,
    score_keys,
)
from selectorch.collect import eval_mode as _eval_mode
from selectorch.data import module_device, to_device
from selectorch.distributed.collectives import replicated_inputs
from selectorch.functional.finite import finite_rows
from selectorch.gradients import gradient_run
from selectorch.recorded import is_recorded
from selectorch.recorder.hooks import LayerHooks
from selectorch.recorder.layers import check_not_compiled, get_layer
from selectorch.recorder.pooling import Pool
from selectorch.scores.base import Score

__all__ = [
    "SelectiveModel",
    "SelectiveOutput",
    "class_predictions",
    "effective_pool",
    "logits_from_output",
    "score_keys",
]

_FEATURES = "features"


class SelectiveOutput(NamedTuple):
    """What :class:`SelectiveModel` returns.

    Attributes:
        output: Exactly what the wrapped model returned (same object, untouched).
        score: ``(B,)`` uncertainty, higher = less trustworthy; ``+inf`` for non-finite samples.
        selected: ``(B,)`` bool, ``True`` where the prediction is kept (``score <= threshold_``).
    """

    output: Any
    score: torch.Tensor
    selected: torch.Tensor


@functools.lru_cache(maxsize=256)
def _fit_takes_copy(score_type: type) -> bool:
    """Whether ``score_type.fit`` takes a ``copy`` keyword (a subclass may override it without)."""
    try:
        parameter = inspect.signature(score_type.fit).parameters.get("copy")
    except (TypeError, ValueError):  # no signature to read
        return False
    return parameter is not None and parameter.kind in (
        inspect.Parameter.POSITIONAL_OR_KEYWORD,
        inspect.Parameter.KEYWORD_ONLY,
    )


def _finite_rows(tensors: Iterable[Any], batch: int, device: torch.device) -> torch.Tensor:
    """``(B,)`` bool: rows where every floating tensor with leading dim ``batch`` is finite."""
    ok = torch.ones(batch, dtype=torch.bool, device=device)
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.is_floating_point() and t.ndim and t.shape[0] == batch:
            ok = ok & finite_rows(t).to(device)
    return ok


def effective_pool(score: Score, pool: Pool | Mapping[str, Pool]) -> Pool | Mapping[str, Pool]:
    """The pooling the hooks apply: ``score.pool`` when ``pool="auto"`` and the score has one."""
    preferred = getattr(score, "pool", None)
    if isinstance(pool, str) and pool == "auto" and preferred is not None:
        return preferred
    return pool


def _layer_map(score: Score, layer: str | Sequence[str] | None) -> dict[str, str]:
    """Which layers to hook, and under which key the score finds each one."""
    if score.input == "multi":
        names = [layer] if isinstance(layer, str) else list(layer or [])
        if not all(isinstance(name, str) for name in names):
            raise TypeError(f"Expected argument `layer` to hold layer names, got {layer!r}.")
        if "logits" in names:
            raise ValueError(
                "Argument `layer` names 'logits', the key of the model's output: name only the "
                "hooked layers; the logits are read from the model's output."
            )
        keys = score_keys(score)
        if keys is None:
            if not names:
                raise ValueError(
                    f"{type(score).__name__} reads several layers: pass layer=[...] naming them "
                    "(see selectorch.list_layers(model)); the logits come from the model's "
                    "output."
                )
            return {name: name for name in names}
        unknown = [key for key in keys if key not in names and key != "logits"]
        if unknown:
            raise ValueError(
                f"{type(score).__name__} reads the keys {unknown}, which are neither recorded "
                f"layers (layer={names}) nor 'logits'."
            )
        return {name: name for name in names}
    if layer is not None and not isinstance(layer, str):
        raise TypeError(
            f"Expected argument `layer` to be a layer name (str) or None, got {layer!r} "
            "(several layers feed a FusionScore)."
        )
    if layer is None and score.input == "embedding":
        raise ValueError(
            f"{type(score).__name__} scores embeddings: pass layer=... naming the layer to "
            "record, e.g. layer='avgpool' for a torchvision ResNet (see "
            "selectorch.list_layers(model))."
        )
    return {} if layer is None else {layer: _FEATURES}


class SelectiveModel(nn.Module):
    """Wrap any model for selective prediction, without changing it.

    One forward pass returns the model's output, a per-sample uncertainty and whether the
    prediction is kept. Embedding scores (kNN, ...) read a hooked ``layer``; logit scores read
    the model's output (or ``layer`` when given). Hooks are registered once, here, so
    ``torch.compile(sel, fullgraph=True)`` gives one graph (for every score whose
    ``compile_clean`` is true).

    A score with ``requires_grad`` (ODIN) costs two passes: the model runs on its first
    positional input with gradients on, even inside ``torch.no_grad()``, the score moves that
    input, and the model runs again on it; the returned output is the first pass's and the
    parameters get no ``.grad`` (see :mod:`selectorch.gradients`). Such a score raises under
    ``torch.inference_mode()``, for integer inputs and for recordings.

    Args:
        model: Any ``nn.Module``, not yet compiled.
        score: A :class:`~selectorch.scores.Score`.
        layer: Name of the layer whose output is scored (see :func:`selectorch.list_layers`);
            required for embedding scores. A list of names feeds a multi-layer score: a
            :class:`~selectorch.scores.layers.LayerScore` (DkNN, Gram) reads every listed layer
            and the model's logits, a :class:`~selectorch.scores.FusionScore` the keys it
            names (``"logits"`` is always the model's output).
        pool: How the layer's output becomes ``(B, D)``; see
            :func:`selectorch.recorder.pool_features`. With ``"auto"``, a score that prefers
            a pooling (``score.pool``, e.g. Gram features) gets it for every hooked layer
            (:attr:`layer_pool` says which applies).
        head: Name of the classifier's final linear layer, for scores that re-apply the head to
            the recorded features (ViM, ReAct, ASH); its weight and bias are copied into the
            score at init and again at every ``fit`` and ``calibrate``.

    Raises:
        ValueError: No ``layer`` for an embedding score, an unknown layer, a FusionScore key
            that names no recorded layer, or a missing or unusable ``head``.
        TypeError: ``score`` is not a Score, or ``model`` is already compiled.

    Example:
        >>> import torchvision
        >>> net = torchvision.models.resnet18(num_classes=3).eval()
        >>> sel = SelectiveModel(net, scores.KNNScore(k=2), layer="avgpool")
        >>> sel = sel.fit(torch.randn(8, 3, 32, 32), progress=False)
        >>> sel = sel.calibrate(torch.randn(9, 3, 32, 32), coverage=0.8, progress=False)
        >>> out = sel(torch.randn(4, 3, 32, 32))
        >>> out.output.shape, out.score.shape, out.selected.dtype
        (torch.Size([4, 3]), torch.Size([4]), torch.bool)
    """

    def __init__(
        self,
        model: nn.Module,
        score: Score,
        *,
        layer: str | Sequence[str] | None = None,
        pool: Pool = "auto",
        head: str | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(score, Score):
            raise TypeError(
                f"Expected argument `score` to be a selectorch Score, got {type(score).__name__}."
            )
        check_not_compiled(model)
        layers = _layer_map(score, layer)
        layer_pool = effective_pool(score, pool)
        hooks = LayerHooks(model, layers, layer_pool) if layers else None
        self.model = model
        self.score = score.to(module_device(model))
        self.layer = layer
        self.head = head
        self._sync_head()
        # not a submodule: its hooks live on `model`
        object.__setattr__(self, "_hooks", hooks)
        object.__setattr__(self, "_pool", pool)  # as given (saved with the score)
        # as applied by the hooks, to check recordings passed to fit/calibrate
        object.__setattr__(self, "_layer_pool", layer_pool)
        if hooks is not None:
            hooks.tie_to(self)  # a wrapper that is garbage-collected leaves no hook behind

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        if self._hooks is not None:
            self._hooks.tie_to(self)  # a copy (deepcopy, unpickling) removes its own hooks too

    def _sync_head(self) -> None:
        """Copy the classifier head's weight and bias into a score that re-applies it."""
        if not getattr(self.score, "needs_head", False):
            if self.head is not None:
                raise ValueError(
                    f"{type(self.score).__name__} does not use a classifier head; drop head=."
                )
            return
        if self.head is None:
            raise ValueError(
                f"{type(self.score).__name__} re-applies the classifier head: pass head=... naming "
                "the final linear layer, e.g. head='fc' for a torchvision ResNet."
            )
        module = get_layer(self.model, self.head)
        weight = getattr(module, "weight", None)
        if not isinstance(weight, torch.Tensor) or weight.ndim != 2:
            raise ValueError(
                f"Expected head={self.head!r} to be a linear layer with a (C, D) weight, got "
                f"{type(module).__name__}."
            )
        bias = getattr(module, "bias", None)
        self.score.set_head(weight.detach(), None if bias is None else bias.detach())

    @property
    def threshold_(self) -> torch.Tensor:
        """The score's threshold buffer (empty until calibrated)."""
        return self.score.threshold_

    def get_threshold(self) -> float:
        """The current threshold as a float; raises ``NotFittedError`` before calibration."""
        return self.score.get_threshold()

    @property
    def layer_pool(self) -> Pool | Mapping[str, Pool]:
        """The pooling the hooks apply: ``pool``, or the score's own when ``pool="auto"``."""
        return self._layer_pool

    def _run(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, Any]:
        """Run the model; return its output and what the score reads (a dict for multi-input).

        A ``requires_grad`` score gets two passes (see :mod:`selectorch.gradients`): the
        output is the first pass's, what the score reads comes from the second.
        """
        if self.score.requires_grad:
            return gradient_run(
                self.model,
                self.score,
                args,
                kwargs,
                logits_of=logits_from_output,
                second_pass=self._pass,
            )
        return self._pass(args, kwargs)

    def _pass(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, Any]:
        """Run the model once; return its output and what the score reads."""
        hooks = self._hooks
        records: dict[str, torch.Tensor] = {}
        if hooks is not None:
            if hooks.closed:
                raise RuntimeError("This SelectiveModel was closed; its hooks are gone.")
            output, records = hooks.run(self.model, args, kwargs)
        else:
            output = self.model(*args, **kwargs)
        multi = self.score.input == "multi"
        if not multi and hooks is not None:
            return output, records[_FEATURES]
        keys = score_keys(self.score) if multi else None
        if keys is not None and "logits" not in keys:
            return output, records
        logits = logits_from_output(output)
        if logits is None:
            raise TypeError(
                f"Cannot find logits in the model's output of type {type(output).__name__}; "
                "pass layer=... naming the layer whose output is the logits."
            )
        return output, {**records, "logits": logits} if multi else logits

    def forward(self, *args: Any, **kwargs: Any) -> SelectiveOutput:
        """Run the model once and score and select every sample of the batch.

        Args:
            *args: What the model takes, positionally.
            **kwargs: What the model takes by keyword (e.g. ``attention_mask``).

        Returns:
            :class:`SelectiveOutput` ``(output, score, selected)``. A sample with NaN or Inf in a
            floating input, in the scored features or in the logits gets ``score = +inf`` and
            ``selected = False``.

        Raises:
            NotFittedError: ``fit`` or ``calibrate`` is missing.
        """
        self.score._check_fitted()
        self.score._check_calibrated()
        output, features = self._run(args, kwargs)
        self._check_width(features)
        logits = logits_from_output(output)
        needs_preds = getattr(self.score, "needs_preds", False)
        preds = None
        # class-wise scores and per-class thresholds work on the predicted class
        if needs_preds or self.score.threshold_.ndim == 1:
            first = next(iter(features.values())) if isinstance(features, dict) else features
            preds, _ = class_predictions(logits, first.shape[0], self.score)
            if preds is None:
                raise ValueError(
                    f"{type(self.score).__name__} (or its per-class thresholds) works on the "
                    "predicted class, but the model's output holds no class logits."
                )
        scores = (
            self.score.score_with_preds(features, preds) if needs_preds else self.score(features)
        )
        ok = _finite_rows((*args, *kwargs.values(), logits), scores.shape[0], scores.device)
        scores = torch.where(ok, scores, torch.full_like(scores, float("inf")))
        return SelectiveOutput(output, scores, self.score.selected(scores, preds))

    def _check_width(self, features: Any) -> None:
        """Refuse features whose width differs from the fitted state's, naming the layer."""
        dim = self.score._expected_dim()
        if isinstance(self.layer, str) and isinstance(features, torch.Tensor) and dim is not None:
            if features.ndim == 2 and features.shape[1] != dim:
                raise ValueError(
                    f"Layer {self.layer!r} gives {features.shape[1]} features per sample, but "
                    f"{type(self.score).__name__} was fitted (or loaded) with {dim}: fit it on "
                    "this model and layer, or load the state saved for them."
                )

    def check_features(self, *args: Any, **kwargs: Any) -> None:
        """Run the model once on an example batch and check what the score would read.

        Args:
            *args: An example input, as the model takes it (a small batch is enough).
            **kwargs: Keyword inputs of the model.

        Raises:
            ValueError: The recorded layer's width (or, for a multi-layer score, a layer's
                width or the set of layers) differs from the fitted state's.
        """
        device = module_device(self.model)
        args, kwargs = to_device(args, device), to_device(kwargs, device)
        with torch.no_grad(), _eval_mode(self.model):
            _, features = self._run(args, kwargs)
        self._check_width(features)
        if isinstance(features, dict) and self.score.is_fitted:
            self.score._inputs(features)  # a multi-input score checks every layer's width

    def fit(
        self,
        data: Any,
        y: torch.Tensor | None = None,
        *,
        batch_size: int = 256,
        progress: bool = True,
        drop_nonfinite: bool = False,
    ) -> SelectiveModel:
        """Run the model once over reference data and fit the score on what it records.

        The model runs in eval mode under ``torch.no_grad()`` (its flags are restored after).
        Under ``torch.distributed`` each rank runs the model on its part of the data (a
        ``DistributedSampler``); the recorded rows of every rank are then gathered, in dataset
        order and without the sampler's padding, so every rank fits the same state as one
        process over all the data (see :mod:`selectorch.distributed`).

        Args:
            data: A DataLoader (batches: tensor, ``(x, y, ...)`` tuple or dict), an
                ``(N, ...)`` tensor of inputs, or a recording: the TensorDict returned by
                :func:`selectorch.record` or its cache directory (the model does not run; the
                recording must hold ``layer``, or ``"logits"`` for logit scores, and a cache
                must come from this model with this pooling).
            y: Optional ``(N,)`` labels with a tensor ``data``.
            batch_size: Rows per model call for a tensor ``data``.
            progress: Show a progress bar.
            drop_nonfinite: Drop the samples whose recorded features (or logits) hold NaN or
                Inf, with a :class:`~selectorch.nonfinite.NonFiniteRowsWarning` that counts
                them; by default they raise a ``ValueError`` that counts them.

        Returns:
            ``self``.

        Raises:
            selectorch.memory.MemoryLimitError: The recorded features would not fit in memory
                (checked after the first batch when the data has a length).
        """
        self._sync_head()
        run = gather_ranks(collect(self, data, y, batch_size, progress, "fit"), data)
        # features recorded here are ours (a recording's are the user's): the fit may reuse them
        reuse = not is_recorded(data) and _fit_takes_copy(type(self.score))
        if drop_nonfinite:
            run = finite_only(run, "fit data")
        labels = run.labels
        if getattr(self.score, "needs_losses", False):  # DEUP learns the model's own loss
            if run.labels is None or run.logits is None:
                raise ValueError(
                    f"{type(self.score).__name__} learns the model's per-sample loss: fit needs "
                    "labelled data and a model whose output holds class logits."
                )
            labels = torch.nn.functional.cross_entropy(
                run.logits.float(), run.labels.long(), reduction="none"
            )
        if reuse:
            self.score.fit(run.features, labels, copy=False)
        else:
            self.score.fit(run.features, labels)
        return self

    def calibrate(
        self,
        data: Any,
        y: torch.Tensor | None = None,
        *,
        coverage: float | None = None,
        risk: float | None = None,
        delta: float = 0.1,
        per_class: bool = False,
        bound: str = "clopper-pearson",
        method: str = "sgr",
        batch_size: int = 256,
        progress: bool = True,
        drop_nonfinite: bool = False,
    ) -> SelectiveModel:
        """Set the threshold on held-out data for a coverage or a risk target.

        * ``coverage=c``: at least ``c`` of new samples kept in expectation (finite-sample rank
          ``ceil((n + 1) * c)`` of the calibration scores).
        * ``risk=r, delta=d``: the largest coverage whose error rate among kept predictions
          (predicted class != label) is at most ``r`` with probability ``1 - d``; needs labels.
          Nothing is kept if no threshold can be certified.

        A score that calibrates on true labels (``score.calibrates_on_labels``: DkNN) gets the
        labels of ``data`` when it has some, for any target.

        See :meth:`selectorch.scores.Score.calibrate` and :meth:`calibration_report`. Under
        ``torch.distributed`` every rank's calibration rows are gathered as in :meth:`fit`, so
        every rank sets the same threshold.

        Args:
            data: Held-out data, as for :meth:`fit` (a recording too).
            y: Optional labels with a tensor ``data``.
            coverage: Target fraction of kept samples, in (0, 1].
            risk: Target selective risk, in (0, 1).
            delta: Allowed failure probability of the risk promise.
            per_class: One threshold per predicted class (see :func:`class_predictions`).
            bound: ``"clopper-pearson"`` or ``"hoeffding-bentkus"``.
            method: ``"sgr"`` or ``"fixed-sequence"``.
            batch_size: Rows per model call for a tensor ``data``.
            progress: Show a progress bar.
            drop_nonfinite: Drop (with a warning that counts them) the samples whose recorded
                features or logits hold NaN or Inf, instead of raising. The coverage promise
                then holds for the finite samples; the dropped ones are always rejected.

        Returns:
            ``self``.

        Raises:
            ValueError: Bad targets; a risk target without labels; per-class thresholds for a
                model whose output has no class logits.
        """
        check_target(coverage, risk, delta, bound, method)
        self.score._check_fitted()
        self._sync_head()
        run = gather_ranks(collect(self, data, y, batch_size, progress, "calibrate"), data)
        if drop_nonfinite:
            run = finite_only(run, "calibration data")
        needs_preds = per_class or risk is not None
        if needs_preds and run.preds is None:
            raise ValueError(
                "per_class=True and risk targets need class predictions, but the model's output "
                "holds no (B, C) logits."
            )
        correct = None
        if run.labels is not None and run.preds is not None and run.labels.ndim == 1:
            correct = run.preds == run.labels
        if risk is not None and correct is None:
            raise ValueError(
                "A `risk` target needs labels in the calibration data ((x, y) batches, a 'label' "
                "key, or `y` with a tensor) to know which kept predictions are wrong."
            )
        # DkNN measures the held-out nonconformity for the true labels, where there are some
        true = {}
        if self.score.calibrates_on_labels and run.labels is not None and run.labels.ndim == 1:
            true = {"y": run.labels}
        with replicated_inputs():  # the gathered rows are the same on every rank
            self.score.calibrate(
                run.features,
                **true,
                coverage=coverage,
                risk=risk,
                delta=delta,
                correct=correct,
                preds=run.preds,
                per_class=per_class,
                num_classes=run.num_classes,
                bound=bound,
                method=method,
            )
        return self

    def calibration_report(self) -> dict[str, Any]:
        """What the last calibration promised and achieved; see :meth:`Score.calibration_report`."""
        return self.score.calibration_report()

    def save(self, path: str | os.PathLike[str]) -> os.PathLike[str]:
        """Save the fitted score and how it is attached to the model, in the directory ``path``.

        The directory holds the score's tensors (``state.pt``) and a JSON header with the
        selectorch version, the score's class and hyperparameters, the layer, pooling and head
        names, every tensor's shape, the model's class and weights checksum, and a SHA-256 of
        each file (see :mod:`selectorch.persistence_model`). The model's weights are not saved.

        Args:
            path: Directory to write; a previous save there is replaced.

        Returns:
            The directory's path.

        Raises:
            selectorch.persistence.PersistenceError: The score is not registered.
            FileExistsError: ``path`` exists and is not a selectorch save.
        """
        from selectorch.persistence_model import save_selective

        return save_selective(self, path)

    @classmethod
    def load(
        cls,
        path: str | os.PathLike[str],
        model: nn.Module,
        *,
        map_location: torch.device | str | None = None,
        pool: Pool | None = None,
        check_model: bool = True,
        example_input: Any = None,
    ) -> SelectiveModel:
        """Build a SelectiveModel on ``model`` from a directory written by :meth:`save`.

        The header is checked before any tensor is read: format and version (same
        ``major.minor``), sizes and SHA-256 of the files, the model's class and weights, the
        layer's presence and, where its type tells, its width. Tensors are read with
        ``torch.load(..., weights_only=True)``; nothing in the files is ever executed.

        Args:
            path: Directory written by :meth:`save`.
            model: The model the score was fitted on (not yet compiled).
            map_location: Device of the score's state; the model's device by default.
            pool: The pooling callable, when the save was made with one (names are saved).
            check_model: Refuse a model whose weights checksum differs from the saved one.
            example_input: Optional example batch: the model runs once on it to check the
                recorded layer's width against the loaded state.

        Returns:
            A fitted (and, if it was, calibrated) SelectiveModel.

        Raises:
            selectorch.persistence.PersistenceError: The save is refused; the message says why.

        Example:
            >>> import tempfile, torchvision
            >>> net = torchvision.models.resnet18(num_classes=3).eval()
            >>> sel = SelectiveModel(net, scores.KNNScore(k=2), layer="avgpool")
            >>> sel = sel.fit(torch.randn(8, 3, 32, 32), progress=False)
            >>> with tempfile.TemporaryDirectory() as tmp:
            ...     _ = sel.save(f"{tmp}/sel")
            ...     again = SelectiveModel.load(f"{tmp}/sel", net)
            >>> again.score.bank_.shape
            torch.Size([8, 512])
        """
        from selectorch.persistence_model import load_selective

        return load_selective(
            cls,
            path,
            model,
            map_location=map_location,
            pool=pool,
            check_model=check_model,
            example_input=example_input,
        )

    def close(self) -> None:
        """Remove exactly the hooks this wrapper added to the model."""
        if self._hooks is not None:
            self._hooks.close()

    def __enter__(self) -> SelectiveModel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def extra_repr(self) -> str:
        return f"layer={self.layer!r}"
