"""Tests for selectorch.record, the on-disk cache, fitting from recordings, and the conveniences
that came with them (KNNScore.knn_search, selectorch.progress, plot_embedding_sets, logging).

References: the Recorder run batch by batch by hand, an uninterrupted in-memory recording,
selectorch.functional.knn_search, and max RSS measured in a subprocess.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import textwrap

import pytest
import torch
import torchvision
from tensordict import MemoryMappedTensor
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler, TensorDataset

import selectorch as st
import selectorch.progress as progress
from selectorch.cache import PROGRESS_FILE, CacheMismatchError, load_cache
from selectorch.functional import knn_search
from selectorch.recorder import pool_features

N_IMAGES, BATCH = 2000, 200
LAYERS = ["layer3", "avgpool"]

# --------------------------------------------------------------------------------------------
# data, models and a forward-call counter
# --------------------------------------------------------------------------------------------


class Images(Dataset):
    """(image, label) items; raises once at item ``fail_at`` (a flaky disk, a killed job)."""

    def __init__(self, x, y, fail_at=None):
        self.x, self.y, self.fail_at = x, y, fail_at

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        if i == self.fail_at:
            self.fail_at = None
            raise RuntimeError(f"read error at item {i}")
        return self.x[i], self.y[i]


class TinyCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        return self.head(self.pool(torch.relu(self.bn(self.conv(x)))).flatten(1))


class Counter:
    """Counts forward calls of a model through a forward hook."""

    def __init__(self, model):
        self.calls = 0
        self.handle = model.register_forward_hook(self._hook)

    def _hook(self, *args):
        self.calls += 1


def fixed_pool(x):
    return x.mean(dim=(2, 3))


@pytest.fixture(scope="module")
def images():
    g = torch.Generator().manual_seed(1)
    return torch.randn(N_IMAGES, 3, 16, 16, generator=g), torch.arange(N_IMAGES) % 10


@pytest.fixture(scope="module")
def resnet():
    torch.manual_seed(0)
    return torchvision.models.resnet18(num_classes=10).eval()


@pytest.fixture(scope="module")
def in_memory(resnet, images):
    """One uninterrupted in-memory recording of the 2000 images."""
    loader = DataLoader(Images(*images), batch_size=BATCH)
    return st.record(resnet, loader, layers=LAYERS, progress=False)


@pytest.fixture(scope="module")
def train_cache(resnet, images, tmp_path_factory):
    path = tmp_path_factory.mktemp("cache") / "train"
    loader = DataLoader(Images(*images), batch_size=BATCH)
    st.record(resnet, loader, layers=LAYERS, cache=path, progress=False)
    return path


@pytest.fixture
def tiny():
    torch.manual_seed(3)
    return TinyCNN().eval(), torch.randn(300, 3, 8, 8), torch.arange(300) % 5


def tiny_loader(x, y, **kwargs):
    return DataLoader(Images(x, y, kwargs.pop("fail_at", None)), batch_size=50, **kwargs)


# --------------------------------------------------------------------------------------------
# extraction
# --------------------------------------------------------------------------------------------


def test_record_equals_recorder_batch_by_batch_in_memory_and_cached(
    resnet, images, in_memory, train_cache
):
    parts = {key: [] for key in (*LAYERS, "logits")}
    with st.Recorder(resnet, LAYERS) as rec, torch.no_grad():
        for start in range(0, N_IMAGES, BATCH):
            logits, feats = rec(images[0][start : start + BATCH])
            parts["logits"].append(logits)
            for key in LAYERS:
                parts[key].append(feats[key])
    cached = load_cache(train_cache)
    assert in_memory.batch_size == torch.Size([N_IMAGES])
    assert list(in_memory.keys()) == list(cached.keys()) == [*LAYERS, "logits", "labels"]
    assert isinstance(cached["avgpool"], MemoryMappedTensor)
    assert in_memory["avgpool"].shape == (N_IMAGES, 512)
    for key, chunks in parts.items():
        assert torch.equal(in_memory[key], torch.cat(chunks)), key
        assert torch.equal(cached[key], torch.cat(chunks)), key
    assert torch.equal(cached["labels"], images[1])


def test_recorded_tensors_are_ordinary_and_model_flags_are_restored(tiny):
    model, x, y = tiny
    model.train()
    stats = model.bn.running_mean.clone()
    rec = st.record(model, tiny_loader(x, y), layers={"conv": "conv_avg"}, progress=False)
    assert model.training and model.bn.training
    assert torch.equal(model.bn.running_mean, stats)  # ran in eval mode
    emb = rec["conv_avg"]
    assert not emb.is_inference() and emb.device.type == "cpu" and emb.shape == (300, 8)
    w = torch.ones(8, requires_grad=True)
    (emb @ w).sum().backward()  # usable with autograd after extraction
    assert torch.allclose(w.grad, emb.sum(0))
    model.eval()
    with torch.no_grad():
        expected = pool_features(model.conv(x[:50]), "avg")
    assert torch.allclose(emb[:50], expected, atol=1e-6)


def test_record_options_logits_only_no_labels_and_half_precision(tiny):
    model, x, y = tiny
    only_logits = st.record(model, tiny_loader(x, y), layers=[], labels=False, progress=False)
    assert list(only_logits.keys()) == ["logits"]
    half = st.record(model, tiny_loader(x, y), layers="conv", dtype=torch.float16, progress=False)
    assert half["conv"].dtype == torch.float16 and half["labels"].dtype == torch.int64
    with pytest.raises(ValueError, match="reserved key"):
        st.record(model, tiny_loader(x, y), layers={"head": "logits"}, progress=False)
    with pytest.raises(ValueError, match="`dtype` to be a floating"):
        st.record(model, tiny_loader(x, y), layers="conv", dtype=torch.int8, progress=False)


# --------------------------------------------------------------------------------------------
# cache: resume, reuse, refusal
# --------------------------------------------------------------------------------------------


def test_interrupted_extraction_resumes_and_equals_an_uninterrupted_one(
    resnet, images, in_memory, tmp_path
):
    counter = Counter(resnet)
    try:
        loader = DataLoader(Images(*images, fail_at=1300), batch_size=BATCH)
        with pytest.raises(RuntimeError, match="read error at item 1300"):
            st.record(resnet, loader, layers=LAYERS, cache=tmp_path, progress=False)
        assert counter.calls == 6  # batches 0..5; batch 6 failed while loading
        assert json.loads((tmp_path / PROGRESS_FILE).read_text()) == {"rows_done": 1200}
        with pytest.raises(ValueError, match="incomplete: 1200 of 2000 rows"):
            load_cache(tmp_path)
        counter.calls = 0
        resumed = st.record(resnet, loader, layers=LAYERS, cache=tmp_path, progress=False)
        assert counter.calls == 4  # only batches 6..9 ran
        counter.calls = 0
        again = st.record(resnet, loader, layers=LAYERS, cache=tmp_path, progress=False)
        assert counter.calls == 0  # complete: loaded, not recomputed
    finally:
        counter.handle.remove()
    for key in in_memory.keys():
        assert torch.equal(resumed[key], in_memory[key]), key
        assert torch.equal(again[key], in_memory[key]), key


class Reversed(Sampler):
    def __init__(self, n):
        self.n = n

    def __iter__(self):
        return iter(range(self.n - 1, -1, -1))

    def __len__(self):
        return self.n


def test_resume_follows_a_custom_sampler_order(tiny, tmp_path):
    model, x, y = tiny
    make = lambda fail_at=None: tiny_loader(x, y, sampler=Reversed(300), fail_at=fail_at)  # noqa: E731
    counter = Counter(model)
    with pytest.raises(RuntimeError, match="read error"):
        st.record(model, make(fail_at=120), layers="conv", cache=tmp_path, progress=False)
    assert counter.calls == 3  # items 299..150 ran; the batch holding item 120 failed
    counter.calls = 0
    resumed = st.record(model, make(), layers="conv", cache=tmp_path, progress=False)
    assert counter.calls == 3
    counter.handle.remove()
    expected = st.record(model, make(), layers="conv", progress=False)
    assert torch.equal(resumed["conv"], expected["conv"])
    assert torch.equal(resumed["labels"], y.flip(0))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ("model", "model checksum"),
        ("layer", "layers: cache has"),
        ("pool", "pooling: cache has"),
        ("dataset", "data sample"),
        ("split", "data length"),
    ],
)
def test_cache_of_another_source_is_refused_or_rebuilt_never_used(tiny, tmp_path, change, message):
    model, x, y = tiny
    st.record(model, tiny_loader(x, y), layers="conv", cache=tmp_path, progress=False)
    kwargs = {"layers": "conv", "pool": "avg"}
    loader = tiny_loader(x, y)
    if change == "model":
        model = TinyCNN().eval()
    elif change == "layer":
        kwargs["layers"] = "bn"
    elif change == "pool":
        kwargs["pool"] = fixed_pool
    elif change == "dataset":
        loader = tiny_loader(torch.randn_like(x), y)
    else:
        loader = tiny_loader(x[:200], y[:200])
    with pytest.raises(CacheMismatchError, match=message):
        st.record(model, loader, cache=tmp_path, progress=False, **kwargs)
    counter = Counter(model)
    rebuilt = st.record(model, loader, cache=tmp_path, overwrite=True, progress=False, **kwargs)
    counter.handle.remove()
    assert counter.calls == len(loader)
    expected = st.record(model, loader, progress=False, **kwargs)
    key = "bn" if change == "layer" else "conv"
    assert torch.equal(rebuilt[key], expected[key])
    meta = json.loads((tmp_path / "selectorch-cache.json").read_text())
    if change == "pool":
        assert meta["fingerprint"]["pool"] == {"conv": "callable:test_record.fixed_pool"}


def test_cache_refuses_shuffled_loaders_foreign_directories_and_plain_iterables(tiny, tmp_path):
    model, x, y = tiny
    with pytest.raises(ValueError, match="different order on each pass"):
        st.record(model, tiny_loader(x, y, shuffle=True), layers="conv", cache=tmp_path)
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not a selectorch cache"):
        st.record(model, tiny_loader(x, y), layers="conv", cache=tmp_path, overwrite=True)
    assert (tmp_path / "notes.txt").read_text() == "mine"
    with pytest.raises(TypeError, match="to be a torch DataLoader when `cache` is given"):
        st.record(model, [x[:10]], layers="conv", cache=tmp_path / "new")


class Augmented(Images):
    def __getitem__(self, i):
        x, y = super().__getitem__(i)
        return x + 0.01 * torch.randn_like(x), y


def test_cache_refuses_random_transforms_and_a_second_writer_but_takes_over_a_stale_lock(
    tiny, tmp_path
):
    model, x, y = tiny
    with pytest.raises(ValueError, match="random transforms or augmentation"):
        st.record(model, DataLoader(Augmented(x, y), batch_size=50), layers="conv", cache=tmp_path)
    lock = tmp_path / "writer.lock"
    lock.write_text(json.dumps({"pid": os.getppid(), "host": socket.gethostname()}))
    with pytest.raises(RuntimeError, match="being written by another process"):
        st.record(model, tiny_loader(x, y), layers="conv", cache=tmp_path, progress=False)
    gone = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], text=True, capture_output=True
    ).stdout.strip()
    lock.write_text(json.dumps({"pid": int(gone), "host": socket.gethostname()}))
    rec = st.record(model, tiny_loader(x, y), layers="conv", cache=tmp_path, progress=False)
    assert rec["conv"].shape == (300, 8) and not lock.exists()


def test_record_takes_any_iterable_of_batches_in_memory(tiny):
    model, x, y = tiny
    batches = [{"image": x[:7], "label": y[:7]}, {"image": x[7:20], "label": y[7:20]}]
    rec = st.record(model, batches, layers="conv", progress=False)
    assert rec.batch_size == torch.Size([20]) and torch.equal(rec["labels"], y[:20])
    with pytest.raises(ValueError, match="entries disagree on the batch size"):
        st.record(model, [(x[:4], y[:3])], layers="conv", progress=False)


MEMORY_SCRIPT = """
import sys, threading, torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset
import selectorch as st

