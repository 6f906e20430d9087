"""The CPU search's certified bfloat16 pre-selection finds the float32 search's neighbours."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import selectorch.functional.knn as knn_module
import selectorch.functional.knn_bf16 as knn_bf16
import selectorch.functional.knn_cpu as knn_cpu
from selectorch import datasets
from selectorch.functional.distances import prepare_bank
from selectorch.functional.knn import row_sq_norms
from selectorch.scores import KNNScore

NATIVE = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
needs_bf16 = pytest.mark.skipif(not NATIVE, reason="no native bfloat16 product on this CPU")


def cloud(n: int, dim: int, offset: float, spread: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return offset + spread * torch.randn(n, dim, generator=g)


def both_searches(monkeypatch, query, bank, k, **kwargs):
    """(bf16 search, plain float32 chunk loop, the pre-selection's ``decided`` mask)."""
    decided = []
    real = knn_bf16.certified_bf16_search

    def spy(*args, **kw):
        out = real(*args, **kw)
        decided.append(out[2])
        return out

    with monkeypatch.context() as m:
        m.setattr(knn_cpu, "certified_bf16_search", spy)
        m.setattr(knn_cpu, "BF16_MIN_QUERIES", query.shape[0])  # one call: no probe
        fast = knn_module.knn_search(query, bank, k, **kwargs)
    with monkeypatch.context() as m:
        m.setattr(knn_module, "CPU_BLOCKED_MIN_ROWS", 1 << 62)
        plain = knn_module.knn_search(query, bank, k, **kwargs)
    assert len(decided) == 1, "the bfloat16 pre-selection did not run"
    return fast, plain, decided[0]


def assert_same_neighbours(query, bank, fast, plain, metric="euclidean"):
    """Neighbours at the same float64 distances; identical rows and distances almost always."""
    (d, i), (ref_d, ref_i) = fast, plain
    q, b = query.double(), bank.double()
    if metric == "cosine":
        q, b = F.normalize(q, dim=1), F.normalize(b, dim=1)

    def exact(idx):
        return (q.unsqueeze(1) - b[idx]).norm(dim=-1)

    torch.testing.assert_close(exact(i), exact(ref_i), rtol=1e-5, atol=1e-6)
    same = (i == ref_i).all(dim=1)
    assert same.float().mean() > 0.95
    if metric == "euclidean":  # distances of the chosen rows are recomputed directly
        assert torch.equal(d[same], ref_d[same])
    else:
        torch.testing.assert_close(d, ref_d, rtol=0, atol=1e-6)


def embeddings(n: int, dim: int, seed: int) -> torch.Tensor:
    """Rank-8 Gaussian rows plus isotropic noise, centred near 0 (like a fitted bank)."""
    basis = torch.randn(8, dim, generator=torch.Generator().manual_seed(0)) / 8**0.5
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 8, generator=g) @ basis + 0.25 * torch.randn(n, dim, generator=g)


@needs_bf16
def test_the_native_bf16_product_is_found_on_this_cpu():
    op = knn_cpu.bf16_linear()
    assert op is not None
    x = torch.tensor([[1.0, 2.0]], dtype=torch.bfloat16)
    y = op(x, x, torch.tensor([0.25]), "none", [], "")
    assert y.dtype == torch.bfloat16 and y.item() == 5.25


@pytest.mark.parametrize(("width", "take"), [(16384, 19), (5000, 7), (16384 + 37, 60), (40, 5)])
def test_strided_topk_is_exact(width, take):
    g = torch.Generator().manual_seed(width + take)
    y = torch.randn(30, width, generator=g)
    y[:5] = y[:5].round(decimals=1)  # many ties
    y = y.bfloat16()
    values, columns = knn_bf16.strided_topk(y, take)
    assert values.dtype == torch.float32 and values.shape == (30, take)
    assert torch.equal(values, y.float().topk(take, dim=1).values)
    assert torch.equal(y.float().gather(1, columns), values)
    assert (columns.sort(dim=1).values.diff(dim=1) > 0).all(), "a column chosen twice"


