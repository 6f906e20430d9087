"""Calibration promises, measured: coverage in expectation, risk with probability 1 - delta."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch import nn

import selectorch as st
from selectorch.calibration import (
    BinomialCDFPath,
    binomial_cdf,
    calibrate_thresholds,
    hoeffding_bentkus_pvalue,
    risk_threshold,
    upper_bound,
)
from selectorch.calibration.bounds import pvalue
from selectorch.scores import KNNScore, SoftmaxScore


def synthetic_pool(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores and 0/1 losses where a higher score makes an error more likely."""
    g = torch.Generator().manual_seed(seed)
    scores = torch.randn(n, generator=g, dtype=torch.float64)
    p_error = torch.sigmoid(2.5 * scores - 2.0)
    losses = (torch.rand(n, generator=g, dtype=torch.float64) < p_error).double()
    return scores, losses


# ------------------------------------------------------------------ bounds


@pytest.mark.parametrize(("k", "n", "p"), [(0, 5, 0.3), (3, 10, 0.5), (7, 40, 0.1), (12, 12, 0.9)])
def test_binomial_cdf_equals_direct_sum(k, n, p):
    direct = sum(math.comb(n, i) * p**i * (1 - p) ** (n - i) for i in range(k + 1))
    assert binomial_cdf(k, n, p) == pytest.approx(direct, rel=1e-9)


def test_binomial_cdf_path_follows_the_direct_cdf_over_3000_trials():
    g = torch.Generator().manual_seed(0)
    steps = (torch.rand(3000, generator=g) < 0.15).int().tolist()
    path, errors = BinomialCDFPath(0.1), 0
    for n, step in enumerate(steps, start=1):
        path.add(step)
        errors += step
        assert (path.n, path.e) == (n, errors)
        if n % 97 == 0 or n < 20:
            assert path.cdf == pytest.approx(binomial_cdf(errors, n, 0.1), rel=1e-9, abs=1e-300)


def _fixed_sequence_reference(scores, losses, risk, delta, bound):
    """Fixed-sequence testing written plainly: every candidate's p-value from scratch."""
    binary = bool(((losses == 0) | (losses == 1)).all())
    thresholds = sorted(set(scores.tolist()))
    start = math.ceil(math.log(delta) / math.log1p(-risk) - 1e-9)
    best, tests = float("-inf"), 0
    for t in thresholds:
        kept = scores <= t
        n = int(kept.sum())
        if n < start:
            continue
        tests += 1
        if pvalue(bound, float(losses[kept].sum()), n, risk, binary) > delta:
            break
        best = t
    return best, tests


@pytest.mark.parametrize("bound", ["clopper-pearson", "hoeffding-bentkus"])
def test_fixed_sequence_running_pvalues_decide_as_the_plain_tests(bound):
    g = torch.Generator().manual_seed(1)
    for trial in range(12):
        n = 200 + 150 * trial
        scores = torch.randn(n, generator=g, dtype=torch.float64)
        scores = scores.round(decimals=1) if trial % 3 == 0 else scores  # ties
        p_error = torch.sigmoid(2.5 * scores - 2.0)
        if bound == "clopper-pearson":
            losses = (torch.rand(n, generator=g, dtype=torch.float64) < p_error).double()
        else:
            losses = (torch.rand(n, generator=g, dtype=torch.float64) * 2 * p_error).clamp(0, 1)
        risk = 0.05 + 0.02 * trial
        result = risk_threshold(
            scores, losses, risk=risk, delta=0.1, bound=bound, method="fixed-sequence"
        )
        expected = _fixed_sequence_reference(scores, losses, risk, 0.1, bound)
        assert (result.threshold, result.tests) == expected


@pytest.mark.parametrize(("n", "delta"), [(10, 0.1), (100, 0.05), (1000, 0.01)])
def test_clopper_pearson_bound_with_no_errors_is_closed_form(n, delta):
    # P(Bin(n, u) <= 0) = (1 - u)^n = delta  ->  u = 1 - delta^(1/n)
    assert upper_bound("clopper-pearson", 0, n, delta, True) == pytest.approx(
        1 - delta ** (1 / n), abs=1e-6
    )


