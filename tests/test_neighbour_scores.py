"""Tests of the neighbour-based scores: LID, trust score and DkNN.

Each score: module == functional == an independent reference written here (plain Python loops
over numpy rows, float64), edge cases (zero distances, classes out of range, missing labels),
and real MNIST features of the ccexam CNN, held-out digits against Fashion-MNIST.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch._dynamo.testing import CompileCounter

import selectorch as st
from selectorch import datasets
from selectorch.exceptions import NotFittedError
from selectorch.functional import auroc, class_banks
from selectorch.functional.neighbours import (
    class_nearest_search,
    density_filter,
    dknn_score,
    lid_mle,
    lid_score,
    trust_score,
)
from selectorch.scores import DkNNScore, LIDScore, TrustScore, create_score

# ============================== independent references ========================================


def distances_to(query: np.ndarray, rows: np.ndarray) -> list[float]:
    """Euclidean distances from one query to each row, one Python loop."""
    return [math.sqrt(float(((query - row) ** 2).sum())) for row in rows]


def reference_lid(query, bank, k: int) -> np.ndarray:
    out = []
    for q in query.double().numpy():
        r = sorted(distances_to(q, bank.double().numpy()))[:k]
        if r[-1] == 0 or r[0] == 0:
            out.append(0.0)
            continue
        mean_log = sum(math.log(ri / r[-1]) for ri in r) / k
        out.append(math.inf if mean_log == 0 else -1.0 / mean_log)
    return np.array(out)


def reference_kept_rows(X, y, k: int, alpha: float) -> list[int]:
    """Per class, drop the floor(alpha * n) rows with the largest k-th other-row distance."""
    X, y = X.double().numpy(), y.numpy()
    kept = []
    for c in sorted(set(y.tolist())):
        rows = [i for i in range(len(y)) if y[i] == c]
        radius = {
            i: sorted(distances_to(X[i], X[[j for j in rows if j != i]]))[k - 1] for i in rows
        }
        n_drop = math.floor(alpha * len(rows))
        by_radius = sorted(rows, key=lambda i: radius[i])
        kept += by_radius[: len(rows) - n_drop]
    return sorted(kept)


def reference_trust(query, X, y, preds, k: int, alpha: float) -> np.ndarray:
    kept = reference_kept_rows(X, y, k, alpha)
    Xk, yk = X.double().numpy()[kept], y.numpy()[kept]
    classes = sorted(set(yk.tolist()))
    out = []
    for b, q in enumerate(query.double().numpy()):
        nearest = {c: min(distances_to(q, Xk[yk == c])) for c in classes}
        pred = min(nearest, key=nearest.get) if preds is None else int(preds[b])
        if pred not in nearest:
            out.append(math.inf)
            continue
        other = min(d for c, d in nearest.items() if c != pred)
        out.append(nearest[pred] / other)
    return np.array(out)


def reference_dknn(queries, banks, labels, classes, k: int) -> np.ndarray:
    out = []
    for b in range(classes.shape[0]):
        differ = 0
        for query, bank in zip(queries, banks, strict=True):
            d = distances_to(query[b].double().numpy(), bank.double().numpy())
            nearest = sorted(range(len(d)), key=lambda j: d[j])[:k]
            differ += sum(int(labels[j]) != int(classes[b]) for j in nearest)
        out.append(differ / (len(banks) * k))
    return np.array(out)


def blobs(n: int, seed: int, dim: int = 6, classes: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` rows around ``classes`` separated centres, and their labels."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % classes
    centres = torch.randn(classes, dim, generator=g) * 3.0
    return centres[y] + torch.randn(n, dim, generator=g), y


# ============================== LID ===========================================================


@pytest.mark.parametrize(("k", "chunk_size"), [(2, 16384), (7, 16384), (7, 13)])
def test_lid_module_equals_functional_equals_python_loop(k, chunk_size):
    bank, _ = blobs(60, seed=0)
    query, _ = blobs(9, seed=1)
    query = query + 5.0  # away from the bank's mean: the centring matters
    module = LIDScore(k=k, chunk_size=chunk_size).fit(bank)
    expected = torch.from_numpy(reference_lid(query, bank, k)).float()
    torch.testing.assert_close(module(query), expected, rtol=1e-4, atol=1e-5)
    func = lid_score(query, bank, k, chunk_size=chunk_size)
    torch.testing.assert_close(func, expected, rtol=1e-4, atol=1e-5)  # LID amplifies rounding
    assert module.bank_.shape == (60, 6)


def test_lid_zero_distances_give_the_estimators_limits_not_nan():
    d = torch.tensor(
        [
            [0.0, 1.0, 2.0],  # the query equals one reference row: LID 0
            [0.0, 0.0, 0.0],  # all k neighbours coincide with it: 0, not 0/0
            [2.0, 2.0, 2.0],  # all k at the same distance: unbounded
            [1.0, 2.0, 4.0],
        ]
    )
    out = lid_mle(d)
    assert out[:3].tolist() == [0.0, 0.0, math.inf]
    assert out[3].item() == pytest.approx(-1.0 / ((math.log(0.25) + math.log(0.5)) / 3))
    # a query equal to a bank row, through the module (exact recomputed distances)
    bank, _ = blobs(40, seed=2)
    score = LIDScore(k=5).fit(bank)
    duplicated = torch.cat([bank, bank[:1]])
    twice = LIDScore(k=5).fit(duplicated)
    assert score(bank[:3]).tolist() == [0.0, 0.0, 0.0]
    assert twice(bank[:1]).tolist() == [0.0]
    assert not torch.isnan(score(bank[:3] + 1e-3)).any()


def test_lid_does_not_change_when_every_embedding_is_scaled():
    bank, _ = blobs(50, seed=3)
    query, _ = blobs(6, seed=4)
    plain = LIDScore(k=6).fit(bank)(query)
    scaled = LIDScore(k=6).fit(bank * 40.0)(query * 40.0)
    torch.testing.assert_close(scaled, plain, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("k", [0, 1])
def test_lid_k_below_two_raises_naming_k(k):
    with pytest.raises(ValueError, match=r"`k`"):
        LIDScore(k=k)
    with pytest.raises(ValueError, match=r"`k` to be at least 2"):
        lid_score(torch.zeros(1, 2), torch.zeros(5, 2), k=1)


def test_lid_k_above_the_bank_size_raises_at_fit():
    with pytest.raises(ValueError, match=r"`k` to be at most the bank size 10, got k=20"):
        LIDScore().fit(torch.randn(10, 3))


# ============================== trust score ===================================================


@pytest.mark.parametrize(("alpha", "chunk_size"), [(0.0, 16384), (0.25, 16384), (0.25, 7)])
def test_trust_module_equals_functional_equals_python_loop(alpha, chunk_size):
    X, y = blobs(45, seed=5)
    query, _ = blobs(12, seed=6)
    preds = torch.tensor([0, 1, 2] * 4)
    module = TrustScore(k=3, alpha=alpha, chunk_size=chunk_size).fit(X, y)
    expected = torch.from_numpy(reference_trust(query, X, y, preds, 3, alpha)).float()
    got = module.score_with_preds(query, preds)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    # the functional form, on the kept rows
    keep = density_filter(X, y, 3, alpha)
    assert keep.tolist() == reference_kept_rows(X, y, 3, alpha)
    assert int(module.class_sizes().sum()) == 45 - 3 * math.floor(alpha * 15)
    banks = class_banks(X[keep], y[keep])
    torch.testing.assert_close(trust_score(query, banks, preds, chunk_size=chunk_size), expected)


def test_trust_without_preds_scores_against_the_nearest_rows_class():
    X, y = blobs(60, seed=7)
    query, _ = blobs(10, seed=8)
    score = TrustScore().fit(X, y)
    expected = torch.from_numpy(reference_trust(query, X, y, None, 10, 0.0)).float()
    alone = score(query)
    torch.testing.assert_close(alone, expected, rtol=1e-5, atol=1e-6)
    assert ((alone >= 0) & (alone <= 1)).all()
    nearest = score.predicted_classes(query)
    torch.testing.assert_close(score.score_with_preds(query, nearest), alone)
    # predicting the second-nearest class inverts the ratio: above 1, closer to another class
    d, _ = class_nearest_search(query - X.mean(dim=0), score.bank_)
    second = d.argsort(dim=1)[:, 1]
    torch.testing.assert_close(score.score(query), alone)
    torch.testing.assert_close(score.score(query, preds=second, batch_size=3), 1 / alone)
    assert (score.score_with_preds(query, (nearest + 1) % 3) >= 1).all()


def test_trust_zero_distances_give_zero_one_or_inf():
    X = torch.tensor([[0.0, 0.0], [0.0, 0.0], [5.0, 5.0], [9.0, 0.0], [1.0, 1.0]])
    y = torch.tensor([0, 1, 1, 2, 0])
    score = TrustScore().fit(X, y)
    query = torch.tensor([[5.0, 5.0], [5.0, 5.0], [0.0, 0.0], [9.0, 0.0]])
    out = score.score_with_preds(query, torch.tensor([1, 0, 0, 1]))
    # on its own class's row: 0; on a row of another class: inf; on rows of both: 1
    assert out.tolist() == [0.0, math.inf, 1.0, math.inf]


def test_trust_prediction_outside_the_fitted_classes_scores_inf():
    X, y = blobs(30, seed=9)
    score = TrustScore(k=2).fit(X, y)
    out = score.score_with_preds(X[:3] + 0.1, torch.tensor([-1, 3, 2]))
    assert out[:2].tolist() == [math.inf, math.inf] and math.isfinite(out[2].item())


def test_trust_argument_errors_name_the_argument():
    X, y = blobs(30, seed=10)
    with pytest.raises(ValueError, match=r"TrustScore needs class labels: expected argument `y`"):
        TrustScore().fit(X)
    with pytest.raises(ValueError, match=r"at least 2 classes in `y`, got 1"):
        TrustScore().fit(X, torch.zeros(30, dtype=torch.long))
    with pytest.raises(ValueError, match=r"`alpha` to be a number in \[0, 1\), got 1.0"):
        TrustScore(alpha=1.0)
    with pytest.raises(ValueError, match=r"k \+ 1 = 11 reference rows .* got 10 in class 0"):
        TrustScore(k=10, alpha=0.1).fit(X, y)
    score = TrustScore(k=3).fit(X, y)
    with pytest.raises(ValueError, match=r"`preds` to be an \(5,\) integer tensor"):
        score.score_with_preds(X[:5], torch.zeros(5))
    with pytest.raises(NotFittedError, match="TrustScore is not fitted yet"):
        TrustScore().score_with_preds(X[:5], torch.zeros(5, dtype=torch.long))


def test_trust_calibrate_and_select_score_with_the_given_preds():
    X, y = blobs(90, seed=11)
    cal, cal_y = blobs(60, seed=12)
    query, _ = blobs(20, seed=13)
    preds_cal, preds = (cal_y + 1) % 3, torch.arange(20) % 3
    score = TrustScore(k=4, alpha=0.1).fit(X, y)
    score.calibrate(cal, coverage=0.8, preds=preds_cal)
    torch.testing.assert_close(
        score.calibration_scores_.sort().values,
        score.score_with_preds(cal, preds_cal).sort().values,
    )
    out = score.select(query, preds=preds)
    torch.testing.assert_close(out["score"], score.score_with_preds(query, preds))
    assert torch.equal(out["selected"], out["score"] <= score.threshold_)
    # per-class thresholds follow the same classes
    score.calibrate(cal, coverage=0.8, preds=cal_y, per_class=True)
    assert score.threshold_.shape == (3,)
    out = score.select(query, preds=preds)
    assert torch.equal(out["selected"], out["score"] <= score.threshold_[preds])


@pytest.mark.parametrize("chunk_size", [1, 5, 16384])
def test_class_nearest_search_matches_brute_force_with_unbalanced_classes(chunk_size):
    X, _ = blobs(23, seed=14)
    y = torch.tensor([0] * 15 + [1] * 2 + [3] * 6)  # class 2 has no rows
    query, _ = blobs(5, seed=15)
    d, pos = class_nearest_search(query, class_banks(X, y), chunk_size=chunk_size)
    for b in range(5):
        for c in range(4):
            rows = (y == c).nonzero().flatten()
            if rows.numel() == 0:
                assert d[b, c] == math.inf
                continue
            dist = (X[rows] - query[b]).norm(dim=1)
            assert d[b, c].item() == pytest.approx(dist.min().item(), rel=1e-4)
            assert pos[b, c].item() == dist.argmin().item()


def test_trust_compiles_to_one_graph_with_preds():
    X, y = blobs(60, seed=16)
    score = TrustScore(k=3, alpha=0.1).fit(X, y)
    counter = CompileCounter()
    compiled = torch.compile(score.score_with_preds, backend=counter, fullgraph=True)
    for seed in (17, 18):
        query, _ = blobs(8, seed=seed)
        query[2, 0] = math.nan
        preds = torch.arange(8) % 3
        torch.testing.assert_close(compiled(query, preds), score.score_with_preds(query, preds))
    assert counter.frame_count == 1


# ============================== DkNN ==========================================================


def layer_inputs(n: int, seed: int, classes: int = 3) -> tuple[dict, torch.Tensor]:
    """Three layers of different widths and logits, loosely tied to the labels."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(classes, (n,), generator=g)
    X = {
        name: torch.randn(n, width, generator=g) + 2.0 * torch.eye(width)[y]
        for name, width in (("conv", 7), ("fc", 5), ("penultimate", 4))
    }
    X["logits"] = torch.randn(n, classes, generator=g) + 2.0 * torch.eye(classes)[y]
    return X, y


