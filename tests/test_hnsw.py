"""Tests of the hnsw search backend: recall against exact search, scores, compile, persistence
with a fingerprint, state_dict round trips, lazy import and argument errors."""

from __future__ import annotations

import copy
import gc
import subprocess
import sys

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

from selectorch.functional import knn_search
from selectorch.scores import CosineScore, EuclideanScore, KNNScore, create_score
from selectorch.search.hnsw import (
    HNSWIndex,
    IndexMismatchError,
    bank_fingerprint,
    hnsw_search,
)


def clustered(n: int, d: int, *, clusters: int = 20, queries: int = 500, seed: int = 0):
    """``(n, d)`` bank and ``(queries, d)`` queries drawn from the same Gaussian clusters."""
    g = torch.Generator().manual_seed(seed)
    centres = 4.0 * torch.randn(clusters, d, generator=g)
    bank = centres[torch.randint(clusters, (n,), generator=g)] + torch.randn(n, d, generator=g)
    query = centres[torch.randint(clusters, (queries,), generator=g)]
    return bank, query + torch.randn(queries, d, generator=g)


def recall(found: torch.Tensor, exact: torch.Tensor) -> float:
    """Mean fraction of the exact k neighbours that were found (recall@k)."""
    hits = (found.unsqueeze(2) == exact.unsqueeze(1)).any(dim=2)
    return hits.float().mean().item()


@pytest.fixture(scope="module")
def large():
    """20 clusters, 20,000 x 32, k=10: one hnsw score (default settings) and its exact twin."""
    bank, query = clustered(20_000, 32)
    hnsw = KNNScore(k=10, backend="hnsw").fit(bank)
    exact = KNNScore(k=10).fit(bank)
    return hnsw, exact, query


@pytest.fixture
def small():
    return clustered(2000, 16, clusters=10, queries=64, seed=1)


# -- quality ---------------------------------------------------------------------------------


def test_recall_at_10_against_exact_search_is_at_least_095_on_clustered_data(large):
    hnsw, exact, query = large
    _, found = hnsw.knn_search(query)
    _, truth = exact.knn_search(query)
    assert recall(found, truth) >= 0.95


