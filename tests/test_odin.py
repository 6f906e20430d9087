"""ODINScore against plain autograd sample by sample, alone and in a SelectiveModel."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import selectorch as st
from selectorch import datasets
from selectorch.functional.odin import odin_logits, odin_perturbation
from selectorch.scores import ODINScore


class SmallCNN(nn.Module):
    """A CNN over (B, 3, 8, 8) inputs, with batch norm (eval mode keeps samples independent)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.fc = nn.Linear(6 * 4 * 4, 5)

    def forward(self, x):
        h = torch.relu(self.bn(self.conv(x)))
        return self.fc(nn.functional.max_pool2d(h, 2).flatten(1))


def small_cnn() -> nn.Module:
    torch.manual_seed(0)
    net = SmallCNN()
    with torch.no_grad():  # non-trivial running statistics
        net.bn.running_mean.uniform_(-0.5, 0.5)
        net.bn.running_var.uniform_(0.5, 2.0)
    return net.eval()


def images(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, 3, 8, 8, generator=torch.Generator().manual_seed(seed))


def manual_odin(model, x, temperature, epsilon, std) -> torch.Tensor:
    """One sample at a time, with nothing from selectorch: the paper's recipe in plain autograd."""
    out = []
    std = torch.as_tensor(std, dtype=x.dtype)
    std = std.reshape(1, -1, *([1] * (x.ndim - 2))) if std.ndim else std
    for row in x:
        xi = row[None].clone().requires_grad_(True)
        with torch.enable_grad():
            logits = model(xi)
            pred = int(logits.argmax())
            loss = -torch.log_softmax(logits / temperature, dim=1)[0, pred]
            (grad,) = torch.autograd.grad(loss, xi)
        moved = xi.detach() - epsilon * torch.sign(grad) / std
        with torch.no_grad():
            probs = torch.softmax(model(moved) / temperature, dim=1)
        out.append(-probs.max())
    return torch.stack(out)


def model_state(model: nn.Module):
    return (
        [(p.requires_grad, p.grad) for p in model.parameters()],
        [m.training for m in model.modules()],
    )


@pytest.mark.parametrize("std", [0.5, (0.5, 0.25, 0.8)])
def test_odin_equals_plain_autograd_sample_by_sample_on_a_small_cnn(std):
    net, x = small_cnn(), images(7, seed=1)
    odin = ODINScore(temperature=10.0, epsilon=0.05, std=std)
    batched = odin(odin.perturbed_logits(net, x))
    expected = manual_odin(net, x, 10.0, 0.05, std)
    torch.testing.assert_close(batched, expected, rtol=1e-5, atol=1e-6)
    # the functional form is the same computation
    again = odin(odin_logits(net, x, temperature=10.0, epsilon=0.05, std=std))
    torch.testing.assert_close(again, batched, rtol=0, atol=0)
    # the perturbation moved the scores (epsilon=0 does not)
    plain = odin(net(x).detach())
    assert not torch.allclose(batched, plain)
    torch.testing.assert_close(ODINScore(temperature=10.0, epsilon=0.0)(net(x).detach()), plain)


def test_odin_perturbation_is_one_signed_step_against_the_predicted_class():
    x = torch.tensor([[1.0, 3.0], [3.0, -1.0]], requires_grad=True)
    logits = torch.stack([x[:, 0] * 2, x[:, 1]], dim=1)  # row 0 predicts class 1, row 1 class 0
    moved = odin_perturbation(x, logits, temperature=1.0, epsilon=0.1, std=0.5)
    # raising the predicted logit: row 0 moves x1 up and x0 down, row 1 the reverse
    torch.testing.assert_close(moved, torch.tensor([[0.8, 3.2], [3.2, -1.2]]))


