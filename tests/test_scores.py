"""Tests of the score modules: one contract suite over every registered score, kNN specifics,
the standalone (seapig-style) flow, argument errors, and real MNIST data.

Module == functional == an independent reference written here (numpy / Python loops).
"""

from __future__ import annotations

import io
import math
import re

import numpy as np
import pytest
import torch

import selectorch as st
from selectorch import datasets
from selectorch import functional as F
from selectorch.exceptions import NotFittedError
from selectorch.functional.distances import prepare_bank
from selectorch.scores import (
    CosineScore,
    EnergyScore,
    EuclideanScore,
    KNNScore,
    SoftmaxScore,
    create_score,
    list_scores,
)


def _buildable(name: str) -> bool:
    """Whether ``create_score(name)`` works here: a score of an optional extra (``pyod``) that is
    not installed raises ImportError (the GPU machine lacks pyod; CI installs it with ``dev``)."""
    try:
        create_score(name)
    except ImportError:
        return False
    return True


ALL_SCORES = [name for name in list_scores() if _buildable(name)]
FITTED_SCORES = [name for name in ALL_SCORES if create_score(name).fitted_buffers]
UNFITTED_SCORES = [name for name in ALL_SCORES if not create_score(name).fitted_buffers]
D = 8  # embedding dimension, and number of classes for logit scores

# every registered score with its defaults, plus a few non-default hyperparameters
CASES = [pytest.param(name, {}, id=name) for name in ALL_SCORES] + [
    pytest.param("knn", {"k": 5, "metric": "cosine", "stat": "median"}, id="knn-k5-cosine-median"),
    pytest.param("euclidean", {"k": 4, "stat": "mean"}, id="euclidean-k4-mean"),
    pytest.param("energy", {"temperature": 3.0}, id="energy-T3"),
]
FITTED_CASES = [case for case in CASES if case.values[0] in FITTED_SCORES]
UNFITTED_CASES = [case for case in CASES if case.values[0] in UNFITTED_SCORES]


MEMBERS = 3  # ensemble members, for scores that take (N, C, M) logits


# multi-layer scores (LayerScore) read two layers of other widths and the logits
LAYER_WIDTHS = {"block.a": D, "block.b": D + 4}


def make_inputs(score, n: int, seed: int):
    """Rows of what ``score`` consumes: ``(n, D)`` embeddings or logits, ``(n, D, MEMBERS)``
    logits of an ensemble, or for multi-layer scores a dict ``{"block.a": (n, D), "block.b":
    (n, D + 4), "logits": (n, D)}``."""
    g = torch.Generator().manual_seed(seed)
    if score.input == "multi":
        X = {name: torch.randn(n, width, generator=g) for name, width in LAYER_WIDTHS.items()}
        return {**X, "logits": torch.randn(n, D, generator=g) * 3.0}
    shape = (n, D, MEMBERS) if getattr(score, "ensemble", False) else (n, D)
    X = torch.randn(*shape, generator=g)
    return X * 3.0 if score.input == "logits" else X


def make_labels(X) -> torch.Tensor:
    """``(n,)`` labels for scores fitted on classes (others ignore them): 3 classes, by which of
    the first three features is largest, so that the classes differ as a classifier's would
    (for a dict of layers: of the first three logits)."""
    X = X["logits"] if isinstance(X, dict) else X
    X = X.mean(dim=-1) if X.ndim == 3 else X  # ensembles: the members' mean
    return X[:, :3].argmax(dim=1)


# Rows of either kind of input, a tensor or a dict of tensors with the same rows:


def n_rows(X) -> int:
    return next(iter(X.values())).shape[0] if isinstance(X, dict) else X.shape[0]


def apply(X, fn):
    """``fn`` applied to the tensor, or to every tensor of the dict."""
    return {key: fn(value) for key, value in X.items()} if isinstance(X, dict) else fn(X)


def take(X, rows):
    """The rows ``rows`` (an index, a slice or an index list) of ``X``."""
    return apply(X, lambda t: t[rows])


def cat(parts):
    if isinstance(parts[0], dict):
        return {key: torch.cat([part[key] for part in parts]) for key in parts[0]}
    return torch.cat(parts)


def poisoned(X, row: int, value: float, col: int = 0, part: int = 0):
    """A copy of ``X`` with ``value`` at ``[row, col]``: in the ``part``-th tensor of a dict
    (counted cyclically, so parts 0, 1, 2 hit both layers and the logits)."""
    X = apply(X, torch.clone)
    t = list(X.values())[part % len(X)] if isinstance(X, dict) else X
    t[row, col] = value
    return X


# Scores that need more than their hyperparameters before fit (a classifier head, ...):
# name -> function(score) that prepares a freshly created score for inputs of width D.
SETUP: dict = {}


def set_test_head(score):
    """A fixed (5, D) classifier head with non-negative weights: the contract's outliers (every
    feature -25) then get very negative logits, i.e. high energy, as unfamiliar inputs do for a
    trained head (energy-based scores rank by the head, so a random-sign head would not)."""
    g = torch.Generator().manual_seed(0)
    return score.set_head(torch.rand(5, D, generator=g), torch.randn(5, generator=g))


SETUP["vim"] = set_test_head  # selectorch/scores/head.py
SETUP["react"] = set_test_head
SETUP["ash"] = set_test_head
# DEUP turns integer labels into per-sample losses with a head (float y would be losses)
SETUP["deup"] = set_test_head  # selectorch/scores/deup.py
SETUP["gradnorm"] = set_test_head  # selectorch/scores/gradnorm.py
SETUP["she"] = set_test_head  # selectorch/scores/she.py

# Scores that keep rows by their predicted loss, not by how typical they are: an in-distribution
# row near a class tie is rightly rejected, so the direction test asks them to reject far
# outliers but not to keep every inlier.
LOSS_PREDICTORS = {"deup"}