@pytest.mark.parametrize("n_layers", [2, 3])
def test_dknn_module_equals_functional_equals_python_loop(n_layers):
    X, y = layer_inputs(80, seed=0)
    Q, _ = layer_inputs(15, seed=1)
    names = ["conv", "fc", "penultimate"][:n_layers]
    X = {key: X[key] for key in [*names, "logits"]}
    Q = {key: Q[key] for key in ["logits", *reversed(names)]}  # any key order
    score = DkNNScore(k=6, chunk_size=11).fit(X, y)
    classes = Q["logits"].argmax(dim=1)
    expected = reference_dknn([Q[n] for n in names], [X[n] for n in names], y, classes, 6)
    torch.testing.assert_close(score(Q), torch.from_numpy(expected).float())
    func = dknn_score([Q[n] for n in names], [X[n] for n in names], y, classes, 6)
    torch.testing.assert_close(func, torch.from_numpy(expected).float())
    assert score.layers_ == names and score.bank_.shape == (80, [7, 12, 16][n_layers - 1])


def test_dknn_fit_without_labels_raises_naming_y():
    X, _ = layer_inputs(20, seed=2)
    with pytest.raises(ValueError, match=r"DkNNScore needs class labels: expected argument `y`"):
        DkNNScore(k=3).fit(X)
    with pytest.raises(ValueError, match=r"`y` to be an \(N,\) integer tensor"):
        DkNNScore(k=3).fit(X, torch.zeros(20))
    with pytest.raises(ValueError, match=r"`k` to be at most the number of reference rows 20"):
        DkNNScore().fit(X, torch.zeros(20, dtype=torch.long))


