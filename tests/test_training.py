import itertools

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from arrag.training import TrainConfig, learning_rate_at, train


class KilledError(Exception):
    pass


def regression_task(model: nn.Module, crash_at: int | None = None):
    def loss_at(step: int, micro: int):
        if step == crash_at:
            raise KilledError
        g = torch.Generator().manual_seed(step * 10 + micro)
        x = torch.randn(16, 4, generator=g)
        loss = ((model(x) - x.sum(-1, keepdim=True)) ** 2).mean()
        return loss, {"loss": loss.item()}

    return loss_at


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))


@pytest.mark.parametrize("ema_decay", [None, 0.9])
def test_a_killed_run_resumes_to_the_same_weights(tmp_path, ema_decay):
    config = TrainConfig(
        steps=8,
        batch_size=16,
        learning_rate=1e-2,
        warmup_steps=2,
        checkpoint_every=3,
        accumulation=2,
        ema_decay=ema_decay,
    )
    whole = make_model()
    train(whole, regression_task(whole), config, tmp_path / "whole", {"what": "test"})

    killed = make_model()
    with pytest.raises(KilledError):
        train(killed, regression_task(killed, crash_at=7), config, tmp_path / "killed", {"what": "test"})
    resumed = make_model()  # a fresh process: weights come from the step-6 checkpoint
    train(resumed, regression_task(resumed), config, tmp_path / "killed", {"what": "test"})

    expected, got = (
        load_file(tmp_path / "whole" / "model.safetensors"),
        load_file(tmp_path / "killed" / "model.safetensors"),
    )
    assert expected.keys() == got.keys()
    for name in expected:
        assert torch.equal(expected[name], got[name]), name
    assert not torch.equal(expected["0.weight"], make_model().state_dict()["0.weight"])  # it did train


def test_saved_weights_are_the_exponential_average_of_the_trained_ones(tmp_path):
    decay = 0.7
    config = TrainConfig(
        steps=5, batch_size=16, learning_rate=1e-2, warmup_steps=1, checkpoint_every=1, ema_decay=decay
    )
    model = make_model()
    snapshots = []  # the raw weights after every step
    train(
        model,
        regression_task(model),
        config,
        tmp_path,
        {"what": "test"},
        on_checkpoint=lambda step: snapshots.append({k: v.clone() for k, v in model.state_dict().items()}),
    )
    expected = dict(snapshots[0])
    for weights in snapshots[1:]:
        expected = {k: decay * expected[k] + (1 - decay) * weights[k] for k in expected}
    saved = load_file(tmp_path / "model.safetensors")
    for name, value in expected.items():
        torch.testing.assert_close(saved[name], value)
        assert not torch.allclose(saved[name], snapshots[-1][name])  # not simply the last weights


def test_learning_rate_warms_up_then_decays_to_the_floor():
    config = TrainConfig(steps=100, batch_size=1, learning_rate=1.0, warmup_steps=10, min_lr_ratio=0.1)
    rates = [learning_rate_at(s, config) for s in range(100)]
    assert rates[0] == pytest.approx(0.1) and rates[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in itertools.pairwise(rates[9:]))
    assert rates[-1] == pytest.approx(0.1, abs=1e-3)
