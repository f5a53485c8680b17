"""The three networks of TGB-GAN (Li et al., MIUA 2021): autoencoder generator, WGAN critic, age regressor.

All three are 3D and normalisation-free, as in the paper. Depths and channel widths come from the
constructor, so the paper's 96^3 five-level model and a small demo model are the same classes.
"""
from __future__ import annotations

from collections.abc import Sequence
from math import prod

import torch
import torch.nn.functional as F
from torch import nn

from custom_components.common.networks.output_layer import ScaledLinear


def _check_odd_kernel(kernel_size: int) -> None:
    if kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"kernel_size must be a positive odd number, got {kernel_size}")


def _check_channels(name: str, channels: Sequence[int]) -> tuple[int, ...]:
    channels = tuple(int(c) for c in channels)
    if not channels or min(channels) < 1:
        raise ValueError(f"{name} must be a non-empty sequence of positive channel counts, got {channels}")
    return channels


def _check_volume(x: torch.Tensor, channels: int, owner: str) -> None:
    if x.dim() != 5 or x.shape[1] != channels:
        raise ValueError(f"{owner} expects (batch, {channels}, D, H, W) input, got shape {x.shape}")


UPSAMPLING = ("transposed", "nearest", "trilinear")


def _upsample(c_in: int, c_out: int, kernel_size: int, mode: str) -> list[nn.Module]:
    """Layers that double the spatial size and map ``c_in`` to ``c_out`` channels (see TGBGenerator)."""
    pad = kernel_size // 2
    if mode == "transposed":
        return [nn.ConvTranspose3d(c_in, c_out, kernel_size, stride=2, padding=pad, output_padding=1)]
    return [nn.Upsample(scale_factor=2, mode=mode), nn.Conv3d(c_in, c_out, kernel_size, padding=pad)]