# Scores proportional to the feature norm (GradNorm = ||p - 1/C||_1 ||h||_1 / T): on post-ReLU
# features unfamiliar inputs activate fewer units, so their outliers are weakly activated rows
# (the contract's default outliers, every feature -25, have a large norm and look familiar).
WEAK_ACTIVATION_OUTLIERS = {"gradnorm"}

#: Scores whose fitted state is a Python object (PyOD's detector, scored in NumPy): no
#: state_dict twin, no Score.save / SelectiveModel.save, no torch.compile of the score itself.
#: tests/test_pyod.py checks instead that each of these is refused with a clear error.
NON_TENSOR_STATE = {"pyod"}


def skip_non_tensor_state(name: str) -> None:
    """Skip a tensor-state contract for a score that keeps its state outside tensors."""
    if name in NON_TENSOR_STATE:
        pytest.skip(f"{name} keeps its fitted state in a Python object (see NON_TENSOR_STATE)")


def build(name: str, kwargs: dict | None = None):
    """A fresh score, prepared by its SETUP entry if it has one (every contract test uses this)."""
    score = create_score(name, **(kwargs or {}))
    if name in SETUP:
        SETUP[name](score)
    return score


def fitted(name: str, kwargs: dict, *, calibrate: bool = True):
    score = build(name, kwargs)
    X = make_inputs(score, 200, seed=1)
    score.fit(X, make_labels(X))
    if calibrate:
        score.calibrate(make_inputs(score, 60, seed=2), coverage=0.9)
    return score


def test_registry_holds_the_expected_scores():
    assert ALL_SCORES == sorted(ALL_SCORES)
    assert {"knn", "euclidean", "cosine", "softmax", "energy"} <= set(ALL_SCORES)
    assert {"knn", "euclidean", "cosine"} <= set(FITTED_SCORES)
    assert {"softmax", "energy"} <= set(UNFITTED_SCORES)
    for name in ALL_SCORES:
        score = create_score(name)
        assert type(score).registry_name == name
        assert isinstance(score, st.scores.Score)


def test_every_registered_score_declares_its_runtime_attributes():
    rows = {row["name"]: row for row in list_scores(details=True)}
    assert list(rows) == list_scores()  # read from the classes: optional extras need not import
    for name in rows:
        cls = st.scores.get_score_class(name)
        assert type(cls.requires_grad) is bool, name
        assert type(cls.passes) is int and cls.passes >= 1, name
        assert type(cls.compile_clean) is bool, name
        assert cls.input in ("embedding", "logits", "multi"), name
        if cls.requires_grad:  # a second pass reads the perturbed input
            assert cls.passes >= 2 and callable(getattr(cls, "perturb", None)), name
        row = rows[name]
        assert row["class"] == cls.__name__ and row["input"] == cls.input
        assert (row["requires_grad"], row["passes"], row["compile_clean"]) == (
            cls.requires_grad,
            cls.passes,
            cls.compile_clean,
        )
        assert row["needs_fit"] == bool(cls.fitted_buffers)
        assert row["calibrates_on_labels"] == (name == "dknn"), name
    assert rows["knn"]["requires_grad"] is False and rows["knn"]["compile_clean"] is True
    assert (rows["odin"]["requires_grad"], rows["odin"]["passes"]) == (True, 2)
    assert rows["odin"]["compile_clean"] is False and rows["vim"]["needs_head"] is True


def test_fusion_score_derives_its_attributes_from_its_components():
    fusion = st.scores.FusionScore({"a": KNNScore(), "logits": EnergyScore()})
    assert (fusion.requires_grad, fusion.passes, fusion.compile_clean) == (False, 1, True)
    with pytest.raises(TypeError, match=r"got ODINScore for key 'logits', which needs input grad"):
        st.scores.FusionScore({"a": KNNScore(), "logits": create_score("odin")})


# ============================== contract suite (every registered score) ========================


@pytest.mark.parametrize(("name", "kwargs"), FITTED_CASES)
def test_contract_unfitted_use_raises_not_fitted_naming_fit(name, kwargs):
    score = build(name, kwargs)
    X = make_inputs(score, 5, seed=0)
    assert not score.is_fitted
    with pytest.raises(
        NotFittedError, match=rf"{type(score).__name__} is not fitted yet\. Call fit\(X(, y)?\)"
    ):
        score(X)
    with pytest.raises(NotFittedError, match=r"Call fit\(X(, y)?\)"):
        score.score(X)
    with pytest.raises(NotFittedError, match=r"Call fit\(X(, y)?\)"):
        score.calibrate(X, coverage=0.5)


@pytest.mark.parametrize(("name", "kwargs"), UNFITTED_CASES)
def test_contract_logit_scores_need_no_fit(name, kwargs):
    score = build(name, kwargs)
    X = make_inputs(score, 5, seed=0)
    assert score.is_fitted
    out = score(X)
    assert out.shape == (5,)
    torch.testing.assert_close(out, fitted(name, kwargs, calibrate=False)(X))


@pytest.mark.parametrize(("name", "kwargs"), CASES)
def test_contract_select_before_calibrate_raises_naming_calibrate(name, kwargs):
    score = fitted(name, kwargs, calibrate=False)
    X = make_inputs(score, 5, seed=3)
    assert not score.is_calibrated
    with pytest.raises(
        NotFittedError, match=r"no threshold yet\. Call calibrate\(X, coverage=\.\.\.\)"
    ):
        score.select(X)
    with pytest.raises(NotFittedError, match=r"Call calibrate"):
        score.get_threshold()
    with pytest.raises(NotFittedError, match=r"Call calibrate"):
        score.selected(score(X))
    with pytest.raises(NotFittedError, match=r"Call calibrate\(X, coverage=\.\.\.\) first"):
        score.set_threshold(0.9)


