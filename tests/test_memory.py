"""Memory limits: what would not fit is refused with the needed and available bytes, first.

The availability function is monkeypatched to a small number, so that the refusals are tested
without filling the machine.
"""

from __future__ import annotations

import re

import pytest
import torch
from test_contract import Net, inputs
from test_scores import D
from torch.utils.data import DataLoader, TensorDataset

import selectorch as st
from selectorch import memory
from selectorch.memory import MemoryLimitError
from selectorch.scores import KNNScore, MahalanobisScore


def limit(monkeypatch, available: int) -> None:
    monkeypatch.setattr(memory, "available_bytes", lambda device: available)


def test_available_bytes_of_the_cpu_is_positive_and_of_meta_unknown():
    cpu = memory.available_bytes("cpu")
    assert cpu is None or cpu > 0
    assert memory.available_bytes("meta") is None


def test_meminfo_fallback_reads_mem_available(monkeypatch, tmp_path):
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:  1000 kB\nMemFree:  10 kB\nMemAvailable:  250 kB\n")
    real_open = open
    monkeypatch.setitem(__import__("sys").modules, "psutil", None)  # as if not installed
    monkeypatch.setattr(
        "builtins.open",
        lambda path, *a, **k: real_open(meminfo if path == "/proc/meminfo" else path, *a, **k),
    )
    assert memory.available_bytes("cpu") == 250 * 1024


def test_check_fits_names_what_the_needed_and_the_available_bytes(monkeypatch):
    limit(monkeypatch, 1024)
    memory.check_fits(1024, "cpu", "a bank")  # exactly what is free: fine
    with pytest.raises(
        MemoryLimitError,
        match=r"^a bank needs 2.0 KiB \(2048 bytes\) on cpu, but only 1.0 KiB \(1024 bytes\) are",
    ):
        memory.check_fits(2048, "cpu", "a bank")
    monkeypatch.setenv("SELECTORCH_SKIP_MEMORY_CHECK", "1")
    memory.check_fits(2048, "cpu", "a bank")
    assert issubclass(MemoryLimitError, MemoryError)


def test_a_bank_that_does_not_fit_is_refused_before_fit_allocates_it(monkeypatch):
    X = torch.randn(1000, 64)
    limit(monkeypatch, 100_000)
    score = KNNScore(k=2)
    with pytest.raises(
        MemoryLimitError, match=r"Fitting KNNScore on 1000 rows of 64 features.*256000 bytes"
    ):
        score.fit(X)
    assert not score.is_fitted
    # a score that keeps no rows needs no copy of X: nothing to refuse
    MahalanobisScore().fit(X, torch.randint(3, (1000,)))
    # a float64 X converted to the module's float32 needs a copy, even without a bank
    with pytest.raises(MemoryLimitError, match=r"1 copy in torch.float32"):
        MahalanobisScore().fit(X.double()[:, :32].repeat(1, 2), torch.randint(3, (1000,)))


def test_a_selective_fit_that_would_not_fit_stops_after_the_first_batch(monkeypatch):
    model = Net().eval()
    calls = []
    model.body.register_forward_hook(lambda m, a, o: calls.append(1))
    loader = DataLoader(TensorDataset(inputs(100, seed=1)), batch_size=10)
    # one batch of features is 10 x 8 x 4 = 320 bytes; the buffer for ten batches needs 3200
    limit(monkeypatch, 3000)
    sel = st.SelectiveModel(model, KNNScore(k=2), layer="body")
    with pytest.raises(
        MemoryLimitError,
        match=r"Recording features for fit \(10 batches of 320 bytes, preallocated\).*3200 b",
    ):
        sel.fit(loader, progress=False)
    assert len(calls) == 1  # refused after one batch, not after the whole dataset


def test_a_stream_without_length_is_checked_before_concatenating(monkeypatch):
    def stream():
        for i in range(5):
            yield inputs(10, seed=i)

    limit(monkeypatch, 1000)  # 5 x 320 bytes held, 1600 more to concatenate
    sel = st.SelectiveModel(Net().eval(), KNNScore(k=2), layer="body")
    with pytest.raises(MemoryLimitError, match=r"concatenating 5 batches.*1.6 KiB"):
        sel.fit(stream(), progress=False)