def test_hoeffding_bentkus_pvalue_worked_example():
    # mean loss 0.05 over n = 200, target 0.1
    a, b, n = 0.05, 0.1, 200
    h = a * math.log(a / b) + (1 - a) * math.log((1 - a) / (1 - b))
    bentkus = math.e * binomial_cdf(10, n, b)
    assert hoeffding_bentkus_pvalue(a, n, b) == pytest.approx(min(math.exp(-n * h), bentkus))


def test_clopper_pearson_refuses_fractional_losses():
    with pytest.raises(ValueError, match="hoeffding-bentkus"):
        risk_threshold(torch.rand(50), torch.rand(50), risk=0.2, delta=0.1)


# ------------------------------------------------------------------ risk thresholds


@pytest.mark.parametrize("method", ["sgr", "fixed-sequence"])
def test_risk_threshold_certifies_its_bound(method):
    scores, losses = synthetic_pool(2000)
    result = risk_threshold(scores, losses, risk=0.1, delta=0.1, method=method)
    kept = scores <= result.threshold
    assert result.feasible and result.kept == int(kept.sum())
    assert result.empirical_risk == pytest.approx(losses[kept].mean().item())
    assert result.empirical_risk <= result.upper_bound <= 0.1
    assert result.threshold in scores.tolist()


def test_risk_threshold_keeps_ties_together():
    scores = torch.tensor([0.0, 0.0, 0.0, 1.0, 1.0, 2.0] * 50)
    losses = torch.tensor([0.0, 0.0, 0.0, 0.0, 1.0, 1.0] * 50)
    result = risk_threshold(scores, losses, risk=0.3, delta=0.1)
    assert result.threshold == 1.0 and result.kept == 250


def test_infeasible_risk_keeps_nothing_and_warns():
    score = SoftmaxScore()
    logits = torch.randn(30, 3)
    with pytest.warns(UserWarning, match="keeping nothing"):
        score.calibrate(logits, risk=0.01, delta=0.05, correct=torch.zeros(30, dtype=torch.bool))
    assert score.get_threshold() == float("-inf")
    assert not score.select(logits)["selected"].any()
    report = score.calibration_report()
    assert report["feasible"] is False and report["target_risk"] == 0.01


# ------------------------------------------------------------------ promises over random splits


def test_coverage_promise_holds_on_average_over_500_splits(capsys):
    scores, _ = synthetic_pool(5000, seed=1)
    g = torch.Generator().manual_seed(2)
    target, n_cal, kept = 0.9, 200, []
    for _ in range(500):
        perm = torch.randperm(len(scores), generator=g)
        cal, test = scores[perm[:n_cal]], scores[perm[n_cal:]]
        threshold, _ = calibrate_thresholds(cal, coverage=target)
        kept.append((test <= threshold).double().mean().item())
    mean = sum(kept) / len(kept)
    se = (sum((k - mean) ** 2 for k in kept) / (len(kept) - 1)) ** 0.5 / len(kept) ** 0.5
    print(f"coverage target {target}: mean kept fraction {mean:.4f} (se {se:.4f}) over 500 splits")
    # expected coverage is rank / (n + 1) = 181 / 201 = 0.9005 >= 0.9
    assert mean >= target - 3 * se
    assert abs(mean - 181 / 201) < 4 * se


@pytest.mark.parametrize(("method", "splits"), [("sgr", 500), ("fixed-sequence", 500)])
def test_risk_promise_fails_in_at_most_delta_of_500_splits(method, splits):
    scores, losses = synthetic_pool(20000, seed=3)
    g = torch.Generator().manual_seed(4)
    risk, delta, n_cal = 0.1, 0.1, 1000
    failures, coverages = 0, []
    for _ in range(splits):
        perm = torch.randperm(len(scores), generator=g)
        cal, test = perm[:n_cal], perm[n_cal:]
        result = risk_threshold(scores[cal], losses[cal], risk=risk, delta=delta, method=method)
        kept = scores[test] <= result.threshold
        coverages.append(kept.double().mean().item())
        if kept.any() and losses[test][kept].mean().item() > risk:
            failures += 1
    rate = failures / splits
    tolerance = 3 * math.sqrt(delta * (1 - delta) / splits)
    print(
        f"{method}: risk <= {risk} failed in {rate:.3f} of {splits} splits "
        f"(allowed {delta} + {tolerance:.3f}); mean coverage {sum(coverages) / splits:.3f}"
    )
    assert rate <= delta + tolerance
    assert sum(coverages) / splits > 0.3  # the promise is not kept by rejecting everything