def test_dknn_calibrate_with_true_labels_keeps_rows_whose_credibility_is_high_enough():
    X, y = layer_inputs(120, seed=3)
    cal, cal_y = layer_inputs(60, seed=4)
    Q, _ = layer_inputs(40, seed=5)
    score = DkNNScore(k=5).fit(X, y)
    score.calibrate(cal, y=cal_y, coverage=0.8)
    names = ["conv", "fc", "penultimate"]
    alphas = reference_dknn([cal[n] for n in names], [X[n] for n in names], y, cal_y, 5)
    assert sorted(score.calibration_scores_.tolist()) == pytest.approx(sorted(alphas))
    # kept <=> credibility (fraction of calibration nonconformities >= the sample's) is at
    # least that of the threshold: the conformal p-value test of the paper
    alpha = score(Q)
    credibility = (torch.from_numpy(alphas)[None, :] >= alpha[:, None]).float().mean(dim=1)
    level = (torch.from_numpy(alphas) >= score.get_threshold()).float().mean()
    assert torch.equal(score.select(Q)["selected"], credibility >= level)
    # without labels, the held-out rows are scored for the model's prediction
    score.calibrate(cal, coverage=0.8)
    torch.testing.assert_close(score.calibration_scores_.sort().values, score(cal).sort().values)