def test_without_a_limit_everything_fits():
    sel = st.SelectiveModel(Net().eval(), KNNScore(k=2), layer="body")
    sel.fit(inputs(50, seed=1), progress=False)
    assert sel.score.bank_.shape == (50, D)


@pytest.mark.gpu
def test_cuda_available_bytes_follow_mem_get_info_and_a_huge_bank_is_refused():
    free, total = torch.cuda.mem_get_info()
    available = memory.available_bytes("cuda")
    assert free <= available <= total
    rows = int(1.5 * total // (4 * 1024)) + 1  # 1.5 x the whole GPU, in float32 rows of 1024
    X = torch.empty(1, 1024, device="cuda").expand(rows, 1024)  # no memory behind it
    with pytest.raises(MemoryLimitError, match=r"on cuda(:0)?, but only"):
        KNNScore(k=1).fit(X)


# -- streaming fit (issue 9): one buffer, block-wise checks, the bank built in place ------------


def test_check_stacking_projects_one_bank_when_preallocating_and_two_when_stacking(monkeypatch):
    first = torch.zeros(10, 8)  # 320 bytes
    limit(monkeypatch, 3500)
    memory.check_stacking([first], 10, "features", preallocate=True)  # 3200 bytes: fits
    with pytest.raises(MemoryLimitError, match=r"10 batches of 320 bytes, stacked.*6080 bytes"):
        memory.check_stacking([first], 10, "features")  # kept, then concatenated


def test_check_finite_rows_in_blocks_counts_and_names_the_first_bad_rows():
    from selectorch._checks import check_finite_rows

    width = 2**18  # blocks of 4 rows: the bad rows below fall in four blocks
    X = torch.zeros(14, width)
    for i, row in enumerate([13, 1, 9, 6, 2, 5]):
        X[row, (row * 997) % width] = [float("nan"), float("inf"), -float("inf")][i % 3]
    bad = (~torch.isfinite(X).all(dim=1)).nonzero().flatten()  # the whole-tensor reference
    expected = f"has {bad.numel()} of 14 rows with NaN or Inf (first rows: {bad[:5].tolist()})"
    assert expected.endswith("(first rows: [1, 2, 5, 6, 9])")
    with pytest.raises(ValueError, match="^" + re.escape(f"Argument `X` {expected}; remove")):
        check_finite_rows("X", X)
    assert check_finite_rows("X", X[[0, 3, 4]]) is not None  # finite rows pass
    with pytest.raises(ValueError, match=r"has 1 of 3 rows .*first rows: \[2\]"):
        check_finite_rows("y", torch.tensor([0.0, 1.0, float("nan")]))  # (N,): entries are rows


def _features(parts, batches, rows):
    from selectorch.collect import Features

    features = Features(batches, rows, "features")
    for part in parts:
        features.add(part)
    return features.stacked()


@pytest.mark.parametrize(
    ("sizes", "batches", "rows", "allocated"),
    [
        ([10, 10, 5], 3, 25, 25),  # the announced rows, exactly
        ([10, 10, 5], 3, None, 30),  # 3 x 10 rows allocated, a view of 25 returned
        ([10, 10, 5], 3, 40, 30),  # rows that the first batch belies: 3 x 10 rows
        ([3, 7, 5, 5], 2, None, 22),  # larger and more batches than announced: 6 -> 10 -> 15 -> 22
        ([4, 4], 10, None, 8),  # far fewer rows than allocated: copied out, the buffer freed
        ([4, 4, 4], None, None, 12),  # no length: a list, concatenated
    ],
)
def test_features_are_copied_into_one_buffer_or_fall_back_with_the_same_rows(
    sizes, batches, rows, allocated
):
    parts = [torch.randn(n, 3, 2) for n in sizes]
    out = _features(parts, batches, rows)
    assert torch.equal(out, torch.cat(parts))
    assert out.untyped_storage().nbytes() == allocated * 3 * 2 * 4
    assert all(out.untyped_storage().data_ptr() != p.untyped_storage().data_ptr() for p in parts)


def test_features_of_another_shape_or_dtype_fall_back_to_a_concatenation():
    parts = [torch.randn(4, 3), torch.randn(4, 3).double(), torch.randn(2, 3)]
    assert torch.equal(_features(parts, 3, 10), torch.cat(parts))  # promoted as cat does
    dicts = [{"a": torch.randn(4, 3), "b": torch.randn(4, 1)} for _ in range(3)]
    out = _features(dicts, 3, 12)
    assert out.keys() == {"a", "b"}
    for key in ("a", "b"):
        assert torch.equal(out[key], torch.cat([d[key] for d in dicts]))
    with pytest.raises(RuntimeError):  # a row shape that cannot be stacked still fails
        _features([torch.randn(4, 3), torch.randn(4, 2)], 2, 8)


def test_fit_over_a_loader_fits_on_the_filled_buffer_itself(monkeypatch):
    from selectorch import selective

    seen = []
    real_collect = selective.collect

    def spy(*args, **kwargs):
        run = real_collect(*args, **kwargs)
        seen.append(run.features)
        return run

    monkeypatch.setattr(selective, "collect", spy)
    x = inputs(95, seed=3)
    sel = st.SelectiveModel(Net().eval(), KNNScore(k=2), layer="body")
    sel.fit(DataLoader(TensorDataset(x), batch_size=10), progress=False)
    collected = seen[0]
    assert collected.untyped_storage().nbytes() == 95 * D * 4  # exactly the rows: one buffer
    # the bank is the collected buffer, centred in place: no second copy
    assert sel.score.bank_.data_ptr() == collected.data_ptr()
    with torch.no_grad():
        expected = sel.model.body(x)  # what the hooked layer records, in one call
    reference = KNNScore(k=2).fit(expected)
    torch.testing.assert_close(sel.score.bank_, reference.bank_)
    torch.testing.assert_close(sel.score.mean_, reference.mean_)


@pytest.mark.parametrize("metric", ["euclidean", "cosine", "mahalanobis"])
@pytest.mark.parametrize("outlier_q", [0.0, 0.1])
def test_fit_leaves_the_callers_x_untouched_and_copy_false_reuses_it(metric, outlier_q):
    X = torch.randn(60, 6, generator=torch.Generator().manual_seed(0)) + 3
    before = X.clone()
    kept = KNNScore(k=3, metric=metric, outlier_q=outlier_q).fit(X)
    assert torch.equal(X, before)  # copy=True (default): never modified
    assert kept.bank_.data_ptr() != X.data_ptr()
    KNNScore(k=3, metric=metric).fit(X.double())  # a converted copy may be overwritten
    assert torch.equal(X, before)
    reused = KNNScore(k=3, metric=metric, outlier_q=outlier_q).fit(X, copy=False)
    assert torch.equal(reused.bank_, kept.bank_)  # the same state, bit for bit
    q = torch.randn(7, 6)
    assert torch.equal(reused(q), kept(q))
    in_place = metric != "mahalanobis" and outlier_q == 0
    assert (reused.bank_.data_ptr() == X.data_ptr()) == in_place
    if not in_place and outlier_q == 0:
        assert torch.equal(X, before)


def test_copy_reaches_head_and_logit_scores_and_a_fit_without_it_still_works():
    fc = torch.nn.Linear(D, 3)
    X = torch.randn(50, D)
    for score in (
        st.scores.ViMScore(dim=4).set_head(fc.weight, fc.bias),
        st.scores.create_score("energy"),
    ):
        data = fc(X).detach() if score.input == "logits" else X
        score.fit(data.clone(), copy=False)
        assert score.is_fitted

    class OwnFit(KNNScore):  # a user's override without `copy`
        def fit(self, X, y=None):
            self.calls = getattr(self, "calls", 0) + 1
            return super().fit(X, y)

    sel = st.SelectiveModel(Net().eval(), OwnFit(k=2), layer="body")
    sel.fit(inputs(30, seed=4), progress=False)
    assert sel.score.calls == 1 and sel.score.bank_.shape == (30, D)


def test_fit_on_a_recording_leaves_the_recorded_tensors_untouched():
    model = Net().eval()
    rec = st.record(
        model,
        DataLoader(TensorDataset(inputs(40, seed=5)), batch_size=16),
        layers="body",
        progress=False,
    )
    before = rec["body"].clone()
    sel = st.SelectiveModel(model, KNNScore(k=2), layer="body").fit(rec, progress=False)
    assert torch.equal(rec["body"], before)
    assert sel.score.bank_.data_ptr() != rec["body"].data_ptr()