# ------------------------------------------------------------------ per class


def test_per_class_thresholds_give_each_class_its_coverage():
    g = torch.Generator().manual_seed(5)
    preds = torch.randint(0, 3, (3000,), generator=g)
    scores = torch.randn(3000, generator=g) + preds * 3.0  # classes on very different scales
    threshold, report = calibrate_thresholds(scores[:1500], coverage=0.8, preds=preds[:1500])
    assert threshold.shape == (3,)
    kept = scores[1500:] <= threshold[preds[1500:]]
    for c in range(3):
        assert 0.72 <= kept[preds[1500:] == c].double().mean().item() <= 0.9
    assert [entry["class"] for entry in report["classes"]] == [0, 1, 2]
    assert report["per_class"] is True


def test_per_class_with_a_rare_class_names_it():
    preds = torch.tensor([0] * 50 + [1] * 3)
    with pytest.raises(ValueError, match=r"at least 9 calibration samples.*\(1, 3\)"):
        calibrate_thresholds(torch.randn(53), coverage=0.9, preds=preds)


def test_per_class_score_needs_preds_to_select():
    score = KNNScore(k=2).fit(torch.randn(40, 4))
    preds = torch.arange(60) % 2
    score.calibrate(torch.randn(60, 4), coverage=0.5, preds=preds, per_class=True)
    with pytest.raises(ValueError, match="pass `preds`"):
        score.select(torch.randn(3, 4))
    with pytest.raises(ValueError, match="per class"):
        score.get_threshold()
    assert score.select(torch.randn(3, 4), preds=torch.tensor([0, 1, 1]))["selected"].shape == (3,)
    with pytest.raises(ValueError, match="needs `preds`"):
        score.calibrate(torch.randn(60, 4), coverage=0.5, per_class=True)


# ------------------------------------------------------------------ errors and the report


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"risk": 0.0}, r"`risk` to be a number in \(0, 1\)"),
        ({"risk": 0.1, "delta": 1.0}, r"`delta` to be a number in \(0, 1\)"),
        ({"risk": 0.1, "bound": "chernoff"}, "`bound`"),
        ({"risk": 0.1, "method": "bonferroni"}, "`method`"),
        ({"risk": 0.1}, "needs labels"),
        ({"coverage": 0.9, "risk": 0.1}, "exactly one"),
    ],
)
def test_bad_calibration_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        calibrate_thresholds(torch.randn(100), **kwargs)


def test_report_says_target_achieved_and_bound_and_survives_state_dict():
    scores, losses = synthetic_pool(3000, seed=6)
    score = SoftmaxScore()
    # max softmax probability sigmoid(6 - s) decreases as s grows: the score orders like s
    logits = torch.stack([6.0 - scores, torch.zeros_like(scores)], dim=1).float()
    score.calibrate(logits, risk=0.1, delta=0.1, correct=losses == 0)
    report = score.calibration_report()
    assert report["n"] == 3000 and report["feasible"] is True
    assert report["risk"] <= report["risk_upper_bound"] <= 0.1
    assert 0 < report["coverage"] < 1
    twin = SoftmaxScore()
    twin.load_state_dict(score.state_dict())
    assert twin.calibration_report() == report
    score.calibrate(logits, coverage=0.5)
    assert set(score.calibration_report()) >= {"n", "target_coverage", "threshold", "coverage"}


# ------------------------------------------------------------------ SelectiveModel, real data


@pytest.fixture(scope="module")
def noisy_mnist():
    """Real MNIST digits with heavy noise, so the real network makes real mistakes."""
    from selectorch.datasets import mnist5k, mnist_net

    images, labels = mnist5k()
    g = torch.Generator().manual_seed(0)
    order = torch.randperm(len(images), generator=g)
    images, labels = images[order], labels[order]
    images = images + 1.0 * torch.randn(images.shape, generator=g)
    return mnist_net(), images, labels


