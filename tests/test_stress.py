"""Stress: score many random queries in batches; memory must not grow.

The default run scores 50,000 queries; ``SELECTORCH_STRESS_FULL=1`` scores 1,000,000 (a few
minutes on 2 CPU cores). Growth is measured two ways: the number of live tensors (exact: a
recorded tensor or an autograd graph kept per batch would show up at once) and the process's
resident memory (coarse: allocator caches move it by a few MB).
"""

from __future__ import annotations

import gc
import os
import warnings

import pytest
import torch
from torch import nn

import selectorch as st
from selectorch.scores import KNNScore

FULL = os.environ.get("SELECTORCH_STRESS_FULL") == "1"
QUERIES = 1_000_000 if FULL else 50_000
BATCH = 1000
DIM = 32
BANK = 2_000
#: Resident-memory growth allowed over the whole run (allocator caches, fragmentation).
RSS_SLACK = 64 * 2**20


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def live_tensors() -> int:
    gc.collect()
    count = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for obj in gc.get_objects():
            try:
                count += isinstance(obj, torch.Tensor)
            except Exception:  # some lazy objects raise on isinstance
                pass
    return count


class Encoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(DIM, DIM), nn.ReLU(), nn.Linear(DIM, DIM))
        self.head = nn.Linear(DIM, 10)

    def forward(self, x):
        return self.head(self.body(x))


@pytest.fixture(scope="module")
def selector() -> st.SelectiveModel:
    torch.manual_seed(0)
    sel = st.SelectiveModel(Encoder(), KNNScore(k=5), layer="body")
    sel.fit(torch.randn(BANK, DIM), progress=False, batch_size=1000)
    return sel.calibrate(torch.randn(2000, DIM), coverage=0.9, progress=False)


def run(forward, sel: st.SelectiveModel, batches: int) -> tuple[int, int]:
    """Score ``batches`` batches; return the growth of live tensors and of resident memory."""
    g = torch.Generator().manual_seed(1)
    for _ in range(5):  # warm up caches (allocator, dynamo) before measuring
        forward(torch.randn(BATCH, DIM, generator=g))
    tensors, rss = live_tensors(), rss_bytes()
    kept = 0
    for i in range(batches):
        out = forward(torch.randn(BATCH, DIM, generator=g))
        if i % 100 == 0:
            assert out.score.grad_fn is None and not out.selected.requires_grad
        kept += int(out.selected.sum())
        del out
    assert sel._hooks.store == {} and not sel._hooks.recording
    assert 0.8 * batches * BATCH < kept < 0.98 * batches * BATCH  # it really scored
    return live_tensors() - tensors, rss_bytes() - rss


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="reads /proc (Linux)")
def test_scoring_many_batches_with_grad_enabled_keeps_no_tensor_and_no_graph(selector):
    # gradients are on and the model's parameters require them: the output carries a graph,
    # the score and the decision must not, and nothing may outlive its batch
    assert torch.is_grad_enabled()
    assert all(p.requires_grad for p in selector.model.parameters())
    grown_tensors, grown_rss = run(selector, selector, QUERIES // BATCH)
    assert grown_tensors <= 0, f"{grown_tensors} tensors outlived their batch"
    assert grown_rss < RSS_SLACK, f"resident memory grew by {grown_rss / 2**20:.1f} MiB"


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="reads /proc (Linux)")
def test_scoring_many_batches_compiled_keeps_no_tensor(selector):
    compiled = torch.compile(selector, backend="eager", fullgraph=True)
    with torch.no_grad():
        grown_tensors, grown_rss = run(compiled, selector, QUERIES // BATCH // 5)
    assert grown_tensors <= 0, f"{grown_tensors} tensors outlived their batch"
    assert grown_rss < RSS_SLACK, f"resident memory grew by {grown_rss / 2**20:.1f} MiB"


@pytest.mark.gpu
def test_scoring_many_batches_on_cuda_does_not_grow_allocated_memory(selector):
    sel = selector.cuda()
    try:
        g = torch.Generator(device="cuda").manual_seed(1)
        for _ in range(5):
            sel(torch.randn(BATCH, DIM, device="cuda", generator=g))
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        for _ in range(QUERIES // BATCH):
            out = sel(torch.randn(BATCH, DIM, device="cuda", generator=g))
            assert out.score.grad_fn is None
            del out
        torch.cuda.synchronize()
        assert torch.cuda.memory_allocated() <= before
        assert sel._hooks.store == {}
    finally:
        selector.cpu()
