"""kNN search stays exact where float arithmetic is hard, and compiles once for all batch sizes."""

from __future__ import annotations

import pytest
import torch

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
