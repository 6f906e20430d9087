"""Selective-prediction and OOD metrics against hand-computed numbers and naive references."""

from __future__ import annotations

import itertools
import math
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torchmetrics import MetricCollection
from torchmetrics.classification import (
    MulticlassAccuracy,
    MulticlassCalibrationError,
)
from torchmetrics.functional.classification import binary_auroc
from torchmetrics.regression import MeanSquaredError

import selectorch.functional as F
from selectorch import metrics

INF = float("inf")

# -- naive references, written from the definitions by sorting and summing in Python ----------


def naive_curve(scores, losses):
    """[(threshold, coverage, selective risk, generalized risk)] per distinct score."""
    n = len(scores)
    points = []
    for t in sorted(set(scores)):
        kept = [loss for s, loss in zip(scores, losses, strict=True) if s <= t]
        points.append((t, len(kept) / n, sum(kept) / len(kept), sum(kept) / n))
    return points


def geifman_aurc(ordered_losses):
    """Geifman et al.: mean over k of the mean loss of the k first samples."""
    n = len(ordered_losses)
    return sum(sum(ordered_losses[:k]) / k for k in range(1, n + 1)) / n


def tie_averaged_aurc(scores, losses):
    """Geifman's AURC averaged over every order of the tied samples (brute force)."""
    groups = [
        [loss for s, loss in zip(scores, losses, strict=True) if s == t]
        for t in sorted(set(scores))
    ]
    orders = itertools.product(*(itertools.permutations(g) for g in groups))
    values = [geifman_aurc([x for group in order for x in group]) for order in orders]
    return sum(values) / len(values)


def naive_augrc(scores, losses):
    """Trapezoids under (0, 0) and the (coverage, generalized risk) points (fd-shifts)."""
    points = [(0.0, 0.0)] + [(c, g) for _, c, _, g in naive_curve(scores, losses)]
    return sum((c1 - c0) * (g0 + g1) / 2 for (c0, g0), (c1, g1) in itertools.pairwise(points))


def pairwise_auroc(pos, neg):
    wins = sum(1.0 if a > b else 0.5 if a == b else 0.0 for a, b in itertools.product(pos, neg))
    return wins / (len(pos) * len(neg))


def naive_fpr_at_tpr(scores, is_ood, tpr):
    ood = [s for s, o in zip(scores, is_ood, strict=True) if o]
    ind = [s for s, o in zip(scores, is_ood, strict=True) if not o]
    for t in sorted(set(scores), reverse=True):  # flag score >= t, the largest t first
        if sum(s >= t for s in ood) >= tpr * len(ood) - 1e-9:
            return sum(s >= t for s in ind) / len(ind)
    raise AssertionError("unreachable")


def naive_aupr(scores, positive):
    """Trapezoidal area under precision(recall), one point per distinct score, from recall 0."""
    n_pos = sum(positive)
    points = [(0.0, 1.0)]
    for t in sorted(set(scores), reverse=True):
        flagged = [p for s, p in zip(scores, positive, strict=True) if s >= t]
        points.append((sum(flagged) / n_pos, sum(flagged) / len(flagged)))
    return sum((r1 - r0) * (p0 + p1) / 2 for (r0, p0), (r1, p1) in itertools.pairwise(points))


