"""Tests of ``selectorch.functional`` against independent references written here.

The references are plain numpy / Python in float64: a loop over every (query, bank) pair for
the nearest-neighbour search, hand formulas for the logit scores, and exact rational arithmetic
(``fractions.Fraction``) for the conformal rank ``ceil((n + 1) * coverage)``.
"""

from __future__ import annotations

import importlib
import math
from fractions import Fraction

import numpy as np
import pytest
import torch

from selectorch import functional as F
from selectorch.functional.distances import (
    chunk_sq_norms,
    normalize_rows,
    prepare_bank,
    stored_norms_usable,
)

knn_module = importlib.import_module("selectorch.functional.knn")

METRICS = ("euclidean", "cosine")


# -- references --------------------------------------------------------------------------------


def brute_force_distances(query: torch.Tensor, bank: torch.Tensor, metric: str) -> np.ndarray:
    """(B, M) float64 distances from a plain loop over every pair (no matrix tricks)."""
    q = query.double().numpy()
    b = bank.double().numpy()
    out = np.empty((q.shape[0], b.shape[0]))
    for i in range(q.shape[0]):
        for j in range(b.shape[0]):
            if metric == "euclidean":
                out[i, j] = math.sqrt(float(np.sum((q[i] - b[j]) ** 2)))
            else:
                cos = float(np.dot(q[i], b[j])) / (np.linalg.norm(q[i]) * np.linalg.norm(b[j]))
                out[i, j] = 1.0 - cos
    return out


def brute_force_knn(query, bank, k, metric):
    """Sorted ``(B, k)`` distances and indices, plus the full sorted distance rows."""
    dist = brute_force_distances(query, bank, metric)
    order = np.argsort(dist, axis=1, kind="stable")
    full = np.take_along_axis(dist, order, axis=1)
    return full[:, :k], order[:, :k], full


def tie_free(full_sorted: np.ndarray, k: int, tol: float) -> np.ndarray:
    """(B, k) mask of positions whose distance is at least ``tol`` away from its neighbours.

    Where two bank rows are (almost) equally far from a query, their order may legitimately
    differ between float32 search and the float64 reference; indices are compared elsewhere.
    """
    gaps = np.diff(full_sorted, axis=1)  # (B, M - 1)
    before = np.concatenate([np.full((gaps.shape[0], 1), np.inf), gaps], axis=1)[:, :k]
    after = (
        gaps[:, :k]
        if gaps.shape[1] >= k
        else np.concatenate([gaps, np.full((gaps.shape[0], k - gaps.shape[1]), np.inf)], axis=1)
    )
    return (before > tol) & (after > tol)


def conformal_rank_exact(n: int, coverage: str) -> int:
    """ceil((n + 1) * coverage) in exact rational arithmetic."""
    return math.ceil((n + 1) * Fraction(coverage))


def _data(b: int, m: int, d: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, d, generator=g), torch.randn(m, d, generator=g)


# -- knn_search --------------------------------------------------------------------------------


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("k", [1, 2, 5, 17])
def test_knn_search_equals_brute_force_loop(metric, k):
    query, bank = _data(13, 97, 16, seed=k)
    prepared = prepare_bank(bank, metric)
    d, i = F.knn_search(query, prepared, k, metric=metric)
    ref_d, ref_i, full = brute_force_knn(query, bank, k, metric)

    assert d.shape == (13, k) and i.shape == (13, k)
    assert i.dtype == torch.int64
    np.testing.assert_allclose(d.numpy(), ref_d, rtol=1e-5, atol=1e-4)
    assert torch.all(d[:, 1:] >= d[:, :-1]), "distances must be sorted increasingly"
    mask = tie_free(full, k, tol=1e-4)
    assert mask.mean() > 0.9, "reference has too many near-ties to check indices"
    np.testing.assert_array_equal(i.numpy()[mask], ref_i[mask])