@pytest.mark.parametrize(("name", "kwargs"), CASES)
def test_contract_fit_calibrate_and_set_threshold_return_self(name, kwargs):
    score = build(name, kwargs)
    X = make_inputs(score, 100, seed=1)  # more rows than any default k (DkNN's paper k is 75)
    assert score.fit(X, make_labels(X)) is score
    assert score.calibrate(make_inputs(score, 30, seed=2), coverage=0.8) is score
    assert score.set_threshold(0.5) is score
    assert score.calibrate_scores(torch.arange(10.0), coverage=0.5) is score
    assert score.get_threshold() == 5.0  # rank ceil(11 * 0.5) = 6 -> value 5


@pytest.mark.parametrize(("name", "kwargs"), CASES)
def test_contract_state_dict_loads_into_fresh_unfitted_twin(name, kwargs):
    skip_non_tensor_state(name)
    score = fitted(name, kwargs)
    state = score.state_dict()
    assert all(key.endswith("_") or key == "_extra_state" for key in state), list(state)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)

    twin = build(name, kwargs)
    twin.load_state_dict(loaded)
    assert twin.is_fitted and twin.is_calibrated
    Q = make_inputs(score, 25, seed=4)
    torch.testing.assert_close(twin(Q), score(Q), rtol=0, atol=0)
    assert twin.get_threshold() == score.get_threshold()
    assert torch.equal(twin.select(Q)["selected"], score.select(Q)["selected"])
    torch.testing.assert_close(twin.calibration_scores_, score.calibration_scores_, rtol=0, atol=0)


@pytest.mark.parametrize(("name", "kwargs"), CASES)
def test_contract_double_moves_all_state_to_float64(name, kwargs):
    score = fitted(name, kwargs)
    Q = make_inputs(score, 25, seed=4)
    before, threshold = score(Q), score.get_threshold()
    assert score.double() is score
    # every floating buffer moves; integer ones (layer widths dims_, labels) keep their dtype
    buffers = {key: buf for key, buf in score.named_buffers() if buf.is_floating_point()}
    assert {"threshold_", "calibration_scores_"} <= set(buffers)
    for key, buf in buffers.items():
        assert buf.dtype == torch.float64, key
    after = score(apply(Q, torch.Tensor.double))
    assert after.dtype == torch.float64
    torch.testing.assert_close(after, before.double(), rtol=1e-5, atol=1e-5)
    assert score.get_threshold() == pytest.approx(threshold, rel=1e-6)


@pytest.mark.parametrize(("name", "kwargs"), CASES)
def test_contract_compiled_fullgraph_equals_eager(name, kwargs):
    skip_non_tensor_state(name)
    score = fitted(name, kwargs)
    compiled = torch.compile(score, fullgraph=True)
    for seed in (5, 6):  # two batches of the same shape
        Q = poisoned(make_inputs(score, 16, seed=seed), 3, float("nan"))
        torch.testing.assert_close(compiled(Q), score(Q), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("name", "kwargs"), CASES)
def test_contract_compiles_to_one_graph_reused_across_batches(name, kwargs):
    skip_non_tensor_state(name)
    from torch._dynamo.testing import CompileCounter

    score = fitted(name, kwargs)
    counter = CompileCounter()
    compiled = torch.compile(score, backend=counter, fullgraph=True)
    for seed in (5, 6, 7):
        Q = make_inputs(score, 16, seed=seed)
        torch.testing.assert_close(compiled(Q), score(Q))
    score.calibrate(make_inputs(score, 40, seed=8), coverage=0.8)  # recalibration
    compiled(make_inputs(score, 16, seed=9))
    assert counter.frame_count == 1


@pytest.mark.parametrize(("name", "kwargs"), CASES)
def test_contract_row_score_does_not_depend_on_batch(name, kwargs):
    score = fitted(name, kwargs)
    rows = make_inputs(score, 4, seed=10)
    others = make_inputs(score, 60, seed=11)
    alone = score(rows)
    one_by_one = torch.cat([score(take(rows, slice(i, i + 1))) for i in range(4)])
    in_batch = score(cat([take(others, slice(0, 30)), rows, take(others, slice(30, None))]))
    in_batch = in_batch[30:34]
    permuted = score(cat([take(rows, [3, 2, 1, 0]), others]))[:4].flip(0)
    chunked = score.score(cat([rows, others]), batch_size=3)[:4]
    for other in (one_by_one, in_batch, permuted, chunked):
        torch.testing.assert_close(other, alone, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("name", "kwargs"), CASES)
def test_contract_fitting_twice_replaces_state_and_drops_threshold(name, kwargs):
    score = fitted(name, kwargs)
    assert score.is_calibrated
    second = apply(make_inputs(score, 120, seed=12), lambda t: t + 2.0)
    score.fit(second, make_labels(second))
    assert not score.is_calibrated
    assert score.calibration_scores_.numel() == 0
    Q = make_inputs(score, 20, seed=13)
    with pytest.raises(NotFittedError, match="calibrate"):
        score.select(Q)
    fresh = build(name, kwargs).fit(second, make_labels(second))
    torch.testing.assert_close(score(Q), fresh(Q), rtol=0, atol=0)
    for key in type(score).fitted_buffers:
        assert torch.equal(getattr(score, key), getattr(fresh, key)), key
    score.calibrate(make_inputs(score, 40, seed=14), coverage=0.9)
    assert score.select(Q)["selected"].shape == (20,)


