"""The fused Triton kNN search (selectorch.search) against the plain torch search.

Tests marked ``gpu`` run on the GPU machine; the others check that the module imports and
dispatches correctly where there is no CUDA device (CI).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from selectorch.functional import knn_search
from selectorch.search import MAX_K, fused_knn_search, supports

gpu = pytest.mark.gpu


def make(n_query, n_bank, dim, *, dtype=torch.float32, metric="euclidean", seed=0, device="cuda"):
    """Rank-16 structure plus isotropic noise: neighbours are well separated, as in embeddings."""
    g = torch.Generator().manual_seed(seed)
    basis = torch.randn(16, dim, generator=g) / 4
    bank = torch.randn(n_bank, 16, generator=g) @ basis
    bank += 0.3 * torch.randn(n_bank, dim, generator=g)
    query = torch.randn(n_query, 16, generator=g) @ basis
    query += 0.3 * torch.randn(n_query, dim, generator=g)
    if metric == "cosine":
        bank = F.normalize(bank, dim=1)
    return query.to(device), bank.to(device=device, dtype=dtype)


def recall(found: torch.Tensor, ref: torch.Tensor) -> float:
    k = ref.shape[1]
    pairs = zip(found.cpu(), ref.cpu(), strict=True)
    hits = sum(len(set(a.tolist()) & set(b.tolist())) for a, b in pairs)
    return hits / (ref.shape[0] * k)


def test_supports_is_false_for_cpu_tensors_and_import_needs_no_triton_kernel():
    query, bank = torch.randn(3, 32), torch.randn(100, 32)
    assert supports(query, bank, 5) is False
    with pytest.raises(ValueError, match="fused_knn_search needs Triton"):
        fused_knn_search(query, bank, 5)


def test_unknown_metric_is_rejected_with_its_name():
    with pytest.raises(ValueError, match="`metric`.*'manhattan'"):
        fused_knn_search(torch.randn(3, 32), torch.randn(100, 32), 5, metric="manhattan")


@gpu
def test_supports_rejects_what_the_kernel_cannot_serve():
    query, bank = make(4, 1000, 64)
    assert supports(query, bank, 5)
    assert not supports(query[:, :40], bank[:, :40], 5)  # D not a multiple of 16
    assert not supports(query, bank, MAX_K + 1)
    assert not supports(query, bank[:3], 5)  # k > M
    assert not supports(query, bank.to(torch.float64), 5)
    assert not supports(query.cpu(), bank, 5)
    assert not supports(query, bank.T.contiguous().T, 5)  # column stride != 1


@gpu
@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
@pytest.mark.parametrize(("n_query", "k"), [(1, 1), (7, 5), (300, 50), (64, 100), (130, MAX_K)])
def test_fp32_fused_search_equals_plain_search(metric, n_query, k):
    query, bank = make(n_query, 20_011, 96, metric=metric, seed=n_query + k)
    d, i = fused_knn_search(query, bank, k, metric=metric)
    d_ref, i_ref = knn_search(query, bank, k, metric=metric)
    assert d.shape == (n_query, k) and i.shape == (n_query, k) and i.dtype == torch.int64
    # same neighbours, up to the order of distances equal to the last bit
    assert recall(i, i_ref) >= 0.999 and (i == i_ref).float().mean() >= 0.999
    torch.testing.assert_close(d, d_ref, rtol=1e-5, atol=1e-5)
    assert torch.all(d[:, 1:] >= d[:, :-1])


@gpu
@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
def test_transposed_queries_and_half_norms_give_the_plain_result(metric):
    query, bank = make(300, 20_011, 96, metric=metric, seed=5)
    d, i = fused_knn_search(query, bank, 10, metric=metric)
    strided = query.T.contiguous().T  # the same values, column-major
    assert not strided.is_contiguous()
    d_t, i_t = fused_knn_search(strided, bank, 10, metric=metric)
    assert (i_t == i).float().mean() >= 0.999
    torch.testing.assert_close(d_t, d, rtol=1e-5, atol=1e-5)
    if metric == "euclidean":
        # half-precision norms are recomputed (as every search does), not used as given:
        # these, all 65504, would rank every row by -2 q.b alone
        wrong = torch.full((bank.shape[0],), 65504.0, dtype=torch.float16, device="cuda")
        d_h, i_h = fused_knn_search(query, bank, 10, metric=metric, bank_sq_norms=wrong)
        assert torch.equal(i_h, i) and torch.equal(d_h, d)


@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
def test_reduced_precision_recall_against_fp32_exact_search(dtype, metric):
    query, bank = make(256, 50_000, 512, metric=metric, seed=3)
    _, i_ref = knn_search(query, bank, 50, metric=metric)
    low = bank.to(dtype)
    d, i = fused_knn_search(query, low, 50, metric=metric)
    assert recall(i, i_ref) >= 0.99
    assert d.dtype == torch.float32  # promoted with the fp32 query
    # distances are exact (fp32) for the stored rows that were chosen
    rows = low[i].float()
    if metric == "euclidean":
        exact = (query[:, None, :] - rows).pow(2).sum(-1).sqrt()
    else:
        exact = 1 - (rows @ F.normalize(query, dim=1)[:, :, None]).squeeze(-1)
    torch.testing.assert_close(d, exact, rtol=1e-5, atol=1e-5)


@gpu
def test_bf16_query_and_bank_return_bf16_distances():
    query, bank = make(33, 5000, 64)
    d, i = fused_knn_search(query.bfloat16(), bank.bfloat16(), 10)
    assert d.dtype == torch.bfloat16 and i.shape == (33, 10)


@gpu
@pytest.mark.parametrize("config", [
    dict(block_q=16, block_n=32, block_d=16, num_warps=4, num_stages=2, splits_per_sm=0),
    dict(block_q=64, block_n=64, block_d=32, num_warps=4, num_stages=3, splits_per_sm=0),
    dict(block_q=128, block_n=128, block_d=64, num_warps=8, num_stages=3, splits_per_sm=1),
    dict(block_q=32, block_n=64, block_d=32, num_warps=4, num_stages=3, splits_per_sm=0,
         chunk_tiles=1, rounds=0),
    dict(block_q=128, block_n=128, block_d=64, num_warps=8, num_stages=3, splits_per_sm=0,
         chunk_tiles=2, rounds=3, maxnreg=128),
    # tiles loaded by pointers (no tensor descriptors) and the first epilogue
    dict(block_q=64, block_n=64, block_d=32, num_warps=4, num_stages=3, splits_per_sm=0,
         tma=False, epilogue=0),
    dict(block_q=128, block_n=256, block_d=64, num_warps=8, num_stages=4, splits_per_sm=0,
         chunk_tiles=1, rounds=1),
    dict(block_q=128, block_n=256, block_d=64, num_warps=8, num_stages=4, splits_per_sm=0,
         chunk_tiles=2, rounds=2, epilogue=1),
])
def test_compaction_of_long_splits_keeps_the_exact_neighbours(config):
    # splits_per_sm=0 means a single split per query tile and sample=False starts from no
    # threshold: the first tiles append every score (many rounds per tile), and every buffer
    # fills and is compacted many times over
    query, bank = make(150, 30_000, 64, seed=11)
    d, i = fused_knn_search(query, bank, 20, _config=dict(config, sample=False))
    d_ref, i_ref = knn_search(query, bank, 20)
    assert recall(i, i_ref) >= 0.999
    torch.testing.assert_close(d, d_ref, rtol=1e-5, atol=1e-5)


@gpu
def test_duplicate_rows_give_the_distances_of_the_plain_search():
    g = torch.Generator().manual_seed(5)
    distinct = torch.randn(40, 32, generator=g)
    bank = distinct[torch.randint(0, 40, (6000,), generator=g)].cuda()
    query = torch.randn(9, 32, generator=g).cuda()
    d, i = fused_knn_search(query, bank, 60, _config=dict(splits_per_sm=0, sample=False))
    d_ref, _ = knn_search(query, bank, 60)
    torch.testing.assert_close(d, d_ref, rtol=1e-5, atol=1e-5)
    assert all(len(set(row.tolist())) == 60 for row in i.cpu())  # no index twice


@gpu
def test_sorted_bank_with_neighbours_in_one_split_is_exact():
    # rows sorted by their first coordinate: a query's neighbours sit in one contiguous run, so
    # one split holds far more candidates below the sample threshold than its buffer
    query, bank = make(64, 40_000, 64, seed=4)
    bank = bank[bank[:, 0].argsort()]
    d, i = fused_knn_search(query, bank, 50)
    d_ref, i_ref = knn_search(query, bank, 50)
    assert recall(i, i_ref) >= 0.999
    torch.testing.assert_close(d, d_ref, rtol=1e-5, atol=1e-5)


@gpu
def test_nan_bank_rows_are_never_chosen():
    query, bank = make(20, 4000, 64)
    bank[::7] = float("nan")
    d, i = fused_knn_search(query, bank, 10)
    keep = torch.ones(4000, dtype=torch.bool, device="cuda")
    keep[::7] = False
    d_ref, i_ref = knn_search(query, bank[keep], 10)
    assert torch.equal(i, keep.nonzero().squeeze(1)[i_ref])
    torch.testing.assert_close(d, d_ref)


@gpu
def test_large_norms_still_give_exact_distances_for_the_chosen_neighbours():
    # |b|^2 - 2 q.b cancels badly in fp32 here (as in the plain search, which chooses by the
    # same expansion); the contract is that the returned distances are exact and sorted
    query, bank = make(50, 10_000, 128)
    query, bank = query + 1000.0, bank + 1000.0
    d, i = fused_knn_search(query, bank, 5)
    exact = (query[:, None, :] - bank[i]).pow(2).sum(-1).sqrt()
    torch.testing.assert_close(d, exact)
    assert torch.all(d[:, 1:] >= d[:, :-1])


@gpu
def test_precomputed_norms_give_the_same_result():
    query, bank = make(40, 10_000, 64)
    norms = bank.pow(2).sum(1)
    d1, i1 = fused_knn_search(query, bank, 8, bank_sq_norms=norms)
    d2, i2 = fused_knn_search(query, bank, 8)
    assert torch.equal(i1, i2)
    torch.testing.assert_close(d1, d2)


@gpu
def test_bank_not_aligned_for_tensor_descriptors_gives_the_same_neighbours():
    # a bank view 4 bytes past a 16-byte boundary cannot back a tensor descriptor: the kernel
    # then loads its tiles through pointers, with the same result
    query, bank = make(200, 20_000, 64, seed=13)
    storage = torch.empty(bank.numel() + 1, device="cuda")
    shifted = storage[1:].view_as(bank)
    shifted.copy_(bank)
    assert shifted.data_ptr() % 16 != 0
    d, i = fused_knn_search(query, shifted, 20)
    d_ref, i_ref = fused_knn_search(query, bank, 20)
    assert torch.equal(i, i_ref)
    torch.testing.assert_close(d, d_ref)


@gpu
@pytest.mark.parametrize("resident_max", [0, 16384])
def test_selection_kernels_equal_topk(monkeypatch, resident_max):
    # resident_max 0: every row is read in chunks at each step; else rows stay in registers
    from selectorch.search.triton_knn import _kernels

    ops = _kernels()
    monkeypatch.setattr(ops, "SELECT_RESIDENT_MAX", resident_max)
    g = torch.Generator(device="cuda").manual_seed(0)
    values = torch.randn(300, 5000, device="cuda", generator=g)
    values[:, ::3] = float("inf")
    values[7, 10:100] = -10.0  # 90 ties at the 50th value: the first positions win
    idx = (torch.arange(5000, dtype=torch.int32, device="cuda") + 7).expand(300, -1).contiguous()
    sel = ops.knn_select(values, idx, 50)
    ref = idx.gather(1, values.topk(50, dim=1, largest=False).indices)
    rows = torch.arange(300, device="cuda") != 7
    assert torch.equal(sel[rows].sort(1).values, ref[rows].sort(1).values)
    assert torch.equal(sel[7], idx[7, 10:60])
    # the bound: scale * prod + bias[::7], NaN last, + margin |q| sqrt(max bias), min with prev
    query = torch.randn(300, 64, device="cuda", generator=g)
    bias = 10 * torch.rand(35_000, device="cuda", generator=g)
    prod = torch.randn(300, 5000, device="cuda", generator=g)
    prod[3, 11] = float("nan")
    prev = torch.randn(300, device="cuda", generator=g) + 20
    tau = ops.knn_threshold(prod, query, bias[::7], bias.max(), prev, -2.0, 1e-3, 50,
                            True, True, True, True)
    score = (-2.0 * prod + bias[::7]).nan_to_num(nan=float("inf"))
    kth = score.topk(50, dim=1, largest=False).values.amax(1)
    bound = kth + 1e-3 * (query.norm(dim=1) * bias.max().sqrt() * 1.01 + 1e-30)
    torch.testing.assert_close(tau, torch.minimum(bound, prev))
    # fewer than 50 finite scores: no bound (+inf), so prev
    few = torch.full((300, 64), float("inf"), device="cuda")
    few[:, :10] = 1.0
    tau = ops.knn_threshold(few, query, few, few, prev, 1.0, 1e-3, 50, False, False, False, True)
    assert torch.equal(tau, prev)


@gpu
@pytest.mark.parametrize("cosine", [False, True])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.float16])
def test_finish_kernel_ranks_exact_distances_with_ties_by_position_and_nan_last(cosine, out_dtype):
    from selectorch.search.triton_knn import _kernels

    g = torch.Generator().manual_seed(0)
    bank = torch.randn(3000, 96, generator=g).to(device="cuda", dtype=torch.bfloat16)
    query = torch.randn(40, 96, generator=g).to(device="cuda", dtype=torch.bfloat16)
    chosen = torch.stack([torch.randperm(3000, generator=g)[:62] for _ in range(40)]).int().cuda()
    bank[chosen[5, 20]] = bank[chosen[5, 3]]  # two rows, one content: the first position wins
    bank[chosen[9, 0]] = float("nan")  # a NaN distance ranks after every number
    dist, rows = _kernels().knn_finish(query, bank, chosen, 50, cosine, out_dtype)
    rows_of = bank[chosen.long()].float()
    if cosine:
        ref = 1 - (rows_of * query.float()[:, None]).sum(-1)
    else:
        ref = (query.float()[:, None] - rows_of).pow(2).sum(-1).sqrt()
    ref = ref.nan_to_num(nan=float("inf"))
    # a stable sort: ties keep their positions
    order = torch.sort(ref, dim=1, stable=True).indices[:, :50]
    assert dist.shape == rows.shape == (40, 50)
    assert dist.dtype == out_dtype and rows.dtype == torch.int64
    assert torch.equal(rows, chosen.long().gather(1, order))
    tol = 1e-5 if out_dtype == torch.float32 else 1e-3  # one fp16 rounding apart at most
    torch.testing.assert_close(dist.float(), ref.gather(1, order).float(), rtol=tol, atol=tol)
    nan_row, _ = _kernels().knn_finish(query, bank, chosen, 62, cosine, out_dtype)
    assert torch.isnan(nan_row[9, -1]) and torch.isfinite(nan_row[9, :-1]).all()


def test_sample_groups_leave_at_least_32_groups_per_selected_rank():
    from selectorch.search.triton_knn import _sample_group

    # headline: 40,037 sample rows, 62 ranks -> groups of 20 (2,001 keys)
    assert _sample_group(40_037, 62, 32) == 20
    assert _sample_group(40_037, 62, 8) == 8  # capped
    assert _sample_group(4_106, 62, 32) == 2
    assert _sample_group(1_000, 62, 32) == 1  # too few rows: the scores themselves


@gpu
@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("has_bias", [False, True])
def test_group_minima_bound_the_sample_scores(transposed, has_bias):
    from selectorch.search.triton_knn import _kernels

    ops = _kernels()
    g = torch.Generator(device="cuda").manual_seed(3)
    n_query, n_rows, group = 300, 10_007, 7
    prod = torch.randn(n_query, n_rows, device="cuda", generator=g)
    if transposed:  # the layout of the sample product (sample @ q.T).T
        prod = prod.T.contiguous().T
    prod[4, 123] = float("nan")
    bias_all = 10 * torch.rand(3 * n_rows, device="cuda", generator=g)
    bias = bias_all[::3]
    keys = ops.knn_group_minima(prod, bias, -2.0, has_bias, group)
    n_keys = n_rows // group
    assert keys.shape == (n_keys, n_query)
    score = (-2.0 * prod + (bias if has_bias else 0.0)).nan_to_num(nan=float("inf"))
    # key j: the smallest score of rows j, j + n_keys, ... (the last n_rows % group rows out)
    ref = score[:, : n_keys * group].unflatten(1, (group, n_keys)).amin(1)
    assert torch.equal(keys.T, ref)
    # the bound over the keys is never below the k-th smallest score of the sample
    query = torch.randn(n_query, 16, device="cuda", generator=g)  # (read for the margin, 0)
    tau = ops.knn_threshold(keys.T, query, keys, bias_all.max(), keys, 1.0, 0.0, 50,
                            False, False, False, False)
    kth = score.topk(50, dim=1, largest=False).values.amax(1)
    assert (tau >= kth).all()
    torch.testing.assert_close(tau, ref.topk(50, dim=1, largest=False).values.amax(1))


@gpu
@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("config", [
    dict(),  # a dense first sample reduced to group minima (every 32nd row, groups of 8)
    dict(sample_step=1024, sample_group=1),  # a sparse one, refined by the kernel (step 520)
])
def test_sample_thresholds_keep_the_exact_neighbours(monkeypatch, metric, dtype, config):
    from selectorch.search import triton_knn as tk

    ops = tk._kernels()
    query, bank = make(130, 150_000, 64, metric=metric, seed=12)
    rows = bank.to(dtype)
    # the bound is at or above every query's n_sel-th smallest score of the whole bank
    cosine = metric == "cosine"
    q = F.normalize(query, dim=1) if cosine else query
    q_k = q.to(dtype)
    bias = rows.float().pow(2).sum(1)
    scale = -1.0 if cosine else -2.0
    cfg = dict(tk._default_config(130, 64, dtype), **config)
    n_sel = tk._n_selected(10, rows.shape[0])
    calls = []
    group_minima = ops.knn_group_minima
    monkeypatch.setattr(ops, "knn_group_minima", lambda *a: calls.append(a[-1]) or group_minima(*a))
    tau = tk._threshold(q_k, rows, bias, scale, cosine, n_sel, "tf32x3", cfg)
    assert calls == ([8] if not config else [])  # groups of 8 rows on the default path only
    score = scale * (q_k.float() @ rows.float().T) + (0.0 if cosine else bias)
    assert (tau >= score.kthvalue(n_sel, dim=1).values).all()
    d, i = fused_knn_search(query, rows, 10, metric=metric, _config=config)
    d_ref, i_ref = knn_search(query, rows.float(), 10, metric=metric)
    assert recall(i, i_ref) >= (0.999 if dtype == torch.float32 else 0.99)
    if dtype == torch.float32:
        torch.testing.assert_close(d, d_ref, rtol=1e-5, atol=1e-5)
    # the same search without any threshold gives the same neighbours
    _, i_all = fused_knn_search(query, rows, 10, metric=metric, _config=dict(sample=False))
    assert recall(i, i_all) >= 0.999


def test_bound_rises_above_a_kth_that_swallows_the_margin():
    from selectorch.search.triton_knn import _bound

    # a zero query's margin (rel_error * 1e-30) is lost in kth = 64: the bound must still be
    # above kth, or scores tied at kth (candidates pass only below the bound) are all lost
    kth = torch.tensor([64.0, 1e6, 0.0, -3.0])
    tau = _bound(kth, torch.zeros(4, 8), None, -2.0, 1e-6)
    assert (tau > kth).all()
    assert tau[0] == torch.nextafter(torch.tensor(64.0), torch.tensor(100.0))
    # an ordinary margin is kept as it is
    ok = _bound(torch.tensor([1.0]), torch.ones(1, 4), None, -2.0, 1e-3)
    torch.testing.assert_close(ok, torch.tensor([1.0 + 2e-3 * (2 * 1.01 + 1e-30)]))


@gpu
@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
@pytest.mark.parametrize("n_query", [20, 200])  # topk bound / selection-kernel bound
def test_zero_queries_with_tied_scores_get_k_distinct_rows(metric, n_query):
    # every score ties with the bound's kth, and a zero query's margin is lost in its rounding
    g = torch.Generator().manual_seed(4)
    bank = (torch.randint(0, 2, (50_000, 64), generator=g) * 2 - 1).float()
    if metric == "cosine":
        bank = F.normalize(bank, dim=1)
    query = torch.zeros(n_query, 64, device="cuda")
    d, i = fused_knn_search(query, bank.cuda().bfloat16(), 10, metric=metric)
    assert all(len(set(row.tolist())) == 10 for row in i.cpu())
    expected = 8.0 if metric == "euclidean" else 1.0
    assert torch.equal(d.float(), torch.full((n_query, 10), expected, device="cuda"))


@gpu
def test_search_under_autocast_equals_search_without_it():
    # the bank sample's threshold must not be rounded to bf16 by autocast
    query, bank = make(256, 60_000, 128, seed=6)
    d_ref, i_ref = knn_search(query, bank, 30)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        d, i = fused_knn_search(query, bank, 30)
    assert d.dtype == torch.float32 and recall(i, i_ref) >= 0.999
    torch.testing.assert_close(d, d_ref, rtol=1e-5, atol=1e-5)


@gpu
def test_clustered_bank_in_class_order_is_exact():
    # rows grouped by class, as a bank recorded from an ImageFolder: a query's neighbours fill
    # whole tiles, so tiles take many rounds of appends and buffers are compacted mid-split
    g = torch.Generator().manual_seed(8)
    centres = 3 * torch.randn(40, 64, generator=g)
    labels = torch.arange(40).repeat_interleave(1500)
    bank = (centres[labels] + 0.5 * torch.randn(labels.numel(), 64, generator=g)).cuda()
    query = (centres[torch.randint(0, 40, (200,), generator=g)]
             + 0.5 * torch.randn(200, 64, generator=g)).cuda()
    for dtype in (torch.float32, torch.bfloat16):
        rows = bank.to(dtype)
        d, i = fused_knn_search(query, rows, 50)
        # the reference searches exactly the stored rows, in fp32
        d_ref, i_ref = knn_search(query, rows.float(), 50)
        assert recall(i, i_ref) >= (0.999 if dtype == torch.float32 else 0.99)
        if dtype == torch.float32:
            torch.testing.assert_close(d, d_ref, rtol=1e-5, atol=1e-5)


@gpu
def test_tf32_precision_setting_keeps_recall():
    query, bank = make(64, 20_000, 256, seed=2)
    _, i_ref = knn_search(query, bank, 20)
    old = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")
    try:
        _, i = fused_knn_search(query, bank, 20)
    finally:
        torch.set_float32_matmul_precision(old)
    assert recall(i, i_ref) >= 0.99


@gpu
@pytest.mark.parametrize(("dtype", "maxnreg", "n_query", "n_bank"), [
    (torch.bfloat16, 0, 32, 8000), (torch.bfloat16, 128, 32, 8000),
    (torch.float32, 128, 32, 8000),
    (torch.bfloat16, 0, 160, 8000),  # enough queries for the selection kernels
    (torch.bfloat16, 0, 160, 40_000),  # and a sample reduced to group minima (groups of 2)
])
def test_compile_fullgraph_matches_eager_without_recompiling(dtype, maxnreg, n_query, n_bank):
    query, bank = make(n_query, n_bank, 64, dtype=dtype)
    norms = bank.float().pow(2).sum(1)

    def search(x):
        return fused_knn_search(x, bank, 7, bank_sq_norms=norms, _config=dict(maxnreg=maxnreg))

    compiled = torch.compile(search, fullgraph=True)
    d, i = compiled(query)
    d_eager, i_eager = search(query)
    assert torch.equal(i, i_eager)
    torch.testing.assert_close(d, d_eager)
    frames = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    d2, _ = compiled(query + 0.5)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == frames
    assert d2.shape == (n_query, 7)


@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
@pytest.mark.parametrize(("n_query", "n_bank", "dim", "k"), [
    (130, 40_000, 256, 50), (300, 20_001, 128, MAX_K), (256, 70_000, 64, 10),
])
def test_warp_specialised_kernel_equals_the_triton_kernel(dtype, metric, n_query, n_bank, dim,
                                                           k):
    # the Gluon kernel (Hopper; elsewhere both runs take the Triton kernel) chooses the same
    # candidates from the same scores, also as the refinement sample's kernel (a sparse first
    # sample: the 70,000-row bank is refined from every 243rd row); the Triton run starts from
    # the default bound (for the 70,000-row bank from group minima, groups of 3)
    query, bank32 = make(n_query, n_bank, dim, metric=metric, seed=5)
    bank = bank32.to(dtype)
    sparse = dict(sample_step=1024, sample_group=1)
    d_ws, i_ws = fused_knn_search(query, bank, k, metric=metric,
                                  _config=dict(sparse, ws=True, refine_ws=True))
    d_tr, i_tr = fused_knn_search(query, bank, k, metric=metric, _config=dict(ws=False))
    assert recall(i_ws, i_tr) >= 0.999
    torch.testing.assert_close(d_ws, d_tr, rtol=1e-5, atol=1e-5)
    _, i_ref = knn_search(query, bank32, k, metric=metric)
    assert recall(i_ws, i_ref) >= 0.99


@gpu
@pytest.mark.parametrize("splits_per_sm", [0, 2])
def test_warp_specialised_kernel_compacts_without_a_threshold(splits_per_sm):
    # no sample: every score passes, each consumer's half buffer fills and is compacted many
    # times, and the two halves are merged into the split's top k
    query, bank = make(150, 30_000, 64, dtype=torch.bfloat16, seed=11)
    cfg = dict(sample=False, splits_per_sm=splits_per_sm)
    d_ws, i_ws = fused_knn_search(query, bank, 20, _config=dict(cfg, ws=True))
    d_tr, i_tr = fused_knn_search(query, bank, 20, _config=dict(cfg, ws=False))
    assert recall(i_ws, i_tr) >= 0.999
    torch.testing.assert_close(d_ws, d_tr, rtol=1e-5, atol=1e-5)


@gpu
def test_warp_specialised_kernel_keeps_neighbours_in_one_split():
    # a bank in class order: all of a query's candidates lie in one split (compaction there)
    query, bank = make(200, 60_000, 128, seed=2)
    order = torch.argsort(bank @ query[0])
    bank = bank[order].contiguous().bfloat16()
    d_ws, i_ws = fused_knn_search(query, bank, 50, _config=dict(ws=True))
    d_tr, i_tr = fused_knn_search(query, bank, 50, _config=dict(ws=False))
    assert recall(i_ws, i_tr) >= 0.999
    torch.testing.assert_close(d_ws, d_tr, rtol=1e-5, atol=1e-5)