def test_dknn_state_dict_loads_into_an_unfitted_twin_and_compiles_to_one_graph():
    X, y = layer_inputs(60, seed=6)
    Q, _ = layer_inputs(10, seed=7)
    score = DkNNScore(k=4).fit(X, y).calibrate(X, coverage=0.9)
    twin = create_score("dknn", k=4)
    twin.load_state_dict(score.state_dict())
    assert torch.equal(twin(Q), score(Q)) and twin.get_threshold() == score.get_threshold()
    counter = CompileCounter()
    compiled = torch.compile(score, backend=counter, fullgraph=True)
    Q["fc"][3, 0] = math.nan
    out = compiled(Q)
    torch.testing.assert_close(out, score(Q))
    assert out[3] == math.inf and counter.frame_count == 1


def test_neighbour_scores_declare_their_cost():
    for cls in (LIDScore, TrustScore, DkNNScore):
        assert (cls.requires_grad, cls.passes, cls.compile_clean) == (False, 1, True)
    assert TrustScore.needs_preds and DkNNScore.keys is None


# ============================== real data: MNIST CNN ==========================================

LAYERS = ["features", "classifier.1"]  # pooled conv block (64), penultimate after ReLU (128)


@pytest.fixture(scope="module")
def mnist():
    """Features of the ccexam CNN: 1000 digits to fit, 500 held-out digits, 600 noisy digits
    (+1.0 x randn, about 80% accuracy) and 500 Fashion-MNIST images."""
    net = datasets.mnist_net()
    images, labels = datasets.mnist5k()
    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(len(images), generator=g)  # mnist5k is sorted by label
    images, labels = images[perm], labels[perm]
    noisy = images[1500:2100] + torch.randn(600, 1, 28, 28, generator=g)
    parts = {"fit": images[:1000], "held": images[1000:1500], "noisy": noisy}
    parts["fashion"] = datasets.fashion_mnist()[0][:500]
    out = {}
    with st.Recorder(net, LAYERS) as rec, torch.no_grad():
        for name, x in parts.items():
            logits, feats = rec(x)
            out[name] = {**feats, "logits": logits}
    out["y"], out["noisy_y"] = labels[:1000], labels[1500:2100]
    out["net"], out["images"], out["labels"] = net, images, labels
    return out


