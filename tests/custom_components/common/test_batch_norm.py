"""Precise batch-norm statistics: the eval-mode network equals the trained one after recomputation."""
from __future__ import annotations

import pytest
import torch
from ignite.engine import Engine
from torch import nn

from custom_components.common.batch_norm import PreciseBatchNorm, batch_norm_layers, recompute_batch_norm_statistics


def _tiny_problem(seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(32, 1, 8, 8, generator=generator)
    targets = images.mean(dim=(1, 2, 3)) * 4 + images[:, :, :4].std(dim=(1, 2, 3))
    torch.manual_seed(seed)
    network = nn.Sequential(nn.Conv2d(1, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.Dropout(0.5),
                            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 1))
    return network, images, targets


def _train(network, images, targets, steps: int = 30, lr: float = 0.1) -> None:
    """Full-batch Adam at a high learning rate: the weights move a lot, the running averages lag."""
    optimizer = torch.optim.Adam(network.parameters(), lr=lr)
    network.train()
    for _ in range(steps):
        loss = (network(images).view(-1) - targets).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def _train_mode_output(network, images):
    """The output training sees: batch statistics of the whole (single) batch, no dropout."""
    network.eval()
    for layer in batch_norm_layers(network):
        layer.train()
    layer_momenta = [layer.momentum for layer in batch_norm_layers(network)]
    state = {k: v.clone() for k, v in network.state_dict().items()}
    with torch.no_grad():
        out = network(images).view(-1)
    network.load_state_dict(state)  # the forward pass above updated the running statistics
    for layer, momentum in zip(batch_norm_layers(network), layer_momenta):
        layer.momentum = momentum
    network.eval()
    return out


def test_recomputed_statistics_make_eval_mode_the_trained_network():
    network, images, targets = _tiny_problem()
    _train(network, images, targets)
    trained = _train_mode_output(network, images)
    network.eval()
    with torch.no_grad():
        stale = network(images).view(-1)
    # the old behaviour: running averages of past batches give another network in eval mode
    assert (stale - trained).abs().max() > 0.05 * trained.std()
    assert recompute_batch_norm_statistics(network, [images]) == 1
    with torch.no_grad():
        precise = network(images).view(-1)
    assert not network.training
    # equal up to the unbiased (running) vs biased (batch) variance: a factor sqrt(n / (n - 1)), n = 2048
    torch.testing.assert_close(precise, trained, rtol=2e-3, atol=2e-3 * float(trained.std()))


def test_statistics_are_the_average_over_batches_and_other_layers_stay_untouched():
    network, images, _ = _tiny_problem()
    layer = batch_norm_layers(network)[0]
    weights = {k: v.clone() for k, v in network.state_dict().items() if "running" not in k and "num_batches" not in k}
    momentum = layer.momentum
    batches = [images[:16], images[16:]]
    assert recompute_batch_norm_statistics(network, batches) == 2
    with torch.no_grad():
        features = [network[0](b) for b in batches]
    expected_mean = torch.stack([f.mean(dim=(0, 2, 3)) for f in features]).mean(0)
    expected_var = torch.stack([f.var(dim=(0, 2, 3), unbiased=True) for f in features]).mean(0)
    torch.testing.assert_close(layer.running_mean, expected_mean)
    torch.testing.assert_close(layer.running_var, expected_var)
    assert layer.momentum == momentum
    for key, value in weights.items():
        torch.testing.assert_close(network.state_dict()[key], value)


def test_network_without_batch_norm_is_left_alone_and_empty_data_is_refused():
    plain = nn.Sequential(nn.Linear(3, 2))
    assert recompute_batch_norm_statistics(plain, []) == 0
    network, _, _ = _tiny_problem()
    with pytest.raises(ValueError, match="no batches"):
        recompute_batch_norm_statistics(network, [])


class _CountingLoader:
    """Batches that record the engine's epoch whenever they are iterated (once per recomputation)."""

    def __init__(self, batches, engine):
        self.batches, self.engine, self.epochs = batches, engine, []

    def __iter__(self):
        self.epochs.append(self.engine.state.epoch)
        return iter(self.batches)


@pytest.mark.parametrize("max_epochs, interval, expected_epochs", [(4, 1, [1, 2, 3, 4]), (5, 2, [2, 4, 5])])
def test_handler_recomputes_every_interval_and_at_the_end(max_epochs, interval, expected_epochs):
    network, images, _ = _tiny_problem()
    engine = Engine(lambda e, b: None)
    loader = _CountingLoader([{"image": images[:16]}, {"image": images[16:]}], engine)
    handler = PreciseBatchNorm(network, loader, prepare_batch=lambda batch, device: (batch["image"], None),
                               num_batches=1, interval=interval)
    handler.attach(engine)
    engine.run([0], max_epochs=max_epochs)
    assert loader.epochs == expected_epochs
    assert batch_norm_layers(network)[0].num_batches_tracked == 1  # num_batches=1 of the two


def test_zero_batches_switches_the_recomputation_off():
    network, images, _ = _tiny_problem()
    engine = Engine(lambda e, b: None)
    loader = _CountingLoader([{"image": images}], engine)
    PreciseBatchNorm(network, loader, prepare_batch=lambda batch, device: (batch["image"], None), num_batches=0).attach(engine)
    engine.run([0], max_epochs=2)
    assert loader.epochs == [] and batch_norm_layers(network)[0].num_batches_tracked == 0


def test_handler_rejects_bad_settings():
    network, _, _ = _tiny_problem()
    with pytest.raises(ValueError, match="num_batches"):
        PreciseBatchNorm(network, [], prepare_batch=None, num_batches=-1)
    with pytest.raises(ValueError, match="interval"):
        PreciseBatchNorm(network, [], prepare_batch=None, interval=0)
