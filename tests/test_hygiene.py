"""Hook hygiene: wrappers share a model without sharing tensors, and leave nothing behind.

Recorder and SelectiveModel register forward hooks on the user's model (which outlives them):
two wrappers on one model never see each other's tensors; closing one removes only its hooks;
a wrapper that is garbage-collected removes its hooks; deepcopy and pickling keep working; an
exception inside the model leaves no stale tensor; layers called twice are an error; layers on
several devices work.
"""

from __future__ import annotations

import copy
import gc
import pickle

import pytest
import torch
from test_contract import Net, inputs
from test_scores import D
from torch import nn

import selectorch as st
from selectorch.scores import CosineScore, KNNScore


def hook_count(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) for m in model.modules())


def fitted_on(model: nn.Module, score, layer: str = "body", seed: int = 1) -> st.SelectiveModel:
    sel = st.SelectiveModel(model, score, layer=layer)
    sel.fit(inputs(40, seed=seed), progress=False)
    return sel.calibrate(inputs(30, seed=seed + 1), coverage=0.9, progress=False)


# ============================== two wrappers on one model ====================================


def test_two_selective_models_and_a_recorder_on_one_layer_do_not_see_each_others_tensors():
    model = Net().eval()
    a = fitted_on(model, KNNScore(k=2), seed=1)
    b = fitted_on(model, CosineScore(k=3), seed=5)
    rec = st.Recorder(model, "body")
    x, other = inputs(4, seed=9), inputs(4, seed=10)
    with torch.no_grad():
        alone_a, alone_b = a(x).score, b(other).score
        _, feats = rec(other)
        after_a = a(x).score  # b and rec recorded in between
        after_b = b(other).score
        model(x)  # the bare model records into nobody's store
    assert torch.equal(after_a, alone_a) and torch.equal(after_b, alone_b)
    torch.testing.assert_close(feats["body"], model.body(other))
    for wrapper in (a, b, rec):
        assert wrapper._hooks.store == {} and not wrapper._hooks.recording
    assert len(model.body._forward_hooks) == 3


def test_closing_one_wrapper_removes_only_its_hooks_and_the_other_keeps_working():
    model = Net().eval()
    user = model.body.register_forward_hook(lambda m, a, o: None)
    a = fitted_on(model, KNNScore(k=2))
    b = fitted_on(model, KNNScore(k=2))
    x = inputs(3, seed=2)
    with torch.no_grad():
        before = b(x).score
    a.close()
    assert len(model.body._forward_hooks) == 2 and user.id in model.body._forward_hooks
    with torch.no_grad():
        assert torch.equal(b(x).score, before)
    with pytest.raises(RuntimeError, match="closed"), torch.no_grad():
        a(x)
    b.close()
    assert list(model.body._forward_hooks) == [user.id]


# ============================== garbage collection, copies, pickling =========================


@pytest.mark.parametrize("kind", ["selective", "recorder"])
def test_a_garbage_collected_wrapper_leaves_no_hook_behind(kind):
    model = Net().eval()
    before = hook_count(model)

    def make():
        if kind == "selective":
            wrapper = fitted_on(model, KNNScore(k=2))
            with torch.no_grad():
                wrapper(inputs(2, seed=3))
        else:
            wrapper = st.Recorder(model, ["body", "head"])
            wrapper(inputs(2, seed=3))
        assert hook_count(model) > before

    make()
    gc.collect()
    assert hook_count(model) == before


def test_a_compiled_wrapper_that_is_dropped_leaves_no_hook_behind():
    model = Net().eval()
    sel = fitted_on(model, KNNScore(k=2))
    compiled = torch.compile(sel, backend="eager", fullgraph=True)
    with torch.no_grad():
        compiled(inputs(4, seed=3))
    del sel, compiled
    torch._dynamo.reset()  # dynamo's caches may reference the wrapper until reset
    gc.collect()
    assert hook_count(model) == 0


def test_deepcopy_of_a_wrapper_is_independent_and_collected_on_its_own():
    model = Net().eval()
    sel = fitted_on(model, KNNScore(k=2))
    twin = copy.deepcopy(sel)
    assert twin.model is not model and hook_count(twin.model) == 1
    x = inputs(5, seed=4)
    with torch.no_grad():
        assert torch.equal(twin(x).score, sel(x).score)
    del twin
    gc.collect()
    assert hook_count(model) == 1  # the original's hook stays
    with torch.no_grad():
        assert sel(x).score.shape == (5,)
    twin = copy.deepcopy(sel)
    twin_model = twin.model
    del sel
    gc.collect()
    assert hook_count(model) == 0 and hook_count(twin_model) == 1
    with torch.no_grad():
        assert twin(x).score.shape == (5,)