def test_mnist_neighbour_scores_separate_fashion_from_held_out_digits(mnist):
    held, fashion, fit = mnist["held"], mnist["fashion"], mnist["fit"]
    is_ood = torch.arange(1000) >= 500
    pen = "classifier.1"
    lid = LIDScore().fit(fit[pen])
    trust = TrustScore().fit(fit[pen], mnist["y"])
    dknn = DkNNScore().fit(fit, mnist["y"])
    results = {
        "lid": torch.cat([lid(held[pen]), lid(fashion[pen])]),
        "trust": torch.cat(
            [trust.score_with_preds(d[pen], d["logits"].argmax(dim=1)) for d in (held, fashion)]
        ),
        "dknn": torch.cat([dknn(held), dknn(fashion)]),
    }
    # measured: lid 0.987, trust 0.989, dknn (k=75, two layers) 0.960
    floors = {"lid": 0.95, "trust": 0.95, "dknn": 0.92}
    for name, scores in results.items():
        value = auroc(scores, is_ood).item()
        assert value >= floors[name], f"{name} AUROC Fashion vs digits {value:.3f}"


def test_mnist_trust_ranks_the_errors_on_noisy_digits_above_correct_ones(mnist):
    noisy, pen = mnist["noisy"], "classifier.1"
    preds = noisy["logits"].argmax(dim=1)
    wrong = preds != mnist["noisy_y"]
    assert 0.7 < 1 - wrong.float().mean().item() < 0.9
    trust = TrustScore(alpha=0.1).fit(mnist["fit"][pen], mnist["y"])
    value = auroc(trust.score_with_preds(noisy[pen], preds), wrong).item()
    assert value >= 0.77, f"trust AUROC for errors {value:.3f}"  # measured 0.811