def random_case(seed, n=40, levels=6, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    score = torch.randint(0, levels, (n,), generator=g).double() * scale  # many ties
    score[0] = INF
    correct = torch.rand(n, generator=g) < 0.7
    return score, correct


# worked example: scores with a tie and +inf, two errors
EX_SCORE = torch.tensor([0.1, 0.2, 0.2, 0.5, INF], dtype=torch.float64)
EX_CORRECT = torch.tensor([True, False, True, True, False])
EX_LOSS = (~EX_CORRECT).double()


# -- risk-coverage math ----------------------------------------------------------------------


def test_worked_example_matches_hand_computed_numbers():
    curve = F.risk_coverage_curve(EX_SCORE, EX_LOSS)
    assert curve.threshold.tolist() == [0.1, 0.2, 0.5, INF]
    assert curve.coverage.tolist() == pytest.approx([0.2, 0.6, 0.8, 1.0])
    assert curve.risk.tolist() == pytest.approx([0.0, 1 / 3, 1 / 4, 2 / 5])
    assert curve.generalized_risk.tolist() == pytest.approx([0.0, 0.2, 0.2, 0.4])
    # k = 1..5 with the tie {0.2, 0.2} (one error) split evenly: L(2) = 0.5
    assert F.aurc(EX_SCORE, EX_LOSS).item() == pytest.approx(
        (0 + 0.5 / 2 + 1 / 3 + 1 / 4 + 2 / 5) / 5
    )
    assert F.aurc(EX_SCORE, EX_LOSS).item() == pytest.approx(37 / 150)
    assert F.oracle_aurc(EX_LOSS).item() == pytest.approx((1 / 4 + 2 / 5) / 5)  # 13/100
    assert F.eaurc(EX_SCORE, EX_LOSS).item() == pytest.approx(37 / 150 - 13 / 100)
    # trapezoids: 0.2*0 + 0.4*(0+0.2)/2 + 0.2*0.2 + 0.2*(0.2+0.4)/2
    assert F.augrc(EX_SCORE, EX_LOSS).item() == pytest.approx(0.14)
    risks = [F.risk_at_coverage(EX_SCORE, EX_LOSS, c).item() for c in (0.2, 0.5, 0.6, 0.9, 1.0)]
    assert risks == pytest.approx([0.0, 1 / 3, 1 / 3, 0.4, 0.4])
    coverages = [F.coverage_at_risk(EX_SCORE, EX_LOSS, r).item() for r in (0.0, 0.3, 0.39, 0.4)]
    assert coverages == pytest.approx([0.2, 0.8, 0.8, 1.0])


def test_augrc_matches_published_closed_form_of_traub_et_al():
    # Traub et al. 2024: AUGRC = (1 - AUROC_f) * acc * (1 - acc) + (1 - acc)^2 / 2
    for seed in range(4):
        score, correct = random_case(seed)
        loss = (~correct).double()
        acc = correct.double().mean().item()
        auroc_f = pairwise_auroc(score[~correct].tolist(), score[correct].tolist())
        expected = (1 - auroc_f) * acc * (1 - acc) + (1 - acc) ** 2 / 2
        assert F.augrc(score, loss).item() == pytest.approx(expected)
    assert F.augrc(EX_SCORE, EX_LOSS).item() == pytest.approx((1 - 0.75) * 0.6 * 0.4 + 0.4**2 / 2)


def test_eaurc_oracle_matches_geifman_definition():
    # binary losses, n_c correct: oracle AURC = (1/n) sum_{k > n_c} (k - n_c) / k
    n, n_c = 50, 36
    loss = torch.cat([torch.zeros(n_c), torch.ones(n - n_c)]).double()
    loss = loss[torch.randperm(n)]
    expected = sum((k - n_c) / k for k in range(n_c + 1, n + 1)) / n
    assert F.oracle_aurc(loss).item() == pytest.approx(expected)
    # and its large-n limit e + (1 - e) ln(1 - e)
    big = (torch.rand(200_000) < 0.3).double()
    e = big.mean().item()
    assert F.oracle_aurc(big).item() == pytest.approx(e + (1 - e) * math.log(1 - e), abs=1e-4)


@pytest.mark.parametrize("seed", range(4))
def test_curve_aurc_augrc_equal_naive_references_with_ties_and_inf(seed):
    score, correct = random_case(seed, n=12, levels=4)
    loss = torch.where(correct, 0.0, torch.rand(12, dtype=torch.float64))  # user-given losses
    expected = naive_curve(score.tolist(), loss.tolist())
    curve = F.risk_coverage_curve(score, loss)
    assert curve.threshold.tolist() == [p[0] for p in expected]
    for got, column in zip(curve[1:], range(1, 4), strict=True):
        assert got.tolist() == pytest.approx([p[column] for p in expected])
    small_score, small_loss = score[:8], loss[:8]  # brute force over tie orders stays cheap
    assert F.aurc(small_score, small_loss).item() == pytest.approx(
        tie_averaged_aurc(small_score.tolist(), small_loss.tolist())
    )
    assert F.augrc(score, loss).item() == pytest.approx(naive_augrc(score.tolist(), loss.tolist()))


def test_aurc_without_ties_is_geifman_mean_of_selective_risks():
    score = torch.randn(30, dtype=torch.float64)
    loss = (torch.rand(30) < 0.3).double()
    ordered = loss[torch.argsort(score)].tolist()
    assert F.aurc(score, loss).item() == pytest.approx(geifman_aurc(ordered))


def test_score_equal_to_loss_has_zero_excess_aurc_and_excess_is_never_negative():
    loss = (torch.rand(100) < 0.25).double()
    assert F.eaurc(loss, loss).item() == pytest.approx(0.0, abs=1e-12)
    for seed in range(5):
        score, correct = random_case(seed)
        assert F.eaurc(score, (~correct).double()).item() >= -1e-12


def test_risk_at_coverage_and_coverage_at_risk_equal_naive_search():
    score, correct = random_case(3, n=30, levels=5)
    loss = (~correct).double()
    points = naive_curve(score.tolist(), loss.tolist())
    for c in (0.05, 0.3, 0.5, 0.77, 1.0):
        expected = next(risk for _, cov, risk, _ in points if cov >= c - 1e-12)
        assert F.risk_at_coverage(score, loss, c).item() == pytest.approx(expected)
    for r in (0.0, 0.1, 0.2, 0.3, 1.0):
        expected = max([cov for _, cov, risk, _ in points if risk <= r] or [0.0])
        assert F.coverage_at_risk(score, loss, r).item() == pytest.approx(expected)


def test_coverage_at_risk_is_zero_when_no_threshold_reaches_the_risk():
    assert F.coverage_at_risk(torch.rand(5), torch.ones(5), 0.5).item() == 0.0


def test_risk_coverage_values_only_depend_on_the_order_of_large_scores():
    score, correct = random_case(1, levels=5)
    loss = (~correct).double()
    huge = torch.where(torch.isinf(score), score, 1e3 + score * 2.5e5)  # 1e3 .. 1e6 and +inf
    for fn in (F.aurc, F.eaurc, F.augrc):
        assert fn(huge, loss).item() == pytest.approx(fn(score, loss).item())


def test_risk_coverage_errors_name_the_argument():
    with pytest.raises(ValueError, match="same shape"):
        F.aurc(torch.rand(3), torch.rand(4))
    with pytest.raises(ValueError, match="NaN"):
        F.aurc(torch.tensor([float("nan"), 1.0]), torch.zeros(2))
    with pytest.raises(ValueError, match=r"`loss` to hold values in \[0, 1\]"):
        F.augrc(torch.rand(2), torch.tensor([0.5, 2.0]))
    with pytest.raises(ValueError, match="at least one sample"):
        F.aurc(torch.empty(0), torch.empty(0))
    with pytest.raises(ValueError, match=r"`coverage` to be a number in \(0, 1\], got 0"):
        F.risk_at_coverage(torch.rand(3), torch.zeros(3), 0)
    with pytest.raises(ValueError, match=r"`risk` to be a number in \[0, 1\], got 1.5"):
        F.coverage_at_risk(torch.rand(3), torch.zeros(3), 1.5)


# -- OOD detection ---------------------------------------------------------------------------


def ood_case(seed, n=40):
    g = torch.Generator().manual_seed(seed)
    is_ood = torch.rand(n, generator=g) < 0.4
    score = torch.randint(0, 8, (n,), generator=g).double() + 2.0 * is_ood
    score = 1e3 + score * 1.4e5  # far outside [0, 1]: 1e3 .. ~1.4e6
    score[torch.nonzero(is_ood)[0]] = INF
    score[torch.nonzero(~is_ood)[0]] = INF  # an in-distribution +inf too
    return score, is_ood


@pytest.mark.parametrize("seed", range(3))
def test_ood_metrics_equal_naive_references_for_large_and_infinite_scores(seed):
    score, is_ood = ood_case(seed)
    s, o = score.tolist(), is_ood.tolist()
    assert F.auroc(score, is_ood).item() == pytest.approx(
        pairwise_auroc(score[is_ood].tolist(), score[~is_ood].tolist())
    )
    assert F.aupr_out(score, is_ood).item() == pytest.approx(naive_aupr(s, o), abs=1e-6)
    neg = [-x for x in s]
    assert F.aupr_in(score, is_ood).item() == pytest.approx(
        naive_aupr(neg, [not x for x in o]), abs=1e-6
    )
    for tpr in (0.5, 0.95, 1.0):
        assert F.fpr_at_tpr(score, is_ood, tpr).item() == pytest.approx(naive_fpr_at_tpr(s, o, tpr))


def test_large_scores_would_collapse_under_torchmetrics_sigmoid_but_not_here():
    score = torch.tensor([100.0, 200.0, 300.0, 400.0], dtype=torch.float64)
    is_ood = torch.tensor([False, False, True, True])
    assert binary_auroc(score, is_ood.long()).item() == pytest.approx(0.5)  # the trap
    assert F.auroc(score, is_ood).item() == 1.0
    assert F.aupr_out(score, is_ood).item() == pytest.approx(1.0)
    assert F.aupr_in(score, is_ood).item() == pytest.approx(1.0)
    assert F.fpr_at_tpr(score, is_ood).item() == 0.0


def test_ood_hand_computed_example():
    # ID: 1, 1e5, 1e6 ; OOD: 1e5, inf
    score = torch.tensor([1.0, 1e5, 1e5, 1e6, INF], dtype=torch.float64)
    is_ood = torch.tensor([False, True, False, False, True])
    # pairs (OOD > ID): 1e5 vs {1: 1, 1e5: 0.5, 1e6: 0}; inf vs all: 3 -> 4.5 / 6
    assert F.auroc(score, is_ood).item() == pytest.approx(0.75)
    # 95% of 2 OOD needs both: flag score >= 1e5 -> ID flagged: 1e5, 1e6 -> 2/3
    assert F.fpr_at_tpr(score, is_ood, 0.95).item() == pytest.approx(2 / 3)
    # (recall, precision), OOD positive: (0, 1); (1/2, 1) at inf; (1/2, 1/2) at 1e6;
    # (1, 1/2) at 1e5; (1, 2/5) at 1 -> trapezoids 0.5 + 0 + 0.25 + 0
    assert F.aupr_out(score, is_ood).item() == pytest.approx(0.5 * 1 + 0.5 * 0.5, abs=1e-6)


def test_ood_metrics_match_openood_sklearn_code():
    sk = pytest.importorskip("sklearn.metrics")
    for seed in range(3):
        score, is_ood = ood_case(seed)
        score = torch.where(torch.isinf(score), 1e7, score)  # sklearn refuses inf
        conf, ood = (-score).numpy(), is_ood.numpy().astype(int)
        # OpenOOD v1.5 evaluators/metrics.py: auc_and_fpr_recall
        fpr_list, tpr_list, _ = sk.roc_curve(ood, -conf)
        fpr = fpr_list[(tpr_list >= 0.95).argmax()]
        precision_in, recall_in, _ = sk.precision_recall_curve(1 - ood, conf)
        precision_out, recall_out, _ = sk.precision_recall_curve(ood, -conf)
        assert F.fpr_at_tpr(score, is_ood).item() == pytest.approx(fpr)
        assert F.auroc(score, is_ood).item() == pytest.approx(sk.auc(fpr_list, tpr_list))
        assert F.aupr_in(score, is_ood).item() == pytest.approx(
            sk.auc(recall_in, precision_in), abs=1e-6
        )
        assert F.aupr_out(score, is_ood).item() == pytest.approx(
            sk.auc(recall_out, precision_out), abs=1e-6
        )


def test_ood_errors_name_the_problem():
    with pytest.raises(ValueError, match="both in-distribution and OOD"):
        F.fpr_at_tpr(torch.rand(4), torch.zeros(4, dtype=torch.bool))
    with pytest.raises(ValueError, match="only 0/1"):
        F.aupr_in(torch.rand(3), torch.tensor([0, 1, -1]))
    with pytest.raises(ValueError, match="same shape"):
        F.aupr_out(torch.rand(3), torch.tensor([True, False]))
    with pytest.raises(ValueError, match=r"`tpr` to be a number in \(0, 1\]"):
        F.fpr_at_tpr(torch.rand(2), torch.tensor([True, False]), tpr=95)


# -- torchmetrics behaviour ------------------------------------------------------------------

RC_METRICS = {
    "AURC": (lambda: metrics.AURC(), F.aurc),
    "EAURC": (lambda: metrics.EAURC(), F.eaurc),
    "AUGRC": (lambda: metrics.AUGRC(), F.augrc),
    "RiskAtCoverage": (
        lambda: metrics.RiskAtCoverage(0.7),
        lambda s, loss: F.risk_at_coverage(s, loss, 0.7),
    ),
    "CoverageAtRisk": (
        lambda: metrics.CoverageAtRisk(0.2),
        lambda s, loss: F.coverage_at_risk(s, loss, 0.2),
    ),
}
OOD_METRICS = {
    "AUROC": (lambda: metrics.AUROC(), F.auroc),
    "AUPRIn": (lambda: metrics.AUPRIn(), F.aupr_in),
    "AUPROut": (lambda: metrics.AUPROut(), F.aupr_out),
    "FPRAtTPR": (lambda: metrics.FPRAtTPR(0.9), lambda s, o: F.fpr_at_tpr(s, o, 0.9)),
}


@pytest.mark.parametrize("name", sorted(RC_METRICS))
def test_risk_coverage_metric_batches_equal_one_update_and_the_function(name):
    make, fn = RC_METRICS[name]
    score, correct = random_case(5, n=60)
    batched, whole = make(), make()
    for s, c in zip(score.split(17), correct.split(17), strict=True):
        batched.update(s, c)
    whole.update(score, correct)
    expected = fn(score, (~correct).double()).item()
    assert batched.compute().item() == pytest.approx(expected)
    assert whole.compute().item() == pytest.approx(expected)
    batched.reset()
    assert batched.score == [] and batched.loss == []
    batched.update(score[:10], correct[:10])
    assert batched.compute().item() == pytest.approx(
        fn(score[:10], (~correct[:10]).double()).item()
    )


@pytest.mark.filterwarnings("ignore:The ``compute`` method")
@pytest.mark.parametrize("name", sorted(OOD_METRICS))
def test_ood_metric_batches_equal_one_update_and_the_function(name):
    make, fn = OOD_METRICS[name]
    score, is_ood = ood_case(7)
    batched, whole = make(), make()
    for s, o in zip(score.split(13), is_ood.split(13), strict=True):
        batched.update(s, o)
    whole.update(score, is_ood)
    expected = fn(score, is_ood).item()
    assert batched.compute().item() == pytest.approx(expected)
    assert whole.compute().item() == pytest.approx(expected)
    batched.reset()
    with pytest.raises(ValueError, match="no samples"):
        batched.compute()


def test_preds_target_and_float_losses_give_the_same_as_correct():
    score = torch.randn(20)
    logits = torch.randn(20, 4)
    target = torch.randint(0, 4, (20,))
    correct = logits.argmax(1) == target
    values = []
    for args in ((correct,), (logits, target), (logits.argmax(1), target), ((~correct).float(),)):
        m = metrics.AURC()
        m.update(score, *args)
        values.append(m.compute().item())
    assert values == pytest.approx([values[0]] * 4)


def test_metric_moves_to_float64_and_keeps_its_value():
    m = metrics.AUGRC()
    score, correct = random_case(2)
    m.update(score.float(), correct)
    before = m.compute().item()
    m = m.to(torch.float64)
    assert m.dtype == torch.float64
    assert m.score[0].dtype == torch.float64 and m.loss[0].dtype == torch.float64
    assert m.compute().item() == pytest.approx(before)


def test_risk_coverage_curve_metric_returns_the_named_tuple():
    m = metrics.RiskCoverageCurve()
    m.update(EX_SCORE[:2], EX_CORRECT[:2])
    m.update(EX_SCORE[2:], EX_CORRECT[2:])
    curve = m.compute()
    assert isinstance(curve, F.RiskCoverage)
    assert curve.risk.tolist() == pytest.approx([0.0, 1 / 3, 1 / 4, 2 / 5])


@pytest.mark.filterwarnings("ignore:The ``compute`` method")
def test_metric_update_errors_name_argument_expected_and_given():
    m = metrics.AURC()
    with pytest.raises(
        ValueError, match=r"`correct` to have shape \(3,\) like `score`, got \(4,\)"
    ):
        m.update(torch.rand(3), torch.ones(4, dtype=torch.bool))
    with pytest.raises(TypeError, match=r"`correct` to be bool .* got dtype torch.int64"):
        m.update(torch.rand(3), torch.ones(3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"`score` to have shape \(N,\), got \(3, 1\)"):
        m.update(torch.rand(3, 1), torch.ones(3, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"`preds` to be \(3,\) integer class ids or \(3, C\)"):
        m.update(torch.rand(3), torch.rand(3), torch.zeros(3, dtype=torch.long))
    with pytest.raises(TypeError, match="`score` to be a torch.Tensor, got list"):
        m.update([0.1], torch.ones(1, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"`coverage` to be a number in \(0, 1\]"):
        metrics.RiskAtCoverage(1.5)
    with pytest.raises(ValueError, match="no samples; call update"):
        metrics.EAURC().compute()


# -- SelectiveMetric -------------------------------------------------------------------------


def classification_batch(seed, n=50, classes=3):
    g = torch.Generator().manual_seed(seed)
    probs = torch.softmax(torch.randn(n, classes, generator=g) * 2, dim=1)
    target = torch.randint(0, classes, (n,), generator=g)
    selected = torch.rand(n, generator=g) < 0.6
    return probs, target, selected


def test_selective_metric_equals_base_metric_on_subsets_by_hand():
    m = metrics.SelectiveMetric(MulticlassAccuracy(num_classes=3))
    batches = [classification_batch(seed) for seed in range(3)]
    for probs, target, selected in batches:
        m.update(probs, target, selected=selected)
    probs, target, selected = (torch.cat(parts) for parts in zip(*batches, strict=True))
    out = m.compute()
    assert set(out) == {"full", "selected", "rejected"}
    for name, mask in (
        ("full", torch.ones_like(selected)),
        ("selected", selected),
        ("rejected", ~selected),
    ):
        reference = MulticlassAccuracy(num_classes=3)(probs[mask], target[mask])
        assert out[name].item() == pytest.approx(reference.item())
    # macro accuracy by hand on the kept rows
    pred, kept_target = probs[selected].argmax(1), target[selected]
    per_class = [(pred[kept_target == c] == c).double().mean().item() for c in range(3)]
    assert out["selected"].item() == pytest.approx(sum(per_class) / 3)


def test_selective_calibration_error_is_ece_of_kept_predictions():
    m = metrics.SelectiveCalibrationError(num_classes=3, n_bins=10)
    probs, target, selected = classification_batch(11, n=200)
    m.update(probs, target, selected=selected)
    out = m.compute()
    reference = MulticlassCalibrationError(num_classes=3, n_bins=10)(
        probs[selected], target[selected]
    )
    assert out["selected"].item() == pytest.approx(reference.item())
    # by hand: |accuracy - confidence| per bin, weighted by the bin's share of kept rows
    conf, pred = probs[selected].max(1)
    right = (pred == target[selected]).double()
    bins = torch.clamp((conf * 10).ceil().long() - 1, 0, 9)
    ece = sum(
        (bins == b).double().mean()
        * (right[bins == b].mean() - conf[bins == b].double().mean()).abs()
        for b in range(10)
        if (bins == b).any()
    )
    assert out["selected"].item() == pytest.approx(ece.item(), abs=1e-6)
    with pytest.raises(ValueError, match="`norm` to be one of"):
        metrics.SelectiveCalibrationError(num_classes=3, norm="l3")


def test_selective_metric_sub_metrics_are_registered_and_move_with_to():
    base = MulticlassCalibrationError(num_classes=3)
    m = metrics.SelectiveMetric(base)
    m.persistent(True)
    probs, target, selected = classification_batch(1)
    m.update(probs, target, selected=selected)
    keys = set(m.state_dict())
    assert {f"metrics.{name}.confidences" for name in metrics.SUBSETS} <= keys
    assert {"n_full", "n_selected", "n_rejected"} <= keys
    assert [name for name, _ in m.named_children()] == ["metrics"]
    m = m.to(torch.float64)
    for name in metrics.SUBSETS:
        assert m.metrics[name].dtype == torch.float64
        assert m.metrics[name].confidences[0].dtype == torch.float64
    assert base.confidences == []  # the metric given is copied, not updated


def test_selective_metric_reset_empty_subset_and_forward():
    m = metrics.SelectiveMetric(MeanSquaredError())
    preds, target = torch.tensor([1.0, 2.0, 3.0]), torch.tensor([1.0, 0.0, 3.0])
    batch = m(preds, target, selected=torch.tensor([True, True, True]))
    assert batch["full"].item() == pytest.approx(4 / 3)
    assert batch["selected"].item() == pytest.approx(4 / 3)
    assert math.isnan(batch["rejected"].item())
    out = m.compute()
    assert math.isnan(out["rejected"].item()) and out["full"].item() == pytest.approx(4 / 3)
    m.reset()
    assert int(m.n_full) == 0 and int(m.metrics["full"].total) == 0
    m.update(preds, target, selected=torch.tensor([False, True, False]))
    assert m.compute()["selected"].item() == pytest.approx(4.0)
    assert m.compute()["rejected"].item() == pytest.approx(0.0)


def test_selective_metric_takes_a_metric_collection_and_keyword_arguments():
    coll = MetricCollection({"acc": MulticlassAccuracy(num_classes=3, average="micro")})
    m = metrics.SelectiveMetric(coll)
    probs, target, selected = classification_batch(4)
    m.update(preds=probs, target=target, selected=selected)
    expected = (probs[~selected].argmax(1) == target[~selected]).double().mean().item()
    assert m.compute()["rejected"]["acc"].item() == pytest.approx(expected)


def test_selective_metric_errors():
    with pytest.raises(TypeError, match="torchmetrics Metric or MetricCollection, got function"):
        metrics.SelectiveMetric(F.aurc)
    m = metrics.SelectiveMetric(MeanSquaredError())
    with pytest.raises(ValueError, match=r"`selected` to be a \(N,\) bool tensor"):
        m.update(torch.rand(3), torch.rand(3), selected=torch.ones(3))
    with pytest.raises(
        ValueError, match=r"argument 1 to have 3 rows like `selected`, got shape \(4,\)"
    ):
        m.update(torch.rand(3), torch.rand(4), selected=torch.ones(3, dtype=torch.bool))


# -- DDP: two CPU processes over gloo --------------------------------------------------------


def _ddp_worker(rank, world, port, queue):
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        score, correct = random_case(9, n=40)
        _, is_ood = ood_case(9)
        probs, target, selected = classification_batch(9, n=40)
        selected[:20] = False  # rank 0 has no selected rows at all
        half = slice(0, 20) if rank == 0 else slice(20, 40)
        aurc, auroc = metrics.AURC(), metrics.AUROC()
        aurc.update(score[half], correct[half])
        auroc.update(score[half], is_ood[half])
        sel = metrics.SelectiveMetric(MulticlassAccuracy(num_classes=3, average="micro"))
        sel.update(probs[half], target[half], selected=selected[half])
        out = sel.compute()
        queue.put((rank, aurc.compute().item(), auroc.compute().item(), out["selected"].item()))
    finally:
        dist.destroy_process_group()


def test_metrics_gather_every_rank_under_ddp():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # fork: the children reuse the imported modules instead of importing torch again
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    mp.start_processes(_ddp_worker, args=(2, port, queue), nprocs=2, start_method="fork")
    results = sorted(queue.get(timeout=30) for _ in range(2))
    score, correct = random_case(9, n=40)
    _, is_ood = ood_case(9)
    probs, target, selected = classification_batch(9, n=40)
    selected[:20] = False
    kept = (probs[selected].argmax(1) == target[selected]).double().mean().item()
    expected = (F.aurc(score, (~correct).double()).item(), F.auroc(score, is_ood).item(), kept)
    for _, *values in results:
        assert values == pytest.approx(list(expected))