@pytest.mark.parametrize("kind", ["selective", "recorder"])
def test_a_pickled_wrapper_works_and_its_copy_removes_its_own_hooks(kind):
    model = Net().eval()
    if kind == "selective":
        wrapper = fitted_on(model, KNNScore(k=2))
    else:
        wrapper = st.Recorder(model, "body")
    restored = pickle.loads(pickle.dumps(wrapper))
    x = inputs(3, seed=6)
    with torch.no_grad():
        a, b = wrapper(x), restored(x)
    if kind == "selective":
        assert torch.equal(a.score, b.score)
    else:
        assert torch.equal(a[1]["body"], b[1]["body"])
    restored_model = restored.model
    del restored
    gc.collect()
    assert hook_count(restored_model) == 0 and hook_count(model) == 1


# ============================== exceptions, repeated layers, devices =========================


class FailsAfterBody(Net):
    """Raises after the hooked layer ran, when asked to."""

    fail = False

    def forward(self, x, offset=None):
        h = self.body(x)
        if self.fail:
            raise RuntimeError("boom")
        return self.head(self.act(h))


def test_an_exception_inside_the_model_leaves_no_stale_tensor_for_the_next_call():
    model = FailsAfterBody().eval()
    sel = fitted_on(model, KNNScore(k=2))
    x, y = inputs(4, seed=7), inputs(4, seed=8)
    with torch.no_grad():
        expected = sel(y).score
        model.fail = True
        with pytest.raises(RuntimeError, match="boom"):
            sel(x)
        assert sel._hooks.store == {} and not sel._hooks.recording
        model.fail = False
        model(x)  # a direct call records nothing
        assert sel._hooks.store == {}
        assert torch.equal(sel(y).score, expected)  # y's own features, not x's


def test_a_layer_called_twice_in_one_forward_is_an_error_and_the_wrapper_recovers():
    class Twice(Net):
        twice = False

        def forward(self, x, offset=None):
            h = self.body(x)
            if self.twice:
                h = self.body(h)
            return self.head(self.act(h))

    model = Twice().eval()
    sel = fitted_on(model, KNNScore(k=2))
    model.twice = True
    with pytest.raises(RuntimeError, match=r"\['body'\] ran more than once"), torch.no_grad():
        sel(inputs(2, seed=1))
    model.twice = False
    with torch.no_grad():
        assert sel(inputs(2, seed=1)).score.shape == (2,)


def test_only_the_named_layers_get_hooks():
    model = Net().eval()
    counts = {name: len(m._forward_hooks) for name, m in model.named_modules()}
    sel = st.SelectiveModel(model, KNNScore(), layer="body")
    after = {name: len(m._forward_hooks) for name, m in model.named_modules()}
    assert {k for k in after if after[k] != counts[k]} == {"body"}
    sel.close()


class TwoDevices(nn.Module):
    """``first`` on one device, ``second`` on another; the forward moves the data between."""

    def __init__(self, first: str, second: str):
        super().__init__()
        self.first = nn.Linear(D, D).to(first)
        self.second = nn.Linear(D, 3).to(second)

    def forward(self, x):
        h = self.first(x.to(self.first.weight.device))
        return self.second(h.to(self.second.weight.device))


def test_recorded_layers_on_different_devices_keep_their_devices():
    model = TwoDevices("cpu", "meta")
    with st.Recorder(model, ["first", "second"]) as rec:
        out, feats = rec(torch.randn(4, D))
    assert out.device.type == "meta"
    assert feats["first"].device.type == "cpu" and feats["second"].device.type == "meta"
    assert feats["second"].shape == (4, 3)


def test_a_score_on_another_device_than_its_layer_names_both_devices():
    model = TwoDevices("cpu", "meta")
    sel = st.SelectiveModel(model, KNNScore(k=1), layer="second")
    sel.score.fit(torch.randn(10, 3))  # the state on the CPU; the layer's output on meta
    sel.score.calibrate(torch.randn(20, 3), coverage=0.9)
    with pytest.raises(ValueError, match=r"`X` on cpu.*got a tensor on meta"), torch.no_grad():
        sel(torch.randn(2, D))


@pytest.mark.gpu
def test_a_model_split_over_cuda_and_cpu_is_scored_like_on_one_device():
    torch.manual_seed(0)
    reference = TwoDevices("cpu", "cpu").eval()
    split = TwoDevices("cuda", "cpu").eval()
    split.load_state_dict(reference.state_dict())
    x, ref_x = inputs(30, seed=1), inputs(40, seed=2)
    for layer in ("first", "second"):
        outs = []
        for model in (reference, split):
            sel = st.SelectiveModel(model, KNNScore(k=3), layer=layer)
            sel.fit(ref_x, progress=False).calibrate(x, coverage=0.9, progress=False)
            with torch.no_grad():
                outs.append(sel(inputs(8, seed=3)))
            sel.close()
        torch.testing.assert_close(outs[1].score.cpu(), outs[0].score, rtol=1e-4, atol=1e-4)
        assert torch.equal(outs[1].selected.cpu(), outs[0].selected)
