"""Tests for selectorch.Recorder, list_layers and pooling.

References are computed by hand: torchvision models are sliced by calling their submodules in
order, and pooling is plain torch (mean over H, W; class token ``x[:, 0]``; mean over tokens).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torchvision
from tensordict import TensorDict
from torch import nn

import selectorch as st
from selectorch.recorder import POOLS, pool_features

# --------------------------------------------------------------------------------------------
# toy models
# --------------------------------------------------------------------------------------------


class TinyCNN(nn.Module):
    """(B, 3, H, W) -> logits; ``conv`` gives (B, C, H, W), ``head`` (B, 10)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.act = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flat = nn.Flatten()
        self.head = nn.Linear(8, 10)

    def forward(self, x):
        return self.head(self.flat(self.pool(self.act(self.conv(x)))))


class TinyTokens(nn.Module):
    """(B, T, 6) -> logits; ``proj`` gives tokens (B, T, 16), ``head`` (B, 4)."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(6, 16)
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        return self.head(self.proj(x)[:, 0])


class WithUnusedLayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.used = nn.Linear(4, 4)
        self.unused = nn.Linear(4, 4)

    def forward(self, x):
        return self.used(x)


class ReusesModule(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.out = nn.Linear(4, 2)

    def forward(self, x):
        return self.out(self.fc(self.fc(x)))


class FailsOnDemand(nn.Module):
    """Runs ``fc`` and then raises when ``fail`` is set."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.fail = False

    def forward(self, x):
        y = self.fc(x)
        if self.fail:
            raise KeyError("boom")
        return y


class MixedBatch(nn.Module):
    """``per_sample`` gives (B, 4), ``shared`` gives (1, 4) from the batch mean."""

    def __init__(self):
        super().__init__()
        self.per_sample = nn.Linear(4, 4)
        self.shared = nn.Linear(4, 4)

    def forward(self, x):
        return self.per_sample(x) + self.shared(x.mean(0, keepdim=True))


class WithAttention(nn.Module):
    """``attn`` is nn.MultiheadAttention: it returns (attn_output, attn_weights)."""

    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        a, _ = self.attn(x, x, x)
        return self.head(a[:, 0])


class WithLSTM(nn.Module):
    """``lstm`` returns (output, (h, c))."""

    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTM(5, 7, batch_first=True)
        self.head = nn.Linear(7, 2)

    def forward(self, x):
        out, _ = self.lstm(x)
        return self.head(out[:, -1])