def test_hnsw_scores_match_exact_scores_on_clustered_data(large):
    hnsw, exact, query = large
    approx, reference = hnsw(query), exact(query)
    # an approximate neighbour is never closer than the exact one, and rarely much farther
    assert (approx >= reference - 1e-4).all()
    torch.testing.assert_close(approx, reference, rtol=1e-2, atol=1e-3)
    # distances are recomputed exactly: where the neighbours agree, the scores do too
    same = (hnsw.knn_search(query)[1] == exact.knn_search(query)[1]).all(dim=1)
    assert same.float().mean() > 0.9
    torch.testing.assert_close(approx[same], reference[same], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("metric", ["euclidean", "cosine", "mahalanobis"])
def test_each_metric_finds_the_exact_neighbours_and_distances(small, metric):
    bank, query = small
    hnsw = KNNScore(k=5, metric=metric, backend="hnsw").fit(bank)
    exact = KNNScore(k=5, metric=metric).fit(bank)
    d_hnsw, i_hnsw = hnsw.knn_search(query)
    d_exact, i_exact = exact.knn_search(query)
    assert recall(i_hnsw, i_exact) >= 0.99
    torch.testing.assert_close(d_hnsw, d_exact, rtol=1e-4, atol=1e-4)
    assert hnsw.hnsw_index.metric == ("cosine" if metric == "cosine" else "euclidean")


def test_hnsw_search_function_matches_functional_exact_search():
    bank = torch.tensor([[0.0, 0.0], [1.0, 0.0], [5.0, 0.0], [0.0, 3.0]])
    query = torch.tensor([[0.9, 0.1], [4.0, 0.0]])
    index = HNSWIndex.build(bank, "euclidean")
    d, i = hnsw_search(query, bank, index, 2)
    d_ref, i_ref = knn_search(query, bank, 2)
    assert i.tolist() == i_ref.tolist() == [[1, 0], [2, 1]]
    torch.testing.assert_close(d, d_ref)


def test_rows_with_nan_score_inf_and_leave_other_rows_unchanged(small):
    bank, query = small
    score = KNNScore(k=3, backend="hnsw").fit(bank)
    bad = query.clone()
    bad[2, 0] = float("nan")
    bad[5, 3] = float("inf")
    out = score(bad)
    assert out[[2, 5]].tolist() == [float("inf")] * 2
    keep = torch.ones(len(query), dtype=torch.bool)
    keep[[2, 5]] = False
    torch.testing.assert_close(out[keep], score(query)[keep])


def test_build_is_deterministic_with_one_thread(small):
    bank, query = small
    a = HNSWIndex.build(bank, "euclidean", ef=16)
    b = HNSWIndex.build(bank, "euclidean", ef=16)
    assert torch.equal(hnsw_search(query, bank, a, 8)[1], hnsw_search(query, bank, b, 8)[1])


# -- compile ---------------------------------------------------------------------------------


def test_compiled_fullgraph_equals_eager(small):
    bank, query = small
    score = KNNScore(k=4, stat="mean", backend="hnsw").fit(bank)
    compiled = torch.compile(score, fullgraph=True)
    torch.testing.assert_close(compiled(query), score(query), rtol=1e-5, atol=1e-5)


def test_compiled_graph_is_reused_across_batches_and_follows_a_refit(small):
    bank, query = small
    score = KNNScore(k=4, backend="hnsw").fit(bank)
    counter = CompileCounterWithBackend("aot_eager")  # traces the op's fake implementation
    compiled = torch.compile(score, backend=counter, fullgraph=True)
    for batch in query.split(16):
        torch.testing.assert_close(compiled(batch), score(batch))
    assert counter.frame_count == 1
    # a refit builds another index (another handle): the graph must not search the old one
    score.fit(bank[:500] + 3.0)
    torch.testing.assert_close(compiled(query[:16]), score(query[:16]))
    assert counter.frame_count == 2


def test_custom_op_passes_opcheck_and_its_fake_gives_b_by_k(small):
    bank, query = small
    index = HNSWIndex.build(bank, "euclidean")
    torch.library.opcheck(torch.ops.selectorch.hnsw_knn.default, (query, index.handle, 3))
    with torch._subclasses.FakeTensorMode() as mode:
        d, i = torch.ops.selectorch.hnsw_knn(mode.from_tensor(query), index.handle, 3)
    assert d.shape == i.shape == (64, 3)
    assert (d.dtype, i.dtype) == (torch.float32, torch.int64)


def test_custom_op_names_an_unknown_handle():
    with pytest.raises(RuntimeError, match="No hnsw index is registered under handle -1"):
        torch.ops.selectorch.hnsw_knn(torch.zeros(1, 2), -1, 1)


# -- persistence -----------------------------------------------------------------------------


def test_save_index_is_loaded_not_rebuilt_by_a_score_with_the_same_bank(
    small, tmp_path, monkeypatch
):
    bank, query = small
    path = tmp_path / "bank.hnsw"
    first = KNNScore(k=5, backend="hnsw", save_index=path).fit(bank)
    assert first.hnsw_index.loaded_from is None
    assert path.is_file() and (tmp_path / "bank.hnsw.json").is_file()

    def no_build(*args, **kwargs):
        raise AssertionError("the saved index should have been loaded, not rebuilt")

    monkeypatch.setattr(HNSWIndex, "build", classmethod(no_build))
    second = KNNScore(k=5, backend="hnsw", save_index=str(path)).fit(bank)
    assert second.hnsw_index.loaded_from == path
    assert second.hnsw_index.fingerprint == bank_fingerprint(second.bank_)
    torch.testing.assert_close(second(query), first(query), rtol=0, atol=0)


def test_a_bank_with_one_changed_row_refuses_the_stale_index(small, tmp_path):
    bank, query = small
    path = tmp_path / "bank.hnsw"
    KNNScore(k=5, backend="hnsw", save_index=path).fit(bank)
    changed = bank.clone()
    changed[123, 4] += 1.0
    score = KNNScore(k=5, backend="hnsw", save_index=path)
    with pytest.raises(IndexMismatchError, match="stale or foreign") as info:
        score.fit(changed)
    # the message names both fingerprints and what differs
    saved = KNNScore(k=5).fit(bank).bank_
    assert bank_fingerprint(saved)["sha256"] in str(info.value)
    assert bank_fingerprint(score.bank_)["sha256"] in str(info.value)
    assert "differ in sha256" in str(info.value)
    # the score is not left searching an index of another bank
    with pytest.raises(RuntimeError, match="no hnsw index"):
        score(query)


def test_a_saved_index_with_other_graph_options_is_refused(small, tmp_path):
    bank, _ = small
    path = tmp_path / "bank.hnsw"
    KNNScore(k=5, backend="hnsw", save_index=path).fit(bank)
    with pytest.raises(IndexMismatchError, match="built with M=16, this score asks for M=32"):
        KNNScore(k=5, backend="hnsw", M=32, save_index=path).fit(bank)
    with pytest.raises(IndexMismatchError, match="built with space='l2'.*'cosine'"):
        CosineScore(k=5, backend="hnsw", save_index=path).fit(bank)


@pytest.mark.parametrize(
    ("damage", "match"),
    [
        ("truncate", "truncated"),
        ("garble", "damaged"),
        ("drop_json", "not its fingerprint"),
        ("garble_json", "not valid JSON"),
        ("foreign_json", "not written by selectorch"),
    ],
)
def test_a_damaged_index_or_fingerprint_file_gives_a_clear_error(small, tmp_path, damage, match):
    bank, _ = small
    path = tmp_path / "bank.hnsw"
    meta = tmp_path / "bank.hnsw.json"
    KNNScore(k=5, backend="hnsw", save_index=path).fit(bank)
    data = path.read_bytes()
    if damage == "truncate":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "garble":
        path.write_bytes(bytes(255 - b for b in data[:64]) + data[64:])
    elif damage == "drop_json":
        meta.unlink()
    elif damage == "garble_json":
        meta.write_bytes(b"\x00{not json")
    else:
        meta.write_text('{"format": "other"}')
    with pytest.raises(IndexMismatchError, match=match):
        KNNScore(k=5, backend="hnsw", save_index=path).fit(bank)


# -- state -----------------------------------------------------------------------------------


def test_state_dict_into_an_unfitted_twin_rebuilds_an_equivalent_index(small):
    bank, query = small
    score = KNNScore(k=5, backend="hnsw").fit(bank)
    state = score.state_dict()
    assert not any("hnsw" in key for key in state)  # the index is derived, never saved
    twin = KNNScore(k=5, backend="hnsw")
    twin.load_state_dict(state)
    assert twin.hnsw_index is not None and twin.hnsw_index.handle != score.hnsw_index.handle
    assert twin.hnsw_index.fingerprint == score.hnsw_index.fingerprint
    assert torch.equal(twin.knn_search(query)[1], score.knn_search(query)[1])
    torch.testing.assert_close(twin(query), score(query), rtol=0, atol=0)


def test_state_dict_loads_across_backends_and_from_a_saved_index(small, tmp_path):
    bank, query = small
    exact = KNNScore(k=5).fit(bank)
    path = tmp_path / "bank.hnsw"
    hnsw = KNNScore(k=5, backend="hnsw", save_index=path)
    hnsw.load_state_dict(exact.state_dict())  # the bank is the same: the search options differ
    assert hnsw.hnsw_index.loaded_from is None and path.is_file()
    again = KNNScore(k=5, backend="hnsw", save_index=path)
    again.load_state_dict(exact.state_dict())
    assert again.hnsw_index.loaded_from == path
    torch.testing.assert_close(again(query), exact(query), rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="k=3"):
        KNNScore(k=3, backend="hnsw").load_state_dict(exact.state_dict())


def test_deepcopy_gets_its_own_index_that_outlives_the_original(small):
    bank, query = small
    score = KNNScore(k=5, backend="hnsw").fit(bank)
    expected = score(query)
    twin = copy.deepcopy(score)
    assert twin.hnsw_index.handle != score.hnsw_index.handle
    del score
    gc.collect()
    torch.testing.assert_close(twin(query), expected, rtol=0, atol=0)


def test_double_state_keeps_searching_in_float64(small):
    bank, query = small
    score = KNNScore(k=5, backend="hnsw").fit(bank).double()
    out = score(query.double())
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, KNNScore(k=5).fit(bank).double()(query.double()))