@pytest.mark.parametrize(("name", "kwargs"), CASES)
def test_contract_nan_and_inf_rows_get_inf_score_and_are_rejected(name, kwargs):
    score = fitted(name, kwargs)
    Q = make_inputs(score, 8, seed=15)
    clean = score(Q)
    # in a dict of layers: NaN in one layer, Inf in the other, -Inf in the logits
    bad = poisoned(Q, 1, float("nan"), col=0, part=0)
    bad = poisoned(bad, 4, float("inf"), col=2, part=1)
    bad = poisoned(bad, 6, -float("inf"), col=5, part=2)
    out = score.select(bad)
    bad_rows = torch.tensor([1, 4, 6])
    good_rows = torch.tensor([0, 2, 3, 5, 7])
    assert out["score"].shape == (8,) and out["selected"].dtype == torch.bool
    assert torch.all(out["score"][bad_rows] == math.inf)
    assert not out["selected"][bad_rows].any()
    torch.testing.assert_close(out["score"][good_rows], clean[good_rows], rtol=1e-5, atol=1e-5)
    # even an infinite threshold (coverage=1) never keeps them
    score.calibrate(make_inputs(score, 30, seed=16), coverage=1.0)
    assert score.get_threshold() == math.inf
    kept = score.select(bad)["selected"].tolist()
    assert kept == [i not in (1, 4, 6) for i in range(8)]


@pytest.mark.parametrize(("name", "kwargs"), CASES)
def test_contract_empty_batch_gives_empty_scores(name, kwargs):
    score = fitted(name, kwargs)
    empty = make_inputs(score, 0, seed=0)
    assert score(empty).shape == (0,)
    assert score.score(empty).shape == (0,)
    out = score.select(empty)
    assert out["score"].shape == (0,) and out["selected"].shape == (0,)


def direction_data(score):
    """(reference, held-out calibration, inliers, outliers) for the score's input kind."""
    if score.input == "multi":
        return multi_direction_data()
    if getattr(score, "ensemble", False):
        # members that agree up to small noise vs members confident in different classes
        g = torch.Generator().manual_seed(1)

        def members(X):
            return X[..., None] + 0.1 * torch.randn(*X.shape, MEMBERS, generator=g)

        ref, cal = (members(torch.randn(n, D, generator=g) * 3.0) for n in (200, 100))
        split = torch.stack(
            [torch.eye(D)[[(i + m) % D for i in range(3)]] * 12.0 for m in range(MEMBERS)], dim=-1
        )
        return ref, cal, members(torch.eye(3, D) * 12.0), split
    if score.input == "logits":
        # a classifier's typical logits: one clear winner plus noise
        g = torch.Generator().manual_seed(1)
        ref, cal = (
            torch.randn(n, D, generator=g) + 8.0 * torch.eye(D)[torch.randint(D, (n,), generator=g)]
            for n in (200, 100)
        )
        return ref, cal, torch.eye(3, D) * 12.0, torch.zeros(3, D)  # confident vs flat rows
    g = torch.Generator().manual_seed(1)
    ref = torch.randn(200, D, generator=g) * 0.5 + 2.0  # a cloud away from the origin
    cal = torch.randn(100, D, generator=g) * 0.5 + 2.0
    # inliers: the most typical reference rows; outliers: far in distance and in direction
    central = ref[(ref - ref.mean(dim=0)).norm(dim=1).argsort()[:3]]
    return ref, cal, central + 0.01, torch.full((3, D), -25.0)


def multi_direction_data():
    """Three classes, each a cloud in both layers with logits that predict it; the outliers lie
    far from every cloud (nearest to class 2's) while their logits predict class 0."""
    g = torch.Generator().manual_seed(1)
    centres = {
        name: torch.stack(
            [2.0 + 4.0 * torch.eye(width)[c] * (1 if c < 2 else -1) for c in range(3)]
        )
        for name, width in LAYER_WIDTHS.items()
    }

    def rows(classes, noise):
        X = {
            name: c[classes] + noise * torch.randn(len(classes), c.shape[1], generator=g)
            for name, c in centres.items()
        }
        return {
            **X,
            "logits": 8.0 * torch.eye(D)[classes] + torch.randn(len(classes), D, generator=g),
        }

    ref, cal = rows(torch.arange(300) % 3, 0.5), rows(torch.arange(120) % 3, 0.5)
    inliers = rows(torch.arange(3), 0.0)  # the class centres, predicted as their class
    outliers = {name: torch.full((3, c.shape[1]), -25.0) for name, c in centres.items()}
    outliers["logits"] = 8.0 * torch.eye(D)[[0, 0, 0]]
    return ref, cal, inliers, outliers


@pytest.mark.parametrize(("name", "kwargs"), CASES)
def test_contract_higher_score_means_more_uncertain(name, kwargs):
    score = build(name, kwargs)
    if not getattr(score, "informative", True):  # RandomScore: no direction by design
        pytest.skip(f"{type(score).__name__} carries no information by design")
    ref, cal, inliers, outliers = direction_data(score)
    if name in WEAK_ACTIVATION_OUTLIERS:
        outliers = torch.full_like(outliers, 0.1)
    score.fit(ref, make_labels(ref))
    s_in, s_out = score(inliers), score(outliers)
    assert s_out.min() > s_in.max(), (s_in.tolist(), s_out.tolist())
    score.calibrate(cal, coverage=0.9)
    out = score.select(cat([inliers, outliers]))
    if name in LOSS_PREDICTORS:
        assert not out["selected"][3:].any()
    else:
        assert out["selected"].tolist() == [True] * 3 + [False] * 3


