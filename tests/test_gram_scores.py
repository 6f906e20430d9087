"""GramScore and its Gram features against Python-loop references (per sample, power, channel),
on synthetic data and on the real MNIST network's conv blocks, and digits vs Animal-MNIST."""

from __future__ import annotations

import copy
import io
import math
import pickle

import pytest
import torch
from test_gradient_head_scores import GRAM_LAYERS, mnist_recording

import selectorch as st
from selectorch.functional.gram import (
    GramFeatures,
    gram_deviations,
    gram_features,
    gram_ranges,
    gram_score,
)
from selectorch.functional.ranking import auroc
from selectorch.scores import GramScore, create_score
from selectorch.scores.gram import held_out_rows

# ============================== references ====================================================


def loop_gram_features(x: torch.Tensor, powers: int) -> torch.Tensor:
    """For each sample, power p and channel i: the signed p-th root of sum_j (F^p (F^p)^T)_ij,
    with the Gram entries as plain dot products over the spatial axis (float64)."""
    F = x.double().flatten(2)
    B, C, _ = F.shape
    out = torch.zeros(B, powers * C, dtype=torch.float64)
    for b in range(B):
        for p in range(1, powers + 1):
            Fp = F[b] ** p
            for i in range(C):
                r = sum(float(Fp[i] @ Fp[j]) for j in range(C))
                out[b, (p - 1) * C + i] = math.copysign(abs(r) ** (1.0 / p), r)
    return out


def loop_deviation(v: float, low: float, high: float) -> float:
    if v < low:
        return (low - v) / max(abs(low), 1e-6)
    if v > high:
        return (v - high) / max(abs(high), 1e-6)
    return 0.0


def loop_gram_score(fit: dict, query: dict, fraction: float) -> list[float]:
    """Ranges per predicted class on the kept rows (all kept rows for a class none predicts),
    each layer's mean deviation on the held-out rows (every 1/fraction-th row: i is held out
    when floor((i + 1) f) > floor(i f)), and the normalised sum of layers."""
    layers = [key for key in fit if key != "logits"]
    n = fit["logits"].shape[0]
    held_rows = [i for i in range(n) if math.floor((i + 1) * fraction) > math.floor(i * fraction)]
    held_rows = held_rows or [n - 1]
    kept_rows = [i for i in range(n) if i not in held_rows]
    n_classes = fit["logits"].shape[1]
    predicted = [int(row.argmax()) for row in fit["logits"]]
    ranges = {}
    for c in range(n_classes):
        rows = [i for i in kept_rows if predicted[i] == c] or kept_rows
        for layer in layers:
            for k in range(fit[layer].shape[1]):
                values = [float(fit[layer][i, k]) for i in rows]
                ranges[c, layer, k] = (min(values), max(values))

    def layer_deviations(data: dict, i: int) -> dict:
        c = int(data["logits"][i].argmax())
        return {
            layer: sum(
                loop_deviation(float(data[layer][i, k]), *ranges[c, layer, k])
                for k in range(data[layer].shape[1])
            )
            for layer in layers
        }

    held = [layer_deviations(fit, i) for i in held_rows]
    normalizer = {layer: max(sum(d[layer] for d in held) / len(held), 1e-6) for layer in layers}
    out = []
    for i in range(query["logits"].shape[0]):
        devs = layer_deviations(query, i)
        out.append(sum(devs[layer] / normalizer[layer] for layer in layers))
    return out


def synthetic(n: int, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        "a": torch.randn(n, 6, generator=g) * 2,
        "b": torch.rand(n, 4, generator=g) + 0.5,
        "logits": torch.randn(n, 3, generator=g),
    }


# ============================== Gram features =================================================


@pytest.mark.parametrize("shape", [(3, 4, 3, 5), (2, 5, 7), (2, 3, 2, 2, 3)])
def test_gram_features_equal_a_loop_over_samples_powers_and_channels(shape):
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(0))  # signed: odd powers < 0
    expected = loop_gram_features(x, powers=5)
    torch.testing.assert_close(gram_features(x.double(), 5), expected, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(gram_features(x, 5).double(), expected, rtol=2e-5, atol=1e-5)
    assert GramFeatures(5)(x).shape == (shape[0], 5 * shape[1])


def test_gram_features_of_large_and_weak_channels_stay_accurate_in_float32():
    # 10 powers of activations near 3000 would reach 1e69 in float32 Gram entries; a weak
    # channel 1e-4 of the strongest keeps its relative precision
    g = torch.Generator().manual_seed(1)
    x = torch.rand(2, 3, 4, 4, generator=g) * torch.tensor([3000.0, 1.0, 1e-4])[None, :, None, None]
    expected = loop_gram_features(x, powers=10)
    out = gram_features(x, 10)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), expected, rtol=1e-4, atol=0)


