"""Tests of ClassWiseKNNScore, DEUPScore, RandomScore and KNNScore's ``outlier_q``.

Module == functional == an independent reference written here (Python loops, nn.Sequential).
The contract suite in test_scores.py also runs over "classwise_knn", "deup" and "random".
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import FlopCounterMode

import selectorch as st
from selectorch import datasets
from selectorch import functional as F
from selectorch.exceptions import NotFittedError
from selectorch.scores import (
    ClassWiseKNNScore,
    CosineScore,
    DEUPScore,
    EuclideanScore,
    KNNScore,
    RandomScore,
    create_score,
)

# ============================== references written here =======================================


def distance(a: np.ndarray, b: np.ndarray, metric: str) -> float:
    if metric == "euclidean":
        return math.sqrt(float(((a - b) ** 2).sum()))
    return 1.0 - float(a @ b) / (np.linalg.norm(a) * np.linalg.norm(b))


REDUCE = {"max": np.max, "mean": np.mean, "median": np.median, "min": np.min}


def brute_force_classwise(query, X, y, preds, k, metric, stat) -> np.ndarray:
    """For each query, the k smallest distances to the reference rows of its class, in float64."""
    q, x, y, preds = query.double().numpy(), X.double().numpy(), y.numpy(), preds.numpy()
    out = []
    for qi, c in zip(q, preds, strict=True):
        dists = sorted(distance(qi, xj, metric) for xj in x[y == c])
        out.append(REDUCE[stat](dists[:k]))
    return np.array(out)


def hand_leave_one_out(X, k, metric, stat) -> list[float]:
    """Each row's kNN score against all the other rows (Python loop)."""
    x = X.double().numpy()
    scores = []
    for i, xi in enumerate(x):
        dists = sorted(distance(xi, xj, metric) for j, xj in enumerate(x) if j != i)
        scores.append(float(REDUCE[stat](dists[:k])))
    return scores


def hand_kept_rows(scores: list[float], q: float) -> list[int]:
    """Drop the floor(q * n) highest scores (the later row first among ties)."""
    n_drop = math.floor(q * len(scores))
    order = sorted(range(len(scores)), key=lambda i: (scores[i], i))
    return sorted(order[: len(scores) - n_drop])


def classwise_data(seed: int = 0):
    """Four classes of unequal sizes (30, 10, 20, 25) in 6-d, shuffled, and 9 queries."""
    g = torch.Generator().manual_seed(seed)
    sizes = [30, 10, 20, 25]
    y = torch.cat([torch.full((n,), c) for c, n in enumerate(sizes)])
    X = torch.randn(len(y), 6, generator=g) + 2.0 * torch.randn(4, 6, generator=g)[y]
    perm = torch.randperm(len(y), generator=g)
    query = torch.randn(9, 6, generator=g) * 1.5
    preds = torch.tensor([0, 1, 2, 3, 3, 2, 1, 0, 1])
    return X[perm], y[perm], query, preds


