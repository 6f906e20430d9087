"""Tests of the logit scores: every score and task against a numpy reference, binary symmetry,
temperature fitting, persistence, compile, ensembles and argument errors.

Module == functional == an independent float64 numpy reference written here. The numpy binary
reference works from ``p = sigmoid(z)`` directly, not from the centred-pair trick of the library.
"""

from __future__ import annotations

import io
import math
import re
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import selectorch as st
from selectorch import functional as F
from selectorch.scores import (
    EnergyScore,
    EntropyScore,
    GENScore,
    LogitScore,
    MarginScore,
    MaxLogitScore,
    MutualInformationScore,
    PredictiveVarianceScore,
    SoftmaxScore,
    create_score,
    list_scores,
)

# name -> (module class, functional, hyperparameters used in these tests)
SCORES = {
    "softmax": (SoftmaxScore, F.softmax_score, {}),
    "max_logit": (MaxLogitScore, F.max_logit_score, {}),
    "energy": (EnergyScore, F.energy_score, {}),
    "entropy": (EntropyScore, F.entropy_score, {}),
    "margin": (MarginScore, F.margin_score, {}),
    "gen": (GENScore, F.gen_score, {"gamma": 0.3, "M": 3}),
}
ENSEMBLE_SCORES = {
    "mutual_information": (MutualInformationScore, F.mutual_information_score),
    "predictive_variance": (PredictiveVarianceScore, F.predictive_variance_score),
}
PROBABILITY_SCORES = ["softmax", "entropy", "margin", "gen"]  # invariant to shifting the logits

# input kinds: (task, shape of the logits)
KINDS = {
    "multiclass": ("multiclass", (12, 5)),
    "binary-1d": ("binary", (12,)),
    "binary-column": ("binary", (12, 1)),
    "binary-two-logits": ("binary", (12, 2)),
    "multilabel": ("multilabel", (12, 4)),
}
ENSEMBLE_KINDS = {
    "multiclass": ("multiclass", (7, 5, 4)),
    "binary-column": ("binary", (7, 1, 4)),
    "binary-two-logits": ("binary", (7, 2, 4)),
    "multilabel": ("multilabel", (7, 3, 4)),
}