@pytest.mark.parametrize(("name", "kwargs"), CASES)
def test_contract_feature_checks_apply_to_every_score(name, kwargs):
    score = fitted(name, kwargs)
    if score.input == "multi":
        Q = make_inputs(score, 4, seed=0)
        with pytest.raises(
            ValueError, match=r"`X\['block.b'\]` to have shape \(N, D\).* got \(8,\)"
        ):
            score({**Q, "block.b": torch.zeros(8)})
        with pytest.raises(TypeError, match=r"`X\['block.a'\]` to be a floating-point tensor"):
            score({**Q, "block.a": Q["block.a"].long()})
        with pytest.raises(ValueError, match=r"`X\['block.b'\]` to have 12 features per row"):
            score({**Q, "block.b": Q["block.a"]})
        with pytest.raises(ValueError, match=r"fitted on the layers .* holds \['block.a'\]"):
            score({"block.a": Q["block.a"], "logits": Q["logits"]})
        with pytest.raises(ValueError, match=r"`X\['block.a'\]` has 1 of 4 rows with NaN"):
            score.calibrate(poisoned(Q, 2, float("nan")), coverage=0.5)
        return
    with pytest.raises(ValueError, match=r"`X` to have shape \(N, (D|C, M)\).* got \(8,\)"):
        score(torch.zeros(8))
    X = torch.ones_like(make_inputs(score, 4, seed=0))
    with pytest.raises(
        TypeError, match=r"`X` to be a floating-point tensor, got dtype torch.int64"
    ):
        score(X.long())
    with pytest.raises(ValueError, match=r"`X` has 1 of 4 rows with NaN or Inf"):
        score.calibrate(X.index_fill_(0, torch.tensor([2]), float("nan")), coverage=0.5)


# ============================== kNN specifics ==================================================


