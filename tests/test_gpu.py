"""CUDA paths (run on the GPU machine; skipped where there is no CUDA device)."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch.utils.data import DataLoader, TensorDataset

import selectorch as st
from selectorch.functional import knn_search
from selectorch.scores import EnergyScore, KNNScore

pytestmark = pytest.mark.gpu


def fitted(device: str = "cpu") -> st.SelectiveModel:
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).eval()
    sel = st.SelectiveModel(model, KNNScore(k=5), layer="avgpool")
    sel.fit(torch.randn(64, 3, 32, 32), progress=False)
    sel.calibrate(torch.randn(40, 3, 32, 32), coverage=0.9, progress=False)
    return sel.to(device)


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
def test_knn_search_on_cuda_equals_cpu(metric):
    g = torch.Generator().manual_seed(0)
    bank, query = torch.randn(5000, 64, generator=g), torch.randn(300, 64, generator=g)
    bank_c = torch.nn.functional.normalize(bank, dim=1) if metric == "cosine" else bank
    d_cpu, _ = knn_search(query, bank_c, 7, metric=metric, chunk_size=700)
    d_gpu, _ = knn_search(query.cuda(), bank_c.cuda(), 7, metric=metric, chunk_size=700)
    torch.testing.assert_close(d_gpu.cpu(), d_cpu, rtol=1e-4, atol=1e-4)


def test_cuda_moves_every_fitted_buffer_and_matches_cpu():
    sel = fitted()
    x = torch.randn(8, 3, 32, 32)
    with torch.no_grad():
        ref = sel(x)
        sel.cuda()
        out = sel(x.cuda())
    assert sel.score.bank_.is_cuda and sel.score.bank_sq_norms_.is_cuda and sel.threshold_.is_cuda
    assert out.score.is_cuda and out.selected.is_cuda
    torch.testing.assert_close(out.score.cpu(), ref.score, rtol=1e-3, atol=1e-3)


def test_fit_moves_cpu_batches_to_the_model_device():
    model = torchvision.models.resnet18(num_classes=10).eval().cuda()
    loader = DataLoader(TensorDataset(torch.randn(20, 3, 32, 32), torch.arange(20)), batch_size=8)
    sel = st.SelectiveModel(model, KNNScore(k=2), layer="avgpool").fit(loader, progress=False)
    assert sel.score.bank_.device.type == "cuda" and sel.score.bank_.shape == (20, 512)


def test_compile_fullgraph_on_cuda_matches_eager_without_recompiling():
    sel = fitted("cuda")
    compiled = torch.compile(sel, fullgraph=True)
    x = torch.randn(16, 3, 32, 32, device="cuda")
    with torch.no_grad():
        eager = sel(x)
        fast = compiled(x)
        frames = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        sel.calibrate(torch.randn(40, 3, 32, 32), coverage=0.5, progress=False)
        again = compiled(x)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == frames
    torch.testing.assert_close(fast.score, eager.score, rtol=1e-3, atol=1e-3)
    assert torch.equal(again.selected, again.score <= sel.get_threshold())


def test_bf16_autocast_forward_scores_close_to_fp32():
    sel = fitted("cuda")
    x = torch.randn(16, 3, 32, 32, device="cuda")
    with torch.no_grad():
        ref = sel(x)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = sel(x)
    assert out.output.dtype == torch.bfloat16 and out.selected.dtype == torch.bool
    assert torch.isfinite(out.score).all()
    torch.testing.assert_close(out.score.float(), ref.score, rtol=0.05, atol=0.05)


def test_half_model_and_score_on_cuda():
    sel = fitted("cuda").half()
    x = torch.randn(8, 3, 32, 32, device="cuda", dtype=torch.half)
    with torch.no_grad():
        out = sel(x)
    assert sel.score.bank_.dtype == torch.half
    assert torch.isfinite(out.score).all() and out.score.shape == (8,)


def test_logit_score_on_cuda_compiled():
    model = torchvision.models.resnet18(num_classes=10).eval().cuda()
    sel = st.SelectiveModel(model, EnergyScore()).calibrate(
        torch.randn(30, 3, 32, 32), coverage=0.9, progress=False
    )
    x = torch.randn(4, 3, 32, 32, device="cuda")
    with torch.no_grad():
        eager = sel(x)
        fast = torch.compile(sel, fullgraph=True)(x)
    torch.testing.assert_close(fast.score, eager.score, rtol=1e-3, atol=1e-3)


def test_standalone_fit_moves_the_score_to_the_data_device():
    score = KNNScore(k=2).fit(torch.randn(50, 8, device="cuda"))
    assert {b.device.type for b in score.buffers()} == {"cuda"}
    result = score.calibrate(torch.randn(20, 8, device="cuda"), coverage=0.5).select(
        torch.randn(4, 8, device="cuda")
    )
    assert result["selected"].is_cuda
    back = KNNScore(k=2).cuda().fit(torch.randn(50, 8))
    assert {b.device.type for b in back.buffers()} == {"cpu"}


def test_large_knn_score_on_cuda_dispatches_to_the_fused_kernel_and_matches_exact():
    from selectorch.functional import knn_search as torch_search
    from selectorch.search import use_fused

    g = torch.Generator().manual_seed(0)
    bank, query = torch.randn(1_100_000, 16, generator=g), torch.randn(256, 16, generator=g)
    score = KNNScore(k=10).fit(bank.cuda())
    q = query.cuda() - score.mean_
    assert use_fused(q, score.bank_, 10)
    fused = score(query.cuda())
    d, _ = torch_search(q, score.bank_, 10, bank_sq_norms=score.bank_sq_norms_)
    torch.testing.assert_close(fused, d[:, -1], rtol=1e-4, atol=1e-4)


# -- the scores of issue 10 on CUDA: SelectiveModel on the real MNIST network ------------------

#: name -> (score kwargs, layer, head) on the ccexam MNIST CNN.
MNIST_CASES = {
    "odin": ({"std": st.datasets.MNIST_STD}, None, None),
    "gram": ({"powers": 4}, ["features.2", "features.5"], None),
    "dknn": ({"k": 10}, ["features.5", "classifier.0"], None),
    "trust": ({"k": 5}, "classifier.0", None),
    "lid": ({"k": 10}, "classifier.0", None),
    "gradnorm": ({}, "classifier.1", "classifier.2"),
    "she": ({}, "classifier.1", "classifier.2"),
}


@pytest.mark.parametrize("name", sorted(MNIST_CASES))
def test_issue10_scores_on_cuda_match_cpu_and_compile(name):
    kwargs, layer, head = MNIST_CASES[name]
    images, labels = st.datasets.mnist5k()
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
    images, labels = images[order], labels[order]
    fit, cal, test = (images[:600], labels[:600]), images[600:800], images[800:864]

    def build(device):
        net = st.datasets.mnist_net().to(device)
        sel = st.SelectiveModel(net, st.scores.create_score(name, **kwargs), layer=layer, head=head)
        sel.fit(*fit, progress=False)
        return sel.calibrate(cal, coverage=0.9, progress=False)

    cpu, gpu = build("cpu"), build("cuda")
    with torch.no_grad():
        ref = cpu(test)
        out = gpu(test.cuda())
    assert out.score.is_cuda and out.selected.is_cuda
    torch.testing.assert_close(out.score.cpu(), ref.score, rtol=2e-3, atol=2e-3)
    agree = (out.selected.cpu() == ref.selected).double().mean().item()
    assert agree >= 0.95, agree
    compiled = torch.compile(gpu, fullgraph=gpu.score.compile_clean)
    with torch.no_grad():
        fast = compiled(test.cuda())
    torch.testing.assert_close(fast.score, out.score, rtol=2e-3, atol=2e-3)