def test_registry_and_named_scores_pass_the_hnsw_options(small):
    bank, _ = small
    score = create_score("cosine", k=3, backend="hnsw", M=8, ef_construction=50, ef=20)
    score.fit(bank)
    index = score.hnsw_index
    assert (index.metric, index.M, index.ef_construction, index.ef) == ("cosine", 8, 50, 20)
    assert "backend='hnsw', M=8, ef_construction=50, ef=20" in repr(score)
    assert EuclideanScore(k=3, backend="hnsw").fit(bank).hnsw_index.ef == 64  # max(64, 2k)
    assert KNNScore(k=50, backend="hnsw").ef is None
    assert "ef=100" in repr(KNNScore(k=50, backend="hnsw"))


# -- import and arguments --------------------------------------------------------------------


def test_import_selectorch_and_exact_search_do_not_import_hnswlib():
    code = (
        "import sys, torch, selectorch\n"
        "from selectorch.scores import KNNScore\n"
        "KNNScore(k=2).fit(torch.randn(10, 3))(torch.randn(4, 3))\n"
        "assert 'hnswlib' not in sys.modules, 'hnswlib was imported'\n"
        "KNNScore(k=2, backend='hnsw').fit(torch.randn(10, 3))\n"
        "assert 'hnswlib' in sys.modules\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"backend": "faiss"}, "`backend` to be one of \\('exact', 'hnsw'\\), got 'faiss'"),
        ({"backend": "hnsw", "M": 1}, "`M` to be an integer >= 2, got 1"),
        ({"backend": "hnsw", "k": 10, "ef": 5}, "`ef` to be at least k=10.*got 5"),
        ({"backend": "hnsw", "ef_construction": 0}, "`ef_construction`.*got 0"),
        ({"backend": "hnsw", "num_threads": 0}, "`num_threads`.*got 0"),
        ({"backend": "hnsw", "save_index": 3}, "`save_index` to be a path.*got int"),
        ({"save_index": "index.bin"}, "`save_index` needs backend='hnsw', got backend='exact'"),
    ],
)
def test_bad_arguments_raise_value_error_naming_the_argument(kwargs, match):
    with pytest.raises(ValueError, match=match):
        KNNScore(**kwargs)


def test_k_above_the_bank_size_is_refused_by_the_search_function():
    bank = torch.randn(5, 2)
    index = HNSWIndex.build(bank, "euclidean")
    with pytest.raises(ValueError, match="`k` to be in \\[1, 5\\].*got 6"):
        hnsw_search(torch.randn(1, 2), bank, index, 6)


@pytest.mark.gpu
def test_queries_on_cuda_are_searched_on_the_cpu_and_answered_on_cuda(small):
    bank, query = small
    score = KNNScore(k=5, backend="hnsw").fit(bank.cuda())
    out = score(query.cuda())
    assert out.device.type == "cuda"
    torch.testing.assert_close(out.cpu(), KNNScore(k=5, backend="hnsw").fit(bank)(query))
