"""SelectiveModel: one pass gives the untouched output, the score and the decision."""

from __future__ import annotations

import copy

import pytest
import torch
import torchvision
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import selectorch as st
from selectorch.scores import EnergyScore, KNNScore, Score, SoftmaxScore


def small_resnet() -> nn.Module:
    return torchvision.models.resnet18(num_classes=5).eval()


def images(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


@pytest.fixture
def fitted_knn() -> st.SelectiveModel:
    sel = st.SelectiveModel(small_resnet(), KNNScore(k=3), layer="avgpool")
    sel.fit(images(40), progress=False).calibrate(images(30, 1), coverage=0.8, progress=False)
    return sel


class TinyTextModel(nn.Module):
    """Hugging-Face-like: keyword inputs, padded batches, dict output with "logits"."""

    def __init__(self, vocab: int = 50, dim: int = 16, classes: int = 4):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.encoder = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, input_ids, attention_mask=None):
        h = torch.tanh(self.encoder(self.embed(input_ids)))
        if attention_mask is not None:
            h = h * attention_mask.unsqueeze(-1)
        return {"logits": self.head(h[:, 0]), "hidden_states": h}


class SpyScore(Score):
    """Records what fit received, to check labels are passed through."""

    input = "logits"

    def _fit(self, X, y):
        self.seen_y = y

    def _score(self, X):
        return X[:, 0]


def test_output_is_bitwise_the_bare_models_output(fitted_knn):
    x = images(6, 2)
    with torch.no_grad():
        bare = fitted_knn.model(x)
        out = fitted_knn(x)
    assert isinstance(out, st.SelectiveOutput)
    assert torch.equal(out.output, bare)
    assert out.score.shape == (6,) and out.selected.shape == (6,)
    assert out.selected.dtype == torch.bool


def test_forward_score_equals_standalone_score_on_recorded_embeddings(fitted_knn):
    x = images(5, 3)
    with torch.no_grad():
        out = fitted_knn(x)
        feats = nn.Sequential(*list(fitted_knn.model.children())[:-1])(x).flatten(1)
    expected = fitted_knn.score.score(feats)
    torch.testing.assert_close(out.score, expected)
    assert torch.equal(out.selected, expected <= fitted_knn.get_threshold())


def test_fit_banks_every_reference_embedding(fitted_knn):
    assert fitted_knn.score.bank_.shape == (40, 512)


def test_calibrate_uses_finite_sample_rank(fitted_knn):
    with torch.no_grad():
        cal = torch.sort(fitted_knn(images(30, 1)).score).values
    # n = 30, coverage 0.8: rank ceil(31 * 0.8) = 25
    assert fitted_knn.get_threshold() == pytest.approx(cal[24].item(), rel=1e-6)


def test_compile_fullgraph_matches_eager_and_recalibration_does_not_recompile(fitted_knn):
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    compiled = torch.compile(fitted_knn, backend=backend, fullgraph=True)
    x = images(4, 4)
    with torch.no_grad():
        eager = fitted_knn(x)
        fast = compiled(x)
        assert torch.equal(fast.output, eager.output)
        torch.testing.assert_close(fast.score, eager.score)
        assert torch.equal(fast.selected, eager.selected)
        fitted_knn.calibrate(images(30, 5), coverage=0.5, progress=False)
        again = compiled(x)
    assert len(graphs) == 1
    assert torch.equal(again.selected, again.score <= fitted_knn.get_threshold())