def test_selective_model_under_no_grad_equals_the_manual_computation():
    net, x = small_cnn(), images(6, seed=2)
    odin = ODINScore(temperature=100.0, epsilon=0.02, std=(0.5, 0.25, 0.8))
    sel = st.SelectiveModel(net, odin)
    before = model_state(net)
    with torch.no_grad():
        sel.fit(images(30, seed=3), progress=False)
        sel.calibrate(images(40, seed=4), coverage=0.8, progress=False)
        out = sel(x)
        bare = net(x)
    assert torch.equal(out.output, bare) and not out.output.requires_grad
    torch.testing.assert_close(out.score, manual_odin(net, x, 100.0, 0.02, odin.std))
    assert torch.equal(out.selected, out.score <= sel.threshold_)
    # calibration scores are the perturbed ones too (stored sorted)
    cal = manual_odin(net, images(40, seed=4), 100.0, 0.02, odin.std).sort().values
    torch.testing.assert_close(sel.score.calibration_scores_.sort().values, cal)
    assert model_state(net) == before  # no .grad left, flags and train/eval modes restored


def test_selective_model_with_grad_enabled_keeps_the_outputs_graph_and_writes_no_grad():
    net = small_cnn()
    sel = st.SelectiveModel(net, ODINScore(epsilon=0.01)).calibrate(
        images(30, seed=5), coverage=0.9, progress=False
    )
    x = images(4, seed=6)
    out = sel(x)
    assert out.output.requires_grad and out.output.grad_fn is not None
    assert not out.score.requires_grad
    assert all(p.grad is None and p.requires_grad for p in net.parameters())
    out.output.sum().backward()  # the user's own backward still works
    assert all(p.grad is not None for p in net.parameters())


def test_train_mode_model_keeps_its_flags_and_fit_restores_them():
    net = small_cnn().train()
    sel = st.SelectiveModel(net, ODINScore())
    flags = [m.training for m in net.modules()]
    with torch.no_grad():
        sel.calibrate(images(30, seed=7), coverage=0.9, progress=False)  # runs in eval mode
    assert [m.training for m in net.modules()] == flags


def test_inference_mode_is_refused_with_a_clear_error():
    sel = st.SelectiveModel(small_cnn(), ODINScore()).calibrate(
        images(30, seed=8), coverage=0.9, progress=False
    )
    with (
        torch.inference_mode(),
        pytest.raises(
            RuntimeError, match=r"ODINScore needs gradients .* torch\.inference_mode\(\) forbids"
        ),
    ):
        sel(images(2, seed=9))
    with torch.inference_mode():
        frozen = images(3, seed=9)  # an inference tensor, used outside inference mode
    with torch.no_grad():
        assert sel(frozen).score.shape == (3,)


def test_integer_input_and_keyword_only_input_are_refused():
    embed = nn.Sequential(nn.Embedding(20, 4), nn.Flatten(), nn.Linear(12, 3)).eval()
    sel = st.SelectiveModel(embed, ODINScore())
    with pytest.raises(TypeError, match=r"needs a floating-point tensor, got dtype torch\.int64"):
        sel.calibrate(torch.randint(0, 20, (30, 3)), coverage=0.9, progress=False)

    class Keyword(nn.Module):
        def forward(self, *, x):
            return x

    sel = st.SelectiveModel(Keyword(), ODINScore())
    with pytest.raises(TypeError, match=r"got only keyword inputs \['x'\]"):
        sel.check_features(x=torch.randn(2, 3))


def test_recordings_are_refused():
    net = small_cnn()
    loader = DataLoader(TensorDataset(images(20, seed=10)), batch_size=8)
    rec = st.record(net, loader, layers=[], progress=False)
    sel = st.SelectiveModel(net, ODINScore())
    with pytest.raises(ValueError, match=r"ODINScore needs the model itself .* not a recording"):
        sel.calibrate(rec, coverage=0.9, progress=False)


def test_std_length_must_match_the_channels():
    net = small_cnn()
    with pytest.raises(ValueError, match=r"`std` gives 2 per-channel values.*\(B, 2, \.\.\.\)"):
        ODINScore(std=(0.5, 0.5)).perturbed_logits(net, images(2, seed=11))
    with pytest.raises(ValueError, match=r"`std` to be a positive number or a non-empty"):
        ODINScore(std=(0.5, 0.0))
    with pytest.raises(ValueError, match=r"`epsilon` to be a finite number >= 0, got -1"):
        ODINScore(epsilon=-1)


