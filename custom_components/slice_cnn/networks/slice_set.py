"""2D-slice set network for brain age and AD detection (Gupta et al., ISBI 2021 and 2023).

A volume (B, 1, X, Y, Z) on the RAS canonical grid is cut into its S slices along ``slice_axis``
(sagittal: along X, coronal: along Y, axial: along Z). All B*S slices go through a 2D encoder as one
batch, the embeddings are viewed back as (B, S, F), optionally get a learned position embedding, are
pooled over slices by a permutation-invariant aggregator and mapped to the prediction by a small head.

Missing-slice robustness (2021 paper): in training, ``slice_dropout`` drops a random fraction of the
slices (one subset per batch, drawn from torch's global RNG, which MONAI's ``set_determinism`` seeds);
in evaluation, ``slice_stride`` keeps every k-th slice and ``slice_fraction`` a random fraction of those.
Kept slices keep their own position vectors. The three are plain attributes, so they can be changed on a
trained model (also on its TorchScript export).
"""
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from custom_components.common.networks.output_layer import ScaledLinear
from custom_components.slice_cnn.networks.slice_aggregators import build_aggregator
from custom_components.slice_cnn.networks.slice_encoders import SFCN2D_CHANNELS, build_slice_encoder

SLICE_AXES = {"sagittal": 0, "coronal": 1, "axial": 2}


class SlicePositionEmbedding(nn.Module):
    """A learned vector per slice index (S, F), Kaiming-normal initialised, added to the slice embeddings,
    then a LayerNorm per slice. The original normalises jointly over all slices and features; normalising
    each slice alone keeps the result independent of which other slices are present."""

    def __init__(self, num_slices: int, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(nn.init.kaiming_normal_(torch.empty(num_slices, dim)))
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, slice_indices: torch.Tensor | None) -> torch.Tensor:
        """``x`` (B, S', F); ``slice_indices`` (S',) the kept slices, None when all S are present."""
        position = self.weight if slice_indices is None else self.weight.index_select(0, slice_indices)
        return self.norm(x + position)


def _keep_random(indices: torch.Tensor, fraction: float) -> torch.Tensor:
    """A random subset of ``indices`` of ``round(fraction * len)`` (at least one) entries, in order."""
    count = max(1, int(fraction * indices.shape[0] + 0.5))
    chosen = torch.randperm(indices.shape[0], device=indices.device)[:count]
    return indices.index_select(0, chosen.sort().values)