def test_compile_with_inductor_matches_eager_for_logit_score():
    sel = st.SelectiveModel(small_resnet(), EnergyScore())
    sel.calibrate(images(20), coverage=0.9, progress=False)
    x = images(3, 1)
    with torch.no_grad():
        eager = sel(x)
        fast = torch.compile(sel, fullgraph=True)(x)
    torch.testing.assert_close(fast.output, eager.output, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(fast.score, eager.score, rtol=1e-4, atol=1e-4)


def test_state_dict_loads_into_unfitted_twin(fitted_knn):
    twin = st.SelectiveModel(copy.deepcopy(fitted_knn.model), KNNScore(k=3), layer="avgpool")
    twin.load_state_dict(fitted_knn.state_dict())
    x = images(5, 6)
    with torch.no_grad():
        a, b = fitted_knn(x), twin(x)
    assert torch.equal(a.score, b.score) and torch.equal(a.selected, b.selected)
    assert twin.get_threshold() == fitted_knn.get_threshold()
    assert set(fitted_knn.state_dict()) >= {"score.bank_", "score.threshold_", "model.fc.weight"}


def test_deepcopy_is_independent(fitted_knn):
    twin = copy.deepcopy(fitted_knn)
    x = images(4, 7)
    with torch.no_grad():
        before = fitted_knn(x)
        twin.model.fc.weight.add_(1.0)
        twin.score.bank_.mul_(2.0)
        after_original = fitted_knn(x)
        after_twin = twin(x)
    assert torch.equal(before.score, after_original.score)
    assert not torch.equal(after_twin.score, before.score)
    assert not torch.equal(after_twin.output, before.output)


def test_double_moves_fitted_state_and_runs_in_float64(fitted_knn):
    x = images(3, 8)
    with torch.no_grad():
        ref = fitted_knn(x)
        fitted_knn.double()
        out = fitted_knn(x.double())
    assert fitted_knn.score.bank_.dtype == torch.float64
    assert fitted_knn.threshold_.dtype == torch.float64
    torch.testing.assert_close(out.score.float(), ref.score, rtol=1e-4, atol=1e-4)


def test_nan_input_row_is_rejected_and_other_rows_are_unaffected(fitted_knn):
    x = images(4, 9)
    with torch.no_grad():
        clean = fitted_knn(x)
        x[2, 1, 5, 5] = float("nan")
        dirty = fitted_knn(x)
    assert dirty.score[2] == float("inf") and not dirty.selected[2]
    keep = [0, 1, 3]
    assert torch.equal(dirty.score[keep], clean.score[keep])


def test_inf_logit_row_is_rejected_for_logit_scores():
    class Fixed(nn.Module):
        def forward(self, logits):
            return logits * 1.0

    sel = st.SelectiveModel(Fixed(), SoftmaxScore())
    sel.calibrate(torch.randn(50, 3), coverage=0.9, progress=False)
    logits = torch.tensor([[5.0, 0.0, 0.0], [float("inf"), 0.0, 0.0]])
    with torch.no_grad():
        out = sel(logits)
    assert out.score[1] == float("inf") and not out.selected[1]
    assert out.selected[0]


def test_empty_batch_gives_empty_outputs(fitted_knn):
    with torch.no_grad():
        out = fitted_knn(images(0))
    assert out.score.shape == (0,) and out.selected.shape == (0,)


def test_unfitted_and_uncalibrated_use_raise_not_fitted():
    sel = st.SelectiveModel(small_resnet(), KNNScore(k=2), layer="avgpool")
    with pytest.raises(st.NotFittedError, match=r"fit\("):
        sel(images(2))
    with pytest.raises(st.NotFittedError, match=r"fit\("):
        sel.calibrate(images(10), coverage=0.5, progress=False)
    sel.fit(images(10), progress=False)
    with pytest.raises(st.NotFittedError, match=r"calibrate\("):
        sel(images(2))


def test_embedding_score_without_layer_is_refused():
    with pytest.raises(ValueError, match="layer="):
        st.SelectiveModel(small_resnet(), KNNScore())


def test_non_score_is_refused():
    with pytest.raises(TypeError, match="`score`.*Score.*Linear"):
        st.SelectiveModel(small_resnet(), nn.Linear(2, 2))


def test_unknown_layer_suggests_close_names():
    with pytest.raises(ValueError, match=r"'avgpol' not found in ResNet\. Did you mean 'avgpool'"):
        st.SelectiveModel(small_resnet(), KNNScore(), layer="avgpol")


def test_compiled_model_is_refused():
    with pytest.raises(TypeError, match="already compiled"):
        st.SelectiveModel(torch.compile(small_resnet()), EnergyScore())


@pytest.mark.parametrize("coverage", [0.0, 1.5, -0.2, True])
def test_calibrate_rejects_bad_coverage(fitted_knn, coverage):
    with pytest.raises(ValueError, match="`coverage`"):
        fitted_knn.calibrate(images(10), coverage=coverage, progress=False)


def test_calibrate_with_too_few_samples_says_how_many_are_needed(fitted_knn):
    with pytest.raises(ValueError, match="at least 99 calibration samples.*n=10"):
        fitted_knn.calibrate(images(10), coverage=0.99, progress=False)


def test_fit_accepts_tuple_dict_and_tensor_batches_with_labels():
    x, y = torch.randn(12, 3), torch.arange(12) % 3

    class Ident(nn.Module):
        def forward(self, inputs):
            return inputs + 0.0

    for data, labels in [
        (DataLoader(TensorDataset(x, y), batch_size=5), None),
        ([{"image": x[:6], "label": y[:6]}, {"image": x[6:], "label": y[6:]}], None),
        (x, y),
    ]:
        spy = SpyScore()
        st.SelectiveModel(Ident(), spy).fit(data, labels, batch_size=4, progress=False)
        assert torch.equal(spy.seen_y, y)


def test_fit_refuses_labels_with_a_loader():
    loader = DataLoader(TensorDataset(torch.randn(4, 3)), batch_size=2)
    sel = st.SelectiveModel(nn.Identity(), SpyScore())
    with pytest.raises(ValueError, match="`y` is only used with a tensor"):
        sel.fit(loader, torch.zeros(4), progress=False)


def test_fit_runs_in_eval_mode_and_restores_training_flags():
    model = small_resnet().train()
    running = model.bn1.running_mean.clone()
    sel = st.SelectiveModel(model, KNNScore(), layer="avgpool").fit(images(8), progress=False)
    assert torch.equal(model.bn1.running_mean, running)
    assert model.training and model.layer1[0].bn1.training
    assert sel.score.is_fitted


def test_keyword_inputs_and_dict_outputs_like_hugging_face():
    model = TinyTextModel().eval()
    ids = torch.randint(0, 50, (20, 7))
    mask = torch.ones(20, 7, dtype=torch.long)
    mask[::2, 4:] = 0  # padded batch
    batches = [
        {"input_ids": ids[i : i + 5], "attention_mask": mask[i : i + 5]} for i in range(0, 20, 5)
    ]
    sel = st.SelectiveModel(model, EnergyScore()).fit(batches, progress=False)
    sel.calibrate(batches, coverage=0.75, progress=False)
    with torch.no_grad():
        out = sel(input_ids=ids[:3], attention_mask=mask[:3])
        bare = model(input_ids=ids[:3], attention_mask=mask[:3])
    torch.testing.assert_close(out.score, -torch.logsumexp(bare["logits"], dim=1))
    assert torch.equal(out.output["logits"], bare["logits"])

    knn = st.SelectiveModel(model, KNNScore(k=2), layer="encoder")
    knn.fit(batches, progress=False).calibrate(batches, coverage=0.75, progress=False)
    with torch.no_grad():
        assert knn(input_ids=ids[:3], attention_mask=mask[:3]).score.shape == (3,)


def test_logits_are_found_in_tuple_outputs():
    class TwoHeads(nn.Module):
        def forward(self, x):
            return x * 2.0, x.sum(1)

    sel = st.SelectiveModel(TwoHeads(), SoftmaxScore()).calibrate(
        torch.randn(30, 4), coverage=0.9, progress=False
    )
    x = torch.randn(2, 4)
    with torch.no_grad():
        out = sel(x)
    torch.testing.assert_close(out.score, -torch.softmax(x * 2.0, 1).amax(1))


def test_output_without_logits_asks_for_a_layer():
    class Strings(nn.Module):
        def forward(self, x):
            return "not logits"

    sel = st.SelectiveModel(Strings(), SoftmaxScore())
    with pytest.raises(TypeError, match="layer="):
        sel.calibrate(torch.randn(10, 2), coverage=0.5, progress=False)


def test_close_removes_exactly_the_added_hooks():
    model = small_resnet()
    user_hook = model.avgpool.register_forward_hook(lambda m, a, o: None)
    with st.SelectiveModel(model, KNNScore(), layer="avgpool") as sel:
        assert len(model.avgpool._forward_hooks) == 2
    assert list(model.avgpool._forward_hooks) == [user_hook.id]
    with pytest.raises(RuntimeError, match="closed"):
        sel.fit(images(3), progress=False)


def test_fit_does_not_change_the_model():
    model = small_resnet()
    before = copy.deepcopy(model.state_dict())
    st.SelectiveModel(model, KNNScore(), layer="layer4").fit(images(6), progress=False)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_fit_streams_an_iterable_dataset_without_a_length():
    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            g = torch.Generator().manual_seed(0)
            for _ in range(10):
                yield torch.randn(3, 32, 32, generator=g)

    sel = st.SelectiveModel(small_resnet(), KNNScore(k=2), layer="avgpool")
    sel.fit(DataLoader(Stream(), batch_size=4), progress=False)
    assert sel.score.bank_.shape == (10, 512)


def test_dict_batches_pass_every_non_label_key_to_the_model():
    seen = {}

    class WithMask(nn.Module):
        def forward(self, pixel_values, pixel_mask=None):
            seen["mask"] = pixel_mask
            return pixel_values.flatten(1) * pixel_mask.flatten(1)

    x, mask = torch.randn(6, 2, 2), torch.ones(6, 2, 2)
    batch = {"pixel_values": x, "pixel_mask": mask, "label": torch.arange(6), "meta": None}
    batch.pop("meta")
    st.SelectiveModel(WithMask(), SoftmaxScore()).calibrate([batch], coverage=0.5, progress=False)
    assert seen["mask"] is mask


def test_non_tensor_dict_labels_are_ignored():
    spy = SpyScore()
    batch = {"input": torch.randn(4, 3), "label": ["a", "b", "c", "d"]}
    st.SelectiveModel(nn.Identity(), spy).fit([batch], progress=False)
    assert spy.seen_y is None


def test_layer_must_be_one_name():
    with pytest.raises(
        TypeError, match=r"`layer` to be a layer name \(str\) or None, got \['avgpool'\]"
    ):
        st.SelectiveModel(small_resnet(), KNNScore(), layer=["avgpool"])


def test_numpy_integers_and_floats_are_accepted_as_hyperparameters():
    np = pytest.importorskip("numpy")
    score = KNNScore(k=np.int64(3)).fit(torch.randn(20, 4))
    score.calibrate(torch.randn(20, 4), coverage=np.float32(0.5))
    assert score.k == 3 and isinstance(score.k, int)


def test_classwise_knn_in_a_selective_model_searches_the_predicted_class():
    from selectorch.scores import ClassWiseKNNScore

    model = small_resnet()
    x, y = images(40), torch.arange(40) % 5
    sel = st.SelectiveModel(model, ClassWiseKNNScore(k=2), layer="avgpool")
    sel.fit(x, y, progress=False).calibrate(images(30, 1), coverage=0.8, progress=False)
    q = images(4, 2)
    with torch.no_grad():
        out = sel(q)
        feats = nn.Sequential(*list(model.children())[:-1])(q).flatten(1)
        expected = sel.score.score_with_preds(feats, model(q).argmax(1))
    torch.testing.assert_close(out.score, expected)


def test_deup_in_a_selective_model_learns_the_models_own_loss():
    from selectorch.scores import DEUPScore

    model = small_resnet()
    x, y = images(60), torch.arange(60) % 5
    sel = st.SelectiveModel(model, DEUPScore(epochs=5, folds=2), layer="avgpool")
    sel.fit(x, y, progress=False)
    assert sel.score.is_fitted
    with pytest.raises(ValueError, match="needs labelled data"):
        st.SelectiveModel(model, DEUPScore(epochs=5), layer="avgpool").fit(x, progress=False)


@pytest.mark.parametrize("make", [lambda: KNNScore(k=2), EnergyScore])
def test_fit_and_calibrate_run_the_model_without_autograd(make):
    """No graph is built over a whole fit or calibration (memory), for stateful and stateless."""
    grad_modes = []
    net = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    net.register_forward_hook(lambda m, a, out: grad_modes.append(torch.is_grad_enabled()))
    layer = "1" if isinstance(make(), KNNScore) else None
    sel = st.SelectiveModel(net, make(), layer=layer)
    x = torch.randn(40, 6, generator=torch.Generator().manual_seed(0))
    sel.fit(x, batch_size=16, progress=False)
    sel.calibrate(x, coverage=0.9, batch_size=16, progress=False)
    assert grad_modes == [False] * 6
