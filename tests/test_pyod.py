"""PyODScore: the detector's own numbers on CPU numpy, its cost flags, its limits."""

from __future__ import annotations

import importlib.util
import sys

import numpy as np
import pytest
import torch
from torch import nn
from torch._dynamo.testing import CompileCounter

import selectorch as st
from selectorch import datasets
from selectorch.exceptions import NotFittedError
from selectorch.functional.ranking import auroc
from selectorch.persistence import PersistenceError
from selectorch.scores import PyODScore, create_score

#: Every test but the missing-PyOD one needs PyOD (the `pyod` extra, installed by `dev`).
needs_pyod = pytest.mark.skipif(
    importlib.util.find_spec("pyod") is None, reason="pip install 'selectorch[pyod]'"
)
if importlib.util.find_spec("pyod") is not None:
    from pyod.models.iforest import IForest
    from pyod.models.knn import KNN
    from pyod.models.lof import LOF


class MeanDistance:
    """Not PyOD: any object with fit / decision_function on numpy is accepted."""

    def fit(self, X, y=None):
        self.mean_ = X.mean(axis=0)
        self.decision_scores_ = self.decision_function(X)
        return self

    def decision_function(self, X):
        return np.linalg.norm(X - self.mean_, axis=1)


@pytest.fixture(scope="module")
def mnist():
    """128-d `classifier.0` features of 1,200 MNIST digits and of 300 Animal-MNIST drawings."""
    net = datasets.mnist_net()
    images, _ = datasets.mnist5k()
    perm = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))
    digits = images[perm[:1200]]
    animals = datasets.animal_mnist()[:300]
    with st.Recorder(net, "classifier.0") as rec, torch.no_grad():
        _, feats = rec(digits)
        _, ood = rec(animals)
    return {"fit": feats["classifier.0"][:800], "test": feats["classifier.0"][800:],
            "ood": ood["classifier.0"]}


@needs_pyod
def test_registry_builds_a_default_knn_detector_with_the_cost_flags():
    score = create_score("pyod")
    assert isinstance(score, PyODScore) and type(score.detector).__name__ == "KNN"
    assert not score.is_fitted
    assert (PyODScore.requires_grad, PyODScore.passes, PyODScore.compile_clean) == (
        False, 1, False
    )
    assert repr(score) == "PyODScore(detector=KNN)"


@needs_pyod
@pytest.mark.parametrize("make", [lambda: KNN(n_neighbors=7), lambda: LOF(n_neighbors=15),
                                  lambda: IForest(n_estimators=25, random_state=0)])
def test_scores_equal_the_detector_called_directly_on_numpy_mnist_features(mnist, make):
    X, Q = mnist["fit"], torch.cat([mnist["test"][:100], mnist["ood"][:100]])
    score = PyODScore(make()).fit(X)
    reference = make().fit(X.double().numpy())  # an independent detector, same settings
    expected = reference.decision_function(Q.double().numpy())
    got = score.score(Q, batch_size=64)  # batches give the same per-row numbers
    assert got.dtype == torch.float32 and got.shape == (200,)
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-5, atol=1e-5)


@needs_pyod
def test_pyod_knn_separates_animals_from_digits_as_a_higher_outlier_score(mnist):
    score = PyODScore(KNN()).fit(mnist["fit"])
    test, ood = score.score(mnist["test"]), score.score(mnist["ood"])
    both = torch.cat([test, ood])
    value = auroc(both, torch.arange(both.numel()) >= test.numel()).item()
    assert value > 0.9, value  # higher = more outlying = OOD; a flipped sign gives < 0.1
    score.calibrate(mnist["test"][:200], coverage=0.9)
    kept = score.select(mnist["ood"])["selected"].float().mean().item()
    assert kept < 0.5, kept


@needs_pyod
def test_a_detector_given_fitted_counts_as_fitted_and_scores_without_fit():
    X = torch.randn(100, 5, generator=torch.Generator().manual_seed(1))
    detector = KNN().fit(X.double().numpy())
    score = PyODScore(detector)
    assert score.is_fitted
    expected = detector.decision_function(X[:10].double().numpy())
    np.testing.assert_allclose(score(X[:10]).numpy(), expected, rtol=1e-5)