@pytest.mark.parametrize("metric", METRICS)
def test_knn_search_matches_torch_cdist_reference(metric):
    query, bank = _data(9, 40, 6, seed=3)
    q, b = query.double(), bank.double()
    if metric == "euclidean":
        ref = torch.cdist(q, b, compute_mode="donot_use_mm_for_euclid_dist")
    else:
        ref = (
            1.0
            - torch.nn.functional.normalize(q, dim=1) @ torch.nn.functional.normalize(b, dim=1).T
        )
    ref_d, ref_i = ref.sort(dim=1)
    d, i = F.knn_search(q, prepare_bank(b, metric), 4, metric=metric)
    torch.testing.assert_close(d, ref_d[:, :4], rtol=1e-9, atol=1e-7)
    assert torch.equal(i, ref_i[:, :4])


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize(
    ("k", "n_query", "n_bank", "chunk_size"),
    [
        (5, 5, 103, 2),  # chunk = max(k, 2) = 5: 21 chunks, last one has 3 < k rows
        (3, 4, 103, 10),  # chunk = 10: 11 chunks, last one has 3 rows
        (1, 6, 50, 1),  # chunk = k = 1: one chunk per bank row
        (7, 2, 64, 16),  # chunk = 16 divides the bank: no partial chunk
    ],
)
def test_knn_search_chunked_equals_single_chunk_and_brute_force(
    metric, k, n_query, n_bank, chunk_size, monkeypatch
):
    query, bank = _data(n_query, n_bank, 8, seed=n_bank + k)
    prepared = prepare_bank(bank, metric)
    whole_d, whole_i = F.knn_search(query, prepared, k, metric=metric, chunk_size=1 << 30)

    calls = []
    real = knn_module.pairwise_distance

    def counting(q, b, *args, **kwargs):
        calls.append(b.shape[0])
        return real(q, b, *args, **kwargs)

    monkeypatch.setattr(knn_module, "pairwise_distance", counting)
    d, i = F.knn_search(query, prepared, k, metric=metric, chunk_size=chunk_size)

    chunk = min(n_bank, max(k, chunk_size))
    assert len(calls) == math.ceil(n_bank / chunk)
    assert len(calls) >= 4, "the chunk loop should run many times"
    assert sum(calls) == n_bank, "every bank row is visited exactly once"
    assert calls[-1] == n_bank - chunk * (len(calls) - 1)

    torch.testing.assert_close(d, whole_d)
    assert torch.equal(i, whole_i)
    ref_d, ref_i, full = brute_force_knn(query, bank, k, metric)
    np.testing.assert_allclose(d.numpy(), ref_d, rtol=1e-5, atol=1e-4)
    mask = tie_free(full, k, tol=1e-4)
    np.testing.assert_array_equal(i.numpy()[mask], ref_i[mask])


def test_knn_search_chunked_result_does_not_depend_on_batch_size():
    # the chunk width depends on the bank only, never on the number of queries
    query, bank = _data(24, 77, 5, seed=11)
    d_all, i_all = F.knn_search(query, bank, 6, chunk_size=10)
    for size in (1, 5, 24):
        parts = [F.knn_search(q, bank, 6, chunk_size=10) for q in query.split(size)]
        torch.testing.assert_close(torch.cat([p[0] for p in parts]), d_all)
        assert torch.equal(torch.cat([p[1] for p in parts]), i_all)


def test_knn_search_docstring_example_and_exact_small_case():
    bank = torch.tensor([[0.0], [1.0], [5.0]])
    d, i = F.knn_search(torch.tensor([[0.9], [4.0]]), bank, 2)
    assert i.tolist() == [[1, 0], [2, 1]]
    torch.testing.assert_close(d, torch.tensor([[0.1, 0.9], [1.0, 3.0]]))