@needs_bf16
@pytest.mark.parametrize(
    ("dim", "offset", "spread", "bias"),
    [(3, 0.0, 1.0, True), (100, 50.0, 0.3, True), (700, 0.0, 1e-3, True), (64, 0.0, 1.0, False)],
)
def test_product_error_bounds_every_pair(dim, offset, spread, bias):
    query, bank = cloud(300, dim, offset, spread, 1), cloud(2000, dim, offset, spread, 2)
    query[:3] *= 1e4  # a few rows of very different scale
    c = -0.5 * row_sq_norms(bank) if bias else None
    q16, b16 = query.bfloat16(), bank.bfloat16()
    got = knn_cpu.bf16_linear()(q16, b16, c, "none", [], "").double()
    exact = query.double() @ bank.double().T + (c.double() if bias else 0.0)
    q_norm, q_err = knn_bf16._rounding_norms(query, q16)
    b_norm, b_err = (v.max() for v in knn_bf16._rounding_norms(bank, b16))
    c_max = c.abs().max() if bias else torch.zeros(())
    bound = knn_bf16.product_error(q_norm, q_err, b_norm, b_err, c_max, dim)
    total = bound.double()[:, None] + knn_bf16.OUTPUT_ROUNDING * got.abs()
    assert ((got - exact).abs() <= total).all()
    # not vacuous: about bfloat16's precision times the operands
    scale = q_norm.double()[:, None] * b_norm.double() + c_max.double()
    assert (bound.double()[:, None] < 0.02 * scale).all()


@needs_bf16
@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
@pytest.mark.parametrize(
    ("k", "chunk_size"), [(5, 16384), (1, 1000), (50, 3000), (3, 7), (4100, 16384)]
)
def test_bf16_search_equals_the_float32_search(metric, k, chunk_size, monkeypatch):
    bank, query = embeddings(4100, 48, 7), embeddings(200, 48, 8)
    if metric == "cosine":
        bank = prepare_bank(bank, metric)
    kwargs = dict(metric=metric, chunk_size=chunk_size, bank_normalized=True)
    fast, plain, decided = both_searches(monkeypatch, query, bank, k, **kwargs)
    assert decided.float().mean() > 0.9
    if k == bank.shape[0]:  # every row, sorted: the order of far rows at equal float distances
        assert (fast[1].sort(dim=1).values == torch.arange(k)).all()  # may differ
        assert (fast[0].diff(dim=1) >= 0).all()
        torch.testing.assert_close(fast[0], plain[0], rtol=1e-5, atol=1e-5)
        return
    assert_same_neighbours(query, bank, fast, plain, metric)


def mnist_features() -> tuple[torch.Tensor, torch.Tensor]:
    images, _ = datasets.mnist5k()
    net = datasets.mnist_net().eval()
    with torch.no_grad():
        feats = net.classifier[:2](net.features(images).flatten(1))
    return images.flatten(1), feats


@needs_bf16
@needs_bf16
def test_data_the_bound_cannot_decide_go_to_float32_after_the_probe(monkeypatch):
    bank = prepare_bank(cloud(4100, 48, 3.0, 1.0, 16), "cosine")  # similarities all near 1
    query = cloud(300, 48, 3.0, 1.0, 17)
    calls = []
    real = knn_bf16.certified_bf16_search

    def spy(query, **kw):
        out = real(query, **kw)
        calls.append((query.shape[0], out[2].float().mean().item()))
        return out

    kwargs = dict(metric="cosine", bank_normalized=True)
    with monkeypatch.context() as m:
        m.setattr(knn_cpu, "certified_bf16_search", spy)
        m.setattr(knn_cpu, "BF16_MIN_QUERIES", 100)
        d, i = knn_module.knn_search(query, bank, 5, **kwargs)
    assert len(calls) == 1 and calls[0][0] == 100 and calls[0][1] < 0.5
    with monkeypatch.context() as m:
        m.setattr(knn_module, "CPU_BLOCKED_MIN_ROWS", 1 << 62)
        plain = knn_module.knn_search(query, bank, 5, **kwargs)
    assert_same_neighbours(query, bank, (d, i), plain, "cosine")
    # euclidean search of the same rows is shifted to their mean and decided
    bank = cloud(4100, 48, 3.0, 1.0, 16)
    fast, plain, decided = both_searches(monkeypatch, query, bank, 5)
    assert decided.float().mean() > 0.9
    assert_same_neighbours(query, bank, fast, plain)


@needs_bf16
def test_bf16_search_on_mnist_pixels_and_cnn_features(monkeypatch):
    for data in mnist_features():
        bank, query = data[:4400], data[4400:]
        fast, plain, decided = both_searches(monkeypatch, query, bank, 5)
        assert decided.float().mean() > 0.95
        assert_same_neighbours(query, bank, fast, plain)
        exact = torch.cdist(query.double(), bank.double()).topk(5, largest=False).indices
        assert (fast[1] == exact).float().mean() > 0.99


