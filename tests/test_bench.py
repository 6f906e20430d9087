"""selectorch.evaluate, its report, and the `selectorch bench` command."""

from __future__ import annotations

import importlib.util
import json
import pickle
import re

import pytest
import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import selectorch as st
from selectorch.bench import BenchError, BenchReport, evaluate
from selectorch.bench.command import guess_head, parse_scores
from selectorch.bench.default import DEFAULT_OPTIONS, DEFAULT_SCORES, MULTI_LAYERS, SIZES
from selectorch.cli import main
from selectorch.datasets import MNIST_MEAN, MNIST_STD, fashion_mnist, mnist5k, mnist_net

#: Registered scores the default MNIST run leaves out: ensemble scores and variants of others.
NOT_IN_DEFAULT = {"classwise_knn", "deup", "ash", "euclidean",
                  "mutual_information", "predictive_variance"}


class CountingNet(nn.Module):
    """A small classifier that counts how many batches it has seen."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, 16), nn.ReLU())
        self.head = nn.Linear(16, 3)
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.head(self.body(x))


def blobs(n: int, seed: int, shift: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Three well separated Gaussian blobs in 4-d (moved by ``shift`` for OOD data)."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 3
    centers = torch.eye(3, 4) * 6
    return centers[y] + torch.randn(n, 4, generator=g) + shift, y


@pytest.fixture(scope="module")
def trained():
    torch.manual_seed(0)
    net = CountingNet().eval()
    x, y = blobs(600, 0)
    # fit the head so that the logits mean something
    opt = torch.optim.Adam(net.parameters(), lr=0.05)
    for _ in range(100):
        opt.zero_grad()
        nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
    net.calls = 0
    data = {
        "fit": blobs(300, 1),
        "calibrate": blobs(200, 2),
        "test": blobs(200, 3),
        "ood": {"far": blobs(150, 4, shift=8.0)[0], "near": blobs(150, 5, shift=3.0)[0]},
    }
    return net, data


@pytest.fixture
def tiny(trained):
    net, data = trained
    net.calls = 0
    return net, data


def run(net, data, scores=("knn", "energy"), **kwargs):
    kwargs.setdefault("layer", "body")
    return evaluate(
        net, list(scores), fit=data["fit"], calibrate=data["calibrate"], test=data["test"],
        ood=data["ood"], progress=False, batch_size=50, **kwargs,
    )


# -- the Fashion-MNIST loader -----------------------------------------------------------------


def test_fashion_mnist_reads_the_debian_idx_files():
    images, labels = fashion_mnist()
    assert images.shape == (10000, 1, 28, 28) and images.dtype == torch.float32
    assert torch.equal(labels.bincount(), torch.full((10,), 1000))
    assert images.min().item() == pytest.approx(-MNIST_MEAN / MNIST_STD, abs=1e-5)


def test_fashion_mnist_errors_name_the_fix(tmp_path):
    with pytest.raises(ValueError, match="`split` to be 'test' or 'train'"):
        fashion_mnist("val")
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        fashion_mnist(root=tmp_path)
    import gzip

    from selectorch.datasets import read_idx

    with gzip.open(tmp_path / "bad.gz", "wb") as f:
        f.write(b"\x00\x00\x0d\x01" + bytes(8))
    with pytest.raises(ValueError, match="not an IDX file of unsigned bytes"):
        read_idx(tmp_path / "bad.gz")
    with gzip.open(tmp_path / "short.gz", "wb") as f:
        f.write(b"\x00\x00\x08\x01" + (5).to_bytes(4, "big") + bytes(3))
    with pytest.raises(ValueError, match="announces shape \\(5,\\)"):
        read_idx(tmp_path / "short.gz")


# -- evaluate ---------------------------------------------------------------------------------


def test_model_runs_once_per_dataset_whatever_the_number_of_scores(tiny):
    net, data = tiny
    run(net, data, scores=("knn", "cosine", "mahalanobis", "energy", "softmax"))
    batches = 300 // 50 + 200 // 50 + 200 // 50 + 2 * (150 // 50)
    assert net.calls == batches


def test_rows_match_the_functional_metrics(tiny):
    net, data = tiny
    report = run(net, data, scores=("energy",))
    row = report.rows[0]
    x, y = data["test"]
    with torch.no_grad():
        logits = net(x)
        far = net(data["ood"]["far"])
    s_test = -torch.logsumexp(logits, dim=1)
    s_far = -torch.logsumexp(far, dim=1)
    # AUROC as the probability that an OOD sample scores higher than an ID one (ties: half)
    diff = s_far[:, None] - s_test[None, :]
    naive = ((diff > 0).double() + 0.5 * (diff == 0).double()).mean().item()
    assert row["auroc:far"] == pytest.approx(naive, abs=1e-9)
    assert row["accuracy"] == pytest.approx((logits.argmax(1) == y).double().mean().item())
    threshold = row["threshold"]
    kept = s_test <= threshold
    assert row["coverage"] == pytest.approx(kept.double().mean().item(), abs=1e-6)
    assert row["kept:far"] == pytest.approx((s_far <= threshold).double().mean().item(), abs=1e-6)
    assert row["auroc_mean"] == pytest.approx((row["auroc:far"] + row["auroc:near"]) / 2)
    assert row["layer"] == "logits"


def test_embedding_scores_separate_far_ood_and_calibrate_near_the_target(tiny):
    net, data = tiny
    report = run(net, data, scores=("knn", "mahalanobis"), coverage=0.9)
    for row in report.rows:
        assert row["auroc:far"] > 0.95, row
        assert 0.8 <= row["coverage"] <= 1.0
        assert row["fit_s"] >= 0 and row["score_rows_per_s"] > 0


def test_mahalanobis_takes_the_labels_from_the_recording(tiny):
    net, data = tiny
    report = run(net, data, scores=("mahalanobis",))
    x, y = data["fit"]
    with st.Recorder(net, ["body"]) as rec:
        fit_feats = rec(x)[1]["body"]
        test_feats = rec(data["test"][0])[1]["body"]
    manual = st.scores.MahalanobisScore().fit(fit_feats, y)
    assert torch.allclose(report.raw["mahalanobis"]["test"], manual.score(test_feats), atol=1e-4)


def test_risk_target_keeps_the_error_rate_low(tiny):
    net, data = tiny
    report = run(net, data, scores=("energy",), coverage=None, risk=0.05, delta=0.1)
    assert report.meta["target"] == {"risk": 0.05, "delta": 0.1}
    assert report.rows[0]["risk"] <= 0.05


def test_a_recording_is_used_as_it_is(tiny):
    net, data = tiny
    recorded = st.record(
        net, DataLoader(TensorDataset(*data["fit"]), batch_size=50), layers=["body"],
        progress=False,
    )
    net.calls = 0
    report = evaluate(
        net, ["knn"], layer="body", fit=recorded, calibrate=data["calibrate"],
        test=data["test"], progress=False, batch_size=50,
    )
    assert net.calls == 200 // 50 + 200 // 50
    assert report.meta["splits"]["fit"]["record_s"] == 0.0
    assert report.ood_names == [] and "auroc_mean" not in report.rows[0]


def test_per_score_layers_and_labels_from_a_dict(tiny):
    net, data = tiny
    scores = {"knn body": st.scores.KNNScore(k=3), "knn head": st.scores.KNNScore(k=3)}
    report = evaluate(
        net, scores, layer={"knn body": "body", "knn head": "head"}, fit=data["fit"],
        calibrate=data["calibrate"], test=data["test"], progress=False,
    )
    assert [(r["score"], r["layer"]) for r in report.rows] == [
        ("knn body", "body"), ("knn head", "head"),
    ]


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"layer": "nope"}, ValueError, "Layer 'nope' not found in CountingNet"),
        ({"layer": None}, ValueError, "Score 'knn' scores embeddings: pass layer="),
        ({"scores": ["knn", "knn"]}, ValueError, "Score label 'knn' appears twice"),
        ({"ood": {"test": torch.zeros(2, 4)}}, ValueError, "keys of `ood`"),
        ({"risk": 0.1}, ValueError, "exactly one of `coverage` and `risk`"),
        ({"coverage": 1.5}, ValueError, "`coverage` to be a number in \\(0, 1\\]"),
        ({"scores": ["no_such_score"]}, ValueError, "Unknown score 'no_such_score'"),
        ({"scores": ["vim"], "head": "body"}, BenchError, "head='body' to be a linear layer"),
    ],
)
def test_bad_arguments_are_named(tiny, kwargs, error, message):
    net, data = tiny
    args = {"layer": "body", "scores": ["knn"], **kwargs}
    scores = args.pop("scores")
    ood = args.pop("ood", data["ood"])
    with pytest.raises(error, match=message):
        evaluate(net, scores, fit=data["fit"], calibrate=data["calibrate"], test=data["test"],
                 ood=ood, progress=False, **args)
    if "layer" in kwargs and kwargs["layer"] == "nope":
        assert net.calls == 0  # refused before any data was recorded


def test_a_failing_score_is_named(tiny):
    net, data = tiny
    with pytest.raises(BenchError, match="Score 'vim' failed: .*head"):
        run(net, data, scores=("vim",))


# -- multi-layer scores, scores that run the model, cost columns --------------------------------


def test_a_multi_layer_score_is_fitted_from_the_recorded_layers(tiny):
    net, data = tiny
    report = run(net, data, scores=("dknn", "knn"), layer={"dknn": ["body", "head"], "knn": "body"})
    assert net.calls == 300 // 50 + 200 // 50 + 200 // 50 + 2 * (150 // 50)  # recorded once
    row = report.rows[0]
    assert row["layer"] == "body+head" and row["rate_includes_model"] is False
    x, y = data["fit"]
    with st.Recorder(net, ["body", "head"]) as rec, torch.no_grad():
        logits, feats = rec(x)
        test_logits, test_feats = rec(data["test"][0])
    manual = st.scores.DkNNScore().fit({**feats, "logits": logits}, y)
    expected = manual.score({**test_feats, "logits": test_logits})
    torch.testing.assert_close(report.raw["dknn"]["test"], expected)


def test_scores_on_the_predicted_class_get_the_recorded_argmax(tiny):
    net, data = tiny
    report = run(net, data, scores=("trust",))
    x, y = data["fit"]
    with st.Recorder(net, "body") as rec, torch.no_grad():
        _, fit_feats = rec(x)
        test_logits, test_feats = rec(data["test"][0])
    manual = st.scores.TrustScore().fit(fit_feats["body"], y)
    expected = manual.score(test_feats["body"], preds=test_logits.argmax(1))
    torch.testing.assert_close(report.raw["trust"]["test"], expected)


def test_a_gradient_score_runs_the_model_on_the_raw_data_and_says_so(tiny):
    net, data = tiny
    odin = st.scores.ODINScore(temperature=10.0, epsilon=0.05)
    report = evaluate(
        net, {"odin": odin, "energy": "energy"}, fit=data["fit"], calibrate=data["calibrate"],
        test=data["test"], ood=data["ood"], progress=False, batch_size=50,
    )
    row = report.rows[0]
    assert (row["requires_grad"], row["passes"], row["compile_clean"]) == (True, 2, False)
    assert row["rate_includes_model"] is True and report.rows[1]["rate_includes_model"] is False
    assert row["score_rows_per_s"] > 0 and row["fit_s"] >= 0
    # reference: one signed-gradient step on the input, by plain autograd, then the score
    x = data["test"][0].clone().requires_grad_(True)
    logits = net(x) / 10.0
    loss = -torch.log_softmax(logits, dim=1).max(dim=1).values.sum()
    (grad,) = torch.autograd.grad(loss, x)
    with torch.no_grad():
        probs = torch.softmax(net(x - 0.05 * grad.sign()) / 10.0, dim=1)
    expected = -probs.max(dim=1).values
    torch.testing.assert_close(report.raw["odin"]["test"], expected, rtol=1e-5, atol=1e-6)
    assert report.rows[0]["accuracy"] == report.rows[1]["accuracy"]


@pytest.mark.parametrize(
    ("name", "reason"),
    [("odin", r"it needs gradients .*requires_grad=True"),
     ("gram", r"it pools its layers its own way \(pool=GramFeatures")],
)
def test_a_score_that_runs_the_model_refuses_recordings_before_anything_runs(tiny, name, reason):
    net, data = tiny
    recorded = st.record(net, data["fit"][0], layers=[], progress=False)
    net.calls = 0
    with pytest.raises(ValueError, match=rf"Score '{name}' cannot be evaluated from recordings: "
                       rf"{reason}.*given for fit\b"):
        evaluate(net, ["energy", name], layer={"gram": ["body"]}, fit=recorded,
                 calibrate=data["calibrate"], test=data["test"], progress=False)
    assert net.calls == 0


def test_pyod_runs_in_evaluate_on_the_cpu_and_is_not_compile_clean(tiny):
    pytest.importorskip("pyod")
    net, data = tiny
    report = run(net, data, scores=("pyod",))
    row = report.rows[0]
    assert row["auroc:far"] > 0.95 and row["compile_clean"] is False
    assert row["rate_includes_model"] is False


def test_cost_columns_say_yes_no_and_the_notes_say_what_the_rates_count():
    rows = [
        {"score": "odin", "layer": "logits", "requires_grad": True, "passes": 2,
         "compile_clean": False, "fit_s": 1.0, "score_rows_per_s": 200.0,
         "rate_includes_model": True},
        {"score": "knn", "layer": "x", "requires_grad": False, "passes": 1,
         "compile_clean": True, "fit_s": 0.1, "score_rows_per_s": 9000.0,
         "rate_includes_model": False},
    ]
    meta = {"ood": [], "splits": {"fit": {"rows": 10, "rows_per_s": 500.0}}}
    report = BenchReport(rows=rows, meta=meta)
    lines = report.table().splitlines()
    assert lines[0].split()[-8:] == ["input", "passes", "full", "fit", "s", "scored", "rate",
                                     "incl."]
    assert lines[3].split()[-6:] == ["yes", "2", "no", "1.00", "200", "yes"]
    assert lines[4].split()[-6:] == ["no", "1", "yes", "0.10", "9,000", "no"]
    notes = " ".join(report.notes())
    assert "include the model's passes" in notes and "500 to 500 rows/s" in notes
    assert report.to_markdown().endswith(report.notes()[-1])
    assert BenchReport(rows=[{"score": "x"}]).notes() == []


# -- the report -------------------------------------------------------------------------------


def test_report_renders_and_saves(tiny, tmp_path):
    net, data = tiny
    report = run(net, data, scores=("knn", "energy", "random"))
    text = report.table()
    lines = text.splitlines()
    assert lines[0].split()[:4] == ["score", "layer", "accuracy", "AUROC"]
    assert lines[1].split()[:2] == ["far", "far"]  # second header line: the OOD set
    assert [line.split()[0] for line in lines[3:]] == ["knn", "energy", "random"]
    markdown = report.to_markdown()
    assert "| score | layer | accuracy | AUROC far | FPR@95 far |" in markdown
    assert report.best("auroc_mean") in ("knn", "energy")
    assert report.best("fpr_mean") in ("knn", "energy")
    with pytest.raises(ValueError, match="`key` to be one of"):
        report.best("layer")
    parsed = json.loads(report.to_json())
    assert parsed["rows"][0]["score"] == "knn" and parsed["meta"]["ood"] == ["far", "near"]
    folder = report.save(tmp_path / "out")
    names = {p.name for p in folder.iterdir()}
    assert {"report.md", "report.txt", "report.json", "scores.pt", "risk_coverage.png",
            "risk_coverage_open.png", "plots"} <= names
    assert (folder / "plots" / "energy-densities.png").stat().st_size > 1000
    raw = torch.load(folder / "scores.pt", weights_only=True)
    assert torch.equal(raw["energy"]["test"], report.raw["energy"]["test"])
    assert raw["energy"]["ood:far"].shape == (150,)
    assert (folder / "report.txt").read_text().strip() == text


def test_report_json_has_no_nan(tiny):
    report = BenchReport(rows=[{"score": "x", "risk": float("nan"), "fit_s": float("inf")}])
    assert json.loads(report.to_json())["rows"][0] == {"score": "x", "risk": None, "fit_s": "inf"}


# -- the command ------------------------------------------------------------------------------


def test_parse_scores_with_options():
    scores = parse_scores("cosine:k=3,energy:temperature=2.0, softmax")
    assert list(scores) == ["cosine:k=3", "energy:temperature=2.0", "softmax"]
    assert scores["cosine:k=3"].k == 3 and scores["energy:temperature=2.0"].temperature == 2.0


def test_guess_head_finds_the_final_linear_layer_and_its_input():
    import torchvision

    assert guess_head(torchvision.models.resnet18()) == ("avgpool", "fc")
    assert guess_head(mnist_net()) == ("classifier.1", "classifier.2")
    assert guess_head(nn.Sequential(nn.Conv2d(1, 2, 3))) == (None, None)


def bench_error(capsys, argv: list[str]) -> tuple[int, str]:
    """Exit code and stderr of ``selectorch bench ARGV``."""
    code = main(["bench", *argv])
    return code, capsys.readouterr().err.strip()


def is_one_line_error(code: int, err: str, message: str) -> bool:
    """Exit code 2 and one ``selectorch: error:`` line that matches ``message``."""
    return (
        code == 2
        and err.startswith("selectorch: error:")
        and len(err.splitlines()) == 1
        and re.search(message, err) is not None
    )


@pytest.fixture(scope="module")
def image_folders(tmp_path_factory):
    """Tiny MNIST image folders (classes 0, 1, 2) and a flat folder of Fashion-MNIST images."""
    root = tmp_path_factory.mktemp("images")
    images, labels = mnist5k()
    pixels = ((images * MNIST_STD + MNIST_MEAN) * 255).round().clamp(0, 255).byte()
    picked = {c: (labels == c).nonzero().flatten() for c in range(3)}
    for split, rows in (("train", range(0, 20)), ("val", range(20, 40)), ("test", range(40, 50))):
        for c in range(3):
            (root / split / str(c)).mkdir(parents=True)
            for i in rows:
                index = int(picked[c][i])
                Image.fromarray(pixels[index, 0].numpy()).save(root / split / str(c) / f"{i}.png")
    fashion, _ = fashion_mnist()
    (root / "fashion").mkdir()
    for i in range(15):
        img = ((fashion[i, 0] * MNIST_STD + MNIST_MEAN) * 255).round().clamp(0, 255).byte()
        Image.fromarray(img.numpy()).save(root / "fashion" / f"{i}.png")
    return root


def test_bench_on_image_folders(image_folders, tmp_path, capsys):
    r = image_folders
    argv = [
        "bench", "--model", "selectorch.datasets:mnist_net",
        "--transform", "selectorch.datasets:mnist_transform",
        "--train", str(r / "train"), "--val", str(r / "val"), "--test", str(r / "test"),
        "--ood", f"fashion={r / 'fashion'}", "--scores", "knn,energy,react",
        "--batch-size", "16", "--workers", "0", "--coverage", "0.9",
        "--output", str(tmp_path / "report"), "--no-plots",
    ]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "layer classifier.1; head classifier.2" in out
    rows = json.loads((tmp_path / "report" / "report.json").read_text())["rows"]
    assert [row["score"] for row in rows] == ["knn", "energy", "react"]
    assert all(row["accuracy"] == 1.0 for row in rows)
    assert rows[1]["auroc:fashion"] > 0.8
    assert not (tmp_path / "report" / "risk_coverage.png").exists()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--layer", "nope"], "Layer 'nope' not found in MNISTNet"),
        (["--train", "x"], "--train need --model"),
        (["--scores", "knn,nope"], "--scores 'nope': Unknown score 'nope'"),
        (["--scores", "cosine:k"], "expected NAME:key=value"),
        (["--device", "tpu:9"], "--device 'tpu:9'"),
        (["--model", "selectorch.datasets:mnist_net"], "--model needs --train, --val and --test"),
        (["--model", "selectorch.datasets:mnist_net", "--small"], "--small is for the built-in"),
        (["--layers", ","], "--layers: expected comma-separated layer names"),
    ],
)
def test_bench_argument_errors_are_one_line(argv, message, capsys):
    code, err = bench_error(capsys, argv)
    assert is_one_line_error(code, err, message), err


def test_bench_bad_path_is_one_line(image_folders, capsys):
    r = image_folders
    base = ["--model", "selectorch.datasets:mnist_net", "--val", str(r / "val"),
            "--test", str(r / "test")]
    code, err = bench_error(capsys, [*base, "--train", "/no/such/dir"])
    assert is_one_line_error(code, err, "--train: no such directory"), err
    code, err = bench_error(capsys, [*base, "--train", str(r / "fashion")])
    assert is_one_line_error(code, err, "--train .*Couldn't find any class folder"), err
    good = [*base, "--train", str(r / "train")]
    code, err = bench_error(capsys, [*good, "--ood", "x=/no/where"])
    assert is_one_line_error(code, err, "--ood x: no such directory"), err
    code, err = bench_error(capsys, [*good, "--ood", "nameless"])
    assert is_one_line_error(code, err, "expected NAME=DIR"), err


def test_bench_weights_that_do_not_fit_are_one_line(image_folders, tmp_path, capsys):
    import torchvision

    r = image_folders
    base = ["--model", "selectorch.datasets:mnist_net", "--train", str(r / "train"),
            "--val", str(r / "val"), "--test", str(r / "test")]
    other = tmp_path / "resnet.pt"
    torch.save(torchvision.models.resnet18().state_dict(), other)
    code, err = bench_error(capsys, [*base, "--weights", str(other)])
    missing = r"do not fit MNISTNet: \d+ missing \(first 'features.0.weight'\)"
    assert is_one_line_error(code, err, missing), err
    wrong_shape = mnist_net().state_dict()
    wrong_shape["classifier.2.weight"] = torch.zeros(5, 128)
    torch.save({"state_dict": wrong_shape}, tmp_path / "shape.pt")
    code, err = bench_error(capsys, [*base, "--weights", str(tmp_path / "shape.pt")])
    shape = r"1 of another shape \(first 'classifier.2.weight': file \(5, 128\)"
    assert is_one_line_error(code, err, shape), err
    (tmp_path / "evil.pt").write_bytes(pickle.dumps(object()))
    code, err = bench_error(capsys, [*base, "--weights", str(tmp_path / "evil.pt")])
    assert is_one_line_error(code, err, "not readable with torch.load\\(weights_only=True\\)"), err
    code, err = bench_error(capsys, [*base, "--weights", str(tmp_path / "missing.pt")])
    assert is_one_line_error(code, err, "--weights: no such file"), err


# -- the embedded default: real data, every registered score that fits a multiclass model --------


@pytest.fixture(scope="module")
def default_run(tmp_path_factory):
    """``selectorch bench --small``: the default scores on a few hundred rows per split."""
    folder = tmp_path_factory.mktemp("bench") / "selectorch-report"
    import io
    from contextlib import redirect_stdout

    out = io.StringIO()
    with redirect_stdout(out):
        code = main(["bench", "--small", "--output", str(folder), "--no-plots"])  # plots: above
    return code, out.getvalue(), folder


def test_default_bench_separates_fashion_and_animals(default_run, capsys):
    code, out, folder = default_run
    with capsys.disabled():
        print("\n" + out)
    assert code == 0
    report = json.loads((folder / "report.json").read_text())
    rows = {row["score"]: row for row in report["rows"]}
    for score in ("cosine", "energy"):
        for ood in ("fashion", "animals"):
            assert rows[score][f"auroc:{ood}"] >= 0.93, (score, ood, rows[score])
    assert report["meta"]["seconds"] < 180
    assert report["meta"]["splits"]["ood:fashion"]["rows"] == SIZES["ood"][1]
    assert 0.93 <= rows["cosine"]["coverage"] <= 0.98
    assert "best mean AUROC: cosine" in out


def test_default_bench_runs_every_score_with_its_auroc_and_cost(default_run):
    _, out, folder = default_run
    rows = {row["score"]: row for row in json.loads((folder / "report.json").read_text())["rows"]}
    multiclass = [n for n in st.scores.list_scores() if n not in NOT_IN_DEFAULT]
    if importlib.util.find_spec("pyod") is None:
        multiclass.remove("pyod")
    assert sorted(rows) == sorted(multiclass) == sorted(DEFAULT_SCORES)
    for name, row in rows.items():
        cls = st.scores.get_score_class(name)
        assert (row["requires_grad"], row["passes"], row["compile_clean"]) == (
            cls.requires_grad, cls.passes, cls.compile_clean
        ), name
        assert row["score_rows_per_s"] > 0 and row["fit_s"] >= 0, name
        for ood in ("fashion", "animals"):
            assert 0.0 <= row[f"auroc:{ood}"] <= 1.0, name
        if name != "random":
            assert row["auroc_mean"] > 0.6, (name, row["auroc_mean"])  # all beat chance
    assert abs(rows["random"]["auroc_mean"] - 0.5) < 0.1
    # the scores that cannot use the recordings ran the model, and their rates say so
    assert rows["odin"]["requires_grad"] and rows["odin"]["passes"] == 2
    assert rows["odin"]["rate_includes_model"] and rows["gram"]["rate_includes_model"]
    assert rows["gram"]["layer"] == "+".join(MULTI_LAYERS["gram"])
    assert rows["dknn"]["layer"] == "+".join(MULTI_LAYERS["dknn"])
    assert not rows["knn"]["rate_includes_model"] and not rows["dknn"]["rate_includes_model"]
    assert "rate incl." in out and "include the model's passes" in out


def test_default_bench_writes_the_report(default_run):
    _, out, folder = default_run
    assert f"report written to {folder}" in out
    for name in ("report.md", "report.json", "report.txt", "scores.pt"):
        assert (folder / name).is_file(), name
    raw = torch.load(folder / "scores.pt", weights_only=True)
    assert raw["cosine"]["ood:animals"].shape == (SIZES["ood"][1],)
    assert raw["odin"]["test"].shape == (SIZES["test"][1],)
    assert (folder / "report.txt").read_text().strip() in out


def test_default_odin_uses_the_mnist_std():
    setup_scores = parse_scores("odin,odin:epsilon=0.0", defaults=DEFAULT_OPTIONS)
    assert setup_scores["odin"].std == pytest.approx(MNIST_STD)
    assert setup_scores["odin:epsilon=0.0"].std == pytest.approx(MNIST_STD)
    assert setup_scores["odin:epsilon=0.0"].epsilon == 0.0