class DictLayer(nn.Module):
    """Returns a dict whose first value is not a tensor; the first tensor value is ``feat``."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 6)

    def forward(self, x):
        return {"n_tokens": x.shape[0], "feat": self.fc(x), "aux": -x}


class NoTensorLayer(nn.Module):
    def forward(self, x):
        return {"shape": tuple(x.shape)}


class WithOddLayers(nn.Module):
    def __init__(self):
        super().__init__()
        self.dict_layer = DictLayer()
        self.no_tensor = NoTensorLayer()
        self.head = nn.Linear(6, 2)

    def forward(self, x):
        self.no_tensor(x)
        return self.head(self.dict_layer(x)["feat"])


class TinyHFModel(nn.Module):
    """Hugging-Face style: keyword inputs, dict output."""

    def __init__(self, vocab: int = 20, dim: int = 8):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.layer = nn.Linear(dim, dim)
        self.lm_head = nn.Linear(dim, vocab)

    def forward(self, input_ids, attention_mask=None):
        h = self.layer(self.embed(input_ids))
        if attention_mask is not None:
            h = h * attention_mask.unsqueeze(-1)
        return {"logits": self.lm_head(h), "hidden": h}


def _hooks(rec: st.Recorder):
    return rec._hooks


# --------------------------------------------------------------------------------------------
# 1. Recorder == manual slicing of torchvision models
# --------------------------------------------------------------------------------------------


def _gap(t: torch.Tensor) -> torch.Tensor:
    return t.mean(dim=(2, 3))


def _resnet18_case():
    m = torchvision.models.resnet18(weights=None).eval()
    layers = ["layer1", "layer2.0.conv1", "layer3", "avgpool", "fc"]

    def manual(x):
        h = m.maxpool(m.relu(m.bn1(m.conv1(x))))
        l1 = m.layer1(h)
        l2_conv1 = m.layer2[0].conv1(l1)
        l3 = m.layer3(m.layer2(l1))
        p = m.avgpool(m.layer4(l3))
        logits = m.fc(torch.flatten(p, 1))
        feats = {
            "layer1": _gap(l1),
            "layer2.0.conv1": _gap(l2_conv1),
            "layer3": _gap(l3),
            "avgpool": p[:, :, 0, 0],
            "fc": logits,
        }
        return logits, feats

    return m, layers, manual, torch.randn(2, 3, 64, 64)


def _vit_b_16_case():
    m = torchvision.models.vit_b_16(weights=None, image_size=32).eval()
    layers = ["conv_proj", "encoder.layers.encoder_layer_1", "encoder", "heads"]

    def manual(x):
        proj = m.conv_proj(x)
        tokens = proj.reshape(x.shape[0], m.hidden_dim, -1).permute(0, 2, 1)
        tokens = torch.cat([m.class_token.expand(x.shape[0], -1, -1), tokens], dim=1)
        enc = m.encoder
        h = enc.dropout(tokens + enc.pos_embedding)
        after = []
        for block in enc.layers:
            h = block(h)
            after.append(h)
        encoded = enc.ln(h)
        logits = m.heads(encoded[:, 0])
        feats = {
            "conv_proj": _gap(proj),
            "encoder.layers.encoder_layer_1": after[1][:, 0],
            "encoder": encoded[:, 0],
            "heads": logits,
        }
        return logits, feats

    return m, layers, manual, torch.randn(2, 3, 32, 32)


def _convnext_tiny_case():
    m = torchvision.models.convnext_tiny(weights=None).eval()
    layers = ["features.1", "features.5", "avgpool", "classifier.1"]

    def manual(x):
        outs = []
        h = x
        for f in m.features:
            h = f(h)
            outs.append(h)
        p = m.avgpool(h)
        flat = torch.flatten(m.classifier[0](p), 1)
        logits = m.classifier[2](flat)
        feats = {
            "features.1": _gap(outs[1]),
            "features.5": _gap(outs[5]),
            "avgpool": p[:, :, 0, 0],
            "classifier.1": flat,
        }
        return logits, feats

    return m, layers, manual, torch.randn(2, 3, 64, 64)


def _mobilenet_v3_small_case():
    m = torchvision.models.mobilenet_v3_small(weights=None).eval()
    layers = ["features.3", "features.12", "classifier.0"]

    def manual(x):
        outs = []
        h = x
        for f in m.features:
            h = f(h)
            outs.append(h)
        flat = torch.flatten(m.avgpool(h), 1)
        hidden = m.classifier[0](flat)
        logits = m.classifier[3](m.classifier[1](hidden))
        feats = {"features.3": _gap(outs[3]), "features.12": _gap(outs[12]), "classifier.0": hidden}
        return logits, feats

    return m, layers, manual, torch.randn(2, 3, 64, 64)


def _efficientnet_b0_case():
    m = torchvision.models.efficientnet_b0(weights=None).eval()
    layers = ["features.2.0.block", "features.4", "avgpool"]

    def manual(x):
        outs = []
        h = x
        for i, f in enumerate(m.features):
            if i == 2:
                block_out = f[0].block(h)
            h = f(h)
            outs.append(h)
        p = m.avgpool(h)
        logits = m.classifier(torch.flatten(p, 1))
        feats = {
            "features.2.0.block": _gap(block_out),
            "features.4": _gap(outs[4]),
            "avgpool": p[:, :, 0, 0],
        }
        return logits, feats

    return m, layers, manual, torch.randn(2, 3, 64, 64)


TORCHVISION_CASES = {
    "resnet18": _resnet18_case,
    "vit_b_16": _vit_b_16_case,
    "convnext_tiny": _convnext_tiny_case,
    "mobilenet_v3_small": _mobilenet_v3_small_case,
    "efficientnet_b0": _efficientnet_b0_case,
}


@pytest.mark.parametrize("name", list(TORCHVISION_CASES))
def test_recorder_matches_manual_slicing_of_torchvision_model(name):
    model, layers, manual, x = TORCHVISION_CASES[name]()
    with torch.no_grad():
        expected_logits, expected = manual(x)
        with st.Recorder(model, layers) as rec:
            output, feats = rec(x)
        direct = model(x)

    assert isinstance(feats, TensorDict)
    assert feats.batch_size == torch.Size([x.shape[0]])
    assert sorted(feats.keys()) == sorted(layers)
    for layer in layers:
        assert feats[layer].shape == expected[layer].shape, layer
        torch.testing.assert_close(
            feats[layer], expected[layer], msg=lambda m, k=layer: f"{k}: {m}"
        )
    assert torch.equal(output, direct)
    torch.testing.assert_close(output, expected_logits)


def test_recorder_output_is_model_output_unchanged_for_resnet18_with_grad_enabled():
    model = torchvision.models.resnet18(weights=None).eval()
    x = torch.randn(2, 3, 64, 64)
    with st.Recorder(model, "layer4") as rec:
        output, feats = rec(x)
    assert torch.equal(output, model(x))
    assert feats["layer4"].shape == (2, 512)


# --------------------------------------------------------------------------------------------
# 2. pooling
# --------------------------------------------------------------------------------------------


def test_auto_pool_averages_feature_maps_over_spatial_dims():
    x = torch.randn(3, 5, 4, 6)
    torch.testing.assert_close(pool_features(x, "auto"), x.mean(dim=(2, 3)))


def test_auto_pool_averages_volumes_over_every_dim_after_channels():
    x = torch.randn(2, 3, 4, 5, 6)
    torch.testing.assert_close(pool_features(x, "auto"), x.mean(dim=(2, 3, 4)))


def test_auto_pool_takes_class_token_of_token_sequence():
    x = torch.randn(3, 7, 5)
    assert torch.equal(pool_features(x, "auto"), x[:, 0])


def test_auto_pool_leaves_matrix_unchanged():
    x = torch.randn(3, 5)
    assert torch.equal(pool_features(x, "auto"), x)


def test_mean_pool_averages_over_tokens():
    x = torch.randn(3, 7, 5)
    out = pool_features(x, "mean")
    assert out.shape == (3, 5)
    torch.testing.assert_close(out, x.mean(dim=1))


def test_cls_pool_takes_first_token():
    x = torch.randn(3, 7, 5)
    assert torch.equal(pool_features(x, "cls"), x[:, 0])


def test_avg_pool_averages_over_spatial_dims():
    x = torch.randn(3, 5, 4, 4)
    torch.testing.assert_close(pool_features(x, "avg"), x.mean(dim=(2, 3)))


def test_flatten_pool_keeps_batch_and_flattens_the_rest():
    x = torch.randn(3, 5, 4, 2)
    out = pool_features(x, "flatten")
    assert out.shape == (3, 40)
    assert torch.equal(out, x.reshape(3, -1))


def test_none_pool_keeps_output_unchanged():
    x = torch.randn(3, 5, 4, 2)
    assert torch.equal(pool_features(x, "none"), x)


def test_callable_pool_is_applied_to_layer_output():
    x = torch.randn(3, 5, 4, 2)
    out = pool_features(x, lambda t: t.amax(dim=(2, 3)))
    assert torch.equal(out, x.amax(dim=(2, 3)))


def test_pool_names_are_the_documented_ones():
    assert POOLS == ("auto", "avg", "avg_last", "cls", "mean", "flatten", "none")


def test_auto_refuses_channels_last_maps_and_avg_last_pools_them():
    model = torchvision.models.swin_t().eval()
    x = torch.randn(2, 3, 64, 64)
    with pytest.raises(ValueError, match=r"looks channels-last.*pool='avg_last'"):
        st.Recorder(model, "norm")(x)
    with torch.no_grad(), st.Recorder(model, "norm", pool="avg_last") as rec:
        _, feats = rec(x)
        manual = model.norm(model.features(x)).mean(dim=(1, 2))
    torch.testing.assert_close(feats["norm"], manual)


def test_auto_averages_conv1d_maps_instead_of_taking_a_token():
    model = nn.Sequential(nn.Conv1d(3, 16, 3), nn.ReLU())
    x = torch.randn(2, 3, 48)
    with torch.no_grad(), st.Recorder(model, "0") as rec:
        _, feats = rec(x)
    torch.testing.assert_close(feats["0"], model[0](x).mean(dim=2))


def test_recorder_pools_feature_map_and_tokens_by_shape_with_auto():
    cnn = TinyCNN().eval()
    x = torch.randn(2, 3, 8, 8)
    with st.Recorder(cnn, ["conv", "head"]) as rec, torch.no_grad():
        _, feats = rec(x)
        torch.testing.assert_close(feats["conv"], cnn.conv(x).mean(dim=(2, 3)))
        torch.testing.assert_close(feats["head"], cnn(x))

    tok = TinyTokens().eval()
    t = torch.randn(2, 5, 6)
    with st.Recorder(tok, "proj") as rec, torch.no_grad():
        _, feats = rec(t)
        torch.testing.assert_close(feats["proj"], tok.proj(t)[:, 0])


@pytest.mark.parametrize(
    ("pool", "reference"),
    [
        ("mean", lambda t: t.mean(dim=1)),
        ("cls", lambda t: t[:, 0]),
        ("flatten", lambda t: t.reshape(t.shape[0], -1)),
        ("none", lambda t: t),
        (lambda t: t.amax(dim=1), lambda t: t.amax(dim=1)),
    ],
    ids=["mean", "cls", "flatten", "none", "callable"],
)
def test_recorder_applies_chosen_pool_to_token_layer(pool, reference):
    tok = TinyTokens().eval()
    t = torch.randn(2, 5, 6)
    with st.Recorder(tok, "proj", pool=pool) as rec, torch.no_grad():
        _, feats = rec(t)
        expected = reference(tok.proj(t))
    assert feats["proj"].shape == expected.shape
    torch.testing.assert_close(feats["proj"], expected)


def test_recorder_pool_dict_chooses_pool_per_layer_and_defaults_to_auto():
    cnn = TinyCNN().eval()
    x = torch.randn(2, 3, 8, 8)
    with st.Recorder(cnn, ["conv", "act", "head"], pool={"conv": "flatten", "act": "none"}) as rec:
        with torch.no_grad():
            _, feats = rec(x)
            conv = cnn.conv(x)
            expected_act = cnn.act(conv)
    assert feats["conv"].shape == (2, 8 * 8 * 8)
    torch.testing.assert_close(feats["conv"], conv.reshape(2, -1))
    assert feats["act"].shape == (2, 8, 8, 8)
    torch.testing.assert_close(feats["act"], expected_act)
    assert feats["head"].shape == (2, 10)


def test_pool_dict_is_keyed_by_layer_name_when_layers_are_renamed():
    cnn = TinyCNN().eval()
    x = torch.randn(2, 3, 8, 8)
    with st.Recorder(cnn, {"conv": "early"}, pool={"conv": "flatten"}) as rec:
        _, feats = rec(x)
    assert list(feats.keys()) == ["early"]
    assert feats["early"].shape == (2, 512)


def test_bad_pool_name_raises_value_error_naming_pool():
    with pytest.raises(ValueError, match=r"argument `pool`.*'bogus'"):
        st.Recorder(TinyCNN(), "conv", pool="bogus")


def test_bad_pool_in_dict_raises_value_error_naming_the_layer_entry():
    with pytest.raises(ValueError, match=r"`pool\['conv'\]`.*'median'"):
        st.Recorder(TinyCNN(), ["conv", "head"], pool={"conv": "median"})


def test_pool_dict_naming_unrecorded_layer_raises_value_error():
    with pytest.raises(ValueError, match=r"`pool` names layers that are not recorded: \['head'\]"):
        st.Recorder(TinyCNN(), "conv", pool={"head": "none"})


def test_cls_pool_on_feature_map_raises_value_error():
    cnn = TinyCNN().eval()
    rec = st.Recorder(cnn, "conv", pool="cls")
    match = r"pool='cls' expects a \(B, T, D\).*'conv'.*\(2, 8, 8, 8\)"
    with pytest.raises(ValueError, match=match):
        rec(torch.randn(2, 3, 8, 8))


def test_mean_pool_on_feature_map_raises_value_error():
    with pytest.raises(ValueError, match=r"pool='mean' expects a \(B, T, D\)"):
        pool_features(torch.randn(2, 3, 4, 4), "mean", "conv")


def test_pooling_one_dim_output_raises_value_error_naming_layer():
    with pytest.raises(ValueError, match=r"Layer 'scores' output has shape \(4,\)"):
        pool_features(torch.randn(4), "auto", "scores")


def test_zero_dim_recorded_tensor_raises_value_error_naming_layer():
    # Contract 8: shape problems raise errors that name the layer. A pool callable that
    # returns a 0-d tensor currently ends in a bare IndexError from `t.shape[0]`.
    model = nn.Sequential(nn.Linear(3, 3)).eval()
    rec = st.Recorder(model, "0", pool=lambda t: t.sum())
    with pytest.raises(ValueError, match="'0'"):
        rec(torch.randn(2, 3))


# --------------------------------------------------------------------------------------------
# 3. layer names and keys
# --------------------------------------------------------------------------------------------


def test_layer_dict_maps_layer_names_to_tensordict_keys():
    cnn = TinyCNN().eval()
    x = torch.randn(2, 3, 8, 8)
    with st.Recorder(cnn, {"conv": "early", "head": "logits"}) as rec, torch.no_grad():
        output, feats = rec(x)
    assert rec.layers == {"conv": "early", "head": "logits"}
    assert sorted(feats.keys()) == ["early", "logits"]
    torch.testing.assert_close(feats["logits"], output)
    torch.testing.assert_close(feats["early"], cnn.conv(x).mean(dim=(2, 3)))


def test_layer_list_uses_layer_names_as_keys():
    cnn = TinyCNN().eval()
    with st.Recorder(cnn, ["conv", "flat", "head"]) as rec:
        _, feats = rec(torch.randn(2, 3, 8, 8))
    assert rec.layers == {"conv": "conv", "flat": "flat", "head": "head"}
    assert sorted(feats.keys()) == ["conv", "flat", "head"]
    assert feats["flat"].shape == (2, 8)


def test_single_layer_string_gives_one_key():
    with st.Recorder(TinyCNN().eval(), "head") as rec:
        _, feats = rec(torch.randn(2, 3, 8, 8))
    assert list(feats.keys()) == ["head"]
    assert feats.batch_size == torch.Size([2])


def test_duplicate_output_keys_raise_value_error():
    with pytest.raises(ValueError, match=r"distinct output keys"):
        st.Recorder(TinyCNN(), {"conv": "feat", "head": "feat"})


def test_duplicate_layer_names_in_list_raise_value_error():
    with pytest.raises(ValueError, match=r"`layers` to name each layer once.*\['conv', 'conv'\]"):
        st.Recorder(TinyCNN(), ["conv", "conv"])


@pytest.mark.parametrize("layers", [[], {}], ids=["list", "dict"])
def test_empty_layers_raise_value_error(layers):
    with pytest.raises(ValueError, match=r"`layers` to name at least one layer"):
        st.Recorder(TinyCNN(), layers)


def test_layers_of_wrong_type_raise_value_error():
    with pytest.raises(ValueError, match=r"argument `layers` to be a layer name"):
        st.Recorder(TinyCNN(), 3)


def test_recorder_repr_lists_layers():
    rec = st.Recorder(TinyCNN(), ["conv", "head"])
    assert "layers=['conv', 'head']" in repr(rec)


# --------------------------------------------------------------------------------------------
# 4. unknown layers and list_layers
# --------------------------------------------------------------------------------------------


def test_unknown_layer_error_names_layer_suggests_close_name_and_list_layers():
    model = torchvision.models.resnet18(weights=None)
    with pytest.raises(ValueError) as info:
        st.Recorder(model, ["layer4", "layer5"])
    message = str(info.value)
    assert message.startswith("Layer 'layer5' not found in ResNet. Did you mean 'layer4'")
    assert "selectorch.list_layers(model)" in message


def test_unknown_layer_with_no_close_name_has_no_suggestion():
    with pytest.raises(ValueError, match=r"Layer 'zzzzzzzz' not found in TinyCNN\. See") as info:
        st.Recorder(TinyCNN(), "zzzzzzzz")
    assert "Did you mean" not in str(info.value)


def test_unknown_nested_layer_suggests_the_dotted_name():
    model = torchvision.models.resnet18(weights=None)
    with pytest.raises(ValueError, match=r"Did you mean [^?]*'layer1\.0\.conv1'[^?]*\?"):
        st.Recorder(model, "layer1.0.conv9")


def test_empty_layer_name_raises_value_error():
    with pytest.raises(ValueError, match=r"Expected a layer name \(a non-empty str\), got ''"):
        st.Recorder(TinyCNN(), "")


@pytest.mark.parametrize("build", [TinyCNN, lambda: torchvision.models.resnet18(weights=None)])
def test_list_layers_is_named_modules_without_root(build):
    model = build()
    expected = [name for name, _ in model.named_modules()][1:]
    assert st.list_layers(model) == expected
    assert "" not in st.list_layers(model)


def test_list_layers_of_tiny_cnn_in_definition_order():
    assert st.list_layers(TinyCNN()) == ["conv", "act", "pool", "flat", "head"]


def test_every_listed_layer_is_accepted_by_recorder():
    model = TinyCNN().eval()
    with st.Recorder(model, st.list_layers(model)) as rec:
        _, feats = rec(torch.randn(2, 3, 8, 8))
    assert sorted(feats.keys()) == sorted(st.list_layers(model))


# --------------------------------------------------------------------------------------------
# 5. close() and context manager
# --------------------------------------------------------------------------------------------


def _hook_counts(model: nn.Module) -> dict[str, int]:
    return {name: len(m._forward_hooks) for name, m in model.named_modules()}


def test_close_restores_forward_hooks_of_every_hooked_layer():
    model = torchvision.models.resnet18(weights=None).eval()
    before = _hook_counts(model)
    rec = st.Recorder(model, ["layer1", "layer3.1.conv2", "avgpool"])
    during = _hook_counts(model)
    assert during["layer1"] == before["layer1"] + 1
    assert during["layer3.1.conv2"] == before["layer3.1.conv2"] + 1
    assert during["avgpool"] == before["avgpool"] + 1
    assert sum(during.values()) == sum(before.values()) + 3
    rec.close()
    assert _hook_counts(model) == before
    for name in ["layer1", "layer3.1.conv2", "avgpool"]:
        module = model.get_submodule(name)
        assert len(module._forward_hooks_with_kwargs) == 0
        assert len(module._forward_hooks_always_called) == 0


def test_close_keeps_user_hook_on_same_layer():
    model = TinyCNN().eval()
    calls = []
    handle = model.conv.register_forward_hook(lambda m, a, o: calls.append(o.shape))
    user_ids = list(model.conv._forward_hooks)
    rec = st.Recorder(model, "conv")
    assert len(model.conv._forward_hooks) == 2
    rec(torch.randn(2, 3, 8, 8))
    assert len(calls) == 1
    rec.close()
    assert list(model.conv._forward_hooks) == user_ids
    model(torch.randn(2, 3, 8, 8))
    assert len(calls) == 2
    handle.remove()
    assert len(model.conv._forward_hooks) == 0


def test_closing_one_recorder_keeps_other_recorder_on_same_layer_working():
    model = TinyCNN().eval()
    x = torch.randn(2, 3, 8, 8)
    first = st.Recorder(model, "conv")
    second = st.Recorder(model, {"conv": "c"})
    assert len(model.conv._forward_hooks) == 2
    first.close()
    assert len(model.conv._forward_hooks) == 1
    with torch.no_grad():
        _, feats = second(x)
        torch.testing.assert_close(feats["c"], model.conv(x).mean(dim=(2, 3)))
    second.close()
    assert len(model.conv._forward_hooks) == 0


def test_context_manager_closes_recorder():
    model = TinyCNN().eval()
    before = _hook_counts(model)
    with st.Recorder(model, ["conv", "head"]) as rec:
        assert isinstance(rec, st.Recorder)
        assert _hook_counts(model) != before
    assert _hook_counts(model) == before
    assert _hooks(rec).closed


def test_context_manager_closes_recorder_when_body_raises():
    model = TinyCNN().eval()
    before = _hook_counts(model)
    with pytest.raises(KeyError, match="inside"), st.Recorder(model, "conv"):
        raise KeyError("inside")
    assert _hook_counts(model) == before


def test_calling_closed_recorder_raises_runtime_error():
    model = TinyCNN().eval()
    rec = st.Recorder(model, "conv")
    rec.close()
    with pytest.raises(RuntimeError, match="Recorder was closed"):
        rec(torch.randn(2, 3, 8, 8))


def test_close_twice_is_harmless():
    model = TinyCNN().eval()
    before = _hook_counts(model)
    rec = st.Recorder(model, "conv")
    rec.close()
    rec.close()
    assert _hook_counts(model) == before


# --------------------------------------------------------------------------------------------
# 6. compiled models are refused
# --------------------------------------------------------------------------------------------


def test_torch_compiled_model_is_refused_with_type_error():
    compiled = torch.compile(TinyCNN())
    with pytest.raises(TypeError, match=r"already compiled with torch\.compile"):
        st.Recorder(compiled, "conv")


def test_model_compiled_in_place_is_refused_with_type_error():
    model = TinyCNN()
    model.compile()
    with pytest.raises(TypeError, match=r"already compiled with torch\.compile"):
        st.Recorder(model, "conv")
    assert len(model.conv._forward_hooks) == 0


# --------------------------------------------------------------------------------------------
# 7. layers that do not run, or run twice
# --------------------------------------------------------------------------------------------


def test_layer_that_does_not_run_raises_runtime_error():
    model = WithUnusedLayer().eval()
    rec = st.Recorder(model, ["used", "unused"])
    with pytest.raises(RuntimeError, match=r"\['unused'\] did not run"):
        rec(torch.randn(2, 4))
    assert _hooks(rec).store == {}
    assert _hooks(rec).recording is False


def test_module_reused_twice_raises_runtime_error():
    model = ReusesModule().eval()
    rec = st.Recorder(model, "fc")
    with pytest.raises(RuntimeError, match=r"\['fc'\] ran more than once"):
        rec(torch.randn(2, 4))
    assert _hooks(rec).store == {}


def test_resnet_basic_block_relu_called_twice_raises_and_recorder_recovers():
    model = torchvision.models.resnet18(weights=None).eval()
    x = torch.randn(2, 3, 64, 64)
    bad = st.Recorder(model, ["layer1.0.relu", "layer2"])
    with pytest.raises(RuntimeError, match=r"\['layer1\.0\.relu'\] ran more than once"):
        bad(x)
    assert _hooks(bad).store == {}
    assert _hooks(bad).repeated == set()
    bad.close()

    with st.Recorder(model, ["layer1.0.conv1", "layer2"]) as good, torch.no_grad():
        output, feats = good(x)
        h = model.maxpool(model.relu(model.bn1(model.conv1(x))))
        torch.testing.assert_close(feats["layer1.0.conv1"], model.layer1[0].conv1(h).mean((2, 3)))
        torch.testing.assert_close(feats["layer2"], model.layer2(model.layer1(h)).mean((2, 3)))
        assert torch.equal(output, model(x))
        assert _hooks(good).store == {}


def test_recorder_records_again_after_a_layer_did_not_run():
    model = WithUnusedLayer().eval()
    x = torch.randn(2, 4)
    with st.Recorder(model, ["used", "unused"]) as bad, pytest.raises(RuntimeError):
        bad(x)
    with st.Recorder(model, "used") as good, torch.no_grad():
        _, feats = good(x)
        torch.testing.assert_close(feats["used"], model.used(x))
    assert _hooks(good).store == {}


def test_exception_in_model_forward_stops_recording():
    # The recorder starts recording, the model raises, and recording is never switched off:
    # later direct calls of the model then record into the store (and hold the tensors).
    model = FailsOnDemand().eval()
    rec = st.Recorder(model, "fc")
    model.fail = True
    with pytest.raises(KeyError, match="boom"):
        rec(torch.randn(2, 4))
    model.fail = False
    model(torch.randn(2, 4))
    assert _hooks(rec).recording is False
    assert _hooks(rec).store == {}


def test_recorder_works_after_model_forward_raised():
    model = FailsOnDemand().eval()
    x = torch.randn(2, 4)
    rec = st.Recorder(model, "fc")
    model.fail = True
    with pytest.raises(KeyError, match="boom"):
        rec(torch.randn(3, 4))
    model.fail = False
    with torch.no_grad():
        _, feats = rec(x)
        torch.testing.assert_close(feats["fc"], model.fc(x))
    assert feats.batch_size == torch.Size([2])


# --------------------------------------------------------------------------------------------
# 8. direct model calls record nothing
# --------------------------------------------------------------------------------------------


def test_calling_wrapped_model_directly_records_nothing():
    model = TinyCNN().eval()
    rec = st.Recorder(model, ["conv", "head"])
    x = torch.randn(2, 3, 8, 8)
    out = model(x)
    out_again = model(x)
    assert _hooks(rec).store == {}
    assert torch.equal(out, out_again)

    y = torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        output, feats = rec(y)
        torch.testing.assert_close(feats["conv"], model.conv(y).mean(dim=(2, 3)))
    assert feats.batch_size == torch.Size([4])
    assert torch.equal(feats["head"], output)
    assert _hooks(rec).store == {}


# --------------------------------------------------------------------------------------------
# 9. detach
# --------------------------------------------------------------------------------------------


def test_detach_true_gives_features_without_grad_even_when_input_requires_grad():
    model = TinyCNN().eval()
    x = torch.randn(2, 3, 8, 8, requires_grad=True)
    with st.Recorder(model, ["conv", "head"]) as rec:
        output, feats = rec(x)
    assert output.requires_grad
    assert not feats["conv"].requires_grad
    assert not feats["head"].requires_grad
    assert feats["conv"].grad_fn is None


def test_detach_false_keeps_graph_so_grad_flows_to_input():
    model = TinyCNN().eval()
    x = torch.randn(2, 3, 8, 8, requires_grad=True)
    with st.Recorder(model, "conv", detach=False) as rec:
        _, feats = rec(x)
    assert feats["conv"].requires_grad
    feats["conv"].pow(2).sum().backward()

    x_ref = x.detach().clone().requires_grad_(True)
    model.conv(x_ref).mean(dim=(2, 3)).pow(2).sum().backward()
    assert x.grad is not None
    torch.testing.assert_close(x.grad, x_ref.grad)


# --------------------------------------------------------------------------------------------
# 10. tuple and dict layer outputs
# --------------------------------------------------------------------------------------------


def test_multihead_attention_tuple_output_records_attention_output():
    model = WithAttention().eval()
    x = torch.randn(2, 5, 8)
    with st.Recorder(model, "attn") as rec, torch.no_grad():
        _, feats = rec(x)
        attn_out, _ = model.attn(x, x, x)
    assert feats["attn"].shape == (2, 8)
    torch.testing.assert_close(feats["attn"], attn_out[:, 0])


def test_lstm_tuple_output_records_sequence_output():
    model = WithLSTM().eval()
    x = torch.randn(3, 4, 5)
    with st.Recorder(model, "lstm", pool="mean") as rec, torch.no_grad():
        _, feats = rec(x)
        seq, _ = model.lstm(x)
    assert feats["lstm"].shape == (3, 7)
    torch.testing.assert_close(feats["lstm"], seq.mean(dim=1))


def test_dict_output_records_first_tensor_value():
    model = WithOddLayers().eval()
    x = torch.randn(2, 4)
    with st.Recorder(model, "dict_layer") as rec, torch.no_grad():
        _, feats = rec(x)
        expected = model.dict_layer.fc(x)
    torch.testing.assert_close(feats["dict_layer"], expected)


def test_layer_output_without_tensor_raises_type_error_naming_layer():
    model = WithOddLayers().eval()
    rec = st.Recorder(model, "no_tensor")
    with pytest.raises(TypeError, match=r"Layer 'no_tensor' returned dict, which holds no tensor"):
        rec(torch.randn(2, 4))


# --------------------------------------------------------------------------------------------
# 11. deepcopy
# --------------------------------------------------------------------------------------------


def test_deepcopy_of_recorder_records_from_its_own_model():
    model = TinyCNN().eval()
    x = torch.randn(2, 3, 8, 8)
    rec = st.Recorder(model, ["conv", "head"])
    twin = copy.deepcopy(rec)
    assert twin.model is not model
    assert _hooks(twin) is not _hooks(rec)
    assert _hooks(twin).model is twin.model

    with torch.no_grad():
        twin.model.conv.weight.add_(1.0)
        out, feats = rec(x)
        twin_out, twin_feats = twin(x)
        torch.testing.assert_close(feats["conv"], model.conv(x).mean(dim=(2, 3)))
        torch.testing.assert_close(twin_feats["conv"], twin.model.conv(x).mean(dim=(2, 3)))
    assert not torch.allclose(feats["conv"], twin_feats["conv"])
    assert not torch.allclose(out, twin_out)
    assert _hooks(rec).store == {}
    assert _hooks(twin).store == {}

    twin.close()
    assert len(twin.model.conv._forward_hooks) == 0
    assert len(model.conv._forward_hooks) == 1
    _, again = rec(x)
    torch.testing.assert_close(again["conv"], feats["conv"])


def test_deepcopy_of_wrapped_model_neither_records_nor_raises():
    model = TinyCNN().eval()
    x = torch.randn(2, 3, 8, 8)
    rec = st.Recorder(model, "conv")
    clone = copy.deepcopy(model)
    first = clone(x)
    second = clone(x)
    assert torch.equal(first, second)
    assert torch.equal(first, model(x))
    assert _hooks(rec).store == {}
    (copied_hook,) = clone.conv._forward_hooks.values()
    assert copied_hook.owner is not _hooks(rec)
    assert copied_hook.owner.store == {}

    with torch.no_grad():
        _, feats = rec(x)
        torch.testing.assert_close(feats["conv"], model.conv(x).mean(dim=(2, 3)))


# --------------------------------------------------------------------------------------------
# 12. torch.compile of the recorder
# --------------------------------------------------------------------------------------------


def test_compiled_recorder_fullgraph_matches_eager():
    model = TinyCNN().eval()
    rec = st.Recorder(model, {"conv": "conv", "flat": "pooled", "head": "logits"})
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        eager_out, eager_feats = rec(x)
        compiled = torch.compile(rec, fullgraph=True)
        out, feats = compiled(x)
    assert isinstance(feats, TensorDict)
    assert feats.batch_size == torch.Size([2])
    assert sorted(feats.keys()) == sorted(eager_feats.keys())
    torch.testing.assert_close(out, eager_out)
    for key in eager_feats.keys():
        torch.testing.assert_close(feats[key], eager_feats[key])
    assert _hooks(rec).store == {}
    assert _hooks(rec).recording is False


def test_compiled_recorder_is_one_graph_across_batches_of_same_shape():
    from torch._dynamo.testing import CompileCounter

    model = TinyTokens().eval()
    rec = st.Recorder(model, {"proj": "tokens", "head": "logits"}, pool={"proj": "mean"})
    counter = CompileCounter()
    compiled = torch.compile(rec, backend=counter, fullgraph=True)
    with torch.no_grad():
        for _ in range(3):
            t = torch.randn(2, 5, 6)
            out, feats = compiled(t)
            torch.testing.assert_close(feats["tokens"], model.proj(t).mean(dim=1))
            torch.testing.assert_close(feats["logits"], out)
    assert counter.frame_count == 1


# --------------------------------------------------------------------------------------------
# 13. keyword arguments (Hugging-Face style)
# --------------------------------------------------------------------------------------------


def test_hf_style_model_called_with_keyword_arguments_records_layer():
    model = TinyHFModel().eval()
    ids = torch.randint(0, 20, (3, 6))
    mask = torch.ones(3, 6)
    mask[:, 4:] = 0
    with st.Recorder(model, {"layer": "hidden"}, pool="mean") as rec, torch.no_grad():
        output, feats = rec(input_ids=ids, attention_mask=mask)
        direct = model(input_ids=ids, attention_mask=mask)
        expected = model.layer(model.embed(ids)).mean(dim=1)
    assert isinstance(output, dict)
    assert set(output) == {"logits", "hidden"}
    assert torch.equal(output["logits"], direct["logits"])
    assert feats.batch_size == torch.Size([3])
    torch.testing.assert_close(feats["hidden"], expected)


def test_hf_style_model_with_mixed_positional_and_keyword_arguments():
    model = TinyHFModel().eval()
    ids = torch.randint(0, 20, (2, 4))
    mask = torch.zeros(2, 4)
    with st.Recorder(model, "lm_head") as rec, torch.no_grad():
        output, feats = rec(ids, attention_mask=mask)
    # all-zero mask: the hidden states and so the logits are the lm_head bias at every token
    torch.testing.assert_close(feats["lm_head"], model.lm_head.bias.expand(2, -1))
    assert torch.equal(output["logits"][:, 0], feats["lm_head"])


# --------------------------------------------------------------------------------------------
# 14. batch size agreement
# --------------------------------------------------------------------------------------------


def test_layers_with_different_batch_sizes_raise_value_error():
    model = MixedBatch().eval()
    rec = st.Recorder(model, ["per_sample", "shared"])
    with pytest.raises(ValueError, match=r"batch size.*'per_sample': 5, 'shared': 1"):
        rec(torch.randn(5, 4))
    assert _hooks(rec).store == {}


# --------------------------------------------------------------------------------------------
# recorded values are the layer's output at hook time
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("pool", ["none", "flatten"])
def test_recorded_feature_is_not_changed_by_later_inplace_ops(pool):
    # torchvision's ResNet applies ReLU(inplace=True) to bn1's output right after the hook ran;
    # a recorded view of that output must keep the values bn1 returned.
    model = torchvision.models.resnet18(weights=None).eval()
    x = torch.randn(2, 3, 32, 32)
    with st.Recorder(model, "bn1", pool=pool) as rec, torch.no_grad():
        _, feats = rec(x)
        expected = model.bn1(model.conv1(x))
    if pool == "flatten":
        expected = expected.reshape(2, -1)
    assert (expected < 0).any()
    torch.testing.assert_close(feats["bn1"], expected)