@needs_bf16
def test_undecided_queries_are_searched_again_in_float32(monkeypatch):
    bank = cloud(4100, 32, 0.0, 1.0, 9)
    bank[:600] = bank[0] + 1e-5 * cloud(600, 32, 0.0, 1.0, 10)  # 600 rows nearly one point
    query = torch.cat([bank[:40] + 1e-6, cloud(60, 32, 0.0, 1.0, 11)])
    query[7, 3] = float("nan")
    fast, plain, decided = both_searches(monkeypatch, query, bank, 5)
    assert not decided[:40].any(), "a crowd of near-duplicates cannot be decided"
    assert not decided[7] and decided[40:].float().mean() > 0.9
    assert torch.isnan(fast[0][7]).all()
    # the undecided rows are searched by the float32 blocked search, as one batch
    undecided = (~decided).nonzero().squeeze(1)
    args = (5, "euclidean", None, knn_module.DEFAULT_CHUNK_SIZE, False, torch.float32)
    again = knn_cpu._search_float(query[undecided], bank, *args)
    assert torch.equal(fast[1][undecided], again[1])
    assert torch.equal(fast[0][undecided].nan_to_num(-1), again[0].nan_to_num(-1))
    rest = decided.nonzero().squeeze(1)
    assert_same_neighbours(
        query[rest], bank, (fast[0][rest], fast[1][rest]), (plain[0][rest], plain[1][rest])
    )


@needs_bf16
def test_half_bank_and_stored_norms(monkeypatch):
    bank, query = cloud(4500, 16, 5.0, 1.0, 12).half(), cloud(100, 16, 5.0, 1.0, 13)
    fast, plain, _ = both_searches(monkeypatch, query, bank, 3)
    assert_same_neighbours(query, bank, fast, plain)
    norms = row_sq_norms(bank, torch.float32)
    kept = norms.clone()
    fast, plain, _ = both_searches(monkeypatch, query, bank, 3, bank_sq_norms=norms)
    assert torch.equal(norms, kept), "the caller's norms were changed"
    assert_same_neighbours(query, bank, fast, plain)


@needs_bf16
def test_knn_score_of_a_large_batch_takes_the_bf16_path(monkeypatch):
    bank, query = cloud(6000, 64, 20.0, 1.0, 14), cloud(knn_cpu.BF16_MIN_QUERIES, 64, 20.0, 1.0, 15)
    score = KNNScore(k=5).fit(bank)
    calls = []
    real = knn_bf16.certified_bf16_search
    monkeypatch.setattr(
        knn_cpu, "certified_bf16_search", lambda *a, **kw: calls.append(1) or real(*a, **kw)
    )
    fast = score.score(query)
    assert calls, "the bfloat16 pre-selection did not run"
    monkeypatch.setattr(knn_cpu, "BF16_MIN_QUERIES", 1 << 30)
    assert torch.equal(fast, score.score(query))
    assert len(calls) == 1


# -- the bound's corners (found in review): each test fails if one term or step is dropped ------


def bf16_search(query, bank, k, chunk, metric="euclidean", norms=None):
    return knn_bf16.certified_bf16_search(
        query,
        bank,
        k,
        metric,
        norms,
        min(bank.shape[0], max(k, chunk)),
        64,
        False,
        knn_cpu.bf16_linear(),
    )


@needs_bf16
@pytest.mark.parametrize(("k", "chunk"), [(1, 8), (5, 10), (3, 7), (5, 100), (1, 16384)])
def test_a_crowd_float32_resolves_and_bfloat16_cannot_is_never_decided_wrongly(k, chunk):
    """600 rows 3e-2 apart around one point: float32 ranks them, bfloat16 cannot; chunks
    narrower than keep + 1 exercise the rows let go at the merge alone."""
    g = torch.Generator().manual_seed(0)
    bank = torch.randn(4100, 32, generator=g)
    bank[:600] = bank[0] + 3e-2 * torch.randn(600, 32, generator=g)
    query = bank[0] + 1e-2 * torch.randn(64, 32, generator=g)
    _, i, decided = bf16_search(query, bank, k, chunk)
    ref = knn_cpu._search_float(query, bank, k, "euclidean", None, chunk, False, torch.float32)
    assert torch.equal(i[decided], ref[1][decided])


@needs_bf16
def test_rounding_norms_of_tiny_rows_do_not_underflow(monkeypatch):
    """|b - b~| of rows near 1e-21 squares below float32's range: the bound must keep it."""
    d, s = 64, 2.0**-70
    half = d // 2
    near = torch.cat([torch.full((half,), s * (1 + 0.49 * 2**-7)), torch.full((half,), -s)])
    other = torch.cat([torch.full((half,), s), torch.full((half,), -s)])
    fillers = other.repeat(14, 1)
    other[:8] = s * (1 + 2**-7)  # bfloat16-exact, truly farther than `near`, above it in bf16
    far = 10 * torch.randn(4096, d, generator=torch.Generator().manual_seed(0))
    far -= far.mean(dim=1, keepdim=True)  # q.b = 0 for the query of ones: every row is far
    bank = torch.cat([near[None], other[None], fillers, far])
    assert knn_bf16._shift(bank) is None
    _, err = knn_bf16._rounding_norms(near[None], near[None].bfloat16())
    assert err.item() > 0
    _, i, decided = bf16_search(torch.ones(4, d), bank, 1, 16)
    assert (i[decided] == 0).all()
    with monkeypatch.context() as m:  # undecided queries are searched again in float32
        m.setattr(knn_cpu, "BF16_MIN_QUERIES", 4)
        args = (1, "euclidean", None, 16, False, torch.float32)
        assert (knn_cpu.search_cpu(torch.ones(4, d), bank, *args)[1] == 0).all()


