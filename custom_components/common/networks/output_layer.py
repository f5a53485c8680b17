"""The output layer of the age regressors."""
from __future__ import annotations

import torch
from torch import nn


class ScaledLinear(nn.Linear):
    """A linear layer whose output is multiplied by a fixed ``output_scale`` (a buffer, saved with the model).

    With ``output_scale`` = the training SD of age and ``init_bias`` = the training mean age, the layers
    below learn standardised targets. Unscaled, an age head starts with outputs spread by a fraction of a
    year and Adam, which moves each weight by about the learning rate per step, needs thousands of steps
    just to reach the spread of ages: short runs then predict the mean age for everyone.
    """

    def __init__(self, in_features: int, out_features: int, init_bias: float = 0.0, output_scale: float = 1.0):
        super().__init__(in_features, out_features)
        if not output_scale > 0:
            raise ValueError(f"output_scale must be positive, got {output_scale}")
        self.register_buffer("output_scale", torch.tensor(float(output_scale)))
        nn.init.constant_(self.bias, float(init_bias) / float(output_scale))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # A product and a sum, not F.linear, so that autocast leaves it in float32: in bfloat16 an age
        # near 50 would be rounded to a multiple of 0.25 years.
        out = (x.float().unsqueeze(-2) * self.weight.float()).sum(-1) + self.bias.float()
        return out * self.output_scale
