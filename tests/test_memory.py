"""Memory limits: what would not fit is refused with the needed and available bytes, first.

The availability function is monkeypatched to a small number, so that the refusals are tested
without filling the machine.
"""

from __future__ import annotations

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
    # one batch of features is 10 x 8 x 4 = 320 bytes; ten batches stacked need 6400
    limit(monkeypatch, 5000)
    sel = st.SelectiveModel(model, KNNScore(k=2), layer="body")
    with pytest.raises(
        MemoryLimitError, match=r"Recording features for fit \(10 batches of 320 bytes, stacked"
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
