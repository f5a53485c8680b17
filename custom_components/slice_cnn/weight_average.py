"""An exponential moving average (EMA) of a network's weights: the network that is validated and saved.

Why: the weights at the end of any one epoch carry the noise of its last few hundred steps; on the slice
network that alone moved the validation MAE by 20-40 % from one epoch to the next while the learning
rate was high. The average over the last epochs is a smoother and usually better model, and the best
checkpoint no longer depends on which epoch happened to end on a lucky step.

Batch-norm statistics are not averaged: after the averaged weights change, they are recomputed for them
(``custom_components.common.batch_norm.PreciseBatchNorm`` on ``WeightAverage.module``).
"""
from __future__ import annotations

import copy
import math

import torch
from ignite.engine import Engine, Events
from torch import nn

from brainage_core.checkpoints import unwrap


def ema_decay(epochs: float, iterations_per_epoch: int) -> float:
    """Per-iteration decay of an average over about ``epochs`` epochs (0 epochs: no averaging)."""
    if epochs < 0 or iterations_per_epoch < 1:
        raise ValueError(f"need epochs >= 0 and iterations_per_epoch >= 1, got {epochs}, {iterations_per_epoch}")
    return 0.0 if epochs == 0 else math.exp(-1.0 / (epochs * iterations_per_epoch))


class WeightAverage:
    """Ignite handler keeping ``module``, a copy of ``network`` whose parameters are the exponential moving
    average of the network's, updated after every training iteration: ``avg += (1 - decay) * (w - avg)``.

    The copy starts from the network's weights when the handler is built (after any initial weights are
    loaded) and restarts from them at the first update after a fresh start. ``decay`` 0 makes it a plain
    copy of the current weights. Its state (the number of updates) goes into checkpoints beside
    ``module``'s weights, so a resumed run goes on with the same average.
    """

    def __init__(self, network: nn.Module, decay: float = 0.99) -> None:
        if not 0.0 <= float(decay) < 1.0:
            raise ValueError(f"decay must be in [0, 1), got {decay}")
        self.network = network
        self.decay = float(decay)
        self.module = copy.deepcopy(unwrap(network))
        self.module.requires_grad_(False)
        self.updates = 0

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.update)

    @torch.no_grad()
    def update(self, engine: Engine | None = None) -> None:
        averaged = [p for p in self.module.parameters()]
        current = [p.detach() for p in unwrap(self.network).parameters()]
        if self.updates == 0:
            torch._foreach_copy_(averaged, current)
        else:
            torch._foreach_lerp_(averaged, current, 1.0 - self.decay)
        self.updates += 1

    def state_dict(self) -> dict:
        return {"updates": torch.tensor(self.updates)}

    def load_state_dict(self, state: dict) -> None:
        self.updates = int(state["updates"])