def test_gram_features_of_the_mnist_conv_blocks_equal_the_loop():
    data = mnist_recording()
    net, images = data["net"], data["images"][:1]
    with st.Recorder(net, list(GRAM_LAYERS), pool="none") as rec, torch.no_grad():
        _, maps = rec(images)
    for layer in GRAM_LAYERS:
        expected = loop_gram_features(maps[layer], powers=10)
        got = data["features"][layer][:1].double()
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_gram_features_refuse_vectors_and_integer_maps():
    with pytest.raises(ValueError, match=r"channels-first feature map .* got shape \(4, 8\)"):
        gram_features(torch.rand(4, 8))
    with pytest.raises(
        TypeError, match=r"`x` to be a floating-point tensor, got dtype torch.int64"
    ):
        gram_features(torch.ones(2, 3, 4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"`powers` to be an integer >= 1, got 0"):
        GramFeatures(0)


def test_gram_features_pooling_is_picklable_and_compares_by_powers():
    pool = pickle.loads(pickle.dumps(GramFeatures(4)))
    assert pool == GramFeatures(4) and pool != GramFeatures(3)
    assert repr(pool) == "GramFeatures(powers=4)"
    score = GramScore(powers=4)
    assert score.pool == GramFeatures(4)
    assert copy.deepcopy(score).pool == GramFeatures(4)


# ============================== deviations and the score =====================================


def test_gram_score_equals_the_loop_reference():
    fit, query = synthetic(60, seed=2), synthetic(12, seed=3)
    query["a"][0] = 40.0  # far outside every range
    score = GramScore(normalize_fraction=0.25).fit(fit)
    expected = torch.tensor(loop_gram_score(fit, query, 0.25))
    torch.testing.assert_close(score(query).double(), expected.double(), rtol=1e-5, atol=1e-5)
    assert score.layers_ == ["a", "b"] and score.dims_.tolist() == [6, 4]
    assert score(query).argmax() == 0


def test_gram_score_on_real_mnist_gram_features_equals_the_loop_reference():
    data = mnist_recording()
    fit = {key: data["features"][key][:60] for key in GRAM_LAYERS} | {"logits": data["logits"][:60]}
    rows = slice(600, 606)  # held-out digits ...
    query = {key: data["features"][key][rows] for key in GRAM_LAYERS}
    query["logits"] = data["logits"][rows]
    score = GramScore().fit(fit)
    expected = torch.tensor(loop_gram_score(fit, query, 0.2))
    torch.testing.assert_close(score(query).double(), expected.double(), rtol=1e-5, atol=1e-4)


def test_gram_functional_pieces_compose_to_the_module():
    fit, query = synthetic(50, seed=4), synthetic(9, seed=5)
    score = GramScore().fit(fit)
    X = torch.cat([query["a"], query["b"]], dim=1)
    devs = gram_deviations(X, query["logits"].argmax(dim=1), score.mins_, score.maxs_, [6, 4])
    torch.testing.assert_close(gram_score(devs, score.normalizer_), score(query))


def test_a_class_predicted_by_no_fitting_row_gets_the_overall_range_not_nan():
    ranges = gram_ranges(torch.tensor([[1.0, 5.0], [3.0, 2.0]]), torch.tensor([0, 0]), 2)
    assert ranges.mins.tolist() == [[1.0, 2.0], [1.0, 2.0]]
    assert ranges.maxs.tolist() == [[3.0, 5.0], [3.0, 5.0]]
    assert ranges.counts.tolist() == [2.0, 0.0]
    fit = synthetic(40, seed=6)
    fit["logits"][:, 2] = -10.0  # no fitting row predicts class 2
    query = synthetic(8, seed=7)
    query["logits"][:, 2] = 10.0
    score = GramScore().fit(fit)
    assert score.class_counts_[2] == 0
    out = score(query)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(
        out.double(), torch.tensor(loop_gram_score(fit, query, 0.2)).double()
    )


def test_gram_score_state_dict_round_trip_keeps_layers_and_scores():
    fit, query = synthetic(50, seed=8), synthetic(10, seed=9)
    score = GramScore(powers=3).fit(fit).calibrate(synthetic(30, seed=10), coverage=0.9)
    buffer = io.BytesIO()
    torch.save(score.state_dict(), buffer)
    buffer.seek(0)
    twin = GramScore(powers=3)
    twin.load_state_dict(torch.load(buffer, weights_only=True))
    assert twin.layers_ == ["a", "b"] and twin.is_calibrated
    torch.testing.assert_close(twin(query), score(query), rtol=0, atol=0)


def test_gram_score_errors_name_the_argument():
    with pytest.raises(ValueError, match=r"`normalize_fraction` to be a number in \(0, 1\)"):
        GramScore(normalize_fraction=1.0)
    with pytest.raises(ValueError, match=r"`powers` to be an integer >= 1, got 2.5"):
        GramScore(powers=2.5)
    with pytest.raises(ValueError, match=r"needs at least 2 rows to fit.* got 1"):
        GramScore().fit(synthetic(1, seed=0))
    score = GramScore().fit(synthetic(20, seed=0))
    query = synthetic(4, seed=1)
    query["logits"] = torch.randn(4, 5)
    with pytest.raises(ValueError, match=r"`X\['logits'\]` to have 3 classes.* got 5"):
        score(query)
    cls = type(create_score("gram"))
    assert (cls.requires_grad, cls.passes, cls.compile_clean) == (False, 1, True)


def test_gram_score_captures_one_graph_equal_to_eager():
    from torch._dynamo.testing import CompileCounter

    score = GramScore().fit(synthetic(40, seed=11))
    counter = CompileCounter()
    compiled = torch.compile(score, backend=counter, fullgraph=True)
    for seed in (12, 13):
        query = synthetic(8, seed=seed)
        query["a"][2, 0] = float("nan")
        out = compiled(query)
        torch.testing.assert_close(out, score(query))
        assert out[2] == math.inf
    assert counter.frame_count == 1


# ============================== real data =====================================================


# measured AUROC (300 digits vs 300 Animal-MNIST drawings, fitted on 600 digits): 0.940 with
# both conv blocks; 0.851 (features.2) and 0.911 (features.5) alone
def test_mnist_digits_vs_animal_drawings_auroc_with_two_conv_blocks():
    data = mnist_recording()
    feats, logits = data["features"], data["logits"]
    fit = {key: feats[key][data["fit"]] for key in GRAM_LAYERS} | {"logits": logits[data["fit"]]}
    query = {key: feats[key][data["query"]] for key in GRAM_LAYERS}
    query["logits"] = logits[data["query"]]
    value = auroc(GramScore().fit(fit)(query), data["is_ood"]).item()
    assert value >= 0.91, f"GramScore AUROC {value:.4f} < 0.91"


def test_selective_model_records_gram_features_with_the_scores_pool():
    data = mnist_recording()
    net, images = data["net"], data["images"]
    # pool="auto" (the default) takes the score's GramFeatures pooling for every hooked layer
    sel = st.SelectiveModel(net, GramScore(), layer=list(GRAM_LAYERS))
    sel.fit(images[:100], progress=False).calibrate(images[100:150], coverage=0.9, progress=False)
    out = sel(images[150:166])
    feats, logits = data["features"], data["logits"]
    alone = GramScore().fit(
        {key: feats[key][:100] for key in GRAM_LAYERS} | {"logits": logits[:100]}
    )
    query = {key: feats[key][150:166] for key in GRAM_LAYERS} | {"logits": logits[150:166]}
    torch.testing.assert_close(out.score, alone(query), rtol=1e-4, atol=1e-4)


def test_held_out_rows_are_evenly_spaced_so_sorted_classes_split_alike():
    held = held_out_rows(1000, 0.2)
    assert int(held.sum()) == 200
    labels = torch.arange(1000) // 100  # ten classes, sorted
    assert torch.bincount(labels[held], minlength=10).tolist() == [20] * 10
    assert held_out_rows(3, 0.1).tolist() == [False, False, True]  # at least one row
