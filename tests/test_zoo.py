"""Models users actually wrap: timm ViTs and CNNs, Hugging Face transformers on padded batches."""

from __future__ import annotations

import copy

import pytest
import timm
import torch
import transformers

import selectorch as st
from selectorch.scores import EnergyScore, KNNScore


def tiny_bert() -> torch.nn.Module:
    config = transformers.BertConfig(
        vocab_size=100,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=32,
        num_labels=3,
    )
    return transformers.BertForSequenceClassification(config).eval()


def token_batches(n: int = 24, length: int = 10, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 100, (n, length), generator=g)
    lengths = torch.randint(3, length + 1, (n,), generator=g)
    mask = (torch.arange(length) < lengths[:, None]).long()
    ids = ids * mask  # pad token 0 after each sentence
    return [
        {"input_ids": ids[i : i + 8], "attention_mask": mask[i : i + 8]} for i in range(0, n, 8)
    ]


@pytest.mark.parametrize(
    ("name", "layer"),
    [
        ("vit_tiny_patch16_224", "fc_norm"),
        ("resnet18", "global_pool"),
        ("convnext_atto", "head.flatten"),
    ],
)
def test_timm_models_with_knn_on_pre_logits(name, layer):
    kwargs = {"img_size": 32} if name.startswith("vit") else {}
    model = timm.create_model(name, pretrained=False, num_classes=4, **kwargs).eval()
    x = torch.randn(12, 3, 32, 32)
    sel = st.SelectiveModel(model, KNNScore(k=2), layer=layer)
    sel.fit(x[:8], progress=False).calibrate(x[8:], coverage=0.5, progress=False)
    with torch.no_grad():
        out = sel(x[:3])
        features = model.forward_head(model.forward_features(x[:3]), pre_logits=True)
    torch.testing.assert_close(out.score, sel.score.score(features))
    assert torch.equal(out.output, model(x[:3]))


def test_hugging_face_bert_padded_batches_and_dict_outputs():
    model = tiny_bert()
    batches = token_batches()
    sel = st.SelectiveModel(model, EnergyScore()).fit(batches, progress=False)
    sel.calibrate(batches, coverage=0.75, progress=False)
    b = batches[0]
    with torch.no_grad():
        out = sel(**b)
        bare = model(**b)
    assert isinstance(out.output, transformers.modeling_outputs.SequenceClassifierOutput)
    assert torch.equal(out.output.logits, bare.logits)
    torch.testing.assert_close(out.score, -torch.logsumexp(bare.logits, dim=1))


def test_bert_pooler_knn_score_does_not_depend_on_padding():
    model = tiny_bert()
    sel = st.SelectiveModel(model, KNNScore(k=3), layer="bert.pooler")
    batches = token_batches()
    sel.fit(batches, progress=False).calibrate(batches, coverage=0.75, progress=False)
    b = batches[1]
    more_padding = {
        "input_ids": torch.cat([b["input_ids"], torch.zeros(8, 5, dtype=torch.long)], dim=1),
        "attention_mask": torch.cat(
            [b["attention_mask"], torch.zeros(8, 5, dtype=torch.long)], dim=1
        ),
    }
    with torch.no_grad():
        short, long = sel(**b), sel(**more_padding)
    torch.testing.assert_close(short.score, long.score, rtol=1e-4, atol=1e-4)
    assert torch.equal(short.selected, long.selected)


def test_bert_selective_model_deepcopies_and_halves():
    model = tiny_bert()
    sel = st.SelectiveModel(model, KNNScore(k=2), layer="bert.pooler")
    batches = token_batches()
    sel.fit(batches, progress=False).calibrate(batches, coverage=0.75, progress=False)
    twin = copy.deepcopy(sel).double()
    with torch.no_grad():
        a = sel(**batches[2])
        b = twin(**batches[2])
    assert twin.score.bank_.dtype == torch.float64
    torch.testing.assert_close(b.score.float(), a.score, rtol=1e-4, atol=1e-4)
