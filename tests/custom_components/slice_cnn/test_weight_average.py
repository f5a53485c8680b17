"""The exponential moving average of weights that the slice bundle validates and saves."""
from __future__ import annotations

import math

import pytest
import torch
from ignite.engine import Engine
from torch import nn

from custom_components.slice_cnn.weight_average import WeightAverage, ema_decay


def _network() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 1))


def _step(network: nn.Module, value: float) -> None:
    with torch.no_grad():
        for p in network.parameters():
            p.fill_(value)


def test_average_follows_the_exponential_moving_average_of_the_weights():
    network = _network()
    average = WeightAverage(network, decay=0.9)
    expected = None
    for value in (1.0, 2.0, 4.0):
        _step(network, value)
        average.update()
        expected = value if expected is None else 0.9 * expected + 0.1 * value  # restarts at the first update
    for p in average.module.parameters():
        torch.testing.assert_close(p, torch.full_like(p, expected))
    assert not any(p.requires_grad for p in average.module.parameters())
    assert all(p.requires_grad for p in network.parameters())  # the trained network is untouched


def test_decay_zero_is_a_copy_of_the_current_weights_and_state_round_trips():
    network = _network()
    average = WeightAverage(network, decay=0.0)
    engine = Engine(lambda e, b: _step(network, float(e.state.iteration)))
    average.attach(engine)
    engine.run([0, 1, 2], max_epochs=1)
    for p in average.module.parameters():
        torch.testing.assert_close(p, torch.full_like(p, 3.0))
    restored = WeightAverage(network, decay=0.0)
    restored.load_state_dict(average.state_dict())
    assert restored.updates == 3


def test_decay_from_epochs_and_bad_values():
    assert ema_decay(0, 35) == 0.0
    assert ema_decay(2.0, 35) == pytest.approx(math.exp(-1 / 70))
    with pytest.raises(ValueError):
        ema_decay(-1, 10)
    with pytest.raises(ValueError, match="decay"):
        WeightAverage(_network(), decay=1.0)
