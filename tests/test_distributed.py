"""selectorch.distributed: several processes give exactly what one process gives.

The multi-process tests start 2 and then 3 gloo processes on localhost (forked, so nothing is
imported again; spawned on a machine with CUDA), once for the whole module. Each process first
runs the pipeline alone (no process group: the single-process reference, in the same process
and thread settings), then with the process group, and saves both; the tests compare them. The
model is elementwise, so a row's features never depend on the other rows of its batch: what is
compared is selectorch's work, not the batch-size dependence of a matrix product.
"""

from __future__ import annotations

import datetime
import os
import socket
import time
import traceback
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

import selectorch as st
from selectorch import distributed as sd
from selectorch.functional.gaussian import fit_gaussian_stats
from selectorch.metrics import AURC

N_FIT, N_CAL, N_QUERY, DIM, CLASSES = 301, 157, 37, 12, 4  # odd sizes: uneven ranks, padding
COMPILED_ROWS = 6  # rows per rank in the compiled forward (the same on every rank)
WORLDS = (2, 3)
TIMEOUT_S = 120


class Elementwise(nn.Module):
    """A classifier whose every output row depends on its own input row only."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(1)
        self.scale = nn.Parameter(torch.randn(DIM, generator=g))
        self.body = nn.Tanh()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x * self.scale)[:, :CLASSES] * 4.0


def dataset() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N_FIT + N_CAL + N_QUERY, DIM, generator=g)
    y = (x[:, :CLASSES] + torch.randn(x.shape[0], CLASSES, generator=g)).argmax(dim=1)
    fit, cal = slice(0, N_FIT), slice(N_FIT, N_FIT + N_CAL)
    query = slice(N_FIT + N_CAL, None)
    return {
        "x_fit": x[fit], "y_fit": y[fit], "x_cal": x[cal], "y_cal": y[cal], "x_query": x[query]
    }


#: name -> (score factory, layer); "sharded" scores split their bank across ranks
SCORES = {
    "knn_sharded": (lambda: st.scores.KNNScore(k=5, shard=True), "body"),
    "knn": (lambda: st.scores.KNNScore(k=5), "body"),
    "cosine_sharded": (
        lambda: st.scores.KNNScore(k=4, metric="cosine", stat="mean", shard=True),
        "body",
    ),
    "mahalanobis_sharded": (
        lambda: st.scores.KNNScore(k=3, metric="mahalanobis", shard=True),
        "body",
    ),
    "mahalanobis": (lambda: st.scores.MahalanobisScore(), "body"),
    "pca": (lambda: st.scores.PCAScore(n_components=4), "body"),
    "entropy_fitted_temperature": (lambda: st.scores.EntropyScore(temperature=None), None),
    "fusion": (
        lambda: st.scores.FusionScore(
            {"body": st.scores.KNNScore(k=3), "logits": st.scores.EnergyScore()}
        ),
        ["body"],
    ),
}


def rows_of(rank: int, world: int, n: int) -> slice:
    """This rank's contiguous, uneven part of ``n`` query rows."""
    sizes = [len(part) for part in torch.arange(n).tensor_split(world)]
    start = sum(sizes[:rank])
    return slice(start, start + sizes[rank])


def loader(x: torch.Tensor, y: torch.Tensor, distributed: bool) -> DataLoader:
    data = TensorDataset(x, y)
    sampler = DistributedSampler(data, shuffle=True, seed=3) if distributed else None
    return DataLoader(data, batch_size=32, sampler=sampler)