def logits_of(shape: tuple[int, ...], seed: int = 0, scale: float = 3.0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


# ============================== numpy references ==============================================


def np_softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def np_multiclass(name: str, z: np.ndarray, T: float, gamma: float, M: int) -> np.ndarray:
    """Scores of ``(N, C)`` logits, straight from the definitions."""
    z = z / T
    p = np_softmax(z)
    ordered = -np.sort(-p, axis=1)  # descending
    if name == "softmax":
        return -p.max(axis=1)
    if name == "max_logit":
        return -z.max(axis=1)
    if name == "energy":
        return -T * np.log(np.exp(z).sum(axis=1))
    if name == "entropy":
        return -(p * np.log(p)).sum(axis=1)
    if name == "margin":
        return -(ordered[:, 0] - ordered[:, 1])
    top = ordered[:, :M]
    return (top**gamma * (1 - top) ** gamma).sum(axis=1)


def np_binary(name: str, z: np.ndarray, T: float, gamma: float, M: int) -> np.ndarray:
    """Scores of ``(N,)`` log-odds from ``p = sigmoid(z / T)`` and ``max(p, 1 - p)``."""
    p = 1 / (1 + np.exp(-z / T))
    confidence = np.maximum(p, 1 - p)
    if name == "softmax":
        return -confidence
    if name == "max_logit":
        return -np.abs(z) / (2 * T)
    if name == "energy":
        return -T * np.log(2 * np.cosh(z / (2 * T)))
    if name == "entropy":
        return -(p * np.log(p) + (1 - p) * np.log(1 - p))
    if name == "margin":
        return -np.abs(2 * p - 1)
    return min(M, 2) * (p * (1 - p)) ** gamma


def np_reference(name: str, kind: str, z: np.ndarray, T: float, gamma=0.1, M=100) -> np.ndarray:
    task, shape = KINDS[kind]
    if task == "multiclass" or shape[-1:] == (2,) and task == "binary":
        return np_multiclass(name, z, T, gamma, M)
    if task == "binary":
        return np_binary(name, z.reshape(-1), T, gamma, M)
    return np.stack([np_binary(name, z[:, c], T, gamma, M) for c in range(z.shape[1])]).mean(0)


def np_entropy(q: np.ndarray) -> float:
    return float(-(q * np.log(q)).sum())


def np_ensemble(name: str, kind: str, z: np.ndarray, T: float) -> np.ndarray:
    """Per sample and label, the members' distributions as an (M, K) array; loops only."""
    task, _ = ENSEMBLE_KINDS[kind]
    n, c, m = z.shape
    out = []
    for i in range(n):
        if task == "multiclass" or (task == "binary" and c == 2):
            dists = [np.stack([np_softmax(z[i, :, j] / T) for j in range(m)])]
        else:
            dists = []
            for label in range(c):
                p = 1 / (1 + np.exp(-z[i, label] / T))
                dists.append(np.stack([1 - p, p], axis=1))
        values = []
        for P in dists:
            if name == "mutual_information":
                mean = P.mean(axis=0)
                values.append(np_entropy(mean) - np.mean([np_entropy(P[j]) for j in range(m)]))
            else:
                values.append(P.var(axis=0).mean())
        out.append(np.mean(values))
    return np.array(out)


# ============================== each score and task against numpy ==============================


@pytest.mark.parametrize("temperature", [1.0, 2.0, 0.5])
@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("name", list(SCORES))
def test_score_module_equals_functional_equals_numpy(name, kind, temperature):
    cls, fn, kwargs = SCORES[name]
    task, shape = KINDS[kind]
    z = logits_of(shape, seed=1)
    module = cls(task=task, temperature=temperature, **kwargs)(z)
    functional = fn(z, temperature, task=task, **kwargs)
    reference = np_reference(name, kind, z.double().numpy(), temperature, **kwargs)
    assert module.shape == (12,) and module.dtype == torch.float32
    torch.testing.assert_close(module, functional, rtol=0, atol=0)
    np.testing.assert_allclose(module.numpy(), reference, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", list(SCORES))
def test_binary_confident_negative_scores_as_confident_as_confident_positive(name):
    cls, _, kwargs = SCORES[name]
    z = torch.tensor([-10.0, 10.0, -3.0, 3.0, 0.0])
    for logits in (z, z[:, None], torch.stack([-z / 2, z / 2], dim=1)):
        s = cls(task="binary", **kwargs)(logits)
        assert s[0] == s[1] and s[2] == s[3], s.tolist()
        # confident < less confident < undecided, whatever the sign of the log-odds
        assert s[0] < s[2] < s[4], s.tolist()
    # the peer bug: the energy of (0, z) calls z = -10 less confident than z = 0
    naive = -torch.logsumexp(torch.stack([torch.zeros(5), z], dim=1), dim=1)
    assert naive[0] > naive[4]


@pytest.mark.parametrize("name", list(SCORES))
def test_binary_single_logit_equals_its_centred_pair_and_probability_scores_any_pair(name):
    cls, _, kwargs = SCORES[name]
    z = logits_of((12,), seed=2)
    score = cls(task="binary", **kwargs)
    single = score(z)
    torch.testing.assert_close(score(torch.stack([-z / 2, z / 2], dim=1)), single)
    if name in PROBABILITY_SCORES:  # softmax(0, z) = (1 - sigmoid(z), sigmoid(z)) too
        torch.testing.assert_close(score(torch.stack([torch.zeros(12), z], dim=1)), single)


@pytest.mark.parametrize("name", list(SCORES))
def test_multilabel_is_the_mean_of_per_label_binary_scores(name):
    cls, _, kwargs = SCORES[name]
    z = logits_of((12, 4), seed=3)
    multilabel = cls(task="multilabel", **kwargs)(z)
    per_label = torch.stack([cls(task="binary", **kwargs)(z[:, c]) for c in range(4)], dim=1)
    torch.testing.assert_close(multilabel, per_label.mean(dim=1))


@pytest.mark.parametrize("name", list(SCORES))
def test_two_logit_binary_is_multiclass_with_two_classes(name):
    cls, _, kwargs = SCORES[name]
    z = logits_of((12, 2), seed=4)
    assert torch.equal(cls(task="binary", **kwargs)(z), cls(**kwargs)(z))


def test_known_values_on_uniform_and_one_hot_logits():
    C, gamma = 6, 0.2
    flat = torch.zeros(3, C)
    assert F.softmax_score(flat).tolist() == pytest.approx([-1 / C] * 3)
    assert F.max_logit_score(flat + 2.0).tolist() == [-2.0] * 3
    assert F.energy_score(flat).tolist() == pytest.approx([-math.log(C)] * 3)
    assert F.entropy_score(flat).tolist() == pytest.approx([math.log(C)] * 3)
    assert F.margin_score(flat).tolist() == [0.0] * 3
    uniform_gen = C * ((1 / C) * (1 - 1 / C)) ** gamma
    assert F.gen_score(flat, gamma=gamma).tolist() == pytest.approx([uniform_gen] * 3)
    sharp = torch.tensor([[200.0, 0.0, 0.0]])
    assert F.softmax_score(sharp).item() == -1.0
    assert F.margin_score(sharp).item() == -1.0
    assert F.entropy_score(sharp).item() == pytest.approx(0.0, abs=1e-30)
    # binary: z = 0 is a coin flip
    assert F.entropy_score(torch.zeros(1), task="binary").item() == pytest.approx(math.log(2))
    assert F.softmax_score(torch.zeros(1), task="binary").item() == -0.5


def test_gen_sums_the_top_M_probabilities():
    z = logits_of((9, 7), seed=5)
    p = torch.softmax(z.double(), dim=1).sort(dim=1, descending=True).values
    for M in (1, 3, 7):
        ref = (p[:, :M] ** 0.5 * (1 - p[:, :M]) ** 0.5).sum(dim=1)
        torch.testing.assert_close(F.gen_score(z, gamma=0.5, M=M).double(), ref)
    assert torch.equal(F.gen_score(z, M=100), F.gen_score(z, M=7))  # M > C: every class
    gini = (p * (1 - p)).sum(dim=1)  # gamma = 1
    torch.testing.assert_close(F.gen_score(z, gamma=1.0, M=7).double(), gini)


@pytest.mark.parametrize("gap", [20.0, 40.0])
def test_entropy_and_gen_keep_the_tail_of_confident_rows_in_float32(gap):
    # softmax rounds p_top to 1.0 here; the exact values come from q = P(not top class)
    z = torch.tensor([[gap, 0.0, 0.0]])
    tail = 2 * math.exp(-gap) / (1 + 2 * math.exp(-gap))  # 1 - p_top
    p_other = tail / 2
    log_top = -math.log1p(2 * math.exp(-gap))
    entropy = -(math.exp(log_top) * log_top + 2 * p_other * math.log(p_other))
    gen = (math.exp(log_top) * tail) ** 0.1 + 2 * (p_other * (1 - p_other)) ** 0.1
    assert torch.softmax(z, dim=1)[0, 0].item() == 1.0
    assert F.entropy_score(z).item() == pytest.approx(entropy, rel=1e-5)
    assert F.gen_score(z).item() == pytest.approx(gen, rel=1e-5)
    # a confident negative binary log-odds keeps its tail too
    assert F.entropy_score(torch.tensor([-gap]), task="binary").item() == pytest.approx(
        -math.exp(-gap) * (-gap) + math.exp(-gap), rel=1e-4
    )


def test_gen_does_not_underflow_for_very_confident_rows():
    z = torch.tensor([[100.0, 0.0]])  # p_other = e^-100 underflows float32, p^0.1 = e^-10 does not
    assert F.gen_score(z).item() == pytest.approx(2 * math.exp(-10.0), rel=1e-4)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_logits_are_computed_in_float32(dtype):
    for name, (cls, fn, kwargs) in SCORES.items():
        for task, shape in KINDS.values():
            z = logits_of(shape, seed=6).to(dtype)
            out = fn(z, 0.7, task=task, **kwargs)
            assert out.dtype == torch.float32, name
            torch.testing.assert_close(out, fn(z.float(), 0.7, task=task, **kwargs), rtol=0, atol=0)
            assert cls(task=task, **kwargs)(z).dtype == torch.float32
    for _, fn in ENSEMBLE_SCORES.values():
        z = logits_of((5, 4, 3), seed=7).to(dtype)
        assert torch.equal(fn(z), fn(z.float())) and fn(z).dtype == torch.float32


def test_float64_logits_stay_float64():
    z = logits_of((4, 3), seed=8).double()
    for name, (_, fn, kwargs) in SCORES.items():
        assert fn(z, **kwargs).dtype == torch.float64, name


@pytest.mark.parametrize("task", ["binary", "multilabel"])
@pytest.mark.parametrize("name", list(SCORES))
def test_confident_rows_score_lower_than_undecided_rows_for_every_task(name, task):
    cls, _, kwargs = SCORES[name]
    sign = torch.tensor([1.0, -1.0, 1.0])
    confident = (sign * 9.0)[:, None] * torch.ones(3, 1 if task == "binary" else 4)
    score = cls(task=task, **kwargs)
    assert score(torch.zeros_like(confident)).min() > score(confident).max()


# ============================== predictions ===================================================


def test_logit_predictions_follow_the_sign_of_a_binary_log_odds():
    z = torch.tensor([-3.0, 0.5, 2.0])
    assert F.logit_predictions(z, task="binary").tolist() == [0, 1, 1]
    assert F.logit_predictions(z[:, None], task="binary").tolist() == [0, 1, 1]
    assert z[:, None].argmax(dim=1).tolist() == [0, 0, 0]  # what a plain argmax would say
    two = torch.tensor([[1.0, 0.0], [0.0, 3.0]])
    assert F.logit_predictions(two, task="binary").tolist() == [0, 1]
    assert F.logit_predictions(logits_of((6, 4)), task="multiclass").tolist() == (
        logits_of((6, 4)).argmax(dim=1).tolist()
    )
    labels = torch.tensor([[2.0, -1.0, 0.1]])
    assert F.logit_predictions(labels, task="multilabel").tolist() == [[1, 0, 1]]
    # ensembles: the class of the mean probability, not of the mean logit
    members = torch.tensor([[[9.0, 0.0, 0.0], [0.0, 1.0, 1.0]]])  # (1, C=2, M=3)
    assert F.logit_predictions(members, ensemble=True).tolist() == [0]


# ============================== temperature ===================================================


def sampled_labels(z: torch.Tensor, task: str, temperature: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if task == "multiclass":
        return torch.multinomial(torch.softmax(z / temperature, dim=1), 1, generator=g)[:, 0]
    return torch.bernoulli(torch.sigmoid(z / temperature), generator=g)


@pytest.mark.parametrize(
    ("task", "shape"),
    [("multiclass", (20000, 10)), ("binary", (20000,)), ("multilabel", (5000, 4))],
)
def test_fitted_temperature_recovers_the_temperature_labels_were_drawn_with(task, shape):
    z = logits_of(shape, seed=9)
    labels = sampled_labels(z, task, 2.5, seed=10)
    T = F.fit_temperature(z, labels, task=task)
    assert T.shape == () and T.dtype == torch.float32
    assert T.item() == pytest.approx(2.5, abs=0.15)
    score = EntropyScore(task=task, temperature=None).fit(z, labels)
    assert score.temperature_.item() == T.item()
    torch.testing.assert_close(score(z[:50]), F.entropy_score(z[:50], T, task=task))


def test_fitted_temperature_is_the_minimum_of_the_nll():
    z = logits_of((3000, 6), seed=11).double()
    labels = sampled_labels(z, "multiclass", 1.7, seed=12)
    T = F.fit_temperature(z, labels).item()
    grid = torch.linspace(T - 0.05, T + 0.05, 201, dtype=torch.float64)
    nll = torch.stack([F.temperature_nll(z, labels, t) for t in grid])
    assert abs(grid[nll.argmin()].item() - T) <= 1e-3
    ce = nn.functional.cross_entropy(z / T, labels)
    torch.testing.assert_close(F.temperature_nll(z, labels, T), ce)
    bce_z = z[:, 0]
    y = (labels == 0).double()
    torch.testing.assert_close(
        F.temperature_nll(bce_z, y, 2.0, task="binary"),
        nn.functional.binary_cross_entropy_with_logits(bce_z / 2.0, y),
    )


def test_fit_temperature_is_deterministic_and_works_under_no_grad():
    z = logits_of((4000, 5), seed=13)
    labels = sampled_labels(z, "multiclass", 0.6, seed=14)
    first = F.fit_temperature(z, labels)
    with torch.no_grad():
        second = F.fit_temperature(z, labels)
        score = MarginScore(temperature=None).fit(z, labels)
    assert torch.equal(first, second) and not second.requires_grad
    assert score.temperature_.item() == first.item()
    assert first.item() == pytest.approx(0.6, abs=0.05)


def test_ensemble_of_identical_members_fits_the_temperature_of_one_member():
    z = logits_of((6000, 4), seed=15)
    labels = sampled_labels(z, "multiclass", 1.8, seed=16)
    single = F.fit_temperature(z, labels)
    members = z[:, :, None].expand(-1, -1, 3)
    ensemble = MutualInformationScore(temperature=None).fit(members, labels)
    assert ensemble.temperature_.item() == pytest.approx(single.item(), rel=1e-4)


def test_fit_without_labels_warns_and_leaves_the_temperature_as_given():
    z = logits_of((3000, 5), seed=17)
    labels = sampled_labels(z, "multiclass", 2.5, seed=18)
    score = SoftmaxScore(temperature=None).fit(z, labels)
    assert score.temperature_.item() != 1.0
    with pytest.warns(
        UserWarning, match=r"SoftmaxScore\.fit got no labels `y`, so the temperature is not fitted"
    ) as record:
        assert score.fit(z) is score
    assert record[0].filename == __file__  # stacklevel points at the caller
    assert score.temperature_.item() == 1.0  # fitting again starts over, from the given value
    torch.testing.assert_close(score(z), F.softmax_score(z))


def test_fixed_temperature_is_not_fitted_and_ignores_labels_quietly():
    z = logits_of((500, 5), seed=19)
    labels = sampled_labels(z, "multiclass", 2.5, seed=20)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        score = EnergyScore(temperature=3.0).fit(z, labels)
        EnergyScore().fit(z)  # default: fixed at 1, nothing to say
    assert score.temperature_.item() == 3.0 and score.temperature == 3.0
    torch.testing.assert_close(score(z), F.energy_score(z, 3.0))
    # labels it does not use are not checked beyond their row count
    EnergyScore(task="multilabel").fit(torch.zeros(500, 3), labels)
    with pytest.raises(ValueError, match=r"`y` to have 500 rows like `X`, got \(9,\)"):
        EnergyScore().fit(z, labels[:9])


def test_temperature_at_a_bound_warns_about_separable_labels():
    z = logits_of((500, 4), seed=21)
    with pytest.warns(UserWarning, match=r"reached the bound 0\.01 .*held-out data"):
        T = F.fit_temperature(z, z.argmax(dim=1))  # labels the logits predict perfectly
    assert T.item() == pytest.approx(0.01)


def test_fit_drops_the_threshold_and_replaces_the_temperature():
    z = logits_of((400, 5), seed=22)
    labels = sampled_labels(z, "multiclass", 2.0, seed=23)
    score = GENScore(temperature=None).fit(z, labels).calibrate(z, coverage=0.9)
    assert score.is_calibrated
    score.fit(z[:200], labels[:200])
    assert not score.is_calibrated
    fresh = GENScore(temperature=None).fit(z[:200], labels[:200])
    assert torch.equal(score.temperature_, fresh.temperature_)


def test_state_dict_round_trip_carries_the_fitted_temperature():
    z = logits_of((2000, 6), seed=24)
    labels = sampled_labels(z, "multiclass", 1.5, seed=25)
    score = EntropyScore(temperature=None).fit(z, labels).calibrate(z[:500], coverage=0.8)
    state = score.state_dict()
    assert state["temperature_"].shape == () and "temperature" not in state
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    twin = EntropyScore(temperature=None)
    assert twin.temperature_.item() == 1.0
    twin.load_state_dict(torch.load(buffer, weights_only=True))
    assert torch.equal(twin.temperature_, score.temperature_)
    assert torch.equal(twin(z), score(z))
    assert torch.equal(twin.select(z)["selected"], score.select(z)["selected"])
    twin.double()
    assert twin.temperature_.dtype == torch.float64 and twin.temperature_.shape == ()
    torch.testing.assert_close(twin(z.double()), score(z).double(), rtol=1e-6, atol=1e-7)


def test_refitting_the_temperature_reuses_the_compiled_graph():
    from torch._dynamo.testing import CompileCounter

    z = logits_of((800, 5), seed=26)
    score = EnergyScore(temperature=None)
    counter = CompileCounter()
    compiled = torch.compile(score, backend=counter, fullgraph=True)
    before = compiled(z[:16])
    score.fit(z, sampled_labels(z, "multiclass", 3.0, seed=27))
    after = compiled(z[:16])
    assert counter.frame_count == 1
    assert not torch.equal(before, after)
    torch.testing.assert_close(after, F.energy_score(z[:16], score.temperature_))


# ============================== compile on every input kind ===================================


@pytest.mark.parametrize("name", list(SCORES) + list(ENSEMBLE_SCORES))
def test_compiled_fullgraph_equals_eager_on_1d_binary_and_ensemble_inputs(name):
    if name in SCORES:
        cls, _, kwargs = SCORES[name]
        cases = [(cls(task="binary", **kwargs), (16,)), (cls(task="multilabel", **kwargs), (16, 3))]
    else:
        cls = ENSEMBLE_SCORES[name][0]
        cases = [(cls(), (16, 5, 3)), (cls(task="binary"), (16, 1, 3))]
    for score, shape in cases:
        torch._dynamo.reset()
        compiled = torch.compile(score, fullgraph=True)
        z = logits_of(shape, seed=28)
        z[3] = float("nan")
        out = compiled(z)
        torch.testing.assert_close(out, score(z), rtol=1e-5, atol=1e-6)
        assert out[3] == math.inf


@pytest.mark.parametrize(
    ("score", "shape"),
    [
        (SoftmaxScore(task="binary"), (0,)),
        (GENScore(task="binary"), (0, 1)),
        (EnergyScore(task="multilabel"), (0, 3)),
        (MutualInformationScore(), (0, 4, 3)),
        (PredictiveVarianceScore(task="binary"), (0, 1, 3)),
    ],
    ids=["binary-1d", "binary-column", "multilabel", "ensemble", "ensemble-binary"],
)
def test_empty_batches_give_empty_scores_quietly(score, shape):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert score(torch.empty(shape)).shape == (0,)
        assert score.score(torch.empty(shape)).shape == (0,)


# ============================== ensembles =====================================================


@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("kind", list(ENSEMBLE_KINDS))
@pytest.mark.parametrize("name", list(ENSEMBLE_SCORES))
def test_ensemble_score_module_equals_functional_equals_numpy(name, kind, temperature):
    cls, fn = ENSEMBLE_SCORES[name]
    task, shape = ENSEMBLE_KINDS[kind]
    z = logits_of(shape, seed=29)
    module = cls(task=task, temperature=temperature)(z)
    torch.testing.assert_close(module, fn(z, temperature, task=task), rtol=0, atol=0)
    reference = np_ensemble(name, kind, z.double().numpy(), temperature)
    assert module.shape == (7,)
    np.testing.assert_allclose(module.numpy(), reference, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", list(ENSEMBLE_SCORES))
def test_ensemble_scores_are_zero_when_members_agree_and_grow_when_they_disagree(name):
    cls, _ = ENSEMBLE_SCORES[name]
    z = logits_of((5, 4), seed=30)
    agree = z[:, :, None].expand(-1, -1, 3)
    assert cls()(agree).abs().max().item() < 1e-6
    split = torch.stack([z, z.roll(1, dims=1), z.roll(2, dims=1)], dim=2)
    assert (cls()(split) > 1e-3).all()
    # binary ensembles are symmetric in the sign of the log-odds too
    members = torch.tensor([[[8.0, 2.0, 5.0]], [[-8.0, -2.0, -5.0]]])  # (2, 1, 3)
    s = cls(task="binary")(members)
    torch.testing.assert_close(s[0], s[1])


def test_ensemble_scores_stay_in_their_ranges():
    z = logits_of((200, 3, 5), seed=31, scale=6.0)
    mi = F.mutual_information_score(z)
    assert (mi >= 0).all() and (mi <= math.log(3) + 1e-6).all()
    var = F.predictive_variance_score(z)
    assert (var >= 0).all() and (var <= 0.25).all()


# ============================== SelectiveModel ================================================


def test_selective_model_with_a_binary_single_logit_model_and_a_fitted_temperature():
    torch.manual_seed(0)
    model = nn.Linear(4, 1).eval()
    x = torch.randn(600, 4)
    with torch.no_grad():
        z = model(x)[:, 0]
    y = sampled_labels(z, "binary", 0.5, seed=32)
    sel = st.SelectiveModel(model, EntropyScore(task="binary", temperature=None))
    sel.fit(x, y, progress=False).calibrate(x[:300], coverage=0.8, progress=False)
    assert sel.score.temperature_.item() == pytest.approx(0.5, rel=0.3)
    with torch.no_grad():
        out = sel(torch.stack([x[0], -x[0]]) * 50)  # confident positive and negative
    assert out.selected.tolist() == [True, True]


def test_selective_model_with_an_ensemble_model():
    class Ensemble(nn.Module):
        def __init__(self):
            super().__init__()
            self.heads = nn.ModuleList(nn.Linear(4, 3) for _ in range(5))

        def forward(self, x):
            return torch.stack([head(x) for head in self.heads], dim=-1)  # (B, C, M)

    torch.manual_seed(0)
    sel = st.SelectiveModel(Ensemble().eval(), MutualInformationScore())
    sel.calibrate(torch.randn(100, 4), coverage=0.9, progress=False)
    with torch.no_grad():
        out = sel(torch.randn(6, 4))
    assert out.output.shape == (6, 3, 5) and out.score.shape == (6,)
    torch.testing.assert_close(out.score, F.mutual_information_score(out.output))


# ============================== registry and repr =============================================


def test_logit_scores_are_registered_and_build_with_hyperparameters():
    assert {"softmax", "max_logit", "energy", "entropy", "margin", "gen"} <= set(list_scores())
    gen = create_score("gen", gamma=0.5, M=3, task="binary", temperature=None)
    assert isinstance(gen, GENScore) and isinstance(gen, LogitScore)
    assert (gen.gamma, gen.M, gen.task, gen.temperature) == (0.5, 3, "binary", None)
    assert repr(gen) == "GENScore(gamma=0.5, M=3, task='binary', temperature=None)"
    assert repr(EnergyScore()) == "EnergyScore(task='multiclass', temperature=1.0)"
    assert MutualInformationScore.ensemble and not SoftmaxScore.ensemble


# ============================== argument errors ===============================================

TASK_ERROR = r"`task` to be one of \('multiclass', 'binary', 'multilabel'\), got 'regression'"


@pytest.mark.parametrize("cls", [spec[0] for spec in SCORES.values()] + [MutualInformationScore])
def test_unknown_task_names_the_argument(cls):
    with pytest.raises(ValueError, match=TASK_ERROR):
        cls(task="regression")


def test_functional_unknown_task_names_the_argument():
    for _, fn, _ in SCORES.values():
        with pytest.raises(ValueError, match=TASK_ERROR):
            fn(torch.zeros(2, 3), task="regression")


@pytest.mark.parametrize("temperature", [0, -1.0, float("inf"), float("nan"), True, "2"])
def test_temperature_must_be_positive(temperature):
    for cls, _, _ in SCORES.values():
        with pytest.raises(ValueError, match=r"`temperature` to be a positive number, got"):
            cls(temperature=temperature)
    with pytest.raises(ValueError, match=r"`temperature` to be a positive number"):
        F.entropy_score(torch.zeros(2, 3), temperature)


@pytest.mark.parametrize("gamma", [0, -0.1, 1.5, True, "0.1"])
def test_gen_gamma_must_be_in_0_1(gamma):
    with pytest.raises(ValueError, match=rf"`gamma` to be a number in \(0, 1\], got {gamma!r}"):
        GENScore(gamma=gamma)
    with pytest.raises(ValueError, match=r"`gamma` to be a number in \(0, 1\]"):
        F.gen_score(torch.zeros(2, 3), gamma=gamma)


@pytest.mark.parametrize("M", [0, -2, 2.5, True])
def test_gen_M_must_be_a_positive_integer(M):
    with pytest.raises(ValueError, match=rf"`M` to be an integer >= 1, got {M!r}"):
        GENScore(M=M)
    with pytest.raises(ValueError, match=r"`M` to be an integer >= 1"):
        F.gen_score(torch.zeros(2, 3), M=M)


BAD_SHAPES = [
    ("multiclass", False, (8,), r"`X` to have shape \(N, D\), got \(8,\); task='multiclass'"),
    ("multiclass", False, (2, 3, 4), r"`X` to have shape \(N, D\), got \(2, 3, 4\)"),
    ("multiclass", False, (5, 1), r"at least 2 classes for task='multiclass', got shape \(5, 1\)"),
    ("binary", False, (5, 3), r"1 or 2 logits per sample for task='binary', got shape \(5, 3\)"),
    ("binary", False, (2, 3, 4), r"shape \(N,\), \(N, 1\) or \(N, 2\) for task='binary', got"),
    ("binary", False, (), r"shape \(N,\), \(N, 1\) or \(N, 2\) for task='binary', got \(\)"),
    ("multilabel", False, (8,), r"`X` to have shape \(N, D\), got \(8,\); task='multilabel'"),
    ("multilabel", False, (5, 0), r"at least 1 label for task='multilabel'"),
    ("multiclass", True, (5, 3), r"shape \(N, C, M\) \(M ensemble members last\) for task="),
    ("multiclass", True, (5, 3, 0), r"\(N, C, M\) with at least 1 member for task='multiclass'"),
    ("multiclass", True, (5, 1, 4), r"at least 2 classes for task='multiclass', got shape"),
    ("binary", True, (5, 3, 2), r"1 or 2 logits per sample for task='binary'"),
    ("binary", True, (5, 2), r"\(N, 1, M\) or \(N, 2, M\) \(M ensemble members last\)"),
]


@pytest.mark.parametrize(("task", "ensemble", "shape", "message"), BAD_SHAPES)
def test_bad_shapes_per_task_name_the_expected_and_given_shape(task, ensemble, shape, message):
    cls = MutualInformationScore if ensemble else SoftmaxScore
    score = cls(task=task)
    X = torch.zeros(shape)
    for call in (score, score.score, score.fit, lambda X: score.calibrate(X, coverage=0.5)):
        with pytest.raises(ValueError, match=message):
            call(X)
    fn = F.mutual_information_score if ensemble else F.softmax_score
    with pytest.raises(ValueError, match=message.replace("`X`", "`logits`")):
        fn(X, task=task)


def test_integer_and_non_tensor_logits_are_type_errors():
    message = r"`X` to be a floating-point tensor, got dtype torch\.int64"
    with pytest.raises(TypeError, match=message):
        EnergyScore(task="binary")(torch.zeros(4, dtype=torch.int64))
    with pytest.raises(TypeError, match=r"`X` to be a torch.Tensor, got list"):
        EnergyScore()([[0.0, 1.0]])


LABEL_ERRORS = [
    ("multiclass", (10, 5), torch.zeros(9, dtype=torch.long), r"`y` to have 10 rows like `X`, "),
    ("multiclass", (10, 5), [0] * 10, r"`y` to have 10 rows like `X`, got list"),
    ("multiclass", (10, 5), torch.zeros(10), r"integer class indices for task='multiclass', got "),
    ("multiclass", (10, 5), torch.arange(10), r"class indices in \[0, 5\), got values in \[0, 9\]"),
    ("binary", (10,), torch.full((10,), 2.0), r"values in \[0, 1\] for task='binary', got values"),
    ("binary", (10,), torch.zeros(10, 2), r"shape \(N,\) or \(N, 1\) for task='binary', got"),
    ("multilabel", (10, 3), torch.zeros(10, 4), r"shape \(N, C\) = \(10, 3\) like the logits"),
    ("multilabel", (10, 3), -torch.ones(10, 3), r"values in \[0, 1\] for task='multilabel'"),
]


@pytest.mark.parametrize(("task", "shape", "labels", "message"), LABEL_ERRORS)
def test_bad_labels_say_what_was_expected(task, shape, labels, message):
    score = SoftmaxScore(task=task, temperature=None)
    with pytest.raises(ValueError, match=message):
        score.fit(torch.zeros(shape), labels)
    if isinstance(labels, torch.Tensor):
        with pytest.raises(ValueError, match=message.replace("`y`", "`labels`")):
            F.fit_temperature(torch.zeros(shape), labels, task=task)


def test_fit_rejects_empty_and_non_finite_logits():
    with pytest.raises(ValueError, match=r"`X` to hold at least one row"):
        SoftmaxScore(task="binary").fit(torch.empty(0))
    z = torch.zeros(6, 2, 3)
    z[4, 1, 2] = float("nan")
    with pytest.raises(ValueError, match=re.escape("`X` has 1 of 6 rows with NaN or Inf")):
        MutualInformationScore().fit(z)