def test_knn_search_k_equal_to_bank_size_returns_whole_bank_sorted():
    query, bank = _data(3, 6, 4, seed=2)
    d, i = F.knn_search(query, bank, 6, chunk_size=4)
    ref_d, _, _ = brute_force_knn(query, bank, 6, "euclidean")
    np.testing.assert_allclose(d.numpy(), ref_d, rtol=1e-5, atol=1e-5)
    assert sorted(i[0].tolist()) == list(range(6))


def test_knn_search_with_precomputed_bank_norms_equals_without():
    query, bank = _data(7, 30, 5, seed=4)
    norms = bank.pow(2).sum(dim=1)
    d1, i1 = F.knn_search(query, bank, 3, bank_sq_norms=norms, chunk_size=3)
    d2, i2 = F.knn_search(query, bank, 3, chunk_size=3)
    torch.testing.assert_close(d1, d2)
    assert torch.equal(i1, i2)


def test_knn_search_errors_name_the_argument():
    query, bank = _data(2, 5, 3, seed=0)
    with pytest.raises(ValueError, match=r"`k` to be in \[1, 5\].*got 0"):
        F.knn_search(query, bank, 0)
    with pytest.raises(ValueError, match=r"`k` to be in \[1, 5\].*got 6"):
        F.knn_search(query, bank, 6)
    with pytest.raises(ValueError, match=r"`metric` to be one of .*'manhattan'"):
        F.knn_search(query, bank, 1, metric="manhattan")
    with pytest.raises(ValueError, match=r"`metric` to be one of .*'manhattan'"):
        F.pairwise_distance(query, bank, "manhattan")


# -- pairwise_distance -------------------------------------------------------------------------


@pytest.mark.parametrize("metric", METRICS)
def test_pairwise_distance_equals_brute_force_loop(metric):
    query, bank = _data(6, 11, 7, seed=8)
    d = F.pairwise_distance(query, prepare_bank(bank, metric), metric)
    assert d.shape == (6, 11)
    np.testing.assert_allclose(d.numpy(), brute_force_distances(query, bank, metric), atol=1e-5)


def test_pairwise_distance_squared_and_docstring_value():
    assert F.pairwise_distance(torch.zeros(1, 2), torch.tensor([[3.0, 4.0]])).item() == 5.0
    sq = F.pairwise_distance(torch.zeros(1, 2), torch.tensor([[3.0, 4.0]]), squared=True)
    assert sq.item() == 25.0


def test_prepare_bank_normalises_rows_only_for_cosine():
    bank = torch.tensor([[3.0, 4.0], [0.0, 2.0]])
    torch.testing.assert_close(prepare_bank(bank, "cosine"), torch.tensor([[0.6, 0.8], [0.0, 1.0]]))
    assert torch.equal(prepare_bank(bank, "euclidean"), bank)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_stored_norms_are_used_only_in_single_or_double_precision(dtype):
    # one rule for every search: half-precision norms are recomputed from the rows
    rows = torch.tensor([[3.0, 4.0], [1.0, 0.0]])
    stored = torch.tensor([7.0, 9.0], dtype=dtype)  # deliberately wrong: shows which is used
    full = dtype in (torch.float32, torch.float64)
    assert stored_norms_usable(stored) is full
    assert stored_norms_usable(None) is False
    expected = [7.0, 9.0] if full else [25.0, 1.0]
    assert chunk_sq_norms(rows, stored, 0, torch.float32).tolist() == expected
    # pairwise_distance follows the same rule
    squared = F.pairwise_distance(torch.zeros(1, 2), rows, squared=True, bank_sq_norms=stored)
    assert squared.tolist() == [expected]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_a_zero_row_normalises_to_zero_in_every_dtype(dtype):
    # F.normalize's floor 1e-12 underflows in float16: a zero row used to become NaN there
    bank = torch.tensor([[0.0, 0.0], [3.0, 4.0]], dtype=dtype)
    expected = torch.tensor([[0.0, 0.0], [0.6, 0.8]], dtype=dtype)
    torch.testing.assert_close(prepare_bank(bank, "cosine"), expected)
    torch.testing.assert_close(normalize_rows(bank), expected)
    inplace = bank.clone()
    assert prepare_bank(inplace, "cosine", inplace=True) is inplace
    torch.testing.assert_close(inplace, expected)
    if dtype == torch.float16:  # rows with subnormal norms still get unit norm
        tiny = torch.tensor([[2.0**-24, 0.0], [2.0**-20, 2.0**-20]], dtype=dtype)
        torch.testing.assert_close(normalize_rows(tiny)[0], torch.tensor([1.0, 0.0], dtype=dtype))
        assert abs(normalize_rows(tiny)[1].float().norm().item() - 1) < 0.05  # subnormal norm
    # cosine distance of a zero query row: 1 (no similarity), finite
    dist = F.pairwise_distance(bank, bank, "cosine")
    torch.testing.assert_close(dist.float(), torch.tensor([[1.0, 1.0], [1.0, 0.0]]),
                               atol=2e-3, rtol=0)