def pipeline(
    rank: int, world: int, device: torch.device, distributed: bool, out: Path, backend: str
) -> dict[str, Any]:
    """Fit, calibrate and score every score; the same code alone and under a process group."""
    data = {key: value.to(device) for key, value in dataset().items()}
    model = Elementwise().to(device)
    mine = data["x_query"][rows_of(rank, world, N_QUERY)]
    results: dict[str, Any] = {}
    for name, (make, layer) in SCORES.items():
        sel = st.SelectiveModel(model, make(), layer=layer)
        sel.fit(loader(data["x_fit"], data["y_fit"], distributed), progress=False)
        sel.calibrate(
            loader(data["x_cal"], data["y_cal"], distributed), coverage=0.9, progress=False
        )
        state = {k: v.cpu() for k, v in sel.score.state_dict().items() if torch.is_tensor(v)}
        results[name] = {"state": state, "report": sel.calibration_report()}
        output = sel(mine)
        results[name]["score"], results[name]["selected"] = output.score, output.selected
        if name == "knn_sharded":
            features = torch.tanh(mine * model.scale)
            results[name]["search"] = sel.score.knn_search(features)
            results[name]["batched"] = sel.score.score(features, batch_size=4)
            equal = data["x_query"][rank * COMPILED_ROWS : (rank + 1) * COMPILED_ROWS]
            compiled = torch.compile(sel, fullgraph=True, backend=backend)
            results[name]["compiled"] = compiled(equal).score
            results[name]["eager"] = sel(equal).score
            if distributed and world == 2:
                sd.save_sharded(sel, out / "checkpoint")
    return results


def collectives(rank: int, world: int, device: torch.device, out: Path) -> dict[str, Any]:
    """The helpers of selectorch.distributed, each against what one process computes."""
    data = dataset()
    x, y = data["x_fit"].to(device), data["y_fit"].to(device)
    part = rows_of(rank, world, N_FIT)
    results: dict[str, Any] = {"gathered": sd.gather_rows(x[part])}
    results["gathered_bool"] = sd.gather_rows(y[part] > 1)
    try:  # a trailing shape that differs between ranks raises on every rank
        sd.gather_rows(x[part, : DIM - rank])
    except ValueError as err:
        results["shape_error"] = str(err)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        (once,) = sd.gather_dataset(x, warn_replicated=True)
    results["replicated"] = (once.shape[0], [str(w.message) for w in caught])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        (in_rank_order,) = sd.gather_dataset(x[part], indices=torch.arange(3))
    results["mismatched"] = (in_rank_order, [str(w.message) for w in caught])
    local_y = y[part].clone()
    local_y[local_y == rank] = (rank + 1) % CLASSES  # each rank misses one class
    stats = sd.all_reduce_gaussian_stats(fit_gaussian_stats(x[part].double(), local_y))
    full_y = sd.gather_rows(local_y)
    reference = fit_gaussian_stats(x.double(), full_y)
    results["stats"] = [
        {"classes": s.classes, "counts": s.counts, "means": s.means, "scatter": s.scatter}
        for s in (stats, reference)
    ]
    metric = AURC().to(device)
    g = torch.Generator().manual_seed(5)
    scores, correct = torch.randn(N_FIT, generator=g), torch.rand(N_FIT, generator=g) > 0.3
    metric.update(scores[part].to(device), correct[part].to(device))
    results["aurc"] = (metric.compute().cpu(), AURC()(scores, correct))
    try:  # each rank passing its own rows to a sharded fit is refused on every rank
        st.scores.KNNScore(k=2, shard=True).fit(x[part])
    except ValueError as err:
        results["fit_error"] = str(err)
    if world == 3:  # the checkpoint of the 2-process run, re-sharded for 3
        sel = st.SelectiveModel(Elementwise().to(device), SCORES["knn_sharded"][0](), layer="body")
        sd.load_sharded(sel, out / "checkpoint")
        mine = data["x_query"].to(device)[rows_of(rank, world, N_QUERY)]
        results["loaded"] = {"score": sel(mine).score, "rows": sel.score.bank_.shape[0]}
        results["loaded_threshold"] = sel.score.threshold_
    return results


