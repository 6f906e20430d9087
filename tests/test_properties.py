"""Property tests (hypothesis) of the fail-closed promises, over every registered score.

Shapes, dtypes, extreme magnitudes (1e30, subnormals), NaN/Inf placed anywhere, duplicate rows,
k equal to the bank size, one class only. Examples are few and derandomized (the same examples
on every run) so that the file stays fast and never flaky.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as hs
from test_scores import ALL_SCORES, apply, build, fitted, make_inputs, make_labels, n_rows, take

import selectorch as st
from selectorch.scores import KNNScore

SETTINGS = settings(
    max_examples=25,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
# subnormal in float32 (1e-40) and float16 (1e-6), tiny, unit, large, near float32's limit
MAGNITUDES = [1e-40, 1e-6, 1e-3, 1.0, 1e3, 1e30]

_FITTED: dict[str, object] = {}


def fitted_once(name: str):
    """One fitted, calibrated score per name (scores are not changed by scoring)."""
    if name not in _FITTED:
        _FITTED[name] = fitted(name, {})
    return _FITTED[name]


@hs.composite
def queries(draw, name: str):
    """A batch for score ``name``: rows of any magnitude and dtype, with NaN/Inf anywhere."""
    score = fitted_once(name)
    n = draw(hs.integers(0, 9))
    X = make_inputs(score, n, seed=draw(hs.integers(0, 2**16)))
    magnitude = draw(hs.sampled_from(MAGNITUDES))
    X = apply(X, lambda t: t * magnitude)
    parts = list(X.values()) if isinstance(X, dict) else [X]  # a dict: every layer, the logits
    if n and draw(hs.booleans()):  # duplicate rows
        for t in parts:
            t[n // 2] = t[0]
    for _ in range(draw(hs.integers(0, 3)) if n else 0):
        flat = parts[draw(hs.integers(0, len(parts) - 1))].reshape(n, -1)
        row, col = draw(hs.integers(0, n - 1)), draw(hs.integers(0, flat.shape[1] - 1))
        flat[row, col] = draw(hs.sampled_from([math.nan, math.inf, -math.inf]))
    dtype = draw(hs.sampled_from(DTYPES))
    return apply(X, lambda t: t.to(dtype))


def nonfinite_rows(X) -> torch.Tensor:
    if isinstance(X, dict):
        return torch.stack([nonfinite_rows(t) for t in X.values()]).any(dim=0)
    return ~torch.isfinite(X.flatten(1)).all(dim=1)


@pytest.mark.parametrize("name", ALL_SCORES)
def test_property_scores_are_finite_or_plus_inf_and_bad_rows_are_rejected(name):
    score = fitted_once(name)

    @SETTINGS
    @given(X=queries(name))
    def check(X):
        out = score.select(X)
        s, kept = out["score"], out["selected"]
        assert s.shape == (n_rows(X),) and kept.shape == (n_rows(X),)
        assert not torch.isnan(s).any(), s
        assert not (s == -math.inf).any(), s  # -inf would be "most certain": never produced
        bad = nonfinite_rows(X)
        assert torch.all(s[bad] == math.inf)
        assert not kept[bad].any()
        assert torch.all(torch.isfinite(s[kept]))  # a kept sample always has a finite score
        # the rows without NaN/Inf score as they do in a batch of their own
        good = (~bad).nonzero().flatten()
        if good.numel():
            torch.testing.assert_close(score(take(X, good)), s[good], rtol=1e-5, atol=1e-5)

    check()


@SETTINGS
@given(
    m=hs.integers(1, 8),
    d=hs.integers(1, 4),
    duplicates=hs.integers(0, 3),
    metric=hs.sampled_from(["euclidean", "cosine"]),
    stat=hs.sampled_from(["max", "mean", "median", "min"]),
    scale=hs.sampled_from([1e-3, 1.0, 1e3]),
    seed=hs.integers(0, 2**16),
)
def test_property_knn_with_k_equal_to_the_bank_size_matches_brute_force(
    m, d, duplicates, metric, stat, scale, seed
):
    g = torch.Generator().manual_seed(seed)
    bank = torch.randn(m, d, generator=g, dtype=torch.float64) * scale
    bank = torch.cat([bank, bank[: min(duplicates, m)]])  # duplicate rows
    query = torch.cat([bank[:2], torch.randn(3, d, generator=g, dtype=torch.float64) * scale])
    k = bank.shape[0]
    score = KNNScore(k=k, metric=metric, stat=stat).double().fit(bank)
    got = score(query)
    assert got.shape == (query.shape[0],) and torch.isfinite(got).all() and (got >= -1e-9).all()
    q, b = query.numpy(), bank.numpy()
    if metric == "euclidean":
        dist = np.sqrt(((q[:, None] - b[None]) ** 2).sum(-1))
    else:
        qn = q / np.linalg.norm(q, axis=1, keepdims=True)
        bn = b / np.linalg.norm(b, axis=1, keepdims=True)
        dist = 1 - qn @ bn.T
    dist.sort(axis=1)
    reduce = {"max": np.max, "mean": np.mean, "median": np.median, "min": np.min}[stat]
    want = reduce(dist, axis=1)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-6, atol=1e-9 * max(scale, 1.0))


@pytest.mark.parametrize("name", ALL_SCORES)
def test_property_one_class_only_fits_or_says_it_needs_classes(name):
    @SETTINGS
    @given(n=hs.integers(2, 30), label=hs.integers(0, 6), seed=hs.integers(0, 2**16))
    def check(n, label, seed):
        score = build(name)
        X = make_inputs(score, n, seed=seed)
        y = torch.full((n,), label, dtype=torch.long)
        try:
            score.fit(X, y)
        except ValueError as err:
            # a refusal says what is wrong: too few classes or rows, or names the argument
            assert any(w in str(err) for w in ("class", "rows", "at least", "`")), str(err)
            return
        out = score(make_inputs(score, 5, seed=seed + 1))
        assert out.shape == (5,) and not torch.isnan(out).any()

    check()


@SETTINGS
@given(
    values=hs.lists(
        hs.sampled_from([0.0, 1.0, 1.0, 2.5, 1e30, -1e30, 1e-40, math.inf]), min_size=1, max_size=40
    ),
    coverage=hs.sampled_from([0.5, 0.8, 0.9, 0.95, 1.0]),
)
def test_property_coverage_threshold_keeps_at_least_the_promised_rank_with_ties(values, coverage):
    scores = torch.tensor(values, dtype=torch.float64)
    n = scores.numel()
    rank = math.ceil((n + 1) * coverage)
    score = st.scores.SoftmaxScore().double()  # the threshold is stored without rounding
    if rank > n and coverage < 1:
        with pytest.raises(ValueError, match="calibration samples"):
            score.calibrate_scores(scores, coverage=coverage)
        return
    score.calibrate_scores(scores, coverage=coverage)
    kept = score.selected(scores)
    assert int(kept.sum()) >= min(rank, int(torch.isfinite(scores).sum()))
    assert not kept[~torch.isfinite(scores)].any()  # +inf scores are never kept


@pytest.mark.parametrize("name", ALL_SCORES)
def test_property_fit_data_with_nan_rows_is_refused_with_the_count(name):
    @SETTINGS
    @given(
        bad=hs.sets(hs.integers(0, 29), min_size=1, max_size=5),
        value=hs.sampled_from([math.nan, math.inf, -math.inf]),
    )
    def check(bad, value):
        score = build(name)
        X = make_inputs(score, 30, seed=0)
        y = make_labels(X)
        first = next(iter(X.values())) if isinstance(X, dict) else X  # a dict: one layer only
        first.reshape(30, -1)[sorted(bad), 0] = value
        with pytest.raises(ValueError, match=rf"{len(bad)} of 30 rows with NaN or Inf"):
            score.fit(X, y)
        # the explicit alternative drops exactly those rows, with their labels, and says so
        with pytest.warns(st.NonFiniteRowsWarning, match=rf"Dropped {len(bad)} of 30 rows"):
            X_kept, y_kept = st.drop_nonfinite(X, y)
        assert n_rows(X_kept) == y_kept.shape[0] == 30 - len(bad)

    check()


@SETTINGS
@given(
    values=hs.lists(hs.floats(-1e6, 1e6, allow_nan=False), min_size=10, max_size=40),
    dtype=hs.sampled_from([torch.float16, torch.bfloat16, torch.float32]),
    then_half=hs.booleans(),
)
def test_property_a_threshold_stored_in_a_coarser_dtype_is_rounded_down_never_up(
    values, dtype, then_half
):
    scores = torch.tensor(values, dtype=torch.float64)
    score = st.scores.SoftmaxScore().to(dtype).calibrate_scores(scores, coverage=0.5)
    exact = st.scores.SoftmaxScore().double().calibrate_scores(scores, coverage=0.5)
    if then_half:
        score.half()
    stored = score.threshold_.double()
    assert stored <= exact.threshold_
    # so nothing above the calibrated threshold is ever kept
    assert not (score.selected(scores) & (scores > exact.threshold_)).any()