class SliceSetNet(nn.Module):
    """Slice set network; ``forward(x)`` returns the prediction (B, out_channels).

    Args:
        encoder: "sfcn2d" (the paper's "encoder1"), "resnet18" or "resnet34" (MONAI 2D ResNet).
        slice_axis: "sagittal", "coronal" or "axial".
        aggregation: "mean", "max", "attention" (weights via ``forward_with_attention``) or "transformer".
        position_embedding: add a learned per-slice-index embedding (needs ``spatial_shape``). For sfcn2d
            it is added inside the encoder before its dropout + final 1x1 conv (as the paper), for the
            ResNets after their Linear 512 -> embed_dim.
        spatial_shape: the input's (X, Y, Z), e.g. the bundle's ``img_size``; sets the number of slices of
            the position embedding. When given, inputs of another shape are refused.
        embed_dim: size of the slice embeddings.
        out_channels: 1 for age, 1 or 2 for AD.
        init_bias: initial bias of the last layer (the training mean age; 0 for classification).
        output_scale: fixed scale of the output (the training SD of age; 1 for classification), see
            :class:`ScaledLinear`.
        in_channel_mode: ResNets only: "repeat" the slice to 3 channels (as the paper) or "sum" the
            pretrained RGB conv1 kernels into a one-channel conv1.
        pretrained_weights: ResNets only: a local file with a torchvision-style ResNet state dict.
        sfcn_channels, sfcn_feature_dim, dropout: sfcn2d widths (default the paper's) and dropout.
        sfcn_norm: sfcn2d's normalisation: "instance" (the paper's) or "batch". Instance norm of every slice
            removes most of what differs between subjects, so the model stays at the mean age; batch norm
            keeps it (figures: the Performance section of ``bundles/slice_cnn_brainage/docs/README.md``).
        num_heads: heads of the attention and transformer aggregators.
        transformer_layers: depth of the transformer aggregator.
        head_hidden: hidden width of the prediction head.
        slice_dropout: fraction of slices dropped per batch in training.
        slice_stride, slice_fraction: evaluation-time slice subsetting (every k-th, then a random fraction).
        channels_last: run the 2D encoder in channels-last memory format.
        fused_norm_pool: sfcn2d only: normalise after the max-pool, an exact reordering (see
            ``SFCN2DBlock``), faster under ``torch.compile`` (e.g. the trainer's ``compile=True``).

    ``torch.jit.script`` compiles the model with every option, ``forward_with_attention`` included.
    """

    spatial_shape: list[int]  # empty when not given; annotated here so that TorchScript types it

    def __init__(
        self,
        encoder: str = "sfcn2d",
        slice_axis: str = "sagittal",
        aggregation: str = "mean",
        position_embedding: bool = False,
        spatial_shape: Sequence[int] | None = None,
        embed_dim: int = 32,
        out_channels: int = 1,
        init_bias: float = 0.0,
        output_scale: float = 1.0,
        in_channel_mode: str = "repeat",
        pretrained_weights: str | Path | None = None,
        sfcn_channels: Sequence[int] = SFCN2D_CHANNELS,
        sfcn_feature_dim: int = 64,
        dropout: float = 0.5,
        num_heads: int = 4,
        transformer_layers: int = 2,
        head_hidden: int = 64,
        slice_dropout: float = 0.0,
        slice_stride: int = 1,
        slice_fraction: float = 1.0,
        channels_last: bool = False,
        fused_norm_pool: bool = False,
        sfcn_norm: str = "instance",
    ) -> None:
        super().__init__()
        if slice_axis not in SLICE_AXES:
            raise ValueError(f"unknown slice_axis {slice_axis!r}; expected one of {sorted(SLICE_AXES)}")
        if spatial_shape is not None and (len(spatial_shape) != 3 or min(spatial_shape) < 1):
            raise ValueError(f"spatial_shape must be three positive sizes (X, Y, Z), got {spatial_shape}")
        if position_embedding and spatial_shape is None:
            raise ValueError("position_embedding needs spatial_shape (the input's X, Y, Z) to size it")
        if not 0.0 <= slice_dropout < 1.0:
            raise ValueError(f"slice_dropout must be in [0, 1), got {slice_dropout}")
        if slice_stride < 1:
            raise ValueError(f"slice_stride must be >= 1, got {slice_stride}")
        if not 0.0 < slice_fraction <= 1.0:
            raise ValueError(f"slice_fraction must be in (0, 1], got {slice_fraction}")

        self.slice_dim = 1 + SLICE_AXES[slice_axis]  # in the (B, X, Y, Z) view of the input
        self.spatial_shape = [int(size) for size in spatial_shape] if spatial_shape is not None else []
        self.slice_dropout = float(slice_dropout)
        self.slice_stride = int(slice_stride)
        self.slice_fraction = float(slice_fraction)
        self.channels_last = channels_last

        self.encoder = build_slice_encoder(
            encoder,
            embed_dim,
            sfcn_channels,
            sfcn_feature_dim,
            dropout,
            in_channel_mode,
            pretrained_weights,
            fused_norm_pool,
            sfcn_norm,
        )
        self.position = (
            SlicePositionEmbedding(self.spatial_shape[self.slice_dim - 1], self.encoder.feature_dim)
            if position_embedding
            else None
        )
        self.aggregator = build_aggregator(aggregation, embed_dim, num_heads, transformer_layers)
        self.head = nn.Sequential(
            nn.Linear(embed_dim, head_hidden),
            nn.ReLU(inplace=True),
            ScaledLinear(head_hidden, out_channels, init_bias, output_scale),
        )
        if channels_last:
            self.encoder.to(memory_format=torch.channels_last)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._predict(x)[0]

    @torch.jit.export
    def forward_with_attention(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Prediction and attention weights (B, heads, S') over the S' slices used (all S unless slices
        are dropped or subset), for ``aggregation="attention"``."""
        prediction, weights = self._predict(x)
        if weights is None:
            raise ValueError("attention weights exist only with aggregation='attention'")
        return prediction, weights

    def _predict(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        self._check_input(x)
        slices = x[:, 0].movedim(self.slice_dim, 1)  # (B, S, H, W)
        slice_indices = self._kept_slice_indices(slices.shape[1], x.device)
        if slice_indices is not None:
            slices = slices.index_select(1, slice_indices)
        batch, num_slices, height, width = slices.shape
        images = slices.reshape(batch * num_slices, 1, height, width)
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        features = self.encoder.features(images).view(batch, num_slices, -1)
        if self.position is not None:
            features = self.position(features, slice_indices)
        pooled, weights = self.aggregator(self.encoder.project(features))
        return self.head(pooled), weights

    def _check_input(self, x: torch.Tensor) -> None:
        if x.dim() != 5 or x.shape[1] != 1:
            raise ValueError(f"expected a volume batch (B, 1, X, Y, Z), got shape {list(x.shape)}")
        if len(self.spatial_shape) > 0 and list(x.shape[2:]) != self.spatial_shape:
            raise ValueError(
                f"input spatial shape {list(x.shape[2:])} differs from spatial_shape {self.spatial_shape} "
                "the network (and its slice position embedding) was built for"
            )

    def _kept_slice_indices(self, num_slices: int, device: torch.device) -> torch.Tensor | None:
        """Indices of the slices to use, in order; None for all of them."""
        if self.training:
            if self.slice_dropout > 0.0:
                return _keep_random(torch.arange(num_slices, device=device), 1.0 - self.slice_dropout)
            return None
        if self.slice_stride == 1 and self.slice_fraction == 1.0:
            return None
        indices = torch.arange(0, num_slices, self.slice_stride, device=device)
        if self.slice_fraction < 1.0:
            indices = _keep_random(indices, self.slice_fraction)
        return indices