def worker(rank: int, world: int, init: str, out: str, backend: str, compile_backend: str) -> None:
    """One process: the pipeline alone, then under the process group; results to a file."""
    out_dir = Path(out)
    torch.set_num_threads(1)
    device = torch.device("cpu")
    if backend == "nccl":
        torch.cuda.set_device(rank)
        device = torch.device("cuda", rank)
    try:
        alone = pipeline(rank, world, device, False, out_dir, compile_backend)
        dist.init_process_group(
            backend,
            init_method=init,
            rank=rank,
            world_size=world,
            timeout=datetime.timedelta(seconds=TIMEOUT_S),
        )
        together = pipeline(rank, world, device, True, out_dir, compile_backend)
        helpers = collectives(rank, world, device, out_dir)
        dist.barrier()
        dist.destroy_process_group()
        result = {"alone": alone, "together": together, "helpers": helpers}
    except Exception:  # the parent reports it with the traceback
        result = {"error": traceback.format_exc()}
    torch.save(_to_cpu(result), out_dir / f"world{world}-rank{rank}.pt")


def _to_cpu(obj: Any) -> Any:
    if torch.is_tensor(obj):
        return obj.cpu()
    if isinstance(obj, dict):
        return {key: _to_cpu(value) for key, value in obj.items()}
    if isinstance(obj, (tuple, list)):
        return type(obj)(_to_cpu(value) for value in obj)
    return obj


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(world: int, out: Path, *, backend: str, start_method: str, compile_backend: str):
    """Run :func:`worker` on ``world`` processes; return each rank's results."""
    init = f"tcp://127.0.0.1:{free_port()}"
    args = (world, init, str(out), backend, compile_backend)
    context = mp.start_processes(
        worker, args=args, nprocs=world, join=False, start_method=start_method
    )
    deadline = time.monotonic() + TIMEOUT_S + 30  # the workers' own collectives time out first
    finished = True
    while not context.join(timeout=1):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            finished = False
            break
    files = [out / f"world{world}-rank{rank}.pt" for rank in range(world)]
    results = [torch.load(f, weights_only=True) if f.is_file() else {} for f in files]
    errors = [f"rank {rank}: {r['error']}" for rank, r in enumerate(results) if "error" in r]
    if errors or not finished:
        pytest.fail(f"{world} processes did not all finish:\n" + "\n".join(errors))
    return results


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("distributed")


@pytest.fixture(scope="module")
def runs(run_dir) -> dict[int, list[dict[str, Any]]]:
    """2 then 3 gloo processes (the 3 load the 2's checkpoint); results by world size."""
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    # fork is fast, but a forked child cannot use CUDA once this process has initialised it,
    # which other tests in the same process may have done (on the GPU machine, after the GPU
    # tests, the forked ranks failed with "Cannot re-initialize CUDA in forked subprocess"):
    # spawn wherever there is a CUDA device
    forkable = "fork" in mp.get_all_start_methods() and not torch.cuda.is_available()
    method = "fork" if forkable else "spawn"
    return {
        world: launch(
            world, run_dir, backend="gloo", start_method=method, compile_backend="aot_eager"
        )
        for world in WORLDS
    }


# -- checks shared by the gloo and NCCL runs ---------------------------------------------------


def check_fitted_state_and_thresholds(
    results: list[dict[str, Any]], world: int, *, exact: bool = True
) -> None:
    same = torch.equal if exact else _close
    for rank, result in enumerate(results):
        for name in SCORES:
            alone, together = result["alone"][name], result["together"][name]
            for key, value in alone["state"].items():
                got = together["state"][key]
                if key == "bank_" and name.endswith("_sharded"):
                    sizes = together["state"]["shard_sizes_"].tolist()
                    start = sum(sizes[:rank])
                    value = value[start : start + sizes[rank]]
                elif key.startswith("shard_"):
                    continue
                assert same(got, value), f"{name}.{key} on rank {rank} of {world}"
            assert not exact or together["report"] == alone["report"], name
            threshold = together["state"]["threshold_"]
            assert torch.equal(threshold, results[0]["together"][name]["state"]["threshold_"])


