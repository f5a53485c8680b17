"""Precise batch-norm statistics: recompute every BatchNorm layer's running mean and variance for the
current weights before the network is evaluated.

Why: in training, batch norm normalises with the statistics of the batch; in evaluation, with running
averages (momentum 0.1) of the batch statistics of the last few dozen iterations, taken while the weights
were moving. On the slice network those averages lag the weights: validation MAE jumped between 5 and 50
years from one epoch to the next while Pearson r stayed at 0.9, because the eval-mode output's offset and
scale moved (docs of the slice bundle, Performance). Recomputing the statistics with the final weights
(forward passes in training mode over training batches, no gradients, cumulative average) makes the
eval-mode network the one that was trained.

Only batch-norm layers are switched to training mode; dropout and everything else stay in eval mode, and
no parameter changes. Under DDP every rank computes statistics on its own batches and the ranks' averages
are averaged, so all ranks (and the checkpoint) hold the same statistics.
"""
from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable

import torch
import torch.distributed as dist
from ignite.engine import Engine, Events
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from brainage_core.checkpoints import unwrap


def batch_norm_layers(network: nn.Module) -> list[_BatchNorm]:
    """The network's batch-norm layers that keep running statistics."""
    return [m for m in unwrap(network).modules() if isinstance(m, _BatchNorm) and m.track_running_stats]


@torch.no_grad()
def recompute_batch_norm_statistics(network: nn.Module, images: Iterable[torch.Tensor],
                                    autocast_device: str | None = None, inferer: Callable | None = None,
                                    autocast_dtype: torch.dtype | None = None) -> int:
    """Replace the running statistics of ``network``'s batch-norm layers by their average over the batches
    of ``images`` (each a network input), computed with the current weights; return the number of batches.

    ``inferer(images, network)`` runs the forward pass when given (the training inferer, so that the
    statistics come from the same computation as in training), under CUDA autocast (``autocast_dtype``,
    float16 when None) when ``autocast_device`` is "cuda". Leaves the network in eval mode. A network without batch norm is left
    as it is (0 batches)."""
    network = unwrap(network)
    layers = batch_norm_layers(network)
    if not layers:
        return 0
    momenta = [layer.momentum for layer in layers]
    network.eval()
    for layer in layers:
        layer.reset_running_stats()
        layer.momentum = None  # cumulative average over the batches below
        layer.train()
    count = 0
    try:
        for batch in images:
            with torch.autocast(autocast_device or "cpu", dtype=autocast_dtype, enabled=autocast_device is not None):
                inferer(batch, network) if inferer is not None else network(batch)
            count += 1
    finally:
        for layer, momentum in zip(layers, momenta):
            layer.momentum = momentum
        network.eval()
    if count == 0:
        raise ValueError("no batches to recompute batch-norm statistics from")
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        for layer in layers:
            for buffer in (layer.running_mean, layer.running_var):
                dist.all_reduce(buffer)
                buffer /= dist.get_world_size()
    return count


class PreciseBatchNorm:
    """Ignite handler: recompute the batch-norm statistics of ``network`` every ``interval`` epochs and at
    the end of training, from ``num_batches`` batches of ``data_loader``.

    Attach it to the trainer before the ValidationHandler (first in ``train#handlers``), so validation,
    the best-model checkpoint and the final checkpoint all hold statistics that match their weights.

    Args:
        network: the network (or its DDP wrapper).
        data_loader: training batches (dicts); ``prepare_batch`` turns one into the network input.
        prepare_batch: a MONAI PrepareBatch-like callable ``(batch, device) -> (input, target)``.
        num_batches: how many batches to average over (the loader's length if larger); None for all; 0
            switches the recomputation off (evaluation then uses the running averages of training).
        interval: epochs between recomputations (the validation interval).
        device: where inputs go.
        amp: run the forward passes under CUDA autocast, as training does (ignored off CUDA).
        amp_kwargs: the trainer's autocast arguments (``{"dtype": torch.bfloat16}``), so both match.
        inferer: the training inferer (``inferer(inputs, network)``); None for a plain forward pass.
    """

    def __init__(self, network: nn.Module, data_loader: Iterable, prepare_batch: Callable,
                 num_batches: int | None = 16, interval: int = 1, device: str | torch.device = "cpu",
                 amp: bool = False, inferer: Callable | None = None, amp_kwargs: dict | None = None) -> None:
        if num_batches is not None and int(num_batches) < 0:
            raise ValueError(f"num_batches must be >= 0 or None, got {num_batches}")
        if int(interval) < 1:
            raise ValueError(f"interval must be >= 1, got {interval}")
        self.network, self.data_loader, self.prepare_batch = network, data_loader, prepare_batch
        self.num_batches = None if num_batches is None else int(num_batches)
        self.interval = int(interval)
        self.device = torch.device(device)
        self.autocast_device = "cuda" if amp and self.device.type == "cuda" else None
        self.inferer = inferer
        self.autocast_dtype = (amp_kwargs or {}).get("dtype")

    def attach(self, engine: Engine) -> None:
        if self.num_batches == 0:
            return
        engine.add_event_handler(Events.EPOCH_COMPLETED(every=self.interval), self)
        engine.add_event_handler(Events.COMPLETED, self._at_end)

    def _at_end(self, engine: Engine) -> None:
        if engine.state.epoch % self.interval:  # the last epoch was not recomputed yet
            self(engine)

    def __call__(self, engine: Engine | None = None) -> int:
        batches = itertools.islice(self.data_loader, self.num_batches)
        images = (self.prepare_batch(batch, self.device)[0] for batch in batches)
        return recompute_batch_norm_statistics(self.network, images, self.autocast_device, self.inferer,
                                               self.autocast_dtype)