@needs_pyod
def test_unfitted_use_raises_not_fitted_and_nan_rows_score_inf():
    score = PyODScore(KNN())
    with pytest.raises(NotFittedError, match="PyODScore is not fitted yet"):
        score(torch.randn(3, 4))
    score.fit(torch.randn(50, 4))
    X = torch.randn(4, 4)
    X[1, 0], X[3, 2] = float("nan"), float("inf")
    out = score(X)
    assert torch.isinf(out[[1, 3]]).all() and torch.isfinite(out[[0, 2]]).all()
    assert score(torch.randn(0, 4)).shape == (0,)
    with pytest.raises(ValueError, match="4"):
        score(torch.randn(2, 6))  # width fixed by fit


@needs_pyod
def test_scores_come_back_on_the_input_dtype():
    score = PyODScore(KNN()).fit(torch.randn(60, 3))
    assert score(torch.randn(5, 3, dtype=torch.float64)).dtype == torch.float64


def test_missing_pyod_raises_an_import_error_naming_the_extra(monkeypatch):
    for name in [m for m in sys.modules if m == "pyod" or m.startswith("pyod.")]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, "pyod", None)
    with pytest.raises(ImportError, match=r"pip install 'selectorch\[pyod\]'"):
        PyODScore()
    with pytest.raises(ImportError, match=r"selectorch\[pyod\]"):
        create_score("pyod")
    score = PyODScore(MeanDistance()).fit(torch.randn(30, 3))  # a given detector: no import
    assert score.is_fitted and score(torch.zeros(1, 3)).shape == (1,)


def test_not_a_detector_is_refused_with_its_type():
    with pytest.raises(TypeError, match=r"`detector`.*list.*decision_function"):
        PyODScore([1, 2])


@needs_pyod
def test_save_refuses_with_a_message_and_state_dict_carries_only_the_threshold(tmp_path):
    score = PyODScore(KNN()).fit(torch.randn(80, 4)).calibrate(torch.randn(40, 4), coverage=0.9)
    with pytest.raises(PersistenceError, match="PyOD detector.*Python object"):
        score.save(tmp_path / "pyod")
    assert not (tmp_path / "pyod").exists()
    twin = PyODScore(KNN())
    twin.load_state_dict(score.state_dict())
    assert twin.is_calibrated and not twin.is_fitted  # the detector did not travel


@needs_pyod
def test_selective_model_save_refuses_with_the_scores_reason(tmp_path):
    net = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
    sel = st.SelectiveModel(net, PyODScore(KNN()), layer="0")
    sel.fit(torch.randn(60, 4), progress=False)
    sel.calibrate(torch.randn(30, 4), coverage=0.9, progress=False)
    with pytest.raises(PersistenceError, match=r"Cannot save to '.*sel'.*PyOD detector"):
        sel.save(tmp_path / "sel")
    assert not (tmp_path / "sel").exists()


@needs_pyod
def test_compiles_without_fullgraph_with_a_graph_break_and_matches_eager(mnist):
    net = datasets.mnist_net()
    images, labels = datasets.mnist5k()
    sel = st.SelectiveModel(net, PyODScore(KNN()), layer="classifier.0")
    sel.fit(images[:400], progress=False).calibrate(images[400:600], coverage=0.9, progress=False)
    batch = images[600:664]
    eager = sel(batch)
    counter = CompileCounter()
    compiled = torch.compile(sel, backend=counter)
    out = compiled(batch)
    torch.testing.assert_close(out.score, eager.score)
    assert torch.equal(out.selected, eager.selected)
    assert counter.frame_count >= 2  # the model's graph, then the selection after the break
    with pytest.raises(Exception, match="(?i)skip|disable|graph break"):
        torch.compile(sel, fullgraph=True, backend="eager")(batch)