def check_scores_and_search(results: list[dict[str, Any]], *, exact: bool) -> None:
    same = torch.equal if exact else _close
    for rank, result in enumerate(results):
        for name in SCORES:
            alone, together = result["alone"][name], result["together"][name]
            assert same(together["score"], alone["score"]), f"{name} scores on rank {rank}"
            assert torch.equal(together["selected"], alone["selected"]), name
        alone, together = result["alone"]["knn_sharded"], result["together"]["knn_sharded"]
        assert torch.equal(together["search"][1], alone["search"][1])  # global indices
        assert same(together["search"][0], alone["search"][0])
        assert same(together["batched"], alone["batched"])
        assert same(together["compiled"], together["eager"])
        assert same(together["compiled"], alone["eager"])


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return bool(torch.allclose(a, b, rtol=1e-6, atol=1e-6))


# -- gloo on localhost -------------------------------------------------------------------------


@pytest.mark.parametrize("world", WORLDS)
def test_fitted_state_and_thresholds_equal_one_process_on_every_rank(runs, world):
    check_fitted_state_and_thresholds(runs[world], world)


@pytest.mark.parametrize("world", WORLDS)
def test_sharded_search_and_scores_equal_one_process_exactly(runs, world):
    check_scores_and_search(runs[world], exact=True)


@pytest.mark.parametrize("world", WORLDS)
def test_sharded_bank_is_split_evenly_and_covers_every_row(runs, world):
    banks = [r["together"]["knn_sharded"]["state"]["bank_"] for r in runs[world]]
    assert [b.shape[0] for b in banks] == sd.shard_sizes(N_FIT, world)
    whole = runs[world][0]["alone"]["knn_sharded"]["state"]["bank_"]
    assert torch.equal(torch.cat(banks), whole)


@pytest.mark.parametrize("world", WORLDS)
def test_gather_rows_concatenates_uneven_ranks_in_rank_order(runs, world):
    x = dataset()["x_fit"]
    for result in runs[world]:
        helpers = result["helpers"]
        assert torch.equal(helpers["gathered"], x)
        assert torch.equal(helpers["gathered_bool"], dataset()["y_fit"] > 1)
        assert "same shape and dtype" in helpers["shape_error"]


@pytest.mark.parametrize("world", WORLDS)
def test_gather_dataset_keeps_replicated_rows_once_with_a_warning(runs, world):
    for result in runs[world]:
        rows, messages = result["helpers"]["replicated"]
        assert rows == N_FIT
        assert any("passed the same" in m for m in messages)


@pytest.mark.parametrize("world", WORLDS)
def test_gather_dataset_with_unmatched_indices_keeps_rank_order_with_a_warning(runs, world):
    for result in runs[world]:
        rows, messages = result["helpers"]["mismatched"]
        assert torch.equal(rows, dataset()["x_fit"])
        assert any("do not match its DistributedSampler" in m for m in messages)


@pytest.mark.parametrize("world", WORLDS)
def test_all_reduced_gaussian_stats_equal_a_fit_on_all_rows(runs, world):
    for result in runs[world]:
        stats, reference = result["helpers"]["stats"]
        assert torch.equal(stats["classes"], reference["classes"])
        assert torch.equal(stats["counts"], reference["counts"])
        for key in ("means", "scatter"):
            torch.testing.assert_close(stats[key], reference[key], rtol=1e-12, atol=1e-10)


@pytest.mark.parametrize("world", WORLDS)
def test_metric_syncs_across_ranks(runs, world):
    for result in runs[world]:
        synced, alone = result["helpers"]["aurc"]
        assert torch.equal(synced, alone)


@pytest.mark.parametrize("world", WORLDS)
def test_sharded_fit_of_different_rows_per_rank_is_refused_on_every_rank(runs, world):
    for result in runs[world]:
        assert "the same on every rank" in result["helpers"]["fit_error"]