def brute_force_knn_scores(query, bank, k, metric, stat) -> np.ndarray:
    """Plain Python loop over all pairs, float64."""
    q, b = query.double().numpy(), bank.double().numpy()
    reduce = {"max": np.max, "mean": np.mean, "median": np.median, "min": np.min}[stat]
    out = []
    for qi in q:
        dists = []
        for bj in b:
            if metric == "euclidean":
                dists.append(math.sqrt(float(((qi - bj) ** 2).sum())))
            else:
                dists.append(1.0 - float(qi @ bj) / (np.linalg.norm(qi) * np.linalg.norm(bj)))
        out.append(reduce(sorted(dists)[:k]))
    return np.array(out)


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
@pytest.mark.parametrize("stat", ["max", "mean", "median", "min"])
@pytest.mark.parametrize("k", [1, 4, 5])
def test_knn_score_module_equals_functional_equals_brute_force(metric, stat, k):
    g = torch.Generator().manual_seed(0)
    bank, query = torch.randn(80, 6, generator=g), torch.randn(12, 6, generator=g)
    score = KNNScore(k=k, metric=metric, stat=stat).fit(bank)
    module = score(query)
    functional = F.knn_score(query, prepare_bank(bank, metric), k, metric=metric, stat=stat)
    reference = brute_force_knn_scores(query, bank, k, metric, stat)
    assert module.shape == (12,)
    # the module searches a bank centred on its mean: equal up to float32 round-off
    torch.testing.assert_close(module, functional, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(module.numpy(), reference, rtol=1e-5, atol=1e-5)


def test_knn_score_exact_small_example():
    bank = torch.tensor([[0.0, 0.0], [3.0, 4.0], [6.0, 8.0]])
    query = torch.tensor([[0.0, 0.0], [3.0, 4.0]])
    assert KNNScore(k=2).fit(bank)(query).tolist() == pytest.approx([5.0, 5.0])
    assert KNNScore(k=3, stat="mean").fit(bank)(query).tolist() == pytest.approx([5.0, 10 / 3])
    assert KNNScore(k=2, stat="median").fit(bank)(query).tolist() == pytest.approx(
        [2.5, 2.5], abs=1e-3
    )


@pytest.mark.parametrize(
    ("cls", "metric"), [(EuclideanScore, "euclidean"), (CosineScore, "cosine")]
)
def test_euclidean_and_cosine_scores_are_knn_scores_with_that_metric(cls, metric):
    g = torch.Generator().manual_seed(1)
    bank, query = torch.randn(50, 5, generator=g), torch.randn(9, 5, generator=g)
    named = cls(k=3, stat="mean").fit(bank)
    assert isinstance(named, KNNScore)
    assert named.metric == metric and named.k == 3 and named.stat == "mean"
    generic = KNNScore(k=3, metric=metric, stat="mean").fit(bank)
    torch.testing.assert_close(named(query), generic(query), rtol=0, atol=0)
    assert create_score(metric, k=3, stat="mean").metric == metric
    assert repr(named) == f"{cls.__name__}(k=3, stat='mean')"


def test_cosine_bank_is_stored_normalised():
    g = torch.Generator().manual_seed(2)
    bank = torch.randn(30, 4, generator=g) * 7
    score = CosineScore().fit(bank)
    torch.testing.assert_close(score.bank_.norm(dim=1), torch.ones(30))
    torch.testing.assert_close(score.bank_, bank / bank.norm(dim=1, keepdim=True))
    euclidean = KNNScore().fit(bank)  # euclidean keeps the rows, centred on their mean
    torch.testing.assert_close(euclidean.bank_ + euclidean.mean_, bank)
    torch.testing.assert_close(euclidean.mean_, bank.mean(dim=0))


def test_fit_copies_the_bank():
    bank = torch.randn(20, 3)
    score = KNNScore().fit(bank)
    bank.zero_()
    assert score.bank_.abs().sum() > 0


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
def test_bank_sq_norms_not_saved_but_rebuilt_after_load(metric):
    g = torch.Generator().manual_seed(3)
    bank = torch.randn(40, 6, generator=g) * 3
    score = KNNScore(k=2, metric=metric).fit(bank)
    state = score.state_dict()
    assert "bank_sq_norms_" not in state
    expected = {"bank_", "threshold_", "calibration_scores_", "_extra_state"}
    assert set(state) == expected | ({"mean_"} if metric == "euclidean" else set())
    twin = KNNScore(k=2, metric=metric)
    assert twin.bank_sq_norms_.numel() == 0
    twin.load_state_dict(state)
    torch.testing.assert_close(twin.bank_sq_norms_, score.bank_.pow(2).sum(dim=1))
    query = torch.randn(7, 6, generator=g)
    torch.testing.assert_close(twin(query), score(query), rtol=0, atol=0)


def test_fit_after_double_keeps_all_state_in_float64():
    # Contract 2: .to() / .double() move the fitted state; a later fit should write the bank in
    # the module's dtype (as calibrate does for threshold_), not in the dtype of X
    score = KNNScore(k=2).double().fit(torch.randn(30, 4))
    score.calibrate(torch.randn(20, 4), coverage=0.5)
    dtypes = {key: buf.dtype for key, buf in score.named_buffers()}
    assert set(dtypes.values()) == {torch.float64}, dtypes


# ============================== standalone flow (seapig-style) =================================


@pytest.fixture()
def flow_data():
    g = torch.Generator().manual_seed(7)
    return (
        torch.randn(500, 16, generator=g),
        torch.randn(200, 16, generator=g),
        torch.randn(50, 16, generator=g) * 1.3,
    )


def test_standalone_fit_calibrate_select_flow(flow_data):
    ref, val, query = flow_data
    score = EuclideanScore(k=5, stat="mean").fit(ref)
    assert score.calibrate(val, coverage=0.9) is score
    out = score.select(query)
    assert set(out) == {"score", "selected"}
    assert out["score"].shape == (50,) and out["score"].dtype == torch.float32
    assert out["selected"].shape == (50,) and out["selected"].dtype == torch.bool

    val_ref = brute_force_knn_scores(val, ref, 5, "euclidean", "mean")
    rank = math.ceil(201 * 0.9)  # 181
    threshold = score.get_threshold()
    assert isinstance(threshold, float)
    assert threshold == sorted(score.score(val).tolist())[rank - 1]
    assert threshold == pytest.approx(np.sort(val_ref)[rank - 1], rel=1e-5)

    query_ref = brute_force_knn_scores(query, ref, 5, "euclidean", "mean")
    np.testing.assert_allclose(out["score"].numpy(), query_ref, rtol=1e-5)
    assert torch.equal(out["selected"], out["score"] <= threshold)
    assert score.select(val)["selected"].float().mean().item() == pytest.approx(rank / 200)


@pytest.mark.parametrize("q", [0.5, 0.9, 0.95, 0.99, 1.0, 0.123])
def test_set_threshold_is_numpy_linear_quantile_of_validation_scores(flow_data, q):
    ref, val, _ = flow_data
    score = KNNScore(k=3).fit(ref).calibrate(val, coverage=0.9)
    val_scores = score.score(val).double().numpy()
    assert score.set_threshold(q) is score
    assert score.get_threshold() == pytest.approx(
        np.quantile(val_scores, q, method="linear"), rel=1e-6
    )


def test_set_threshold_before_calibrate_raises(flow_data):
    ref, _, _ = flow_data
    with pytest.raises(NotFittedError, match=r"no calibration scores\. Call calibrate"):
        KNNScore().fit(ref).set_threshold(0.9)


def test_calibrate_too_few_samples_reports_needed_count(flow_data):
    ref, val, _ = flow_data
    with pytest.raises(
        ValueError, match=r"coverage=0\.9 needs at least 9 calibration samples.*n=8"
    ):
        KNNScore().fit(ref).calibrate(val[:8], coverage=0.9)


# ============================== argument errors ================================================


@pytest.mark.parametrize("k", [0, -1, 2.0, True])
def test_knn_k_must_be_a_positive_integer(k):
    with pytest.raises(ValueError, match=rf"`k` to be an integer >= 1, got {k!r}"):
        KNNScore(k=k)


def test_k_larger_than_bank_raises_at_fit():
    with pytest.raises(ValueError, match=r"`k` to be at most the bank size 3, got k=5"):
        KNNScore(k=5).fit(torch.randn(3, 4))


def test_empty_bank_raises():
    with pytest.raises(ValueError, match=r"`X` to hold at least one row, got an empty \(0, D\)"):
        KNNScore().fit(torch.empty(0, 4))


def test_unknown_stat_and_metric_name_the_argument():
    with pytest.raises(
        ValueError, match=r"`stat` to be one of \('max', 'mean', 'median', 'min'\), got 'avg'"
    ):
        KNNScore(stat="avg")
    with pytest.raises(
        ValueError,
        match=r"`metric` to be one of \('euclidean', 'cosine', 'mahalanobis'\), got 'l1'",
    ):
        KNNScore(metric="l1")
    with pytest.raises(ValueError, match=r"`stat`.*'avg'"):
        create_score("euclidean", stat="avg")


def test_calibrate_needs_exactly_one_target():
    score = KNNScore().fit(torch.randn(30, 4))
    with pytest.raises(ValueError, match=r"exactly one of the arguments `coverage`.*or `risk`"):
        score.calibrate(torch.randn(20, 4))
    with pytest.raises(ValueError, match=r"exactly one of the arguments `coverage`.*or `risk`"):
        score.calibrate_scores(torch.arange(20.0), coverage=0.5, risk=0.1)


@pytest.mark.parametrize("coverage", [0, 0.0, 1.5, -0.1, True, "0.9"])
def test_bad_coverage_names_the_argument(coverage):
    score = KNNScore().fit(torch.randn(30, 4))
    with pytest.raises(
        ValueError, match=rf"`coverage` to be a number in \(0, 1\], got {coverage!r}"
    ):
        score.calibrate(torch.randn(20, 4), coverage=coverage)
    with pytest.raises(ValueError, match=r"`coverage`"):
        score.calibrate_scores(torch.arange(20.0), coverage=coverage)


def test_feature_dimension_mismatch_names_both_sizes():
    score = KNNScore().fit(torch.randn(30, 32))
    with pytest.raises(
        ValueError, match=r"feature dimension 32 \(as fitted\), got 16 \(shape \(5, 16\)\)"
    ):
        score(torch.randn(5, 16))
    with pytest.raises(ValueError, match=r"32.*16"):
        score.calibrate(torch.randn(20, 16), coverage=0.5)
    with pytest.raises(ValueError, match=r"32.*16"):
        score.score(torch.randn(5, 16))


@pytest.mark.parametrize("shape", [(10,), (4, 3, 2)])
def test_fit_rejects_non_matrix_input(shape):
    with pytest.raises(
        ValueError, match=rf"`X` to have shape \(N, D\), got {re.escape(str(shape))}"
    ):
        KNNScore().fit(torch.randn(*shape))


def test_fit_rejects_integer_and_non_tensor_input():
    with pytest.raises(
        TypeError, match=r"`X` to be a floating-point tensor, got dtype torch.int32"
    ):
        KNNScore().fit(torch.ones(5, 3, dtype=torch.int32))
    with pytest.raises(TypeError, match=r"`X` to be a torch.Tensor, got ndarray"):
        KNNScore().fit(np.ones((5, 3)))


def test_nan_rows_at_fit_are_counted():
    X = torch.randn(10, 3)
    X[2, 1] = float("nan")
    X[7, 0] = float("inf")
    with pytest.raises(
        ValueError, match=r"`X` has 2 of 10 rows with NaN or Inf \(first rows: \[2, 7\]\)"
    ):
        KNNScore().fit(X)


def test_y_with_wrong_length_raises():
    with pytest.raises(ValueError, match=r"`y` to have 10 rows like `X`, got \(9,\)"):
        KNNScore().fit(torch.randn(10, 3), torch.zeros(9))
    with pytest.raises(ValueError, match=r"`y` to have 10 rows like `X`, got list"):
        SoftmaxScore().fit(torch.randn(10, 3), [0] * 10)


@pytest.mark.parametrize("batch_size", [0, -4, 2.5])
def test_score_batch_size_must_be_positive(batch_size):
    with pytest.raises(
        ValueError, match=rf"`batch_size` to be an integer >= 1, got {batch_size!r}"
    ):
        KNNScore().fit(torch.randn(10, 3)).score(torch.randn(4, 3), batch_size=batch_size)


def test_registry_unknown_name_lists_known_and_suggests_close_one():
    with pytest.raises(
        ValueError, match=r"Unknown score 'knnn'\. Did you mean 'knn'\? Known scores: \["
    ):
        create_score("knnn")
    with pytest.raises(ValueError, match=r"Known scores: " + re.escape(str(list_scores()))):
        create_score("zzzz")


def test_register_score_warns_on_name_clash():
    from selectorch.scores import register_score, registry

    name = "_clash_test"
    try:
        register_score(name)(type("First", (SoftmaxScore,), {}))
        with pytest.warns(
            UserWarning, match=r"Score name '_clash_test' re-registered: First replaced by Second"
        ):
            register_score(name)(type("Second", (SoftmaxScore,), {}))
        assert type(create_score(name)).__name__ == "Second"
        assert type(create_score(name)).registry_name == name
    finally:
        registry._REGISTRY.pop(name, None)
    assert name not in list_scores()


@pytest.mark.parametrize("temperature", [0, -1.0, float("inf"), True])
def test_energy_temperature_must_be_positive(temperature):
    with pytest.raises(ValueError, match=r"`temperature` to be a positive number"):
        EnergyScore(temperature=temperature)


@pytest.mark.parametrize("temperature", [0.5, 2.0])
def test_energy_score_module_equals_functional_equals_hand_formula(temperature):
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(15, 6, generator=g) * 3
    module = EnergyScore(temperature=temperature)(logits)
    torch.testing.assert_close(module, F.energy_score(logits, temperature), rtol=0, atol=0)
    z = logits.double().numpy() / temperature
    ref = -temperature * np.log(np.exp(z).sum(axis=1))
    np.testing.assert_allclose(module.numpy(), ref, rtol=1e-5)


def test_softmax_score_module_equals_functional_equals_hand_formula():
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(15, 6, generator=g) * 3
    module = SoftmaxScore()(logits)
    torch.testing.assert_close(module, F.softmax_score(logits), rtol=0, atol=0)
    e = np.exp(logits.double().numpy())
    np.testing.assert_allclose(
        module.numpy(), -(e / e.sum(axis=1, keepdims=True)).max(axis=1), rtol=1e-5
    )


# ============================== real data: pretrained MNIST CNN + 5000 digits ==================


def normalised(pixels: torch.Tensor) -> torch.Tensor:
    return (pixels - datasets.MNIST_MEAN) / datasets.MNIST_STD


@pytest.fixture(scope="module")
def mnist():
    """Penultimate (`classifier.1`, 128-d) embeddings and logits of real digits, recorded once.

    The digits are shuffled with a fixed generator. The network gets only a handful of these
    (training-set) digits wrong, so those are moved to the end of the order, into the test split;
    fit / calibration / test = 2000 / 1000 / 1000 digits.
    """
    net = datasets.mnist_net()
    images, labels = datasets.mnist5k()
    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(len(images), generator=g)
    with st.Recorder(net, "classifier.1") as rec, torch.no_grad():
        logits, feats = rec(images)
        correct = logits.argmax(dim=1) == labels
        order = torch.cat([perm[correct[perm]], perm[~correct[perm]]])
        fit, cal, test = order[:2000], order[2000:3000], order[-1000:]
        noise_logits, noise_feats = rec(normalised(torch.rand(300, 1, 28, 28, generator=g)))
        pixels = images[test[:300]] * datasets.MNIST_STD + datasets.MNIST_MEAN
        inv_logits, inv_feats = rec(normalised(1.0 - pixels))
        manual = net.classifier[:2](net.features(images[:64]).flatten(1))
    emb = feats["classifier.1"]
    return {
        "images": images,
        "fit": emb[fit],
        "cal": emb[cal],
        "test": emb[test],
        "test_logits": logits[test],
        "test_correct": correct[test],
        "noise": noise_feats["classifier.1"],
        "noise_logits": noise_logits,
        "inverted": inv_feats["classifier.1"],
        "inverted_logits": inv_logits,
        "first64": emb[:64],
        "manual64": manual,
        "cal_logits": logits[cal],
    }


def test_mnist_recorded_layer_is_penultimate_128d(mnist):
    assert mnist["fit"].shape == (2000, 128) and mnist["test"].shape == (1000, 128)
    assert mnist["images"].shape == (5000, 1, 28, 28)
    torch.testing.assert_close(mnist["first64"], mnist["manual64"])
    assert (mnist["fit"] >= 0).all(), "classifier.1 is the ReLU output"
    accuracy = mnist["test_correct"].float().mean().item()
    assert accuracy > 0.98, accuracy


def test_mnist_knn_calibrated_at_90_keeps_85_to_95_percent(mnist):
    score = KNNScore(k=5).fit(mnist["fit"]).calibrate(mnist["cal"], coverage=0.9)
    kept = score.select(mnist["test"])["selected"].float().mean().item()
    assert 0.85 <= kept <= 0.95, f"kept {kept:.3f} of test digits at coverage 0.9"
    # module == functional == torch.cdist on the real embeddings
    ref = (
        torch.cdist(mnist["test"][:50].double(), mnist["fit"].double())
        .topk(5, largest=False)
        .values[:, -1]
    )
    torch.testing.assert_close(score(mnist["test"][:50]).double(), ref, rtol=1e-4, atol=1e-3)


def test_mnist_misclassified_digits_score_higher(mnist):
    wrong = ~mnist["test_correct"]
    assert wrong.sum() >= 5, int(wrong.sum())
    knn = KNNScore(k=5).fit(mnist["fit"])(mnist["test"])
    soft = SoftmaxScore()(mnist["test_logits"])
    for label, s in (("kNN", knn), ("softmax", soft)):
        mean_wrong, mean_right = s[wrong].mean().item(), s[~wrong].mean().item()
        assert mean_wrong > mean_right, (
            f"{label}: misclassified mean {mean_wrong:.4f} <= correct mean {mean_right:.4f} "
            f"({int(wrong.sum())} misclassified)"
        )


@pytest.mark.parametrize("kind", ["noise", "inverted"])
def test_mnist_noise_and_inverted_digits_score_higher_than_real(mnist, kind):
    knn = KNNScore(k=5).fit(mnist["fit"])
    for label, score, real, odd in (
        ("kNN euclidean", knn, mnist["test"], mnist[kind]),
        ("kNN cosine", CosineScore(k=5).fit(mnist["fit"]), mnist["test"], mnist[kind]),
        ("softmax", SoftmaxScore(), mnist["test_logits"], mnist[f"{kind}_logits"]),
        ("energy", EnergyScore(), mnist["test_logits"], mnist[f"{kind}_logits"]),
    ):
        mean_odd, mean_real = score(odd).mean().item(), score(real).mean().item()
        assert mean_odd > mean_real, (
            f"{label}: {kind} mean {mean_odd:.4f} <= real digits {mean_real:.4f}"
        )
    knn.calibrate(mnist["cal"], coverage=0.9)
    rejected_odd = 1 - knn.select(mnist[kind])["selected"].float().mean().item()
    rejected_real = 1 - knn.select(mnist["test"])["selected"].float().mean().item()
    assert rejected_odd > rejected_real, (
        f"kNN at coverage 0.9 rejected {rejected_odd:.3f} of {kind} images, "
        f"{rejected_real:.3f} of real digits"
    )


# ============================== device and precision =========================================


def test_input_on_another_device_than_the_fitted_state_names_both():
    score = KNNScore(k=1).fit(torch.randn(10, 4))
    with pytest.raises(ValueError, match=r"`X` on cpu.*KNNScore.*got a tensor on meta"):
        score(torch.empty(2, 4, device="meta"))


def test_euclidean_distance_of_a_duplicate_with_large_norm_is_exact():
    g = torch.Generator().manual_seed(0)
    bank = torch.randn(500, 128, generator=g) * 10 + 50  # norms around 570
    score = KNNScore(k=1).fit(bank)
    assert score(bank[:20]).abs().max().item() == 0.0
    near = bank[:5] + 1e-3
    torch.testing.assert_close(score(near), torch.full((5,), 1e-3 * 128**0.5), rtol=1e-3, atol=1e-5)


def test_state_dict_refuses_a_twin_with_other_hyperparameters():
    cosine = KNNScore(k=2, metric="cosine").fit(torch.randn(30, 4))
    with pytest.raises(
        ValueError, match=r"saved from KNNScore\(metric='cosine'\).*metric='euclidean'"
    ):
        KNNScore(k=2, metric="euclidean").load_state_dict(cosine.state_dict(), strict=False)
    energy = create_score("energy", temperature=10.0).calibrate(torch.randn(30, 3), coverage=0.5)
    with pytest.raises(ValueError, match=r"temperature=10.0.*temperature=1.0"):
        create_score("energy").load_state_dict(energy.state_dict())
    with pytest.raises(
        ValueError, match="saved from a KNNScore; it cannot load into a CosineScore"
    ):
        CosineScore(k=2).load_state_dict(cosine.state_dict())


def test_refused_state_leaves_the_twin_untouched():
    cosine = KNNScore(k=2, metric="cosine").fit(torch.randn(30, 4))
    twin = KNNScore(k=2, metric="euclidean")
    with pytest.raises(ValueError, match="metric="):
        twin.load_state_dict(cosine.state_dict(), strict=False)
    assert twin.bank_.numel() == 0 and not twin.is_fitted