# -- knn_statistic / knn_score -----------------------------------------------------------------

NUMPY_STATS = {"max": np.max, "mean": np.mean, "median": np.median, "min": np.min}


@pytest.mark.parametrize("stat", list(NUMPY_STATS))
@pytest.mark.parametrize("k", [1, 2, 3, 4, 7, 8])
def test_knn_statistic_equals_numpy(stat, k):
    g = torch.Generator().manual_seed(k)
    distances = torch.rand(10, k, generator=g).sort(dim=1).values
    out = F.knn_statistic(distances, stat)
    assert out.shape == (10,)
    ref = NUMPY_STATS[stat](distances.double().numpy(), axis=1)
    np.testing.assert_allclose(out.numpy(), ref, rtol=1e-6)


def test_knn_statistic_median_of_even_k_is_mean_of_two_middle_values():
    distances = torch.tensor([[1.0, 2.0, 4.0, 10.0], [0.0, 0.0, 1.0, 1.0]])
    assert F.knn_statistic(distances, "median").tolist() == [3.0, 0.5]
    odd = torch.tensor([[1.0, 2.0, 40.0]])
    assert F.knn_statistic(odd, "median").tolist() == [2.0]


def test_knn_statistic_unknown_stat_names_the_argument():
    with pytest.raises(ValueError, match=r"`stat` to be one of .*'mode'"):
        F.knn_statistic(torch.zeros(2, 3), "mode")


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("stat", list(NUMPY_STATS))
def test_knn_score_equals_brute_force_statistic(metric, stat):
    query, bank = _data(8, 45, 6, seed=21)
    out = F.knn_score(
        query, prepare_bank(bank, metric), 4, metric=metric, stat=stat, chunk_size=4
    )
    ref_d, _, _ = brute_force_knn(query, bank, 4, metric)
    np.testing.assert_allclose(out.numpy(), NUMPY_STATS[stat](ref_d, axis=1), rtol=1e-5, atol=1e-5)


# -- logit scores ------------------------------------------------------------------------------


def numpy_softmax_score(logits: np.ndarray, temperature: float) -> np.ndarray:
    z = logits.astype(np.float64) / temperature
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return -(e / e.sum(axis=1, keepdims=True)).max(axis=1)


def numpy_energy_score(logits: np.ndarray, temperature: float) -> np.ndarray:
    z = logits.astype(np.float64) / temperature
    m = z.max(axis=1, keepdims=True)
    return -temperature * (m[:, 0] + np.log(np.exp(z - m).sum(axis=1)))


@pytest.mark.parametrize("temperature", [1.0, 0.5, 2.0, 1000.0])
def test_softmax_score_equals_hand_formula(temperature):
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(20, 7, generator=g) * 4
    out = F.softmax_score(logits, temperature)
    assert out.shape == (20,) and out.dtype == torch.float32
    np.testing.assert_allclose(
        out.numpy(), numpy_softmax_score(logits.numpy(), temperature), rtol=1e-5
    )
    assert torch.all((out >= -1.0) & (out <= -1.0 / 7 + 1e-6))