def test_mnist_selective_model_with_dknn_over_two_layers(mnist):
    images, labels = mnist["images"], mnist["labels"]
    sel = st.SelectiveModel(mnist["net"], DkNNScore(k=20), layer=LAYERS)
    sel.fit(images[:300], labels[:300], progress=False)
    sel.calibrate(images[1300:1500], coverage=0.9, progress=False)
    with torch.no_grad():
        out = sel(images[1000:1100])
    expected = sel.score({key: value[:100] for key, value in mnist["held"].items()})
    torch.testing.assert_close(out.score, expected)
    assert 0.8 <= out.selected.float().mean().item() <= 0.98
    assert set(sel.score.layers_) == set(LAYERS)


def test_mnist_selective_model_with_trust_passes_the_models_prediction(mnist):
    images, labels = mnist["images"], mnist["labels"]
    sel = st.SelectiveModel(mnist["net"], TrustScore(), layer="classifier.1")
    sel.fit(images[:300], labels[:300], progress=False)
    sel.calibrate(images[1300:1500], coverage=0.9, progress=False)
    with torch.no_grad():
        out = sel(images[1000:1100])
    held = mnist["held"]
    preds = held["logits"][:100].argmax(dim=1)
    expected = sel.score.score_with_preds(held["classifier.1"][:100], preds)
    torch.testing.assert_close(out.score, expected)
    assert 0.8 <= out.selected.float().mean().item() <= 0.98


def test_selective_model_calibrates_dknn_on_the_true_labels(mnist):
    net, images, labels = mnist["net"], mnist["images"], mnist["labels"]
    g = torch.Generator().manual_seed(5)
    cal_x = images[1000:1300] + torch.randn(300, 1, 28, 28, generator=g)  # some errors
    cal_y = labels[1000:1300]
    sel = st.SelectiveModel(net, DkNNScore(), layer=LAYERS)
    sel.fit(images[:1000], labels[:1000], progress=False)
    sel.calibrate(cal_x, cal_y, coverage=0.9, progress=False)
    with st.Recorder(net, LAYERS) as rec, torch.no_grad():
        logits, feats = rec(cal_x)
    cal = {**feats, "logits": logits}
    alone = DkNNScore().fit(mnist["fit"], mnist["y"]).calibrate(cal, y=cal_y, coverage=0.9)
    torch.testing.assert_close(
        sel.score.calibration_scores_.sort().values, alone.calibration_scores_.sort().values
    )
    assert sel.score.get_threshold() == alone.get_threshold()
    wrong = logits.argmax(dim=1) != cal_y
    assert wrong.sum() > 10
    # without labels the held-out rows are scored for the model's prediction: another threshold
    sel.calibrate(cal_x, coverage=0.9, progress=False)
    torch.testing.assert_close(
        sel.score.calibration_scores_.sort().values, alone(cal).sort().values
    )
    assert not torch.equal(alone(cal).sort().values, alone.calibration_scores_.sort().values)
    assert DkNNScore.calibrates_on_labels and not TrustScore.calibrates_on_labels