@needs_bf16
def test_the_bias_is_added_in_float32():
    op = knn_cpu.bf16_linear()
    for dim, rows, width in [(3, 1, 4), (100, 64, 300), (2048, 512, 2048)]:
        q = torch.zeros(rows, dim, dtype=torch.bfloat16)
        q[:, -1] = 1
        b = torch.zeros(width, dim, dtype=torch.bfloat16)
        b[:, -1] = -1
        y = op(q, b, torch.full((width,), 1 + 2**-12), "none", [], "")
        assert (y.float() == 2**-12).all()  # a bfloat16 bias would give 0


@needs_bf16
@pytest.mark.parametrize("dim", [64, 1000, 4000])
def test_product_error_covers_float32_sums_of_exact_inputs(dim):
    """bfloat16-exact operands and cancelling products: only the float32 sums err."""
    g = torch.Generator().manual_seed(dim)
    # magnitudes over 2**24: most sums round in any order (with 2**-4..2**8 none of the D = 64
    # sums rounded on an AMX CPU, and the test had nothing to check)
    scale = 2.0 ** torch.randint(-12, 12, (300, dim // 2), generator=g)
    x = (torch.randn(300, dim // 2, generator=g) * scale).bfloat16().float()
    bank = torch.cat([x, -x.roll(1, dims=1)], dim=1)
    query = torch.ones(40, dim)
    q16, b16 = query.bfloat16(), bank.bfloat16()
    got = knn_cpu.bf16_linear()(q16, b16, None, "none", [], "").double()
    exact = query.double() @ bank.double().T
    assert (got != exact).any(), "no rounding to cover"
    q_norm, q_err = knn_bf16._rounding_norms(query, q16)
    b_norm, b_err = (v.max() for v in knn_bf16._rounding_norms(bank, b16))
    bound = knn_bf16.product_error(q_norm, q_err, b_norm, b_err, torch.zeros(()), dim).double()
    assert ((got - exact).abs() <= bound[:, None] + knn_bf16.OUTPUT_ROUNDING * got.abs()).all()


@needs_bf16
def test_product_error_of_a_shifted_search_bounds_the_true_distances():
    g = torch.Generator().manual_seed(3)
    bank = 300.0 + torch.randn(2000, 48, generator=g)
    query = 300.0 + torch.randn(200, 48, generator=g)
    shift = knn_bf16._shift(bank)
    assert shift is not None
    qs, bs = query - shift, bank - shift
    c = bs.pow(2).sum(dim=1).mul(-0.5)
    q16, b16 = qs.bfloat16(), bs.bfloat16()
    got = knn_cpu.bf16_linear()(q16, b16, c, "none", [], "").double()
    # the ranking key of the true distances, with the same per-query constant |q_s|^2 / 2
    true_sq = torch.cdist(query.double(), bank.double()) ** 2
    exact = 0.5 * (qs.double().pow(2).sum(1, keepdim=True) - true_sq)
    q_norm, q_err = knn_bf16._rounding_norms(qs, q16)
    b_norm, b_err = (v.max() for v in knn_bf16._rounding_norms(bs, b16))
    bound = knn_bf16.product_error(q_norm, q_err, b_norm, b_err, c.abs().max(), 48, True)
    total = bound.double()[:, None] + knn_bf16.OUTPUT_ROUNDING * got.abs()
    assert ((got - exact).abs() <= total).all()


@needs_bf16
def test_the_probe_and_the_rest_share_one_conversion_of_the_bank(monkeypatch):
    bank, query = embeddings(5000, 32, 20), embeddings(120, 32, 21)
    prepared = []
    real = knn_bf16.BankChunks._prepare

    def spy(self, start):
        prepared.append(start)
        return real(self, start)

    monkeypatch.setattr(knn_bf16.BankChunks, "_prepare", spy)
    monkeypatch.setattr(knn_cpu, "BF16_MIN_QUERIES", 50)
    d, i = knn_module.knn_search(query, bank, 3, chunk_size=2000)
    assert prepared == [0, 2000, 4000]  # once, though the probe and the rest are two searches
    monkeypatch.setattr(knn_bf16, "CACHE_BYTES", 0)  # too large to keep: prepared per search
    prepared.clear()
    d2, i2 = knn_module.knn_search(query, bank, 3, chunk_size=2000)
    assert prepared == [0, 2000, 4000] * 2
    assert torch.equal(i, i2) and torch.equal(d, d2)