class Synthetic(Dataset):  # items made on the fly: nothing held in RAM
    def __len__(self):
        return 40_000
    def __getitem__(self, i):
        return torch.full((8,), float(i)), i % 10

class Wide(nn.Module):  # 4096 floats (16 KiB) per row: 40,000 rows = 625 MiB
    def __init__(self):
        super().__init__()
        self.feat = nn.Identity()
    def forward(self, x):
        return self.feat(x.repeat(1, 512))

def rss_now():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024

class PeakGrowth:  # peak resident memory above the start, sampled every 2 ms by a thread
    def __enter__(self):
        self.start = self.peak = rss_now()
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self
    def _sample(self):
        while not self.done.wait(0.002):
            self.peak = max(self.peak, rss_now())
    def __exit__(self, *exc):
        self.done.set()
        self.thread.join()
        self.growth = max(self.peak, rss_now()) - self.start

model, root = Wide(), sys.argv[1]
warm = DataLoader(Subset(Synthetic(), range(1000)), batch_size=500)
st.record(model, warm, layers="feat", logits=False, cache=root + "/warm", progress=False)
loader = DataLoader(Synthetic(), batch_size=500)
with PeakGrowth() as cached:
    td = st.record(model, loader, layers="feat", logits=False, cache=root + "/big", progress=False)
    assert td["feat"].shape == (40_000, 4096) and float(td["feat"][-1, -1]) == 39_999.0
