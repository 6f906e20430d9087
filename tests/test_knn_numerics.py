"""kNN search stays exact where float arithmetic is hard, and compiles once for all batch sizes."""

from __future__ import annotations

import pytest
import torch

import selectorch.functional.knn as knn_module
import selectorch.functional.knn_cpu as knn_cpu
from selectorch.functional.distances import prepare_bank
from selectorch.functional.knn import row_sq_norms
from selectorch.functional.topk import chunk_topk
from selectorch.scores import KNNScore


def offset_cloud(n: int, dim: int, offset: float, spread: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return offset + spread * torch.randn(n, dim, generator=g)


def nearest_float64(query: torch.Tensor, bank: torch.Tensor) -> torch.Tensor:
    return torch.cdist(query.double(), bank.double()).argmin(dim=1)


@pytest.mark.parametrize(("offset", "spread"), [(1000.0, 0.32), (100.0, 0.32)])
def test_neighbours_of_embeddings_far_from_the_origin_are_exact(offset, spread):
    bank = offset_cloud(2000, 64, offset, spread, 0)
    query = offset_cloud(200, 64, offset, spread, 1)
    score = KNNScore(k=1).fit(bank)
    _, idx = score.knn_search(query)
    assert torch.equal(idx[:, 0], nearest_float64(query, bank))
    expected = torch.cdist(query.double(), bank.double()).min(dim=1).values
    torch.testing.assert_close(score(query).double(), expected, rtol=1e-4, atol=1e-4)


def test_half_module_with_large_norms_keeps_what_float32_keeps():
    bank = offset_cloud(1000, 32, 60.0, 1.0, 2)  # norms ~340: squares overflow float16
    val, query = offset_cloud(300, 32, 60.0, 1.0, 3), offset_cloud(300, 32, 60.0, 1.0, 4)
    full = KNNScore(k=3).fit(bank).calibrate(val, coverage=0.9)
    half = KNNScore(k=3).half().fit(bank.half()).calibrate(val.half(), coverage=0.9)
    kept_full = full.select(query)["selected"].double().mean().item()
    kept_half = half.select(query.half())["selected"].double().mean().item()
    assert torch.isfinite(half(query.half())).all()
    assert abs(kept_half - kept_full) < 0.03, (kept_full, kept_half)


def test_bf16_autocast_does_not_change_neighbours():
    bank = offset_cloud(1500, 48, 5.0, 1.0, 5)
    query = offset_cloud(100, 48, 5.0, 1.0, 6)
    score = KNNScore(k=5).fit(bank)
    plain = score(query)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto = score(query)
    torch.testing.assert_close(auto, plain)


def test_compiled_chunked_search_serves_every_batch_size_in_few_graphs():
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    bank = torch.randn(5000, 8)
    score = KNNScore(k=3, chunk_size=700).fit(bank)  # 8 chunks, the last one partial
    compiled = torch.compile(score, backend=backend, fullgraph=True)
    for batch in (3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37):
        q = torch.randn(batch, 8)
        torch.testing.assert_close(compiled(q), score(q))
    assert len(graphs) <= 2  # one static graph, then one with a dynamic batch size


# -- the blocked CPU path (eager, CPU, banks of CPU_BLOCKED_MIN_ROWS rows or more) -------------


def plain_search(monkeypatch, *args, **kwargs):
    """``knn_search`` forced onto the plain chunk loop (the path compiled code takes)."""
    with monkeypatch.context() as m:
        m.setattr(knn_module, "CPU_BLOCKED_MIN_ROWS", 1 << 62)
        return knn_module.knn_search(*args, **kwargs)


def blocked_search(monkeypatch, *args, block_elements=None, **kwargs):
    calls = []
    real = knn_module._search_cpu

    def spy(*a, **kw):
        calls.append(1)
        return real(*a, **kw)

    with monkeypatch.context() as m:
        m.setattr(knn_module, "_search_cpu", spy)
        if block_elements is not None:
            m.setattr(knn_cpu, "CPU_BLOCK_ELEMENTS", block_elements)
        out = knn_module.knn_search(*args, **kwargs)
    assert calls, "the blocked CPU path was not taken"
    return out


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
@pytest.mark.parametrize(
    ("k", "chunk_size", "block_elements"),
    [
        (5, 16384, None),  # one chunk, grouped selection
        (1, 1000, None),  # 7 chunks, the last one partial
        (50, 3000, 5000),  # k = 50, one query per block
        (7, 5, None),  # chunk = k: plain topk per chunk
        (4100, 1000, 3 * 4100),  # k = bank size: every row, sorted
    ],
)
def test_blocked_cpu_search_equals_the_plain_loop(
    metric, k, chunk_size, block_elements, monkeypatch
):
    bank = offset_cloud(4100, 24, 3.0, 1.0, 7)
    query = offset_cloud(37, 24, 3.0, 1.0, 8)
    if metric == "cosine":
        bank = prepare_bank(bank, metric)
    args = (query, bank, k)
    kwargs = dict(metric=metric, chunk_size=chunk_size, bank_normalized=True)
    d, i = blocked_search(monkeypatch, *args, block_elements=block_elements, **kwargs)
    ref_d, ref_i = plain_search(monkeypatch, *args, **kwargs)
    if metric == "euclidean":  # the chosen distances are recomputed directly: bit for bit
        assert torch.equal(d, ref_d)
        # the same rows, except in the order of rows at exactly the same distance
        unique = (d.unsqueeze(2) == d.unsqueeze(1)).sum(dim=2) == 1
        assert unique.float().mean() > 0.9
        assert torch.equal(i[unique], ref_i[unique])
        return
    # cosine distances come from the product, whose rounding depends on the block's shape
    torch.testing.assert_close(d, ref_d, rtol=0, atol=1e-6)
    exact = 1 - query.double() @ bank.double().T
    torch.testing.assert_close(exact.gather(1, i), exact.gather(1, ref_i), rtol=0, atol=1e-5)


def test_blocked_cpu_search_on_exact_ties_differs_only_in_their_order(monkeypatch):
    bank = offset_cloud(5000, 16, 0.0, 1.0, 9)
    bank[2500:2600] = bank[:100]  # exact duplicates: ties at every distance
    query = torch.cat([bank[:100], offset_cloud(100, 16, 0.0, 1.0, 10)])
    d, i = blocked_search(monkeypatch, query, bank, 4)
    ref_d, ref_i = plain_search(monkeypatch, query, bank, 4)
    assert torch.equal(d, ref_d)
    assert (d[:100, :2] == 0).all()
    twin = torch.where(i >= 2500, i - 2500, i)  # a duplicate counts as its original
    ref_twin = torch.where(ref_i >= 2500, ref_i - 2500, ref_i)
    assert torch.equal(twin.sort(dim=1).values, ref_twin.sort(dim=1).values)


def test_blocked_cpu_search_keeps_dtypes_and_half_banks(monkeypatch):
    bank, query = offset_cloud(4500, 16, 5.0, 1.0, 11), offset_cloud(20, 16, 5.0, 1.0, 12)
    for dtype, expected in ((torch.float64, torch.float64), (torch.float16, torch.float32)):
        d, i = blocked_search(monkeypatch, query.to(dtype), bank.to(dtype), 3)
        ref_d, ref_i = plain_search(monkeypatch, query.to(dtype), bank.to(dtype), 3)
        assert d.dtype == expected
        assert torch.equal(d, ref_d) and torch.equal(i, ref_i)


def test_bank_rows_that_are_not_finite_take_the_plain_path(monkeypatch):
    bank, query = offset_cloud(4200, 8, 0.0, 1.0, 13), offset_cloud(10, 8, 0.0, 1.0, 14)
    bank[17, 3] = float("nan")
    bank[30, 0] = float("inf")
    taken = []
    monkeypatch.setattr(knn_module, "_search_cpu", lambda *a, **kw: taken.append(1))
    d, i = knn_module.knn_search(query, bank, 3)
    assert not taken
    assert not torch.isin(i, torch.tensor([17, 30])).any()
    assert torch.isfinite(d).all()


def test_nan_query_rows_stay_nan_and_other_rows_exact(monkeypatch):
    bank, query = offset_cloud(4200, 8, 0.0, 1.0, 15), offset_cloud(10, 8, 0.0, 1.0, 16)
    query[4, 2] = float("nan")
    d, i = blocked_search(monkeypatch, query, bank, 3)
    ref_d, ref_i = plain_search(monkeypatch, query, bank, 3)
    assert torch.isnan(d[4]).all()
    keep = torch.arange(10) != 4
    assert torch.equal(d[keep], ref_d[keep]) and torch.equal(i[keep], ref_i[keep])


@pytest.mark.parametrize(("width", "k"), [(1000, 1), (1000, 5), (4099, 7), (513, 50), (64, 3)])
def test_chunk_topk_is_exact(width, k):
    g = torch.Generator().manual_seed(width + k)
    d = torch.randn(40, width, generator=g)
    d[:5] = d[:5].round(decimals=1)  # many ties
    values, columns = chunk_topk(d, k)
    ref = d.topk(k, dim=1, largest=False)
    assert torch.equal(values, ref.values)
    assert torch.equal(d.gather(1, columns), values)
    assert (columns.sort(dim=1).values.diff(dim=1) > 0).all(), "a column chosen twice"


def test_row_sq_norms_equals_the_whole_computation():
    x = offset_cloud(1000, 33, 10.0, 3.0, 17)
    assert torch.equal(row_sq_norms(x, rows=7), x.pow(2).sum(dim=1))
    assert torch.equal(
        row_sq_norms(x.half(), torch.float32, rows=100), x.half().float().pow(2).sum(1)
    )


def test_knn_score_uses_the_blocked_path_and_keeps_its_results(monkeypatch):
    bank, query = offset_cloud(6000, 32, 50.0, 1.0, 18), offset_cloud(300, 32, 50.0, 1.0, 19)
    score = KNNScore(k=5).fit(bank)
    fast = blocked_search(
        monkeypatch, query - score.mean_, score.bank_, 5, bank_sq_norms=score.bank_sq_norms_
    )
    plain = plain_search(
        monkeypatch, query - score.mean_, score.bank_, 5, bank_sq_norms=score.bank_sq_norms_
    )
    assert torch.equal(fast[1], plain[1]) and torch.equal(fast[0], plain[0])
    assert torch.equal(score.knn_search(query)[1], plain[1])
    assert torch.equal(score.knn_search(query)[1], nearest_k(query, bank, 5))


def nearest_k(query: torch.Tensor, bank: torch.Tensor, k: int) -> torch.Tensor:
    return torch.cdist(query.double(), bank.double()).topk(k, dim=1, largest=False).indices


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
def test_blocked_cpu_search_without_onednn_gives_the_same_neighbours(metric, monkeypatch):
    bank = prepare_bank(offset_cloud(5000, 32, 2.0, 1.0, 20), metric)
    query = offset_cloud(50, 32, 2.0, 1.0, 21)
    norms = row_sq_norms(bank)
    kept = norms.clone()
    kwargs = dict(metric=metric, bank_sq_norms=norms, chunk_size=1500, bank_normalized=True)
    d, i = blocked_search(monkeypatch, query, bank, 6, **kwargs)
    assert torch.equal(norms, kept), "the caller's norms were changed"
    monkeypatch.setattr(knn_cpu, "onednn_linear", lambda: None)
    monkeypatch.setattr(knn_cpu, "bf16_linear", lambda: None)
    d2, i2 = blocked_search(monkeypatch, query, bank, 6, **kwargs)
    assert torch.equal(i, i2)
    torch.testing.assert_close(d, d2, rtol=0, atol=1e-6)
    assert torch.equal(i, plain_search(monkeypatch, query, bank, 6, **kwargs)[1])


def test_compiled_code_follows_the_float32_matmul_precision():
    """The fused kernel reads torch's precision switch through `assume_constant_result`; a
    compiled graph must not keep the value it was traced with (dynamo guards on it)."""
    from selectorch.search.triton_knn import _fp32_precision

    def f(x):
        return x * 2 if _fp32_precision() == "tf32x3" else x * 3

    compiled = torch.compile(f, backend="eager", fullgraph=True)
    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("highest")
        assert compiled(torch.ones(1)).item() == 2
        torch.set_float32_matmul_precision("high")
        assert compiled(torch.ones(1)).item() == 3
    finally:
        torch.set_float32_matmul_precision(before)