def test_compile_without_fullgraph_gives_the_eager_result_and_fullgraph_says_why():
    sel = st.SelectiveModel(small_cnn(), ODINScore(epsilon=0.01)).calibrate(
        images(30, seed=12), coverage=0.9, progress=False
    )
    x = images(5, seed=13)
    torch._dynamo.reset()
    with torch.no_grad():
        eager = sel(x)
        fast = torch.compile(sel, backend="eager")(x)  # dynamo's graph breaks, no codegen
    torch.testing.assert_close(fast.score, eager.score, rtol=0, atol=0)
    assert torch.equal(fast.selected, eager.selected)
    torch._dynamo.reset()
    with torch.no_grad(), pytest.raises(Exception, match=r"torch.autograd.grad .* fullgraph"):
        torch.compile(sel, backend="eager", fullgraph=True)(x)
    torch._dynamo.reset()


def test_nan_rows_are_rejected_alone_and_rows_do_not_depend_on_the_batch():
    sel = st.SelectiveModel(small_cnn(), ODINScore(temperature=50.0, epsilon=0.05))
    sel.calibrate(images(30, seed=14), coverage=0.9, progress=False)
    x = images(6, seed=15)
    with torch.no_grad():
        clean = sel(x).score
        bad = x.clone()
        bad[2, 1, 3, 3] = math.nan
        dirty = sel(bad)
        alone = torch.cat([sel(row[None]).score for row in x])
    assert dirty.score[2] == math.inf and not dirty.selected[2]
    keep = [0, 1, 3, 4, 5]
    torch.testing.assert_close(dirty.score[keep], clean[keep], rtol=0, atol=0)
    torch.testing.assert_close(alone, clean, rtol=1e-5, atol=1e-6)


def test_state_dict_and_save_round_trip_keep_the_hyperparameters(tmp_path):
    odin = ODINScore(temperature=20.0, epsilon=0.003, std=0.3081)
    odin.calibrate(torch.randn(40, 10), coverage=0.9)
    again = st.scores.Score.load(odin.save(tmp_path / "odin"))
    assert (again.temperature, again.epsilon, again.std) == (20.0, 0.003, 0.3081)
    assert again.get_threshold() == odin.get_threshold()
    with pytest.raises(ValueError, match=r"temperature=20.0.*temperature=1000.0"):
        ODINScore().load_state_dict(odin.state_dict())


def test_save_round_trip_keeps_a_per_channel_std(tmp_path):
    odin = ODINScore(std=(0.229, 0.224, 0.225)).calibrate(torch.randn(40, 10), coverage=0.9)
    again = st.scores.Score.load(odin.save(tmp_path / "odin"))
    assert again.std == (0.229, 0.224, 0.225)
    assert again.get_threshold() == odin.get_threshold()


def test_mnist_odin_equals_manual_and_separates_noise_from_digits():
    net = datasets.mnist_net()
    digits, _ = datasets.mnist5k()
    x = digits[:8]
    std = datasets.MNIST_STD
    odin = ODINScore(temperature=1000.0, epsilon=0.0014, std=std)
    expected = manual_odin(net, x, 1000.0, 0.0014, std)
    sel = st.SelectiveModel(net, odin).calibrate(digits[100:200], coverage=0.9, progress=False)
    with torch.no_grad():
        out = sel(x)
    torch.testing.assert_close(out.score, expected, rtol=1e-5, atol=1e-7)
    noise = (torch.rand(32, 1, 28, 28, generator=torch.Generator().manual_seed(0)) - 0.1307) / std
    with torch.no_grad():
        real = sel(digits[400:432]).score.mean()
        odd = sel(noise).score.mean()
    assert odd > real, (odd.item(), real.item())


def test_fit_runs_one_plain_pass_and_calibrate_two():
    net = small_cnn()
    calls = []
    net.register_forward_hook(lambda m, args, out: calls.append(args[0].requires_grad))
    sel = st.SelectiveModel(net, ODINScore())
    x = images(12, seed=11)
    sel.fit(x, batch_size=4, progress=False)  # ODIN learns nothing: no gradient step
    assert calls == [False, False, False]
    calls.clear()
    sel.calibrate(x, coverage=0.9, batch_size=4, progress=False)
    assert len(calls) == 6 and calls.count(True) == 3  # each batch: gradient pass, then plain
    expected = manual_odin(net, x, 1000.0, 0.0014, 1.0)
    torch.testing.assert_close(sel.score.calibration_scores_.sort().values, expected.sort().values)