written = td["feat"].numel() * 4 / 2**20
del td
with PeakGrowth() as in_memory:  # control: the same recording held in RAM must show
    st.record(model, loader, layers="feat", logits=False, progress=False)
print(cached.growth, in_memory.growth, written)
"""


def test_memory_stays_flat_while_extracting_data_larger_than_the_budget(tmp_path):
    if not sys.platform.startswith("linux"):
        pytest.skip("reads VmRSS from /proc")
    script = tmp_path / "extract.py"
    script.write_text(textwrap.dedent(MEMORY_SCRIPT))
    done = subprocess.run(
        [sys.executable, str(script), str(tmp_path)], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    cached, in_memory, written = map(float, done.stdout.split())
    budget = 100.0  # MiB of growth allowed (allocator noise); the features are 6x that
    assert written > 6 * budget
    assert cached < budget, f"peak RSS grew {cached:.0f} MiB while caching {written:.0f} MiB"
    assert in_memory > 0.9 * written  # the measurement does see a recording held in RAM


# --------------------------------------------------------------------------------------------
# fitting and calibrating from recordings
# --------------------------------------------------------------------------------------------


def test_three_scores_fit_from_one_cache_run_the_model_zero_times(
    resnet, images, train_cache, in_memory, tmp_path
):
    val = DataLoader(Images(images[0][:400] * 1.1, images[1][:400]), batch_size=BATCH)
    st.record(resnet, val, layers=LAYERS, cache=tmp_path / "val", progress=False)
    counter = Counter(resnet)
    selective = [
        st.SelectiveModel(resnet, st.scores.KNNScore(k=5), layer="avgpool"),
        st.SelectiveModel(resnet, st.create_score("mahalanobis"), layer="layer3"),
        st.SelectiveModel(resnet, st.scores.SoftmaxScore()),
    ]
    for sel in selective:
        sel.fit(train_cache).calibrate(tmp_path / "val", coverage=0.9)
    counter.handle.remove()
    assert counter.calls == 0
    knn = st.scores.KNNScore(k=5).fit(in_memory["avgpool"])
    assert torch.equal(selective[0].score.bank_, knn.bank_)
    val_td = load_cache(tmp_path / "val")
    knn.calibrate(val_td["avgpool"], coverage=0.9)
    assert selective[0].get_threshold() == knn.get_threshold()
    selective[2].fit(in_memory).calibrate(val_td, coverage=0.9, risk=None)  # a TensorDict too
    for sel in selective:
        sel.close()


def test_fit_from_a_cache_of_another_layer_pooling_or_model_is_refused(resnet, tiny, train_cache):
    with st.SelectiveModel(resnet, st.scores.KNNScore(), layer="layer4") as sel:
        with pytest.raises(ValueError, match="holds no recording of layer 'layer4'"):
            sel.fit(train_cache)
    with st.SelectiveModel(resnet, st.scores.KNNScore(), layer="avgpool", pool="flatten") as sel:
        with pytest.raises(ValueError, match="pooled layer 'avgpool' with 'auto'"):
            sel.fit(train_cache)
    other = torchvision.models.resnet18(num_classes=10)
    with st.SelectiveModel(other, st.scores.KNNScore(), layer="avgpool") as sel:
        with pytest.raises(CacheMismatchError, match="recorded from another model"):
            sel.fit(train_cache)
    with st.SelectiveModel(resnet, st.scores.KNNScore(), layer="avgpool") as sel:
        with pytest.raises(ValueError, match="`y` is not used"):
            sel.fit(train_cache, torch.zeros(N_IMAGES))
        with pytest.raises(FileNotFoundError, match="No selectorch cache"):
            sel.fit(train_cache / "missing")


# --------------------------------------------------------------------------------------------
# seapig's conveniences: knn_search, progress switch, embedding plots, logging
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
def test_knn_search_of_the_score_equals_the_functional_search(metric):
    bank, query = torch.randn(300, 16), torch.randn(40, 16)
    score = st.scores.KNNScore(k=4, metric=metric).fit(bank)
    ref_bank = torch.nn.functional.normalize(bank, dim=1) if metric == "cosine" else bank
    for k in (None, 7):
        d, i = score.knn_search(query, k=k)
        d_ref, i_ref = knn_search(query, ref_bank, k or 4, metric=metric)
        assert d.shape == i.shape == (40, k or 4)
        assert torch.equal(i, i_ref) and torch.allclose(d, d_ref)
    assert torch.allclose(score.knn_search(query)[0][:, -1], score(query))
    with pytest.raises(ValueError, match=r"`k` to be in \[1, 300\]"):
        score.knn_search(query, k=301)
    with pytest.raises(st.NotFittedError):
        st.scores.KNNScore().knn_search(query)


class FakeBar:
    made: list[dict] = []

    def __init__(self, iterable=None, **kwargs):
        self.iterable, self.disable = iterable, kwargs["disable"]
        FakeBar.made.append(kwargs)

    def __iter__(self):
        return iter(self.iterable)

    def update(self, n):
        pass

    def close(self):
        pass


def test_progress_switch_env_var_and_every_bar_of_the_package(monkeypatch, tiny):
    model, x, y = tiny
    monkeypatch.setattr(progress, "tqdm", FakeBar)
    monkeypatch.delenv(progress.ENV_VAR, raising=False)
    progress.reset()
    try:
        assert progress.progress_bar(desc="t").disable is False
        assert progress.progress_bar(desc="t", enabled=False).disable is True
        monkeypatch.setenv(progress.ENV_VAR, "0")
        assert not progress.is_enabled() and progress.progress_bar(desc="t").disable is True
        progress.enable()  # an explicit call wins over the environment
        assert progress.progress_bar(desc="t").disable is False
        progress.disable()
        FakeBar.made.clear()
        st.record(model, tiny_loader(x, y), layers="conv")
        with st.SelectiveModel(model, st.scores.KNNScore(), layer="conv") as sel:
            sel.fit(tiny_loader(x, y))
        assert [bar["desc"] for bar in FakeBar.made] == ["record", "fit"]
        assert all(bar["disable"] for bar in FakeBar.made)
    finally:
        progress.reset()


def test_plot_embedding_sets_uses_pca_by_default_and_saves_a_png(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    from matplotlib.figure import Figure
    from matplotlib.image import imread

    ref, query = torch.randn(300, 16), torch.randn(60, 16) + 3
    query[0] = float("nan")
    selected = torch.arange(60) % 3 > 0
    fig = st.plot_embedding_sets(
        {"reference": ref, "query": query}, selected={"query": selected}, figsize=(4, 3)
    )
    assert isinstance(fig, Figure)
    ax = fig.axes[0]
    assert ax.get_title() == "PCA of 359 embeddings (1 non-finite rows left out)"
    labels = ax.get_legend_handles_labels()[1]
    assert labels == ["reference (300)", "query (59)", "query rejected (19)"]
    fig.savefig(tmp_path / "emb.png", dpi=50)
    assert imread(tmp_path / "emb.png").shape[:2] == (150, 200)
    with pytest.raises(ValueError, match="same D"):
        st.plot_embedding_sets({"a": ref, "b": torch.randn(5, 3)})
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None)
    assert st.plot_embedding_sets(ref, method="auto").axes[0].get_xlabel() == "PCA 1"


def test_plot_embedding_sets_falls_back_to_tsne_without_umap():
    pytest.importorskip("sklearn")
    fig = st.plot_embedding_sets(torch.randn(40, 8), method="tsne")
    assert fig.axes[0].get_title() == "t-SNE of 40 embeddings"
    try:
        import umap  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="pip install umap-learn"):
            st.plot_embedding_sets(torch.randn(40, 8), method="umap")


def test_logs_go_to_the_selectorch_logger_and_nothing_is_printed(tiny, tmp_path, caplog, capsys):
    model, x, y = tiny
    assert any(isinstance(h, logging.NullHandler) for h in logging.getLogger("selectorch").handlers)
    with caplog.at_level(logging.INFO, logger="selectorch"):
        st.record(model, tiny_loader(x, y), layers="conv", cache=tmp_path, progress=False)
        st.record(model, tiny_loader(x, y), layers="conv", cache=tmp_path, progress=False)
    assert [r.name for r in caplog.records] == ["selectorch.record", "selectorch.record"]
    assert "Recording 300 rows" in caplog.records[0].getMessage()
    assert "is complete (300 rows); the model does not run" in caplog.records[1].getMessage()
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""


@pytest.mark.gpu
def test_record_from_a_cuda_model_lands_on_cpu_and_a_cache_fits_on_cuda(tiny, tmp_path):
    model, x, y = tiny
    on_cpu = st.record(model, tiny_loader(x, y), layers="conv", progress=False)
    model.cuda()
    on_gpu = st.record(model, tiny_loader(x, y), layers="conv", progress=False)
    cached = st.record(model, tiny_loader(x, y), layers="conv", cache=tmp_path, progress=False)
    for td in (on_gpu, cached):
        assert td["conv"].device.type == "cpu" and td["labels"].device.type == "cpu"
        assert torch.allclose(td["conv"], on_cpu["conv"], atol=1e-4)
    with st.SelectiveModel(model, st.scores.KNNScore(k=3), layer="conv") as sel:
        sel.fit(tmp_path).calibrate(on_gpu, coverage=0.9)
        assert sel.score.bank_.device.type == "cuda"
        assert sel(x[:10].cuda()).selected.device.type == "cuda"


def test_evaluate_and_bench_take_recording_caches_without_running_the_model(tmp_path, capsys):
    from selectorch.cli import main as cli_main
    from selectorch.datasets import mnist5k, mnist_net

    net = mnist_net()
    images, labels = mnist5k()
    order = torch.randperm(5000, generator=torch.Generator().manual_seed(0))[:600]
    splits = {"train": order[:300], "val": order[300:450], "test": order[450:]}
    for name, idx in splits.items():
        loader = DataLoader(TensorDataset(images[idx], labels[idx]), batch_size=100)
        st.record(net, loader, layers=["classifier.1"], cache=tmp_path / name, progress=False)
    calls = []
    handle = net.register_forward_hook(lambda *a: calls.append(1))
    report = st.evaluate(
        net, ["cosine", "energy"], layer="classifier.1", fit=str(tmp_path / "train"),
        calibrate=tmp_path / "val", test=tmp_path / "test", progress=False,
    )
    handle.remove()
    assert calls == [] and len(report.rows) == 2
    args = ["--model", "selectorch.datasets:mnist_net", "--layer", "classifier.1",
            "--scores", "energy", "--no-plots", "--output", str(tmp_path / "out")]
    args += [f"--{name}={tmp_path / name}" for name in splits]
    assert cli_main(["bench", *args]) == 0
    assert "energy" in capsys.readouterr().out


def test_deup_fits_from_a_recording_as_from_the_loader_without_running_the_model(tiny):
    net, x, y = tiny
    recording = st.record(net, tiny_loader(x, y), layers=["pool"], progress=False)
    from_loader = st.SelectiveModel(net, st.scores.DEUPScore(), layer="pool")
    from_loader.fit(tiny_loader(x, y), progress=False)
    from_record = st.SelectiveModel(net, st.scores.DEUPScore(), layer="pool")
    counter = Counter(net)
    from_record.fit(recording, progress=False)
    assert counter.calls == 0
    probe = torch.randn(20, 8)
    torch.testing.assert_close(from_record.score.score(probe), from_loader.score.score(probe))