class TGBGenerator(nn.Module):
    """Deterministic 3D convolutional autoencoder: the TGB-GAN generator.

    Encoder: one ``Conv3d(stride 2) + ReLU`` block per entry of ``encoder_channels`` (each halves the size).
    Decoder: one upsampling block + ReLU per entry of ``decoder_channels`` (each doubles the size exactly),
    then a 1x1x1 convolution back to ``in_channels`` followed by a ReLU. The output ReLU is the paper's
    choice: images are scaled to [0, 1], so reconstructions are kept non-negative.

    ``upsampling``: ``"transposed"`` is the paper's ``ConvTranspose3d(stride 2)``; ``"nearest"`` and
    ``"trilinear"`` double the size by that interpolation and then convolve (stride 1): resize-convolution.
    A stride-2 transposed convolution whose kernel size is not a multiple of 2 gives alternate voxels
    different numbers of kernel taps, so the generator can write a period-2 (checkerboard) texture; under
    the adversarial and age terms it does, and a real-trained age regressor reads that texture as age (the
    Performance section of the bundle's docs). Resize-convolution cannot write it (Odena et al., Distill
    2016).

    Convolutions start from Kaiming-normal weights (ReLU gain) and zero biases. With PyTorch's default
    initialisation the signal shrinks through the ReLU stack, the output starts as a near-constant image and
    the output ReLU soon switches off everywhere, an all-zero output; the Kaiming start trains (figures: the
    Performance section of ``bundles/tgb_gan_augment/docs/README.md``). The output convolution's weights
    start non-negative (the magnitudes of a Kaiming draw): its inputs are ReLU outputs, so its output starts
    positive wherever the features are. With signed weights the start depended on the draw: at the bundle's
    widths 1 seed in 10 gave no positive output voxel, a generator whose gradients are all zero.

    ``encode`` and ``decode`` are usable on their own: synthesis interpolates latent codes between them.
    Spatial sizes must be divisible by ``2 ** len(encoder_channels)`` (96 -> 3 for the paper's five levels).
    """

    def __init__(
        self,
        in_channels: int = 1,
        encoder_channels: Sequence[int] = (64, 128, 256, 512, 512),
        decoder_channels: Sequence[int] = (256, 256, 128, 64, 32),
        kernel_size: int = 3,
        upsampling: str = "transposed",
    ) -> None:
        super().__init__()
        if upsampling not in UPSAMPLING:
            raise ValueError(f"upsampling must be one of {UPSAMPLING}, got {upsampling!r}")
        encoder_channels = _check_channels("encoder_channels", encoder_channels)
        decoder_channels = _check_channels("decoder_channels", decoder_channels)
        if len(encoder_channels) != len(decoder_channels):
            raise ValueError(
                "encoder_channels and decoder_channels need the same number of levels so the output size "
                f"equals the input size, got {len(encoder_channels)} and {len(decoder_channels)}"
            )
        _check_odd_kernel(kernel_size)
        pad = kernel_size // 2
        self.in_channels = in_channels
        self.depth = len(encoder_channels)

        encoder: list[nn.Module] = []
        for c_in, c_out in zip((in_channels, *encoder_channels[:-1]), encoder_channels):
            encoder.append(nn.Sequential(nn.Conv3d(c_in, c_out, kernel_size, stride=2, padding=pad), nn.ReLU()))
        self.encoder = nn.Sequential(*encoder)

        decoder: list[nn.Module] = []
        for c_in, c_out in zip((encoder_channels[-1], *decoder_channels[:-1]), decoder_channels):
            decoder.append(nn.Sequential(*_upsample(c_in, c_out, kernel_size, upsampling), nn.ReLU()))
        self.decoder = nn.Sequential(*decoder)
        self.head = nn.Sequential(nn.Conv3d(decoder_channels[-1], in_channels, kernel_size=1), nn.ReLU())
        for module in self.modules():
            if isinstance(module, (nn.Conv3d, nn.ConvTranspose3d)):
                nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
                nn.init.zeros_(module.bias)
        with torch.no_grad():
            self.head[0].weight.abs_()

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Image (B, C, D, H, W) -> latent code (B, encoder_channels[-1], D / 2^depth, ...)."""
        _check_volume(x, self.in_channels, "TGBGenerator")
        factor = 2**self.depth
        for size in x.shape[2:]:
            if size % factor != 0:
                raise ValueError(
                    f"TGBGenerator with {self.depth} levels needs spatial sizes divisible by {factor}, "
                    f"got {list(x.shape[2:])}"
                )
        return self.encoder(x)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Latent code -> image with ``2 ** depth`` times its spatial size."""
        return self.head(self.decoder(z))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x))