@pytest.mark.parametrize("temperature", [1.0, 0.5, 2.0, 1000.0])
def test_energy_score_equals_hand_formula(temperature):
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(20, 7, generator=g) * 4
    out = F.energy_score(logits, temperature)
    assert out.shape == (20,) and out.dtype == torch.float32
    np.testing.assert_allclose(
        out.numpy(), numpy_energy_score(logits.numpy(), temperature), rtol=1e-5, atol=1e-5
    )


def test_logit_scores_known_values():
    assert F.softmax_score(torch.tensor([[0.0, 0.0]])).item() == -0.5
    assert F.energy_score(torch.zeros(1, 4)).item() == pytest.approx(-math.log(4))
    # T * logsumexp(x / T) -> max(x) as T -> 0
    assert F.energy_score(torch.tensor([[3.0, 1.0]]), 0.01).item() == pytest.approx(-3.0, abs=1e-6)


def test_logit_scores_are_stable_for_huge_logits():
    logits = torch.tensor([[1000.0, 0.0], [1000.0, 1000.0]])
    assert F.softmax_score(logits).tolist() == [-1.0, -0.5]
    torch.testing.assert_close(
        F.energy_score(logits), torch.tensor([-1000.0, -1000.0 - math.log(2)])
    )


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("fn", [F.softmax_score, F.energy_score])
def test_half_precision_logits_are_computed_in_float32(dtype, fn):
    g = torch.Generator().manual_seed(3)
    logits = (torch.randn(16, 10, generator=g) * 5).to(dtype)
    out = fn(logits, 0.7)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, fn(logits.float(), 0.7), rtol=0, atol=0)
    ref = numpy_softmax_score if fn is F.softmax_score else numpy_energy_score
    np.testing.assert_allclose(out.numpy(), ref(logits.float().numpy(), 0.7), rtol=1e-5, atol=1e-5)


# -- thresholds --------------------------------------------------------------------------------

COVERAGES = ["0.1", "0.3", "0.5", "0.55", "0.7", "0.8", "0.9", "0.95", "0.99"]


@pytest.mark.parametrize(
    ("n", "coverage", "rank"),
    [
        (9, "0.9", 9),
        (99, "0.9", 90),
        (10, "0.8", 9),
        (19, "0.95", 19),
        (99, "0.55", 55),
        (9, "0.7", 7),
        (4, "0.5", 3),
        (1000, "0.99", 991),
    ],
)
def test_coverage_threshold_is_hand_sorted_rank(n, coverage, rank):
    assert conformal_rank_exact(n, coverage) == rank  # the table itself is right
    g = torch.Generator().manual_seed(n)
    values = torch.randperm(n, generator=g).double() * 0.37 + 1.0  # distinct, shuffled
    expected = sorted(values.tolist())[rank - 1]
    assert F.coverage_threshold(values, float(coverage)).item() == expected


def test_coverage_threshold_rank_matches_exact_arithmetic_for_many_n_and_coverages():
    # float (n + 1) * c can land just above an integer (e.g. 100 * 0.55 = 55.000000000000007)
    mismatches = []
    for coverage in COVERAGES:
        c = float(coverage)
        for n in range(F.min_calibration_size(c), 400):
            scores = torch.arange(1, n + 1, dtype=torch.float64).flip(0)  # value == rank
            got = int(F.coverage_threshold(scores, c).item())
            want = conformal_rank_exact(n, coverage)
            if got != want:
                mismatches.append((n, coverage, got, want))
    assert mismatches == []


def test_coverage_threshold_keeps_dtype_and_docstring_value():
    t = F.coverage_threshold(torch.arange(1.0, 10.0), 0.8)
    assert t.item() == 8.0 and t.ndim == 0 and t.dtype == torch.float32
    assert (
        F.coverage_threshold(torch.arange(1.0, 10.0, dtype=torch.float64), 0.8).dtype
        == torch.float64
    )


