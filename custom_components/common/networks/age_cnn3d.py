"""A well-conditioned 3D residual CNN for brain age: TGB-GAN's default task branch and downstream 3D model.

The paper's regressor (:class:`~custom_components.tgb_gan.networks.ResidualAgeRegressor`) stays selectable,
but it does not learn on 100 subjects: with no normalisation, a zero-padded identity and max-pooling, its
features at initialisation are dominated by the maximum intensity of large blocks (one channel holds most
of the between-subject variance and no age), and its flattened head has hundreds of thousands of weights.
This network has batch norm inside every block, projection shortcuts (1x1x1 convolution + batch norm)
where the width or the size changes, global average pooling and dropout before a standardised output.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from brainage_core.options import as_bool
from custom_components.common.networks.output_layer import ScaledLinear


def _conv_bn(c_in: int, c_out: int, kernel_size: int, stride: int = 1) -> list[nn.Module]:
    return [nn.Conv3d(c_in, c_out, kernel_size, stride=stride, padding=kernel_size // 2, bias=False),
            nn.BatchNorm3d(c_out)]


class ResidualBlock3d(nn.Module):
    """conv3-BN-ReLU-conv3-BN plus a shortcut (identity, or 1x1x1 conv + BN when shape changes), then ReLU.

    Every batch norm starts at unit scale: starting the residual path's last one at zero (each block its
    shortcut at first, common in long ImageNet runs) kept small cohorts near the mean age for far longer
    (tgb_gan_augment docs, Performance).
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.residual = nn.Sequential(*_conv_bn(in_channels, out_channels, 3, stride), nn.ReLU(inplace=True),
                                      *_conv_bn(out_channels, out_channels, 3))
        self.shortcut = (nn.Identity() if stride == 1 and in_channels == out_channels
                         else nn.Sequential(*_conv_bn(in_channels, out_channels, 1, stride)))
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.residual(x) + self.shortcut(x))


class AgeCNN3d(nn.Module):
    """3D residual age regressor: stem (conv3 + BN + ReLU), then one residual stage per further entry of
    ``channels`` (the first block of each halves the size), global average pooling, dropout and a
    :class:`ScaledLinear` output (shape (B, 1)) set by ``init_bias`` / ``output_scale`` (the training mean
    and SD of age). Any input size works; ``blocks_per_stage`` residual blocks per stage.
    ``channels_last`` runs the convolutions in the channels-last-3d memory layout (faster under bf16
    autocast on CPUs with bf16 units); the output is the same.

    ``standardise_input`` z-scores every input volume over all its voxels first, so the network reads the
    same image whatever its intensity scale: the slice bundle's NormalizeIntensity output and TGB-GAN's
    [0, 1] images alike (without it, a regressor trained on one scale is useless on the other: the
    tgb_gan_augment docs, Performance).
    """

    def __init__(
        self,
        in_channels: int = 1,
        channels: Sequence[int] = (16, 32, 64, 128),
        blocks_per_stage: int = 1,
        dropout: float = 0.2,
        init_bias: float = 0.0,
        output_scale: float = 1.0,
        channels_last: bool = False,
        standardise_input: bool = True,
    ) -> None:
        super().__init__()
        channels = tuple(int(c) for c in channels)
        if len(channels) < 2 or min(channels) < 1:
            raise ValueError(f"channels needs at least two positive widths (stem and one stage), got {channels}")
        if blocks_per_stage < 1:
            raise ValueError(f"blocks_per_stage must be >= 1, got {blocks_per_stage}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.in_channels = in_channels
        self.channels_last = as_bool(channels_last, "channels_last")
        self.standardise_input = as_bool(standardise_input, "standardise_input")
        layers: list[nn.Module] = [*_conv_bn(in_channels, channels[0], 3), nn.ReLU(inplace=True)]
        for c_in, c_out in zip(channels[:-1], channels[1:]):
            layers.append(ResidualBlock3d(c_in, c_out, stride=2))
            layers += [ResidualBlock3d(c_out, c_out) for _ in range(blocks_per_stage - 1)]
        self.features = nn.Sequential(*layers)
        for module in self.modules():
            if isinstance(module, nn.Conv3d):
                nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
        self.head = nn.Sequential(nn.AdaptiveAvgPool3d(1), nn.Flatten(), nn.Dropout(dropout))
        self.out = ScaledLinear(channels[-1], 1, init_bias, output_scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 5 or x.shape[1] != self.in_channels:
            raise ValueError(f"AgeCNN3d expects (batch, {self.in_channels}, D, H, W) input, got shape {x.shape}")
        if self.standardise_input:
            flat = x.flatten(1).float()
            mean, std = flat.mean(1), flat.std(1)
            x = ((x - mean.view(-1, 1, 1, 1, 1)) / (std.view(-1, 1, 1, 1, 1) + 1e-6)).to(x.dtype)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last_3d)
        return self.out(self.head(self.features(x)))