def test_checkpoint_of_two_ranks_loads_resharded_on_three(runs):
    for rank, result in enumerate(runs[3]):
        loaded, alone = result["helpers"]["loaded"], result["alone"]["knn_sharded"]
        assert loaded["rows"] == sd.shard_sizes(N_FIT, 3)[rank]
        assert torch.equal(loaded["score"], alone["score"])
        assert torch.equal(result["helpers"]["loaded_threshold"], alone["state"]["threshold_"])


def test_checkpoint_of_two_ranks_loads_whole_in_one_process(runs, run_dir):
    directory = run_dir / "checkpoint"
    assert sorted(p.name for p in directory.iterdir()) == [
        "header.json",
        "rank-00000-of-00002.pt",
        "rank-00001-of-00002.pt",
    ]
    sel = st.SelectiveModel(Elementwise(), SCORES["knn_sharded"][0](), layer="body")
    sd.load_sharded(sel, directory)
    alone = runs[2][0]["alone"]["knn_sharded"]
    assert torch.equal(sel.score.bank_, alone["state"]["bank_"])
    assert torch.equal(sel.score.threshold_, alone["state"]["threshold_"])


# -- one process -------------------------------------------------------------------------------


def test_without_process_group_helpers_are_no_ops():
    x = torch.randn(5, 3)
    assert sd.get_world() == sd.World(0, 1) and not sd.is_distributed()
    assert sd.gather_rows(x) is x
    gathered, nothing = sd.gather_dataset(x, None)
    assert gathered is x and nothing is None
    assert sd.agreed_steps(10, 4) == 3


def test_merge_topk_equals_a_topk_over_all_candidates():
    g = torch.Generator().manual_seed(0)
    d, i = torch.rand(7, 12, generator=g), torch.randperm(84, generator=g).view(7, 12)
    merged_d, merged_i = sd.merge_topk(d, i, 4)
    ref_d, pos = d.topk(4, dim=1, largest=False)
    assert torch.equal(merged_d, ref_d) and torch.equal(merged_i, i.gather(1, pos))


def test_merge_topk_breaks_ties_by_candidate_position():
    d = torch.tensor([[1.0, 0.5, 0.5, 1.0]])
    assert sd.merge_topk(d, torch.tensor([[7, 8, 9, 10]]), 3)[1].tolist() == [[8, 9, 7]]


def test_shard_sizes_split_contiguously_and_evenly():
    assert sd.shard_sizes(10, 3) == [4, 3, 3]
    assert sd.shard_sizes(9, 3) == [3, 3, 3]
    assert sum(sd.shard_sizes(301, 7)) == 301


@pytest.mark.parametrize("metric", ["euclidean", "cosine", "mahalanobis"])
def test_sharded_knn_in_one_process_equals_unsharded(metric):
    g = torch.Generator().manual_seed(0)
    bank, query = torch.randn(200, 8, generator=g), torch.randn(30, 8, generator=g)
    plain = st.scores.KNNScore(k=4, metric=metric).fit(bank)
    sharded = st.scores.KNNScore(k=4, metric=metric, shard=True).fit(bank)
    for got, want in zip(sharded.knn_search(query), plain.knn_search(query), strict=True):
        assert torch.equal(got, want)
    assert sharded.shard_sizes_.tolist() == [200] and int(sharded.shard_rank_) == 0


def test_shard_with_hnsw_backend_is_refused():
    with pytest.raises(ValueError, match="shard=True` needs backend='exact'"):
        st.scores.KNNScore(shard=True, backend="hnsw")
    with pytest.raises(ValueError, match="`shard` to be a bool"):
        st.scores.KNNScore(shard=1)


def test_state_of_another_world_size_is_refused_by_load_state_dict():
    score = st.scores.KNNScore(k=2, shard=True).fit(torch.randn(10, 3))
    state = score.state_dict()
    state["bank_"], state["shard_sizes_"] = state["bank_"][5:], torch.tensor([5, 5])
    state["shard_rank_"] = torch.tensor(1)
    with pytest.raises(ValueError, match="rank 1 of 2.*rank 0 of 1.*load_sharded"):
        st.scores.KNNScore(k=2, shard=True).load_state_dict(state)