# ============================== ClassWiseKNNScore ==============================================


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
@pytest.mark.parametrize("stat", ["max", "mean", "median", "min"])
@pytest.mark.parametrize("k", [1, 4])
def test_classwise_module_equals_functional_equals_per_class_brute_force(metric, stat, k):
    X, y, query, preds = classwise_data()
    score = ClassWiseKNNScore(k=k, metric=metric, stat=stat, chunk_size=7).fit(X, y)
    module = score.score_with_preds(query, preds)
    functional = F.classwise_knn_score(
        query, F.class_banks(X, y), preds, k, metric=metric, stat=stat, chunk_size=7
    )
    reference = brute_force_classwise(query, X, y, preds, k, metric, stat)
    assert module.shape == (9,)
    # the module's banks are centred on their class means: equal up to float32 round-off
    torch.testing.assert_close(module, functional, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(module.numpy(), reference, rtol=1e-5, atol=1e-5)
    # the chunking does not change the result
    one_chunk = ClassWiseKNNScore(k=k, metric=metric, stat=stat).fit(X, y)
    torch.testing.assert_close(one_chunk.score_with_preds(query, preds), module)


def test_classwise_search_recomputes_half_precision_norms():
    # float16 squared norms overflow (200^2 * 2 > 65504): the search recomputes them, as every
    # search does (stored_norms_usable), instead of ranking row 0 at an infinite distance
    banks = torch.tensor([[[200.0, 200.0], [0.0, 0.0]]])
    query, classes = torch.tensor([[199.0, 199.0]]), torch.tensor([0])
    half_norms = banks.pow(2).sum(-1).half()
    assert torch.isinf(half_norms[0, 0])
    d, i = F.classwise_knn_search(query, banks, classes, 1, bank_sq_norms=half_norms)
    torch.testing.assert_close(d, torch.tensor([[2.0**0.5]]))
    assert i.tolist() == [[0]]


def test_classwise_bank_layout_is_padded_per_class_with_inf():
    X, y, _, _ = classwise_data()
    score = ClassWiseKNNScore(k=3).fit(X, y)
    assert score.bank_.shape == (4, 30, 6) and score.means_.shape == (4, 6)
    assert score.class_sizes().tolist() == [30, 10, 20, 25]
    assert score.num_classes == 4
    for c, n in enumerate([30, 10, 20, 25]):
        torch.testing.assert_close(score.means_[c], X[y == c].mean(dim=0))
        torch.testing.assert_close(score.bank_[c, :n] + score.means_[c], X[y == c])
        assert torch.isinf(score.bank_[c, n:]).all()


def test_classwise_forward_without_preds_uses_the_nearest_class_mean():
    X, y, query, _ = classwise_data()
    score = ClassWiseKNNScore(k=2).fit(X, y)
    means = torch.stack([X[y == c].mean(dim=0) for c in range(4)])
    nearest = torch.cdist(query.double(), means.double()).argmin(dim=1)
    assert torch.equal(score.predicted_classes(query), nearest)
    torch.testing.assert_close(score(query), score.score_with_preds(query, nearest))
    torch.testing.assert_close(score.score(query, batch_size=2), score(query))
    ref = brute_force_classwise(query, X, y, nearest, 2, "euclidean", "max")
    np.testing.assert_allclose(score(query).numpy(), ref, rtol=1e-5)


class OpShapes(TorchDispatchMode):
    """Records every aten op and the shapes of its tensor outputs and inputs."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[tuple[str, list[tuple[int, ...]], list[tuple[int, ...]]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))

        def shapes(tree):
            return [tuple(t.shape) for t in tree_flatten(tree)[0] if isinstance(t, torch.Tensor)]

        self.ops.append((func.overloadpacket.__name__, shapes(out), shapes(args)))
        return out


def test_classwise_search_never_touches_other_classes_rows():
    X, y, query, preds = classwise_data()  # classes of 30, 10, 20, 25 rows: 85 in all
    B, D, m_max, total = 9, 6, 30, 85
    score = ClassWiseKNNScore(k=3, chunk_size=8).fit(X, y)
    with OpShapes() as log:
        score.score_with_preds(query, preds)
    # the blocks gathered from the bank: 8 + 8 + 8 + 6 = 30 rows of each query's own class
    blocks = [out[0] for name, out, _ in log.ops if name == "index" and len(out[0]) == 3]
    chunks = [shape for shape in blocks if shape[1] != 3]  # the last gather: the 3 chosen rows
    assert chunks == [(B, 8, D), (B, 8, D), (B, 8, D), (B, 6, D)]
    assert sum(shape[1] for shape in chunks) == m_max
    bmms = [inputs for name, _, inputs in log.ops if name == "bmm"]
    assert [tuple(a) for a, _ in bmms] == chunks
    # no tensor anywhere spans the whole bank (85 rows) or every class (4 x 30)
    for name, outs, _ in log.ops:
        for shape in outs:
            assert total not in shape and 4 * m_max not in shape, (name, shape)
    # a class-blind kNN score does build the (B, 85) distance block: the check would notice
    with OpShapes() as blind:
        KNNScore(k=3).fit(X)(query)
    assert any((B, total) in outs for _, outs, _ in blind.ops)
    # and the work is one class bank per query: 2 B M_max D multiply-adds, not 2 B M D
    with FlopCounterMode(display=False) as flops:
        score.score_with_preds(query, preds)
    assert flops.get_total_flops() == 2 * B * m_max * D


def test_classwise_per_class_thresholds_are_calibrated_on_the_given_preds():
    X, y, _, _ = classwise_data()
    g = torch.Generator().manual_seed(3)
    cal = X[torch.randint(len(X), (400,), generator=g)] + 0.3 * torch.randn(400, 6, generator=g)
    preds = torch.randint(4, (400,), generator=g)
    score = ClassWiseKNNScore(k=2).fit(X, y)
    assert score.calibrate(cal, coverage=0.8, preds=preds, per_class=True) is score
    assert score.threshold_.shape == (4,)
    scores = score.score_with_preds(cal, preds)
    for c in range(4):
        s = scores[preds == c].sort().values
        rank = math.ceil((len(s) + 1) * 0.8)
        assert score.threshold_[c].item() == s[rank - 1].item()
    out = score.select(cal, preds)
    torch.testing.assert_close(out["score"], scores)
    assert torch.equal(out["selected"], scores <= score.threshold_[preds])
    # without preds, the nearest class mean decides both the bank and the threshold
    nearest = score.predicted_classes(cal)
    out = score.select(cal)
    assert torch.equal(out["selected"], score.select(cal, nearest)["selected"])


def test_classwise_compiles_to_one_graph_with_preds():
    from torch._dynamo.testing import CompileCounter

    X, y, query, preds = classwise_data()
    score = ClassWiseKNNScore(k=3, metric="cosine", chunk_size=8).fit(X, y)
    counter = CompileCounter()
    compiled = torch.compile(score.score_with_preds, backend=counter, fullgraph=True)
    for shift in (0.0, 1.0, 2.0):
        q = query + shift
        q[2] = float("nan")
        torch.testing.assert_close(
            compiled(q, preds.roll(int(shift))), score.score_with_preds(q, preds.roll(int(shift)))
        )
    assert counter.frame_count == 1


def test_classwise_unknown_predicted_class_scores_inf_and_is_rejected():
    X, y, query, _ = classwise_data()
    score = ClassWiseKNNScore(k=2).fit(X, y).calibrate(X, coverage=1.0)
    preds = torch.tensor([0, 4, -1, 3, 9, 1, 2, 0, 1])
    s = score.score_with_preds(query, preds)
    assert torch.isinf(s[[1, 2, 4]]).all() and torch.isfinite(s[[0, 3, 5, 6, 7, 8]]).all()
    assert score.select(query, preds)["selected"].tolist() == [i not in (1, 2, 4) for i in range(9)]


def test_classwise_needs_preds_flag_and_registry():
    assert ClassWiseKNNScore.needs_preds is True
    assert create_score("classwise_knn", k=2).k == 2
    assert repr(ClassWiseKNNScore(k=2, outlier_q=0.1)) == (
        "ClassWiseKNNScore(k=2, metric='euclidean', stat='max', outlier_q=0.1)"
    )


def test_classwise_state_dict_round_trip_cosine():
    X, y, query, preds = classwise_data()
    score = ClassWiseKNNScore(k=3, metric="cosine").fit(X, y)
    state = score.state_dict()
    assert set(state) == {"bank_", "means_", "threshold_", "calibration_scores_", "_extra_state"}
    twin = ClassWiseKNNScore(k=3, metric="cosine")
    twin.load_state_dict(state)
    torch.testing.assert_close(
        twin.score_with_preds(query, preds), score.score_with_preds(query, preds), rtol=0, atol=0
    )
    torch.testing.assert_close(twin.bank_sq_norms_, score.bank_sq_norms_)


def test_classwise_errors_name_the_problem():
    X, y, query, preds = classwise_data()
    with pytest.raises(ValueError, match=r"ClassWiseKNNScore needs class labels.*got None"):
        ClassWiseKNNScore().fit(X)
    with pytest.raises(
        ValueError,
        match=r"at least 11 reference rows in every class 0\.\.3, got 10 in class 1 \(k=11\)",
    ):
        ClassWiseKNNScore(k=11).fit(X, y)
    with pytest.raises(ValueError, match=r"at least 11 reference rows.*k \+ 1.*outlier_q"):
        ClassWiseKNNScore(k=10, outlier_q=0.1).fit(X, y)
    with pytest.raises(ValueError, match=r"got 0 in class 0"):
        ClassWiseKNNScore().fit(X, y + 1)  # labels 1..4: class 0 has no rows
    with pytest.raises(ValueError, match=r"`y` to hold class indices >= 0.*got -1"):
        ClassWiseKNNScore().fit(X, y - 1)
    with pytest.raises(ValueError, match=r"`y` to be an \(N,\) integer tensor"):
        ClassWiseKNNScore().fit(X, y.float())
    score = ClassWiseKNNScore().fit(X, y)
    with pytest.raises(ValueError, match=r"`preds` to be an \(9,\) integer tensor.*shape \(8,\)"):
        score.score_with_preds(query, preds[:8])
    with pytest.raises(ValueError, match=r"`preds`.*dtype torch.float32"):
        score.score_with_preds(query, preds.float())
    with pytest.raises(NotFittedError, match=r"ClassWiseKNNScore is not fitted yet"):
        ClassWiseKNNScore().score_with_preds(query, preds)
    with pytest.raises(ValueError, match=r"`outlier_q` to be a number in \[0, 1\), got 1.0"):
        ClassWiseKNNScore(outlier_q=1.0)


def test_classwise_outlier_q_equals_hand_leave_one_out_per_class():
    X, y, _, _ = classwise_data()
    score = ClassWiseKNNScore(k=2, stat="mean", outlier_q=0.2).fit(X, y)
    for c, n in enumerate([30, 10, 20, 25]):
        rows = X[y == c]
        kept = hand_kept_rows(hand_leave_one_out(rows, 2, "euclidean", "mean"), 0.2)
        assert len(kept) == n - math.floor(0.2 * n)
        assert score.class_sizes()[c] == len(kept)
        torch.testing.assert_close(score.means_[c], rows[kept].mean(dim=0))
        torch.testing.assert_close(score.bank_[c, : len(kept)] + score.means_[c], rows[kept])


# ============================== outlier_q (KNNScore and subclasses) ============================


def test_drop_self_matches_keeps_duplicates_and_drops_the_row_itself():
    d = torch.tensor([[0.0, 0.0, 1.0], [0.0, 0.0, 1.0], [0.0, 0.0, 0.0], [0.0, 2.0, 3.0]])
    i = torch.tensor([[1, 0, 2], [1, 0, 2], [0, 1, 4], [3, 1, 0]])
    rows = torch.tensor([0, 1, 2, 3])
    kept_d, kept_i = F.drop_self_matches(d, i, rows)
    # row 0: its duplicate 1 came first and stays; row 2: absent (three ties), the last goes
    assert kept_i.tolist() == [[1, 2], [0, 2], [0, 1], [1, 0]]
    assert kept_d.tolist() == [[0.0, 1.0], [0.0, 1.0], [0.0, 0.0], [2.0, 3.0]]


def tiny_reference() -> torch.Tensor:
    """10 points in 2-d with an exact duplicate pair and one far point (no zero vector)."""
    points = [[0, 0], [0, 0], [1, 0], [0, 1], [1, 1], [5, 5], [0.5, 0.5], [2, 0], [0, 2], [-1, 0]]
    return torch.tensor(points) + torch.tensor([3.0, 1.0])


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
@pytest.mark.parametrize("stat", ["max", "mean", "min"])
@pytest.mark.parametrize("k", [1, 2, 3])
def test_outlier_q_drops_the_rows_with_highest_hand_leave_one_out_score(metric, stat, k):
    X = tiny_reference()
    loo = hand_leave_one_out(X, k, metric, stat)
    torch.testing.assert_close(
        F.leave_one_out_knn_score(X, k, metric=metric, stat=stat),
        torch.tensor(loo, dtype=torch.float32),
        rtol=1e-5,
        atol=1e-6,
    )
    kept = hand_kept_rows(loo, 0.25)  # floor(2.5) = 2 rows dropped
    assert len(kept) == 8
    score = KNNScore(k=k, metric=metric, stat=stat, outlier_q=0.25).fit(X)
    if metric == "euclidean":
        torch.testing.assert_close(score.mean_, X[kept].mean(dim=0))
        torch.testing.assert_close(score.bank_ + score.mean_, X[kept])
    else:
        torch.testing.assert_close(score.bank_, torch.nn.functional.normalize(X[kept], dim=1))
    query = torch.randn(5, 2, generator=torch.Generator().manual_seed(0)) + 3.0
    plain = KNNScore(k=k, metric=metric, stat=stat).fit(X[kept])
    torch.testing.assert_close(score(query), plain(query))


def test_outlier_q_drops_the_far_point_and_keeps_both_duplicates():
    X = tiny_reference()
    score = KNNScore(k=1, outlier_q=0.1).fit(X)  # one row dropped
    kept = score.bank_ + score.mean_
    assert kept.shape == (9, 2)
    assert not (kept == X[5]).all(dim=1).any(), "the far point (5, 5) is dropped"
    assert int((kept == X[0]).all(dim=1).sum()) == 2, "duplicates are each other's neighbour"


def test_outlier_q_reaches_euclidean_cosine_and_mahalanobis():
    g = torch.Generator().manual_seed(1)
    X = torch.randn(100, 5, generator=g)
    for score in (
        EuclideanScore(k=3, outlier_q=0.1),
        CosineScore(k=3, outlier_q=0.1),
        KNNScore(k=3, metric="mahalanobis", outlier_q=0.1),
        create_score("euclidean", outlier_q=0.1),
    ):
        assert score.fit(X).bank_.shape == (90, 5), type(score).__name__
        assert "outlier_q=0.1" in repr(score)
    plain, zero = KNNScore(k=3).fit(X), KNNScore(k=3, outlier_q=0.0).fit(X)
    assert torch.equal(plain.bank_, zero.bank_)
    assert repr(zero) == repr(plain)


@pytest.mark.parametrize("q", [-0.1, 1.0, 1.5, True, "0.1", float("nan")])
def test_outlier_q_outside_zero_one_names_the_argument(q):
    with pytest.raises(
        ValueError, match=r"Expected argument `outlier_q` to be a number in \[0, 1\)"
    ):
        KNNScore(outlier_q=q)
    with pytest.raises(ValueError, match=r"`outlier_q`"):
        CosineScore(outlier_q=q)


def test_outlier_q_with_too_few_rows_raises():
    with pytest.raises(
        ValueError, match=r"at least k \+ 1 = 4 reference rows.*outlier_q=0\.1, got 3"
    ):
        KNNScore(k=3, outlier_q=0.1).fit(torch.randn(3, 2))
    with pytest.raises(ValueError, match=r"`outlier_q` to leave at least k = 4 .* leaving 3 of 5"):
        KNNScore(k=4, outlier_q=0.4).fit(torch.randn(5, 2))


# ============================== DEUPScore =====================================================


def deup_data(n: int = 300, seed: int = 0):
    """Features whose loss is high where feature 0 is large (plus noise)."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, 8, generator=g)
    losses = torch.nn.functional.softplus(3 * X[:, 0] - 2) + 0.1 * torch.rand(n, generator=g)
    return X, losses


def test_kfold_indices_partition_the_rows():
    parts = F.kfold_indices(23, 5, torch.Generator().manual_seed(0))
    assert sorted(len(p) for p in parts) == [4, 4, 5, 5, 5]
    assert sorted(torch.cat(parts).tolist()) == list(range(23))
    again = F.kfold_indices(23, 5, torch.Generator().manual_seed(0))
    assert all(torch.equal(a, b) for a, b in zip(parts, again, strict=True))
    with pytest.raises(ValueError, match=r"2 <= folds <= n rows, got folds=5 and n=4"):
        F.kfold_indices(4, 5)


@pytest.fixture()
def one_thread():
    """Tiny MLP training runs faster on one thread (as DEUPScore.fit does on the CPU)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_out_of_fold_targets_come_from_models_that_did_not_see_the_row(one_thread):
    X, losses = deup_data(90)
    folds = F.kfold_indices(90, 3, torch.Generator().manual_seed(0))

    def oof(targets):
        g = torch.Generator().manual_seed(1)
        return F.out_of_fold_predictions(X, targets, folds, epochs=3, generator=g)

    base = oof(losses)
    for fold in range(3):
        i = int(folds[fold][0])
        changed = losses.clone()
        changed[i] += 50.0  # a huge loss on one row of this fold
        new = oof(changed)
        inside = folds[fold]
        outside = torch.cat([folds[f] for f in range(3) if f != fold])
        # the row's own prediction (and its fold's) came from a model that never saw it ...
        assert torch.equal(new[inside], base[inside])
        # ... while every model that trained on it moved
        assert (new[outside] != base[outside]).all()


def test_deup_is_deterministic_under_a_seed():
    X, losses = deup_data()
    a = DEUPScore(epochs=10, seed=3).fit(X, losses)
    b = DEUPScore(epochs=10, seed=3).fit(X, losses)
    c = DEUPScore(epochs=10, seed=4).fit(X, losses)
    for (name, x), (_, y) in zip(a.named_buffers(), b.named_buffers(), strict=True):
        assert torch.equal(x, y), name
    assert not torch.equal(a.layer0_weight_, c.layer0_weight_)
    Q = torch.randn(20, 8)
    assert torch.equal(a(Q), b(Q)) and not torch.equal(a(Q), c(Q))


def reference_deup(score: DEUPScore, X: torch.Tensor) -> torch.Tensor:
    """The DEUP score written with nn.Sequential and the score's buffers."""
    D, H = score.layer0_weight_.shape[1], score.hidden
    net = nn.Sequential(
        nn.Linear(D, H), nn.ReLU(), nn.Linear(H, H), nn.ReLU(), nn.Linear(H, 1), nn.Softplus()
    )
    with torch.no_grad():
        for layer, prefix in zip(net[::2], ("layer0", "layer1", "output"), strict=True):
            layer.weight.copy_(getattr(score, f"{prefix}_weight_"))
            layer.bias.copy_(getattr(score, f"{prefix}_bias_"))
        low, high = score.feature_low_, score.feature_high_
        inside = torch.maximum(torch.minimum(X, high), low)
        z = (inside - score.feature_mean_) / score.feature_scale_
        outside = ((X - inside) / score.feature_scale_).pow(2).sum(dim=1).sqrt()
        g = net(z).squeeze(1)
        predicted = torch.exp(g) - 1 if score.log_targets else g
        far = torch.clamp(outside - score.support_margin, min=0)
        return score.target_scale_ * (predicted + far)


@pytest.mark.parametrize("log_targets", [True, False])
def test_deup_module_equals_functional_equals_nn_sequential(log_targets):
    X, losses = deup_data()
    score = DEUPScore(hidden=16, epochs=20, log_targets=log_targets).fit(X, losses)
    assert score.layer0_weight_.shape == (16, 8) and score.output_weight_.shape == (1, 16)
    Q = torch.cat([torch.randn(10, 8), torch.randn(5, 8) * 6])  # some rows outside the range
    params = [
        getattr(score, name)
        for name in (
            "layer0_weight_",
            "layer0_bias_",
            "layer1_weight_",
            "layer1_bias_",
            "output_weight_",
            "output_bias_",
        )
    ]
    functional = F.deup_score(
        Q,
        params,
        mean=score.feature_mean_,
        scale=score.feature_scale_,
        low=score.feature_low_,
        high=score.feature_high_,
        target_scale=score.target_scale_,
        log_targets=log_targets,
    )
    inside = torch.maximum(torch.minimum(Q, score.feature_high_), score.feature_low_)
    outside = ((Q - inside) / score.feature_scale_).norm(dim=1)
    assert (outside > score.support_margin).sum() >= 3  # the far term is active on some rows
    torch.testing.assert_close(score(Q), functional, rtol=0, atol=0)
    torch.testing.assert_close(score(Q), reference_deup(score, Q), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(score.feature_mean_, X.mean(dim=0))
    torch.testing.assert_close(score.target_scale_, losses.mean())


def test_deup_learns_where_the_loss_is_high_and_grows_outside_the_fit_range():
    X, losses = deup_data(600)
    score = DEUPScore(epochs=60).fit(X, losses)
    Q, q_losses = deup_data(400, seed=1)
    assert F.auroc(score(Q), q_losses > q_losses.median()) > 0.9
    far = torch.zeros(4, 8)
    far[:, 1] = torch.tensor([10.0, 20.0, 40.0, 80.0])  # beyond the range of feature 1
    s = score(far)
    # clamped, the predictor is constant there: the score grows by one mean loss per std
    expected = score.target_scale_ * torch.tensor([10.0, 20.0, 40.0]) / score.feature_scale_[1]
    torch.testing.assert_close(s.diff(), expected, rtol=1e-4, atol=1e-4)
    assert s[-1] > score(X).max()
    plain = DEUPScore(epochs=60, support_margin=float("inf")).fit(X, losses)
    assert torch.allclose(plain(far), plain(far[:1]).expand(4)), "clamped: constant outside"


def test_deup_integer_labels_use_the_head_cross_entropy():
    X, _ = deup_data()
    g = torch.Generator().manual_seed(2)
    weight, bias = torch.randn(3, 8, generator=g), torch.randn(3, generator=g)
    labels = torch.randint(3, (300,), generator=g)
    with_head = DEUPScore(epochs=5).set_head(weight, bias).fit(X, labels)
    ce = torch.nn.functional.cross_entropy(X @ weight.T + bias, labels, reduction="none")
    with_losses = DEUPScore(epochs=5).fit(X, ce)
    Q = torch.randn(10, 8)
    torch.testing.assert_close(with_head(Q), with_losses(Q))


def test_deup_errors_name_the_problem():
    X, losses = deup_data(50)
    with pytest.raises(ValueError, match=r"DEUPScore needs the base model's per-sample losses"):
        DEUPScore().fit(X)
    with pytest.raises(ValueError, match=r"integer labels as `y` but no classifier head"):
        DEUPScore().fit(X, torch.zeros(50, dtype=torch.long))
    bad = losses.clone()
    bad[[3, 7]] = torch.tensor([-1.0, float("nan")])
    with pytest.raises(ValueError, match=r"finite losses >= 0, got 2 other values.*\[3, 7\]"):
        DEUPScore().fit(X, bad)
    with pytest.raises(ValueError, match=r"`y` to be \(N,\) float losses.*dtype torch.bool"):
        DEUPScore().fit(X, losses > 1)
    with pytest.raises(ValueError, match=r"at least folds = 5 rows in `X`, got 4"):
        DEUPScore().fit(X[:4], losses[:4])
    head = DEUPScore().set_head(torch.randn(3, 8))
    with pytest.raises(ValueError, match=r"labels in \[0, 3\).*from 0 to 5"):
        head.fit(X, torch.arange(50) % 6)
    with pytest.raises(ValueError, match=r"`bias` to have shape \(3,\).*\(2,\)"):
        DEUPScore().set_head(torch.randn(3, 8), torch.randn(2))
    with pytest.raises(ValueError, match=r"`folds` to be an integer >= 2, got 1"):
        DEUPScore(folds=1)
    with pytest.raises(ValueError, match=r"`lr` to be a positive number, got 0"):
        DEUPScore(lr=0)
    with pytest.raises(
        ValueError, match=r"`support_margin` to be a number >= 0 \(or inf\), got -1"
    ):
        DEUPScore(support_margin=-1)
    with pytest.raises(ValueError, match=r"`log_targets` to be a bool, got 1"):
        DEUPScore(log_targets=1)
    assert DEUPScore.needs_losses is True


# ============================== RandomScore ===================================================


def test_random_score_is_a_deterministic_batch_independent_hash():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(500, 16, generator=g)
    score = RandomScore(seed=7)
    s = score(X)
    assert s.shape == (500,) and ((s >= 0) & (s < 1)).all()
    assert torch.equal(score(X), s)  # the same call again
    assert torch.equal(RandomScore(seed=7)(X), s)  # another instance
    assert torch.equal(torch.cat([score(x[None]) for x in X[:20]]), s[:20])  # one by one
    assert torch.equal(score(X.flip(0)).flip(0), s)  # reordered batch
    assert torch.equal(score(X.double()), s.double())  # float64 copy of the same rows
    assert torch.equal(score(X[[3, 3]]), s[[3, 3]])  # identical rows, identical scores
    assert not torch.equal(RandomScore(seed=8)(X), s)
    assert score(-torch.zeros(1, 16)) == score(torch.zeros(1, 16))
    # (compiled == eager is in the contract suite of test_scores.py: a differing hash bit would
    # move the score far beyond its tolerance)


def test_random_score_carries_no_information():
    g = torch.Generator().manual_seed(1)
    X = torch.randn(20000, 8, generator=g)
    s = RandomScore()(X)
    # uniform: mean 1/2, variance 1/12, and its rank does not follow the data
    assert abs(s.mean().item() - 0.5) < 0.01 and abs(s.var().item() - 1 / 12) < 0.003
    for positive in (
        X[:, 0] > 0,
        X.norm(dim=1) > X.norm(dim=1).median(),
        torch.rand(20000, generator=g) < 0.1,
    ):
        assert abs(F.auroc(s, positive).item() - 0.5) < 0.02
    assert abs(np.corrcoef(s.numpy(), X[:, 0].numpy())[0, 1]) < 0.03
    assert RandomScore.informative is False
    assert RandomScore().fit(X) is not None and repr(RandomScore(seed=3)) == "RandomScore(seed=3)"


def test_random_score_keeps_the_calibrated_fraction():
    g = torch.Generator().manual_seed(2)
    score = RandomScore().calibrate(torch.randn(1000, 4, generator=g), coverage=0.7)
    kept = score.select(torch.randn(5000, 4, generator=g))["selected"].float().mean().item()
    assert abs(kept - 0.7) < 0.03


@pytest.mark.parametrize("seed", [1.5, "0", True, None])
def test_random_seed_must_be_an_integer(seed):
    with pytest.raises(ValueError, match=r"`seed` to be an integer"):
        RandomScore(seed=seed)


# ============================== real data: MNIST CNN on noisy digits ===========================


@pytest.fixture(scope="module")
def noisy_mnist():
    """Penultimate (`classifier.1`) features of 2500 MNIST digits with Gaussian noise (+1.0 x
    randn in the normalised space, about 80% accuracy) and of 2000 clean digits."""
    net = datasets.mnist_net()
    images, labels = datasets.mnist5k()
    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(len(images), generator=g)
    noisy_rows, clean_rows = perm[:2500], perm[2500:4500]
    noisy = images[noisy_rows] + 1.0 * torch.randn(2500, 1, 28, 28, generator=g)
    with st.Recorder(net, "classifier.1") as rec, torch.no_grad():
        logits, feats = rec(noisy)
        _, clean_feats = rec(images[clean_rows])
    y = labels[noisy_rows]
    return {
        "emb": feats["classifier.1"],
        "logits": logits,
        "losses": torch.nn.functional.cross_entropy(logits, y, reduction="none"),
        "wrong": logits.argmax(dim=1) != y,
        "clean": clean_feats["classifier.1"],
        "clean_labels": labels[clean_rows],
    }


def test_mnist_deup_ranks_errors_of_held_out_noisy_digits_above_correct_ones(noisy_mnist):
    d = noisy_mnist
    accuracy = 1 - d["wrong"].float().mean().item()
    assert 0.7 < accuracy < 0.9, accuracy
    fit, test = slice(0, 1500), slice(1500, 2500)
    score = DEUPScore().fit(d["emb"][fit], d["losses"][fit])
    auroc = F.auroc(score(d["emb"][test]), d["wrong"][test]).item()
    assert auroc >= 0.7, f"DEUP AUROC for errors {auroc:.3f}"  # measured 0.771
    random = F.auroc(RandomScore()(d["emb"][test]), d["wrong"][test]).item()
    assert abs(random - 0.5) < 0.06, random


def test_mnist_classwise_with_model_predictions_beats_class_blind_knn(noisy_mnist):
    d = noisy_mnist
    test, preds = slice(1500, 2500), noisy_mnist["logits"].argmax(dim=1)
    wrong = d["wrong"][test]
    for metric in ("euclidean", "cosine"):
        classwise = ClassWiseKNNScore(k=5, metric=metric).fit(d["clean"], d["clean_labels"])
        blind = KNNScore(k=5, metric=metric).fit(d["clean"])
        a_cw = F.auroc(classwise.score_with_preds(d["emb"][test], preds[test]), wrong).item()
        a_blind = F.auroc(blind(d["emb"][test]), wrong).item()
        # measured: euclidean 0.674 vs 0.410, cosine 0.889 vs 0.849
        assert a_cw > a_blind + 0.03, (metric, a_cw, a_blind)
