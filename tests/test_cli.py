"""The selectorch command line."""

from __future__ import annotations

import pytest

import selectorch as st
from selectorch import __version__
from selectorch.cli import main


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"selectorch {__version__}"


def test_scores_lists_registered_names(capsys):
    assert main(["scores"]) == 0
    lines = capsys.readouterr().out.splitlines()
    header = ["name", "class", "input", "input", "grad", "passes", "full", "graph"]
    assert lines[0].split() == header
    rows = {line.split()[0]: line.split()[1:] for line in lines[1:]}
    assert sorted(rows) == st.scores.list_scores()
    assert rows["knn"] == ["KNNScore", "embedding", "no", "1", "yes"]
    assert rows["odin"] == ["ODINScore", "logits", "yes", "2", "no"]
    assert rows["dknn"] == ["DkNNScore", "multi", "no", "1", "yes"]


def test_layers_of_a_torchvision_model(capsys):
    assert main(["layers", "torchvision:resnet18"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "conv1\tConv2d"
    assert "avgpool\tAdaptiveAvgPool2d" in lines


def test_layers_of_a_module_function(capsys):
    assert main(["layers", "selectorch.datasets:mnist_net"]) == 0
    assert "classifier.1\tReLU" in capsys.readouterr().out.splitlines()


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("resnet18", "expected MODEL as 'torchvision:NAME'"),
        ("torchvision:resnet99", "unknown torchvision model 'resnet99'"),
        ("no_such_module:f", "cannot load 'no_such_module:f'"),
        ("selectorch:__version__", "'selectorch:__version__' is a str, not a function"),
        ("selectorch.datasets:normalize_mnist", "failed: TypeError"),
        ("torch:randn", "failed: TypeError|not an nn.Module"),
    ],
)
def test_bad_model_gives_one_clear_line(spec, message, capsys):
    assert main(["layers", spec]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("selectorch: error:") and len(err.splitlines()) == 1
    import re

    assert re.search(message, err)
