"""Safe persistence: Score.save/load and SelectiveModel.save/load, and every refusal.

A save is a directory: a JSON header (versions, class, hyperparameters, shapes, SHA-256 of each
file) and the tensors (torch.save of a state_dict), read back with weights_only=True.
"""

from __future__ import annotations

import json
import math
import pickle

import pytest
import torch
import torchvision
from test_contract import Net, inputs, selective
from test_scores import CASES, D, fitted, make_inputs, skip_non_tensor_state
from torch import nn

import selectorch as st
from selectorch import persistence
from selectorch.persistence import PersistenceError
from selectorch.scores import KNNScore, MahalanobisScore, Score


def rewrite_header(path, change) -> None:
    """Apply ``change(header)`` and write the header back (what an attacker or an accident does)."""
    header_path = path / persistence.HEADER_FILE
    header = json.loads(header_path.read_text())
    change(header)
    header_path.write_text(json.dumps(header))


def refresh_checksums(path) -> None:
    """Recompute sizes and checksums in the header, as someone forging a save would."""

    def change(header):
        for name in header["files"]:
            f = path / name
            header["files"][name] = {
                "bytes": f.stat().st_size,
                "sha256": persistence.file_sha256(f),
            }

    rewrite_header(path, change)


class Payload:
    """Unpickling this calls open(marker, "w"): the file appearing means code ran."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


# ============================== round trips over every registered score ======================


@pytest.mark.parametrize(("name", "kwargs"), CASES)
def test_score_save_load_round_trip_gives_identical_scores_and_threshold(name, kwargs, tmp_path):
    skip_non_tensor_state(name)
    score = fitted(name, kwargs)
    path = score.save(tmp_path / "score")
    assert sorted(p.name for p in path.iterdir()) == ["selectorch.json", "state.pt"]
    loaded = Score.load(path)
    assert type(loaded) is type(score)
    assert loaded.hparams() == score.hparams()
    Q = make_inputs(score, 20, seed=4)
    assert torch.equal(loaded(Q), score(Q))
    assert loaded.get_threshold() == score.get_threshold()
    assert loaded.calibration_report() == score.calibration_report()
    assert torch.equal(loaded.select(Q)["selected"], score.select(Q)["selected"])
    assert type(score).load(path).hparams() == score.hparams()  # the class's own load too


@pytest.mark.parametrize(("name", "kwargs"), CASES)
def test_selective_model_save_load_round_trip_gives_identical_outputs(name, kwargs, tmp_path):
    skip_non_tensor_state(name)
    sel = selective(name, kwargs)
    path = sel.save(tmp_path / "sel")
    header = persistence.read_header(path)
    assert header["kind"] == "selective_model"
    assert header["selective"]["layer"] == sel.layer
    loaded = st.SelectiveModel.load(path, sel.model)
    x = inputs(10, seed=5)
    with torch.no_grad():
        a, b = sel(x), loaded(x)
    assert torch.equal(a.score, b.score) and torch.equal(a.selected, b.selected)
    assert loaded.calibration_report() == sel.calibration_report()
    loaded.close()


def test_header_names_versions_class_hyperparameters_shapes_and_checksum(tmp_path):
    score = (
        KNNScore(k=3, stat="mean")
        .fit(torch.randn(40, 6))
        .calibrate(torch.randn(20, 6), coverage=0.9)
    )
    header = persistence.read_header(score.save(tmp_path / "s"))
    assert header["selectorch_version"] == st.__version__
    assert header["score"]["class"] == "knn" and header["score"]["class_name"] == "KNNScore"
    assert header["score"]["hparams"]["k"] == 3 and header["score"]["hparams"]["stat"] == "mean"
    assert header["score"]["feature_dim"] == 6
    assert header["tensors"]["bank_"] == {"shape": [40, 6], "dtype": "torch.float32"}
    assert len(header["files"]["state.pt"]["sha256"]) == 64


def test_unfitted_and_float64_scores_load_as_they_were_saved(tmp_path):
    unfitted = Score.load(KNNScore(k=4).save(tmp_path / "a"))
    assert isinstance(unfitted, KNNScore) and unfitted.k == 4 and not unfitted.is_fitted
    double = KNNScore(k=2).double().fit(torch.randn(30, 3, dtype=torch.float64))
    loaded = Score.load(double.save(tmp_path / "b"))
    assert loaded.bank_.dtype == torch.float64
    assert torch.equal(loaded.bank_, double.bank_)


def test_saving_again_replaces_the_save_and_a_foreign_path_is_never_overwritten(tmp_path):
    path = tmp_path / "s"
    KNNScore(k=1).fit(torch.randn(10, 2)).save(path)
    KNNScore(k=2).fit(torch.randn(10, 2)).save(path)
    assert Score.load(path).k == 2
    assert [p.name for p in tmp_path.iterdir()] == ["s"]  # no temporary left behind
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not a selectorch save directory"):
        KNNScore().save(tmp_path / "notes.txt")
    assert (tmp_path / "notes.txt").read_text() == "mine"


# ============================== refusals: damaged, altered, foreign ==========================


@pytest.fixture
def saved(tmp_path):
    score = KNNScore(k=2).fit(torch.randn(50, D)).calibrate(torch.randn(20, D), coverage=0.9)
    return score.save(tmp_path / "saved")


def test_truncated_tensor_file_is_refused(saved):
    state = saved / "state.pt"
    state.write_bytes(state.read_bytes()[:-100])
    with pytest.raises(PersistenceError, match=r"state.pt' has \d+ bytes.*the file is truncated"):
        Score.load(saved)


def test_altered_tensor_file_is_refused_by_the_checksum(saved):
    state = saved / "state.pt"
    data = bytearray(state.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte, same size
    state.write_bytes(bytes(data))
    with pytest.raises(PersistenceError, match=r"SHA-256 of .*state.pt' differs.*altered"):
        Score.load(saved)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (lambda h: h.update(selectorch_version="0.2.0"), r"written by selectorch 0\.2\.0.*major"),
        (lambda h: h.update(selectorch_version="1.1.0"), r"written by selectorch 1\.1\.0"),
        (lambda h: h.update(format_version=2), r"uses save format 2"),
        (lambda h: h.update(format="pickle"), r"not a selectorch header"),
        (lambda h: h.pop("files"), r"no valid `files` entry"),
        (
            lambda h: h["files"].update({"../escape.py": {"bytes": 1, "sha256": "0"}}),
            r"unexpected file '\.\./escape\.py'",
        ),
        (
            lambda h: h["score"].update({"class": "os.system"}),
            r"'os.system' that is not registered",
        ),
        (lambda h: h["score"]["hparams"].update(k={"a": 1}), r"invalid hyperparameters"),
        (lambda h: h["score"]["hparams"].update(k=0), r"Cannot rebuild KNNScore.*`k`"),
        (lambda h: h["score"]["hparams"].update(nope=1), r"Cannot rebuild KNNScore.*nope"),
        (
            lambda h: h["tensors"]["bank_"].update(shape=[3, 3]),
            r"'bank_'.*shape \[50, 8\].*\[3, 3\]",
        ),
    ],
)
def test_an_altered_or_incompatible_header_is_refused_with_the_reason(saved, change, match):
    rewrite_header(saved, change)
    with pytest.raises(PersistenceError, match=match):
        Score.load(saved)


def test_a_compatible_patch_version_loads():
    assert persistence.compatible_version("0.1.9", "0.1.0")
    assert not persistence.compatible_version("0.2.0", "0.1.0")
    assert not persistence.compatible_version("garbage", "0.1.0")


def test_a_header_that_is_not_json_and_a_missing_file_are_refused(saved, tmp_path):
    (saved / "state.pt").unlink()
    with pytest.raises(PersistenceError, match=r"incomplete: state.pt is missing"):
        Score.load(saved)
    (saved / "selectorch.json").write_text('{"format": "selectorch", ')
    with pytest.raises(PersistenceError, match=r"not valid JSON"):
        Score.load(saved)
    with pytest.raises(PersistenceError, match=r"holds no selectorch.json"):
        Score.load(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"No selectorch save at"):
        Score.load(tmp_path / "nothing")


def test_a_malicious_pickle_file_is_never_opened(tmp_path):
    marker = tmp_path / "marker"
    evil = tmp_path / "model.pt"
    evil.write_bytes(pickle.dumps(Payload(marker)))
    with pytest.raises(PersistenceError, match=r"is a file, not a selectorch save.*not opened"):
        Score.load(evil)
    with pytest.raises(PersistenceError, match=r"is a file"):
        st.SelectiveModel.load(evil, Net())
    assert not marker.exists()


@pytest.mark.parametrize("writer", ["torch.save", "pickle.dump"])
def test_a_forged_save_carrying_code_is_refused_and_the_code_never_runs(saved, writer):
    marker = saved.parent / "marker"
    state = saved / "state.pt"
    payload = {"bank_": Payload(marker)}
    if writer == "torch.save":
        torch.save(payload, state)
    else:
        state.write_bytes(pickle.dumps(payload))
    refresh_checksums(saved)  # the forger fixes the checksums: they do not protect here
    with pytest.raises(PersistenceError, match=r"weights_only=True.*never run"):
        Score.load(saved)
    assert not marker.exists()
    # the file really is dangerous: a plain torch.load would have run the payload
    if writer == "torch.save":
        torch.load(state, weights_only=False)
        assert marker.exists()


def test_load_on_a_subclass_refuses_another_class(tmp_path):
    maha = MahalanobisScore().fit(torch.randn(40, 4), torch.randint(2, (40,)))
    path = maha.save(tmp_path / "m")
    with pytest.raises(PersistenceError, match=r"holds a MahalanobisScore; it cannot load as a "):
        KNNScore.load(path)
    assert isinstance(Score.load(path), MahalanobisScore)


def test_unregistered_scores_and_unsaveable_hyperparameters_are_refused_at_save(tmp_path):
    fusion = st.scores.FusionScore({"a": KNNScore(), "b": KNNScore()})
    with pytest.raises(PersistenceError, match=r"only registered scores"):
        fusion.save(tmp_path / "f")
    odd = KNNScore()
    odd.k = {"a": 1}  # not a plain value
    with pytest.raises(PersistenceError, match=r"argument `k` is not stored.*plain value"):
        odd.save(tmp_path / "k")
    assert not (tmp_path / "f").exists() and not (tmp_path / "k").exists()


# ============================== SelectiveModel: checked against its model ====================


@pytest.fixture
def saved_selective(tmp_path):
    torch.manual_seed(0)
    sel = st.SelectiveModel(Net().eval(), KNNScore(k=3), layer="body")
    sel.fit(inputs(60, seed=1), progress=False).calibrate(
        inputs(30, 2), coverage=0.9, progress=False
    )
    return sel, sel.save(tmp_path / "sel")


def test_loading_onto_a_model_of_another_class_or_with_other_weights_is_refused(saved_selective):
    sel, path = saved_selective

    class Other(Net):
        pass

    with pytest.raises(PersistenceError, match=r"fitted on a .*Net, got a .*Other"):
        st.SelectiveModel.load(path, Other())
    retrained = Net()
    retrained.load_state_dict(sel.model.state_dict())
    with torch.no_grad():
        retrained.head.bias.add_(0.1)
    with pytest.raises(PersistenceError, match=r"other weights.*check_model=False"):
        st.SelectiveModel.load(path, retrained)
    loaded = st.SelectiveModel.load(path, retrained, check_model=False)
    assert loaded.score.bank_.shape == sel.score.bank_.shape


def test_a_model_without_the_layer_is_refused_with_the_close_names(saved_selective):
    sel, path = saved_selective

    class Renamed(nn.Module):
        def __init__(self):
            super().__init__()
            self.bodyy = nn.Linear(D, D)

        def forward(self, x):
            return self.bodyy(x)

    with pytest.raises(PersistenceError, match=r"fitted on layer 'body'.*Did you mean 'bodyy'"):
        st.SelectiveModel.load(path, Renamed(), check_model=False)


def test_a_bank_whose_width_differs_from_the_layer_is_refused(saved_selective):
    _, path = saved_selective

    class Wider(Net):
        def __init__(self):
            super().__init__()
            self.body = nn.Linear(D, 2 * D)
            self.head = nn.Linear(2 * D, 5)

    # the width of a Linear layer is known without running the model
    with pytest.raises(PersistenceError, match=r"fitted on 8 features.*'body' \(Linear\) gives 16"):
        st.SelectiveModel.load(path, Wider(), check_model=False)


def test_a_width_mismatch_hidden_behind_pooling_is_caught_by_an_example_or_first_forward(tmp_path):
    net = torchvision.models.resnet18(num_classes=3).eval()
    sel = st.SelectiveModel(net, KNNScore(k=2), layer="avgpool")
    sel.fit(torch.randn(6, 3, 32, 32), progress=False)
    sel.calibrate(torch.randn(10, 3, 32, 32), coverage=0.8, progress=False)
    path = sel.save(tmp_path / "r")
    smaller = torchvision.models.resnet18(num_classes=3).eval()
    smaller.layer4 = nn.Identity()  # avgpool now sees 256 channels; its type cannot tell
    smaller.fc = nn.Linear(256, 3)
    match = r"Layer 'avgpool' gives 256 features per sample, but KNNScore was fitted.*512"
    with pytest.raises(ValueError, match=match):
        st.SelectiveModel.load(
            path, smaller, check_model=False, example_input=torch.randn(1, 3, 32, 32)
        )
    lazy = st.SelectiveModel.load(path, smaller, check_model=False)
    with pytest.raises(ValueError, match=match), torch.no_grad():
        lazy(torch.randn(2, 3, 32, 32))


def test_a_callable_pooling_must_be_passed_again_and_match(tmp_path):
    def first_half(x):
        return x[:, : D // 2]

    sel = st.SelectiveModel(Net().eval(), KNNScore(k=2), layer="body", pool=first_half)
    sel.fit(inputs(20, seed=1), progress=False)
    path = sel.save(tmp_path / "p")
    with pytest.raises(PersistenceError, match=r"pooling .*first_half, a callable.*pass pool="):
        st.SelectiveModel.load(path, sel.model)
    with pytest.raises(PersistenceError, match=r"fitted with pool=.*first_half.*got pool='auto'"):
        st.SelectiveModel.load(path, sel.model, pool="auto")
    loaded = st.SelectiveModel.load(path, sel.model, pool=first_half)
    assert loaded.score.bank_.shape == (20, D // 2)


def test_a_score_save_and_a_selective_save_are_told_apart(saved_selective, tmp_path):
    sel, path = saved_selective
    assert isinstance(Score.load(path), KNNScore)  # a selective save holds a whole score
    alone = sel.score.save(tmp_path / "alone")
    with pytest.raises(PersistenceError, match=r"holds a score saved alone.*Score.load"):
        st.SelectiveModel.load(alone, sel.model)


def test_loading_onto_a_model_with_hooks_leaves_only_the_new_wrappers_hooks(saved_selective):
    sel, path = saved_selective
    sel.close()
    loaded = st.SelectiveModel.load(path, sel.model)
    assert len(sel.model.body._forward_hooks) == 1
    loaded.close()
    assert len(sel.model.body._forward_hooks) == 0


# ============================== hnswlib indexes travel with the save =========================


def test_an_hnsw_index_is_saved_loaded_not_rebuilt_and_checked_like_the_rest(tmp_path):
    pytest.importorskip("hnswlib")
    g = torch.Generator().manual_seed(0)
    score = KNNScore(k=3, backend="hnsw").fit(torch.randn(300, 8, generator=g))
    score.calibrate(torch.randn(50, 8, generator=g), coverage=0.9)
    path = score.save(tmp_path / "h")
    assert {"hnsw_index.bin", "hnsw_index.bin.json"} <= {p.name for p in path.iterdir()}
    loaded = Score.load(path)
    assert loaded.hnsw_index.loaded_from == path / "hnsw_index.bin"  # not rebuilt
    assert loaded.save_index is None  # the user's option, not the save's internals
    Q = torch.randn(20, 8, generator=g)
    assert torch.equal(loaded(Q), score(Q))
    index = path / "hnsw_index.bin"
    data = bytearray(index.read_bytes())
    data[-5] ^= 0xFF
    index.write_bytes(bytes(data))
    with pytest.raises(PersistenceError, match=r"SHA-256 of .*hnsw_index.bin' differs"):
        Score.load(path)


# ============================== memory: refused before reading ==============================


def test_a_save_larger_than_the_free_memory_is_refused_before_any_tensor_is_read(
    saved, monkeypatch
):
    monkeypatch.setattr("selectorch.memory.available_bytes", lambda device: 1000)

    def no_load(*args, **kwargs):
        raise AssertionError("torch.load must not run")

    monkeypatch.setattr(torch, "load", no_load)
    with pytest.raises(st.MemoryLimitError, match=r"needs .*bytes\) on cpu, but only 1000 bytes"):
        Score.load(saved)


def test_an_infinite_threshold_survives_a_round_trip(tmp_path):
    score = KNNScore().fit(torch.randn(20, 2)).calibrate(torch.randn(20, 2), coverage=1.0)
    assert score.get_threshold() == math.inf
    assert Score.load(score.save(tmp_path / "inf")).get_threshold() == math.inf


def test_a_loaded_head_score_carries_its_head_without_set_head(tmp_path):
    vim = fitted("vim", {})  # tests/test_scores.py's SETUP set its head before fit
    loaded = Score.load(vim.save(tmp_path / "vim"))
    assert loaded.has_head and torch.equal(loaded.head_weight_, vim.head_weight_)
