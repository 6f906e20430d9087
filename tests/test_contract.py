"""More of the contract suite, over every registered score and over SelectiveModel wrapping each.

The score-level suite lives in tests/test_scores.py (unfitted use, fit -> self, state_dict twin,
.double(), compile == eager in one graph, batch independence, refit, NaN rows, empty batches,
direction); this file adds precision (.half()), devices (.cuda(), on the GPU machine), dynamic
batch sizes under compile, determinism, and the same promises for SelectiveModel. Everything is
built with tests/test_scores.py's ``build`` / ``fitted`` / ``make_inputs`` so that a score
registered tomorrow is covered without a change here (a score that needs more than its
hyperparameters adds a ``SETUP`` entry there).
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from test_scores import (
    CASES,
    MEMBERS,
    D,
    apply,
    build,
    fitted,
    make_inputs,
    make_labels,
    poisoned,
    skip_non_tensor_state,
)
from torch import nn
from torch._dynamo.testing import CompileCounter

import selectorch as st
from selectorch.selective import class_predictions

C = 5  # classes of the test model (the heads of tests/test_scores.py's SETUP are (5, D))

# .half(): the fitted state moves to float16 for every score; the scores below are then not
# compared with float32 values, and why:
HALF_VALUES_DIFFER = {
    # the score is a hash of the row's bytes: float16 rows are other bytes, so other (equally
    # uniform) values; this is the documented behaviour of a random baseline
    "random": "hashes the bytes of each row",
}


# Scores whose value changes completely when their input changes in the last bit: inside a
# SelectiveModel, the model's logits for a sample may differ in the last bit with the batch size
# (BLAS picks other kernels for one row), so these scores are batch-independent only for
# bitwise-equal inputs (tested on tensors in tests/test_scores.py).
BATCH_BITS_MATTER = {"random"}


# ============================== scores: precision, devices, determinism ======================


@pytest.mark.parametrize(("name", "kwargs"), CASES)
def test_contract_half_moves_all_state_and_scores_close_to_float32(name, kwargs):
    score = fitted(name, kwargs)
    Q = make_inputs(score, 25, seed=4)
    before = score(Q)
    assert score.half() is score
    floating = {k: b.dtype for k, b in score.named_buffers() if b.is_floating_point()}
    assert set(floating.values()) == {torch.float16}, floating
    after = score(apply(Q, torch.Tensor.half))
    assert after.shape == (25,) and after.is_floating_point()
    assert torch.isfinite(after).all(), after
    if name in HALF_VALUES_DIFFER:
        assert ((after >= 0) & (after < 1)).all()
        return
    # float16 keeps about 3 significant digits of the state
    scale = before.abs().max().item()
    torch.testing.assert_close(after.float(), before, rtol=2e-2, atol=2e-2 * scale)
    # the threshold moved too, and selection follows the float16 scores and threshold
    assert score.threshold_.dtype == torch.float16
    out = score.select(apply(Q, torch.Tensor.half))
    assert torch.equal(out["selected"], out["score"] <= score.threshold_.to(out["score"].dtype))


def test_half_mahalanobis_with_tiny_variances_overflows_and_fails_closed():
    # A precision entry above 65504 (features with variance below ~1.5e-5) overflows in float16:
    # every score is then +inf and every sample rejected; never a finite wrong value.
    g = torch.Generator().manual_seed(0)
    X = torch.randn(200, D, generator=g) * 1e-3
    score = st.scores.MahalanobisScore(shrinkage=0.0).fit(X, torch.zeros(200, dtype=torch.long))
    score.calibrate(torch.randn(50, D, generator=g) * 1e-3, coverage=0.9)
    assert torch.isfinite(score(X[:5])).all()
    score.half()
    assert not torch.isfinite(score.precision_).all()
    out = score.select(X[:5].half())
    assert torch.all(out["score"] == math.inf) and not out["selected"].any()


@pytest.mark.gpu
@pytest.mark.parametrize(("name", "kwargs"), CASES)
def test_contract_cuda_moves_all_state_and_matches_cpu(name, kwargs):
    score = fitted(name, kwargs)
    Q = make_inputs(score, 25, seed=4)
    before, selected = score(Q), score.select(Q)["selected"]
    assert score.cuda() is score
    devices = {k: b.device.type for k, b in score.named_buffers()}
    assert set(devices.values()) == {"cuda"}, devices
    after = score(apply(Q, torch.Tensor.cuda))
    assert after.is_cuda
    torch.testing.assert_close(after.cpu(), before, rtol=1e-4, atol=1e-4)
    assert torch.equal(score.select(apply(Q, torch.Tensor.cuda))["selected"].cpu(), selected)


@pytest.mark.parametrize(("name", "kwargs"), CASES)
def test_contract_repeated_calls_and_refits_are_bitwise_deterministic(name, kwargs):
    score = fitted(name, kwargs)
    Q = make_inputs(score, 30, seed=4)
    first = score(Q)
    assert torch.equal(score(Q), first)
    assert torch.equal(score.score(Q, batch_size=7), score.score(Q, batch_size=7))
    twin = fitted(name, kwargs)  # same data, fitted again from scratch
    assert torch.equal(twin(Q), first)
    assert twin.get_threshold() == score.get_threshold()


@pytest.mark.parametrize(("name", "kwargs"), CASES)
def test_contract_compiled_with_dynamic_batch_equals_eager_for_every_batch_size(name, kwargs):
    skip_non_tensor_state(name)
    score = fitted(name, kwargs)
    counter = CompileCounter()
    compiled = torch.compile(score, backend=counter, fullgraph=True, dynamic=True)
    # sizes that equal no other dimension of the input (D, MEMBERS), so none is specialised
    for n in (5, 17, 64):
        Q = poisoned(make_inputs(score, n, seed=n), 1, float("nan"))
        out = compiled(Q)
        torch.testing.assert_close(out, score(Q), rtol=1e-5, atol=1e-5)
        assert out[1] == math.inf
    assert counter.frame_count == 1


# ============================== SelectiveModel over every score ==============================


class Net(nn.Module):
    """A classifier with a named embedding layer (``body``) and head; for ensemble logit scores
    it returns ``(B, C, MEMBERS)`` logits. ``offset`` is a keyword input added to the features;
    a row whose first input feature is exactly 0 gets NaN logits (its features stay finite)."""

    def __init__(self, ensemble: bool = False):
        super().__init__()
        self.ensemble = ensemble
        self.body = nn.Linear(D, D)
        self.act = nn.ReLU()
        self.head = nn.Linear(D, C)

    def forward(self, x, offset=None):
        h = self.body(x)
        if offset is not None:
            h = h + offset
        logits = self.head(self.act(h))
        logits = torch.where(x[:, :1] == 0, torch.full_like(logits, math.nan), logits)
        if self.ensemble:
            logits = torch.stack([logits * (1 + 0.1 * m) for m in range(MEMBERS)], dim=-1)
        return logits


class TwoLayerNet(nn.Module):
    """For multi-layer scores: two hooked conv layers (``conv.a``, ``conv.b``, channels-first
    ``(B, 4, D)`` outputs) and a head; same NaN-logits rule and ``offset`` input as Net."""

    def __init__(self):
        super().__init__()
        self.conv = nn.ModuleDict(
            {"a": nn.Conv1d(1, 4, 3, padding=1), "b": nn.Conv1d(4, 4, 3, padding=1)}
        )
        self.head = nn.Linear(4 * D, C)

    def forward(self, x, offset=None):
        h = x if offset is None else x + offset
        h = torch.relu(self.conv["b"](torch.relu(self.conv["a"](h[:, None]))))
        logits = self.head(h.flatten(1))
        return torch.where(x[:, :1] == 0, torch.full_like(logits, math.nan), logits)


TWO_LAYERS = ["conv.a", "conv.b"]


def attach(score) -> st.SelectiveModel:
    """SelectiveModel(Net or TwoLayerNet, score): embedding scores read ``body``, multi-layer
    scores ``conv.a`` and ``conv.b``; head scores get ``head``."""
    torch.manual_seed(0)
    if score.input == "multi":
        return st.SelectiveModel(TwoLayerNet().eval(), score, layer=TWO_LAYERS)
    net = Net(ensemble=getattr(score, "ensemble", False)).eval()
    layer = "body" if score.input == "embedding" else None
    head = "head" if getattr(score, "needs_head", False) else None
    return st.SelectiveModel(net, score, layer=layer, head=head)


_FITTED: dict[str, st.SelectiveModel] = {}


def selective(name: str, kwargs: dict) -> st.SelectiveModel:
    """A fitted and calibrated SelectiveModel(Net, score), fitted once per case and deep-copied
    (a copy has its own model, score and hooks)."""
    key = f"{name}-{sorted(kwargs.items())}"
    if key not in _FITTED:
        _FITTED[key] = _fit_selective(name, kwargs)
    return copy.deepcopy(_FITTED[key])


def _fit_selective(name: str, kwargs: dict) -> st.SelectiveModel:
    """A fitted, calibrated :func:`attach` of the score."""
    sel = attach(build(name, kwargs))
    X = inputs(200, seed=1)
    sel.fit(X, make_labels(X), progress=False)
    sel.calibrate(inputs(80, seed=2), coverage=0.9, progress=False)
    return sel


def inputs(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, D, generator=torch.Generator().manual_seed(seed)) + 0.5


def read(sel: st.SelectiveModel, x: torch.Tensor):
    """What the score reads for ``x``: the hooked layer's output, the model's logits, both
    layers and the logits for a multi-layer score, or the logits of the perturbed input for a
    score that needs input gradients."""
    if sel.score.requires_grad:
        return sel.score.perturbed_logits(sel.model, x)
    with torch.no_grad():
        if sel.layer is None:
            return sel.model(x)
        with st.Recorder(sel.model, sel.layer, pool=sel.layer_pool) as rec:
            logits, features = rec(x)
        if isinstance(sel.layer, str):
            return features[sel.layer]
        return {**features, "logits": logits}


@pytest.mark.parametrize(("name", "kwargs"), CASES)
def test_selective_contract_output_score_and_selection_match_the_parts(name, kwargs):
    sel = selective(name, kwargs)
    x = inputs(12, seed=3)
    with torch.no_grad():
        out = sel(x)
        bare = sel.model(x)
    assert isinstance(out, st.SelectiveOutput)
    assert torch.equal(out.output, bare)
    assert out.score.shape == (12,) and out.selected.shape == (12,)
    assert out.selected.dtype == torch.bool and not out.score.requires_grad
    features = read(sel, x)
    if getattr(sel.score, "needs_preds", False):  # class-wise: scored against the predicted class
        preds, _ = class_predictions(bare, 12, sel.score)
        expected = sel.score.score_with_preds(features, preds)
    else:
        expected = sel.score(features)
    torch.testing.assert_close(out.score, expected, rtol=0, atol=0)
    assert torch.equal(out.selected, out.score <= sel.threshold_)


@pytest.mark.parametrize(("name", "kwargs"), CASES)
def test_selective_contract_compiled_fullgraph_is_one_graph_equal_to_eager(name, kwargs):
    sel = selective(name, kwargs)
    if not sel.score.compile_clean:  # declared: ODIN's input gradients, PyOD's numpy
        pytest.skip(f"{type(sel.score).__name__} declares compile_clean=False")
    counter = CompileCounter()
    compiled = torch.compile(sel, backend=counter, fullgraph=True)
    with torch.no_grad():
        for seed in (4, 5):
            x = inputs(16, seed=seed)
            x[2, 3] = math.nan
            fast, eager = compiled(x), sel(x)
            torch.testing.assert_close(fast.score, eager.score, rtol=1e-5, atol=1e-5)
            assert torch.equal(fast.selected, eager.selected) and not fast.selected[2]
        sel.calibrate(inputs(60, seed=6), coverage=0.8, progress=False)  # recalibration
        compiled(inputs(16, seed=7))
    assert counter.frame_count == 1


@pytest.mark.parametrize(("name", "kwargs"), CASES)
def test_selective_contract_nan_in_input_kwarg_or_logits_rejects_only_that_row(name, kwargs):
    sel = selective(name, kwargs)
    x = inputs(6, seed=8)
    offset = torch.zeros(6, D)
    with torch.no_grad():
        clean = sel(x, offset=offset)
        bad_x, bad_offset = x.clone(), offset.clone()
        bad_x[1, 2] = math.nan  # a positional input
        bad_offset[3, 0] = math.inf  # a keyword input
        bad_x[5, 0] = 0.0  # finite input whose logits are NaN (features stay finite)
        dirty = sel(bad_x, offset=bad_offset)
    assert dirty.score[[1, 3, 5]].tolist() == [math.inf] * 3
    assert not dirty.selected[[1, 3, 5]].any()
    keep = [0, 2, 4]
    assert torch.equal(dirty.score[keep], clean.score[keep])
    assert torch.equal(dirty.selected[keep], clean.selected[keep])


@pytest.mark.parametrize(("name", "kwargs"), CASES)
def test_selective_contract_empty_batch_gives_empty_outputs(name, kwargs):
    sel = selective(name, kwargs)
    with torch.no_grad():
        out = sel(inputs(0, seed=0))
    assert out.score.shape == (0,) and out.selected.shape == (0,)
    assert out.selected.dtype == torch.bool


@pytest.mark.parametrize(("name", "kwargs"), CASES)
def test_selective_contract_row_score_does_not_depend_on_batch_and_is_deterministic(name, kwargs):
    sel = selective(name, kwargs)
    rows, others = inputs(3, seed=9), inputs(40, seed=10)
    with torch.no_grad():
        alone = sel(rows).score
        in_batch = sel(torch.cat([others[:20], rows, others[20:]])).score[20:23]
        one_by_one = torch.cat([sel(r[None]).score for r in rows])
        again = sel(rows).score
    assert torch.equal(again, alone)
    if name in BATCH_BITS_MATTER:
        return
    torch.testing.assert_close(in_batch, alone, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(one_by_one, alone, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("name", "kwargs"), CASES)
def test_selective_contract_state_dict_loads_into_an_unfitted_twin(name, kwargs):
    skip_non_tensor_state(name)
    sel = selective(name, kwargs)
    twin_score = build(name, kwargs)
    twin = st.SelectiveModel(sel.model, twin_score, layer=sel.layer, head=sel.head)
    if sel.score.input == "multi":  # the layers' names are saved with the state
        assert sel.state_dict()["score._extra_state"]["layers"] == TWO_LAYERS
    twin.load_state_dict(sel.state_dict())
    x = inputs(10, seed=11)
    with torch.no_grad():
        a, b = sel(x), twin(x)
    assert torch.equal(a.score, b.score) and torch.equal(a.selected, b.selected)
    twin.close()


@pytest.mark.parametrize(("name", "kwargs"), CASES)
def test_selective_contract_unfitted_use_raises_not_fitted(name, kwargs):
    score = build(name, kwargs)
    sel = attach(score)
    missing = "fit" if score.fitted_buffers and not score.is_fitted else "calibrate"
    with pytest.raises(st.NotFittedError, match=rf"Call {missing}\("):
        sel(inputs(2, seed=0))


def test_selective_fit_with_nan_rows_counts_them_or_drops_them_with_a_warning():
    x = inputs(50, seed=12)
    x[[4, 9, 30], 1] = math.nan
    sel = st.SelectiveModel(Net().eval(), st.scores.KNNScore(k=2), layer="body")
    with pytest.raises(ValueError, match=r"`X` has 3 of 50 rows with NaN or Inf"):
        sel.fit(x, progress=False)
    with pytest.warns(st.NonFiniteRowsWarning, match=r"Dropped 3 of 50 rows .* \[4, 9, 30\]"):
        sel.fit(x, progress=False, drop_nonfinite=True)
    assert sel.score.bank_.shape == (47, D)
    cal = inputs(40, seed=13)
    cal[0] = math.inf
    with pytest.raises(ValueError, match=r"`X` has 1 of 40 rows with NaN or Inf"):
        sel.calibrate(cal, coverage=0.9, progress=False)
    with pytest.warns(st.NonFiniteRowsWarning, match=r"Dropped 1 of 40 rows of `calibration"):
        sel.calibrate(cal, coverage=0.9, progress=False, drop_nonfinite=True)
    assert sel.calibration_report()["n"] == 39


def test_selective_fit_drops_rows_whose_logits_are_nan_with_their_labels():
    x = inputs(30, seed=14)
    x[[2, 7], 0] = 0.0  # NaN logits for these rows, finite inputs
    y = torch.arange(30) % C
    sel = st.SelectiveModel(Net().eval(), st.scores.SoftmaxScore(temperature=None))
    with pytest.warns(st.NonFiniteRowsWarning, match=r"Dropped 2 of 30 rows"):
        sel.fit(x, y, progress=False, drop_nonfinite=True)
    assert math.isfinite(sel.score.temperature_.item())


def test_drop_nonfinite_keeps_tensors_aligned_and_refuses_all_bad():
    X = torch.tensor([[1.0, 2.0], [math.nan, 0.0], [3.0, 4.0], [0.0, -math.inf]])
    y = torch.tensor([10, 11, 12, 13])
    with pytest.warns(st.NonFiniteRowsWarning, match=r"Dropped 2 of 4 rows of `X`.*\[1, 3\]"):
        kept, kept_y, nothing = st.drop_nonfinite(X, y, None)
    assert kept.tolist() == [[1.0, 2.0], [3.0, 4.0]] and kept_y.tolist() == [10, 12]
    assert nothing is None
    same = st.drop_nonfinite(X[[0, 2]], y[[0, 2]])
    assert same[0] is not None and torch.equal(same[1], y[[0, 2]])
    with pytest.raises(ValueError, match=r"Every one of the 2 rows of `X` holds NaN or Inf"):
        st.drop_nonfinite(X[[1, 3]])
    with pytest.raises(ValueError, match=r"aligned tensor 0 to have 4 rows like `X`, got \(3,\)"):
        st.drop_nonfinite(X, y[:3])


def test_selective_fit_drops_rows_by_their_logits_too_for_scores_fitted_on_the_loss():
    if "deup" not in st.list_scores():
        pytest.skip("no DEUP score registered")
    x = inputs(40, seed=15)
    x[[3, 11], 0] = 0.0  # NaN logits (hence NaN losses); the recorded features stay finite
    y = torch.arange(40) % C
    score = st.create_score("deup", epochs=2, folds=2, hidden=8)
    sel = st.SelectiveModel(Net().eval(), score, layer="body")
    with pytest.warns(st.NonFiniteRowsWarning, match=r"Dropped 2 of 40 rows of `fit data`"):
        sel.fit(x, y, progress=False, drop_nonfinite=True)
    assert sel.score.is_fitted