def test_coverage_one_gives_infinite_threshold():
    t = F.coverage_threshold(torch.tensor([1.0, 2.0, 3.0]), 1.0)
    assert t.item() == math.inf and t.dtype == torch.float32


@pytest.mark.parametrize(
    ("coverage", "needed"), [(0.9, 9), (0.95, 19), (0.99, 99), (0.5, 1), (0.8, 4)]
)
def test_coverage_threshold_too_few_scores_says_how_many_are_needed(coverage, needed):
    assert F.min_calibration_size(coverage) == needed
    F.coverage_threshold(torch.arange(float(needed)), coverage)  # exactly enough: no error
    if needed > 1:
        with pytest.raises(
            ValueError, match=rf"needs at least {needed} calibration samples.*n={needed - 1}"
        ):
            F.coverage_threshold(torch.arange(float(needed - 1)), coverage)


def test_min_calibration_size_equals_exact_smallest_n():
    for coverage in COVERAGES + ["0.01", "0.999"]:
        smallest = next(n for n in range(1, 10_000) if conformal_rank_exact(n, coverage) <= n)
        assert F.min_calibration_size(float(coverage)) == smallest, coverage


@pytest.mark.parametrize("n", [1, 2, 5, 10, 101])
def test_interpolated_quantile_equals_numpy_linear(n):
    g = torch.Generator().manual_seed(n)
    ordered = torch.randn(n, generator=g, dtype=torch.float64).sort().values
    for q in [0.0, 0.1, 0.25, 0.5, 0.9, 0.95, 0.99, 1.0, 1 / 3]:
        got = F.interpolated_quantile(ordered, q)
        assert got.ndim == 0
        want = np.quantile(ordered.numpy(), q, method="linear")
        assert got.item() == pytest.approx(want, rel=1e-12, abs=1e-12), (n, q)


def test_interpolated_quantile_with_infinite_scores_gives_no_nan():
    inf = math.inf
    ordered = torch.tensor([1.0, 2.0, inf, inf])
    assert F.interpolated_quantile(ordered, 0.9).item() == inf  # between inf and inf
    assert F.interpolated_quantile(ordered, 0.5).item() == inf  # between 2 and inf
    assert F.interpolated_quantile(ordered, 1 / 6).item() == pytest.approx(1.5)  # finite part
    assert F.interpolated_quantile(torch.tensor([1.0, inf]), 1.0).item() == inf


def test_interpolated_quantile_between_minus_inf_and_finite_is_minus_inf_not_nan():
    # library bug: only equal ends are special-cased, so -inf + 0.5 * (0 - -inf) = NaN
    # (numpy.quantile([-inf, 0.0], 0.5) gives -inf)
    inf = math.inf
    with np.errstate(invalid="ignore"):
        assert np.quantile([-inf, 0.0], 0.5) == -inf
    low = F.interpolated_quantile(torch.tensor([-inf, 0.0]), 0.5)
    assert not torch.isnan(low), "interpolating between -inf and a finite score gave NaN"
    assert low.item() == -inf


@pytest.mark.parametrize("fn", ["knn_search", "pairwise_distance"])
def test_functional_cosine_normalises_a_raw_bank(fn):
    query, bank = _data(5, 40, 6, seed=31)
    raw = bank * 7.0 + 1.0
    if fn == "knn_search":
        d, _ = F.knn_search(query, raw, 3, metric="cosine", chunk_size=7)
        ref, _, _ = brute_force_knn(query, raw, 3, "cosine")
        np.testing.assert_allclose(d.numpy(), ref, rtol=1e-5, atol=1e-5)
    else:
        d = F.pairwise_distance(query, raw, "cosine")
        expected = 1 - torch.nn.functional.cosine_similarity(query[:, None], raw[None], dim=-1)
        torch.testing.assert_close(d, expected, rtol=1e-5, atol=1e-5)
