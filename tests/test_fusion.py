"""FusionScore: components on several layers and the logits, standardised and combined."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torchvision

import selectorch as st
from selectorch.functional.fusion import combine_standardized, empirical_pvalues
from selectorch.scores import EnergyScore, FusionScore, KNNScore


def data(n: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"emb": torch.randn(n, 6, generator=g), "logits": 3 * torch.randn(n, 4, generator=g)}


def test_empirical_pvalues_match_a_count():
    ref = torch.sort(torch.randn(2, 50), dim=1).values
    scores = torch.randn(7, 2)
    p = empirical_pvalues(scores, ref)
    for i in range(7):
        for j in range(2):
            count = int((ref[j] >= scores[i, j]).sum())
            assert p[i, j].item() == pytest.approx((1 + count) / 51)


@pytest.mark.parametrize(
    ("standardize", "combine", "reference"),
    [
        ("pvalue", "mean", lambda v: (1 - v).mean(1)),
        ("pvalue", "max", lambda v: (1 - v).max(1)),
        ("pvalue", "fisher", lambda v: -2 * np.log(v).sum(1)),
        ("zscore", "mean", lambda v: v.mean(1)),
        ("zscore", "max", lambda v: v.max(1)),
    ],
)
def test_combinations_against_numpy(standardize, combine, reference):
    values = torch.rand(9, 3) * 0.9 + 0.05
    out = combine_standardized(values, standardize, combine)
    np.testing.assert_allclose(out.numpy(), reference(values.numpy()), rtol=1e-6)


def test_fusion_equals_hand_computation_and_keeps_its_coverage_promise():
    fusion = FusionScore({"emb": KNNScore(k=3), "logits": EnergyScore()}, combine="fisher")
    fit, cal, test = data(300, 0), data(400, 1), data(2000, 2)
    fusion.fit(fit).calibrate(cal, coverage=0.9)
    knn, energy = KNNScore(k=3).fit(fit["emb"]), EnergyScore()
    ref = torch.stack([knn(cal["emb"][:200]), energy(cal["logits"][:200])], 1)
    ref = torch.sort(ref.T, dim=1).values
    comp = torch.stack([knn(test["emb"]), energy(test["logits"])], 1)
    expected = -2 * empirical_pvalues(comp, ref).log().sum(1)
    torch.testing.assert_close(fusion(test), expected)
    kept = fusion.select(test)["selected"].double().mean().item()
    assert 0.86 <= kept <= 0.94
    # the threshold comes from the 200 rows not used to standardise
    assert fusion.calibration_report()["n"] == 200
    assert math.ceil(201 * 0.9) == 181


def test_fusion_state_dict_round_trip_and_nan_rows():
    fusion = FusionScore({"emb": KNNScore(k=2), "logits": EnergyScore()}, standardize="zscore")
    fusion.fit(data(100, 0)).calibrate(data(100, 1), coverage=0.8)
    twin = FusionScore({"emb": KNNScore(k=2), "logits": EnergyScore()}, standardize="zscore")
    twin.load_state_dict(fusion.state_dict())
    x = data(5, 3)
    x["emb"][2, 0] = float("nan")
    a, b = fusion(x), twin(x)
    torch.testing.assert_close(a, b)
    assert a[2] == float("inf") and torch.isfinite(a[[0, 1, 3, 4]]).all()


def test_fusion_errors_name_the_problem():
    with pytest.raises(ValueError, match="non-empty dict"):
        FusionScore({})
    with pytest.raises(TypeError, match="selectorch Score"):
        FusionScore({"a": torch.nn.Linear(2, 2)})
    with pytest.raises(ValueError, match="fisher"):
        FusionScore({"a": KNNScore()}, standardize="zscore", combine="fisher")
    fusion = FusionScore({"emb": KNNScore(k=2), "logits": EnergyScore()})
    with pytest.raises(st.NotFittedError, match=r"fit\(X\)"):
        fusion(data(3, 0))
    fusion.fit(data(50, 0))
    with pytest.raises(st.NotFittedError, match=r"calibrate\(X"):
        fusion(data(3, 0))
    with pytest.raises(ValueError, match=r"lacks the keys \['logits'\]"):
        fusion.fit({"emb": torch.randn(5, 6)})


def test_selective_model_feeds_several_layers_and_logits_to_a_fusion():
    model = torchvision.models.resnet18(num_classes=4).eval()
    fusion = FusionScore(
        {"layer3": KNNScore(k=2), "avgpool": KNNScore(k=2), "logits": EnergyScore()}
    )
    sel = st.SelectiveModel(model, fusion, layer=["layer3", "avgpool"])
    x = torch.randn(40, 3, 32, 32)
    sel.fit(x[:20], progress=False).calibrate(x[20:], coverage=0.5, progress=False)
    q = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        out = sel(q)
        with st.Recorder(model, ["layer3", "avgpool"]) as rec:
            logits, feats = rec(q)
        direct = fusion({"layer3": feats["layer3"], "avgpool": feats["avgpool"], "logits": logits})
        fast = torch.compile(sel, fullgraph=True)(q)
    torch.testing.assert_close(out.score, direct)
    torch.testing.assert_close(fast.score, out.score)
    with pytest.raises(ValueError, match=r"reads the keys \['layer2'\]"):
        st.SelectiveModel(model, FusionScore({"layer2": KNNScore()}), layer=["layer3"])
