"""SelectiveModel with multi-layer scores (LayerScore): hooks, pooling, recordings, save and load.

A tiny LayerScore written here (sum of each layer's distance to its fitted mean, plus the
negative max logit) checks the SelectiveModel side on its own, against a hand computation.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch._dynamo.testing import CompileCounter
from torch.utils.data import DataLoader, TensorDataset

import selectorch as st
from selectorch.scores import registry
from selectorch.scores.layers import LayerScore


class MeanDistance(LayerScore):
    """``sum_l ||x_l - mean_l|| - max(logits)``: a transparent LayerScore for these tests."""

    fitted_buffers = ("dims_", "means_")

    def __init__(self, *, pool: str | None = None) -> None:
        super().__init__()
        self.pool = pool
        self.register_buffer("means_", torch.empty(0))

    def _fit_layers(self, features, logits, y):
        self._set_buffer("means_", torch.cat([f.mean(dim=0) for f in features]))

    def _score_layers(self, features, logits):
        means = self.means_.split(self._dims)
        dists = [(f - m).norm(dim=1) for f, m in zip(features, means, strict=True)]
        return torch.stack(dists).sum(dim=0) - logits.amax(dim=1)


class ConvNet(nn.Module):
    """Two conv blocks (``(B, 4, 6, 6)`` and ``(B, 6, 3, 3)`` outputs) and a linear head."""

    def __init__(self):
        super().__init__()
        self.block1 = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU())
        self.block2 = nn.Sequential(nn.Conv2d(4, 6, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
        self.head = nn.Linear(6 * 3 * 3, 5)

    def forward(self, x):
        return self.head(self.block2(self.block1(x)).flatten(1))


LAYERS = ["block1", "block2"]


def net() -> nn.Module:
    torch.manual_seed(0)
    return ConvNet().eval()


def images(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, 3, 6, 6, generator=torch.Generator().manual_seed(seed))


def by_hand(model, x, pool="avg"):
    """The score's input computed by hand: each block's output pooled, and the logits."""
    with torch.no_grad():
        a = model.block1(x)
        b = model.block2(a)
        logits = model.head(b.flatten(1))
    if pool == "avg":
        a, b = a.mean(dim=(2, 3)), b.mean(dim=(2, 3))
    else:  # "flatten"
        a, b = a.flatten(1), b.flatten(1)
    return {"block1": a, "block2": b, "logits": logits}


@pytest.fixture
def sel() -> st.SelectiveModel:
    sel = st.SelectiveModel(net(), MeanDistance(), layer=LAYERS)
    sel.fit(images(40, seed=1), progress=False)
    return sel.calibrate(images(30, seed=2), coverage=0.8, progress=False)


def test_fit_calibrate_and_forward_read_every_layer_and_the_logits(sel):
    fit = by_hand(sel.model, images(40, seed=1))
    means = torch.cat([fit["block1"].mean(0), fit["block2"].mean(0)])
    torch.testing.assert_close(sel.score.means_, means)
    assert sel.score.layers_ == LAYERS and sel.score.dims_.tolist() == [4, 6]
    x = images(7, seed=3)
    with torch.no_grad():
        out = sel(x)
    assert torch.equal(out.output, sel.model(x))
    X = by_hand(sel.model, x)
    expected = (
        (X["block1"] - means[:4]).norm(dim=1)
        + (X["block2"] - means[4:]).norm(dim=1)
        - X["logits"].amax(dim=1)
    )
    torch.testing.assert_close(out.score, expected)
    torch.testing.assert_close(out.score, sel.score(X), rtol=0, atol=0)
    assert torch.equal(out.selected, out.score <= sel.threshold_)


def test_compiled_fullgraph_is_one_graph_across_batches_and_recalibration(sel):
    counter = CompileCounter()
    compiled = torch.compile(sel, backend=counter, fullgraph=True)
    with torch.no_grad():
        for seed in (4, 5):
            x = images(8, seed=seed)
            x[1, 0, 0, 0] = float("nan")
            fast, eager = compiled(x), sel(x)
            torch.testing.assert_close(fast.score, eager.score)
            assert fast.score[1] == float("inf") and not fast.selected[1]
        sel.calibrate(images(30, seed=6), coverage=0.7, progress=False)
        compiled(images(8, seed=7))
    assert counter.frame_count == 1


def test_the_scores_pool_is_used_with_pool_auto_and_an_explicit_pool_wins():
    preferring = st.SelectiveModel(net(), MeanDistance(pool="flatten"), layer=LAYERS)
    assert preferring.layer_pool == "flatten"
    preferring.fit(images(20, seed=8), progress=False)
    assert preferring.score.dims_.tolist() == [4 * 6 * 6, 6 * 3 * 3]
    expected = by_hand(preferring.model, images(20, seed=8), pool="flatten")
    means = torch.cat([expected["block1"].mean(0), expected["block2"].mean(0)])
    torch.testing.assert_close(preferring.score.means_, means)
    explicit = st.SelectiveModel(net(), MeanDistance(pool="flatten"), layer=LAYERS, pool="avg")
    assert explicit.layer_pool == "avg"
    explicit.fit(images(20, seed=8), progress=False)
    assert explicit.score.dims_.tolist() == [4, 6]


def test_recordings_and_caches_fit_the_same_state_as_the_loader(sel, tmp_path):
    loader = DataLoader(TensorDataset(images(40, seed=1)), batch_size=16)
    rec = st.record(sel.model, loader, layers=LAYERS, progress=False)
    twin = st.SelectiveModel(sel.model, MeanDistance(), layer=LAYERS).fit(rec, progress=False)
    torch.testing.assert_close(twin.score.means_, sel.score.means_, rtol=1e-6, atol=1e-6)
    cache = tmp_path / "cache"
    st.record(sel.model, loader, layers=LAYERS, cache=cache, progress=False)
    twin.fit(cache, progress=False)
    torch.testing.assert_close(twin.score.means_, sel.score.means_, rtol=1e-6, atol=1e-6)
    flat = st.SelectiveModel(sel.model, MeanDistance(), layer=LAYERS, pool="flatten")
    with pytest.raises(ValueError, match=r"pooled layer 'block1' with 'auto'.*pools it with"):
        flat.fit(cache, progress=False)
    only_one = st.record(sel.model, loader, layers=["block1"], progress=False)
    with pytest.raises(ValueError, match=r"to hold \['block2'\]"):
        twin.fit(only_one, progress=False)


def test_save_and_load_rebuild_the_layers_and_the_state(sel, tmp_path):
    name = "_mean_distance_test"
    registry.register_score(name)(MeanDistance)
    try:
        path = sel.save(tmp_path / "sel")
        again = st.SelectiveModel.load(path, sel.model, example_input=images(2, seed=9))
    finally:
        registry._REGISTRY.pop(name, None)
        MeanDistance.registry_name = ""
    assert again.layer == LAYERS and again.score.layers_ == LAYERS
    x = images(6, seed=10)
    with torch.no_grad():
        assert torch.equal(again(x).score, sel(x).score)


def test_layer_errors_name_what_to_pass():
    with pytest.raises(
        ValueError, match=r"MeanDistance reads several layers: pass layer=\[\.\.\.\]"
    ):
        st.SelectiveModel(net(), MeanDistance())
    with pytest.raises(ValueError, match=r"names 'logits', the key of the model's output"):
        st.SelectiveModel(net(), MeanDistance(), layer=["block1", "logits"])
    with pytest.raises(ValueError, match=r"Layer 'block3' not found"):
        st.SelectiveModel(net(), MeanDistance(), layer=["block1", "block3"])


def test_check_features_names_the_layer_whose_width_changed(sel):
    other = st.SelectiveModel(sel.model, MeanDistance(), layer=LAYERS, pool="flatten")
    other.load_state_dict(sel.state_dict())
    with pytest.raises(ValueError, match=r"`X\['block1'\]` to have 4 features per row.* got 144"):
        other.check_features(images(2, seed=11))


def test_drop_nonfinite_drops_a_row_bad_in_one_layer_only():
    sel = st.SelectiveModel(net(), MeanDistance(), layer=LAYERS)
    x = images(20, seed=12)
    x[3, :, :, :] = float("inf")  # every layer and the logits of row 3 are non-finite
    with pytest.warns(st.NonFiniteRowsWarning, match=r"Dropped 1 of 20 rows"):
        sel.fit(x, progress=False, drop_nonfinite=True)
    clean = by_hand(sel.model, torch.cat([x[:3], x[4:]]))
    torch.testing.assert_close(sel.score.means_[:4], clean["block1"].mean(0))


def test_fit_names_the_layer_with_nan_rows_whatever_the_key_order():
    # the logits key first: the features are not in the dict's key order
    X = {"logits": torch.randn(20, 3), "a": torch.rand(20, 4), "b": torch.rand(20, 5)}
    X["b"][3, 1] = float("nan")
    with pytest.raises(ValueError, match=r"`X\['b'\]` has 1 of 20 rows with NaN"):
        MeanDistance().fit(X)


def test_logits_on_another_device_than_the_state_are_refused_by_name():
    X = {"a": torch.rand(20, 4), "b": torch.rand(20, 5), "logits": torch.randn(20, 3)}
    score = MeanDistance().fit(X)
    query = {"a": torch.rand(4, 4), "b": torch.rand(4, 5), "logits": torch.randn(4, 3)}
    query["logits"] = query["logits"].to("meta")  # a device other than the state's
    with pytest.raises(ValueError, match=r"`X\['logits'\]` on cpu, .* got a tensor on meta"):
        score(query)