def test_save_and_load_sharded_in_one_process_round_trip(tmp_path):
    g = torch.Generator().manual_seed(0)
    score = st.scores.KNNScore(k=3, shard=True).fit(torch.randn(50, 6, generator=g))
    score.calibrate(torch.randn(20, 6, generator=g), coverage=0.8)
    sd.save_sharded(score, tmp_path / "ckpt")
    again = sd.load_sharded(st.scores.KNNScore(k=3, shard=True), tmp_path / "ckpt")
    query = torch.randn(9, 6, generator=g)
    assert torch.equal(again(query), score(query))
    assert again.get_threshold() == score.get_threshold()


def test_load_sharded_refuses_a_directory_without_header(tmp_path):
    with pytest.raises(FileNotFoundError, match="header.json"):
        sd.load_sharded(st.scores.KNNScore(shard=True), tmp_path)


def test_load_sharded_refuses_a_newer_layout(tmp_path):
    score = st.scores.KNNScore(k=1, shard=True).fit(torch.randn(5, 2))
    sd.save_sharded(score, tmp_path)
    header = tmp_path / "header.json"
    header.write_text(header.read_text().replace('"version": 1', '"version": 99'))
    with pytest.raises(ValueError, match="newer than this selectorch"):
        sd.load_sharded(st.scores.KNNScore(k=1, shard=True), tmp_path)


def test_load_sharded_refuses_an_altered_rank_file(tmp_path):
    score = st.scores.KNNScore(k=1, shard=True).fit(torch.randn(5, 2))
    sd.save_sharded(score, tmp_path)
    with open(tmp_path / "rank-00000-of-00001.pt", "ab") as file:
        file.write(b"x")
    with pytest.raises(ValueError, match="truncated or altered"):
        sd.load_sharded(st.scores.KNNScore(k=1, shard=True), tmp_path)


def test_score_save_of_a_sharded_score_points_to_save_sharded(tmp_path):
    score = st.scores.KNNScore(k=1, shard=True).fit(torch.randn(5, 2))
    with pytest.raises(st.PersistenceError, match="save_sharded"):
        score.save(tmp_path / "knn")


def test_sampler_indices_follow_a_distributed_sampler():
    data = TensorDataset(torch.arange(10))
    sampler = DistributedSampler(data, num_replicas=3, rank=1, shuffle=False)
    indices = sd.sampler_indices(DataLoader(data, sampler=sampler, batch_size=2))
    assert indices.tolist() == [1, 4, 7, 0]  # the last one is the sampler's padding
    assert sd.sampler_indices(DataLoader(data)) is None
    dropping = DataLoader(data, sampler=sampler, batch_size=3, drop_last=True)
    assert sd.sampler_indices(dropping).tolist() == [1, 4, 7]


# -- NCCL on two GPUs (the GPU machine) ----------------------------------------------------------


@pytest.mark.gpu
def test_nccl_two_gpus(tmp_path, monkeypatch):
    """The same pipeline on 2 GPUs with NCCL and inductor; run with NCCL_NVLS_ENABLE=0."""
    if torch.cuda.device_count() < 2 or not dist.is_nccl_available():
        pytest.skip("needs 2 CUDA devices and NCCL")
    monkeypatch.setenv("NCCL_NVLS_ENABLE", "0")  # the spawned processes inherit it
    results = launch(
        2, tmp_path, backend="nccl", start_method="spawn", compile_backend="inductor"
    )
    # GPU matrix products may round differently for another number of rows: the gathered
    # rows and the neighbours are the same, values agree to float32 rounding
    check_fitted_state_and_thresholds(results, 2, exact=False)
    check_scores_and_search(results, exact=False)
    for rank, result in enumerate(results):
        assert torch.equal(result["helpers"]["gathered"], dataset()["x_fit"]), rank
        synced, alone = result["helpers"]["aurc"]
        assert _close(synced, alone)
    assert os.environ["NCCL_NVLS_ENABLE"] == "0"