def test_selective_model_risk_control_on_noisy_mnist(noisy_mnist):
    net, images, labels = noisy_mnist
    sel = st.SelectiveModel(net, SoftmaxScore())
    sel.calibrate(images[:2500], labels[:2500], risk=0.05, delta=0.1, progress=False)
    report = sel.calibration_report()
    with torch.no_grad():
        out = sel(images[2500:])
    wrong = out.output.argmax(1) != labels[2500:]
    accuracy = 1 - wrong.double().mean().item()
    test_risk = wrong[out.selected].double().mean().item()
    print(
        f"noisy MNIST accuracy {accuracy:.3f}; kept {out.selected.double().mean():.3f}; "
        f"risk among kept {test_risk:.3f} (target 0.05); report {report}"
    )
    assert accuracy < 0.9  # the task is hard enough for the promise to matter
    assert report["feasible"] and report["risk_upper_bound"] <= 0.05
    assert test_risk <= 0.06
    assert out.selected.double().mean() > 0.2


def test_selective_model_per_class_thresholds_in_forward_and_compile(noisy_mnist):
    net, images, labels = noisy_mnist
    sel = st.SelectiveModel(net, KNNScore(k=5), layer="classifier.1")
    sel.fit(images[:1000], progress=False)
    sel.calibrate(images[1000:3000], coverage=0.8, per_class=True, progress=False)
    assert sel.threshold_.shape == (10,)
    with torch.no_grad():
        out = sel(images[3000:3200])
        preds = out.output.argmax(1)
        expected = out.score <= sel.threshold_[preds]
        fast = torch.compile(sel, fullgraph=True)(images[3000:3200])
    assert torch.equal(out.selected, expected)
    assert torch.equal(fast.selected, out.selected)


def test_selective_model_risk_without_labels_is_refused(noisy_mnist):
    net, images, _ = noisy_mnist
    with pytest.raises(ValueError, match="needs labels"):
        st.SelectiveModel(net, SoftmaxScore()).calibrate(images[:100], risk=0.1, progress=False)


def test_per_class_needs_class_logits():
    model = nn.Sequential(nn.Linear(4, 4), nn.Flatten(0))  # (B * 4,) output: no class logits
    knn = st.SelectiveModel(model, KNNScore(k=1), layer="0").fit(torch.randn(20, 4), progress=False)
    with pytest.raises(ValueError, match=r"no \(B, C\) logits"):
        knn.calibrate(torch.randn(20, 4), coverage=0.5, per_class=True, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        knn.calibrate(torch.randn(20, 4), coverage=0.5, progress=False)


def test_risk_options_are_checked_with_a_coverage_target_too():
    with pytest.raises(ValueError, match="`bound`"):
        calibrate_thresholds(torch.randn(50), coverage=0.5, bound="nonsense")
    with pytest.raises(ValueError, match="`delta`"):
        calibrate_thresholds(torch.randn(50), coverage=0.5, delta=7)


def test_per_class_select_refuses_an_uncalibrated_class():
    score = KNNScore(k=2).fit(torch.randn(40, 4))
    score.calibrate(torch.randn(60, 4), coverage=0.5, preds=torch.arange(60) % 3, per_class=True)
    with pytest.raises(ValueError, match=r"`preds` to hold classes in \[0, 3\).*from 0 to 3"):
        score.select(torch.randn(2, 4), preds=torch.tensor([0, 3]))


def test_risk_calibration_of_a_single_logit_binary_model_predicts_by_sign():
    class Perfect(nn.Module):
        def forward(self, x):
            return x[:, :1] * 10.0  # (N, 1) log-odds, right whenever the label is x > 0

    x = torch.randn(400, 2)
    y = (x[:, 0] > 0).long()
    sel = st.SelectiveModel(Perfect(), SoftmaxScore(task="binary"))
    sel.calibrate(x, y, risk=0.05, delta=0.1, progress=False)
    report = sel.calibration_report()
    assert report["feasible"] and report["risk"] == 0.0 and report["coverage"] == 1.0


def test_per_class_thresholds_for_a_single_logit_binary_model():
    class Logit(nn.Module):
        def forward(self, x):
            return x[:, :1]

    sel = st.SelectiveModel(Logit(), SoftmaxScore(task="binary"))
    sel.calibrate(torch.randn(300, 2), coverage=0.8, per_class=True, progress=False)
    assert sel.threshold_.shape == (2,)
    with torch.no_grad():
        out = sel(torch.tensor([[3.0, 0.0], [-3.0, 0.0]]))
    assert out.selected.tolist() == [True, True]