class WGANCritic(nn.Module):
    """PatchGAN-style 3D WGAN critic: ``Conv3d(stride 2) + ReLU`` blocks, then a convolution to a score map.

    The score map is linear (no output activation) and averaged per sample, so ``forward`` returns shape
    (B,). The score convolution has no bias: a constant cancels in mean D(real) - mean D(fake) and in the
    gradient penalty, so it could never be trained. There is no normalisation layer: WGAN-GP penalises
    per-sample input gradients, which batch statistics would couple across the batch.
    ``negative_slope > 0`` swaps the paper's ReLU for LeakyReLU.
    """

    def __init__(
        self,
        in_channels: int = 1,
        channels: Sequence[int] = (64, 128, 256, 512),
        kernel_size: int = 3,
        negative_slope: float = 0.0,
    ) -> None:
        super().__init__()
        channels = _check_channels("channels", channels)
        _check_odd_kernel(kernel_size)
        if negative_slope < 0:
            raise ValueError(f"negative_slope must be >= 0, got {negative_slope}")
        pad = kernel_size // 2
        self.in_channels = in_channels
        blocks: list[nn.Module] = []
        for c_in, c_out in zip((in_channels, *channels[:-1]), channels):
            act = nn.LeakyReLU(negative_slope) if negative_slope > 0 else nn.ReLU()
            blocks.append(nn.Sequential(nn.Conv3d(c_in, c_out, kernel_size, stride=2, padding=pad), act))
        self.features = nn.Sequential(*blocks)
        self.score = nn.Conv3d(channels[-1], 1, kernel_size, padding=pad, bias=False)

    def score_map(self, x: torch.Tensor) -> torch.Tensor:
        """Patch scores (B, 1, d, h, w) before averaging.

        The one-channel score convolution always runs in contiguous memory format: with channels-last weights
        under CPU bfloat16 autocast, its weight gradient through the gradient penalty's double backward came
        out NaN in about one run in three with the same seed (torch 2.13, oneDNN), ending the training."""
        _check_volume(x, self.in_channels, "WGANCritic")
        features = self.features(x).contiguous()
        return F.conv3d(features, self.score.weight.contiguous(), padding=self.score.padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.score_map(x).flatten(1).mean(dim=1)


class ResidualBlock3d(nn.Module):
    """Two 3x3x3 convolutions with a channel-zero-padded identity added before the last ReLU."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        if out_channels < in_channels:
            raise ValueError(
                f"a zero-padded identity cannot shrink channels: got {in_channels} -> {out_channels}"
            )
        self.extra_channels = out_channels - in_channels
        self.conv1 = nn.Conv3d(in_channels, out_channels, 3, padding=1)
        self.conv2 = nn.Conv3d(out_channels, out_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = F.pad(x, (0, 0, 0, 0, 0, 0, 0, self.extra_channels))
        return F.relu(self.conv2(F.relu(self.conv1(x))) + identity)


class ResidualAgeRegressor(nn.Module):
    """3D residual age regressor: TGB-GAN's task-guided branch and the paper's downstream regressor.

    Each entry of ``channels`` adds a :class:`ResidualBlock3d` followed by ``MaxPool3d(2)``; the head is
    Flatten -> ``hidden`` fully connected layers (ReLU, dropout) -> 1 linear output, shape (B, 1).
    The flatten size is computed from ``spatial_shape`` so the state dict is fixed at construction; inputs
    of another size are rejected. ``init_bias`` and ``output_scale`` (typically the training mean and SD of age) set the
    output layer, see :class:`ScaledLinear`.
    """

    def __init__(
        self,
        in_channels: int = 1,
        channels: Sequence[int] = (16, 32, 64, 128, 256),
        hidden: Sequence[int] = (2048, 512, 64),
        dropout: float = 0.1,
        spatial_shape: Sequence[int] = (96, 96, 96),
        init_bias: float = 0.0,
        output_scale: float = 1.0,
    ) -> None:
        super().__init__()
        channels = _check_channels("channels", channels)
        hidden = tuple(int(h) for h in hidden)
        if hidden and min(hidden) < 1:
            raise ValueError(f"hidden sizes must be positive, got {hidden}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.in_channels = in_channels
        self.spatial_shape = [int(s) for s in spatial_shape]
        if len(self.spatial_shape) != 3:
            raise ValueError(f"spatial_shape must have three sizes, got {self.spatial_shape}")
        pooled = tuple(s // 2 ** len(channels) for s in self.spatial_shape)
        if min(pooled) < 1:
            raise ValueError(
                f"spatial_shape {self.spatial_shape} is too small for {len(channels)} poolings by 2"
            )

        blocks: list[nn.Module] = []
        for c_in, c_out in zip((in_channels, *channels[:-1]), channels):
            blocks.append(nn.Sequential(ResidualBlock3d(c_in, c_out), nn.MaxPool3d(2)))
        self.features = nn.Sequential(*blocks)

        sizes = (channels[-1] * prod(pooled), *hidden)
        layers: list[nn.Module] = [nn.Flatten()]
        for f_in, f_out in zip(sizes[:-1], sizes[1:]):
            layers += [nn.Linear(f_in, f_out), nn.ReLU(), nn.Dropout(dropout)]
        self.head = nn.Sequential(*layers)
        self.out = ScaledLinear(sizes[-1], 1, init_bias, output_scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_volume(x, self.in_channels, "ResidualAgeRegressor")
        if list(x.shape[2:]) != self.spatial_shape:
            raise ValueError(
                f"ResidualAgeRegressor was built for spatial_shape {self.spatial_shape}, got {list(x.shape[2:])}"
            )
        return self.out(self.head(self.features(x)))
