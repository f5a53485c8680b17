"""2D slice encoders of the slice set network (Gupta et al. 2021/2023).

Every encoder maps a batch of N one-channel slices (N, 1, H, W) to N embeddings in two steps, so that the
set network can add a slice-position embedding in between:

* ``features(images) -> (N, feature_dim)``
* ``project(features) -> (..., embed_dim)``

``SFCN2DEncoder`` is the paper's "encoder1"; there the position embedding sits before the final
dropout + 1x1 conv, as in the paper. ``ResNetSliceEncoder`` is MONAI's 2D ResNet-18/34 followed by a
Linear 512 -> embed_dim; its ``project`` is the identity, so the position embedding is added after that
Linear. ImageNet weights come from a local file with the usual torchvision key names (nothing is
downloaded).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from monai.networks.nets import ResNet
from torch import nn

SFCN2D_CHANNELS = (32, 64, 128, 256, 256)
RESNET_LAYERS = {"resnet18": (2, 2, 2, 2), "resnet34": (3, 4, 6, 3)}
RESNET_WIDTHS = (64, 128, 256, 512)
IN_CHANNEL_MODES = ("repeat", "sum")
SFCN_NORMS = {"instance": nn.InstanceNorm2d, "batch": nn.BatchNorm2d}


class SFCN2DBlock(nn.Module):
    """Conv2d 3x3 -> InstanceNorm2d -> MaxPool 2 -> ReLU.

    The max-pool is skipped when it would leave a single pixel: InstanceNorm of a 1x1 map is undefined
    (PyTorch raises in training and returns zeros otherwise), so the next norm needs at least two pixels.
    At the paper's slice sizes (91x109, 91x91, 96x96) no pool is ever skipped; for small slices (48x48 at
    4 mm, tiny test volumes) the last pools are, which keeps the network usable at any slice size >= 2
    pixels.

    ``fused_norm_pool`` computes the same function in a cheaper order: InstanceNorm (no affine) maps each
    channel of each image by ``(x - mean) / std`` with ``std > 0``, an increasing map, so it commutes with
    the max-pool. The statistics are taken at full resolution, but only the pooled (4x smaller) map is
    normalised. Parameters and state dict are those of the plain block. Under ``torch.compile`` this order
    is faster; in eager mode the plain order is (InstanceNorm's backward is one native kernel there).
    """

    def __init__(self, in_channels: int, out_channels: int, fused_norm_pool: bool = False, norm: str = "instance") -> None:
        super().__init__()
        if fused_norm_pool and norm != "instance":
            raise ValueError("fused_norm_pool is an exact reordering for instance norm only (sfcn_norm='instance')")
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1)
        self.norm = SFCN_NORMS[norm](out_channels)
        self.pool = nn.MaxPool2d(2)
        self.act = nn.ReLU(inplace=True)
        self.fused_norm_pool = fused_norm_pool

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        pool = (x.shape[-2] // 2) * (x.shape[-1] // 2) >= 2
        if self.fused_norm_pool:
            var, mean = torch.var_mean(x, dim=(2, 3), keepdim=True, correction=0)
            if pool:
                x = self.pool(x)
            return torch.relu((x - mean) * torch.rsqrt(var + self.norm.eps))
        x = self.norm(x)
        if pool:
            x = self.pool(x)
        return self.act(x)


class SFCN2DEncoder(nn.Module):
    """The paper's "encoder1": a 2D version of SFCN's feature extractor (about 1.0 M parameters).

    features: 5 ``SFCN2DBlock`` (``channels``, optionally ``fused_norm_pool``), 1x1 conv ->
    ``feature_dim`` -> InstanceNorm -> ReLU -> average pool. project: Dropout -> 1x1 conv ``feature_dim``
    -> ``embed_dim`` (a Linear, as the map is 1x1 by then).
    """

    def __init__(
        self,
        embed_dim: int = 32,
        channels: Sequence[int] = SFCN2D_CHANNELS,
        feature_dim: int = 64,
        dropout: float = 0.5,
        fused_norm_pool: bool = False,
        norm: str = "instance",
    ) -> None:
        super().__init__()
        if len(channels) == 0:
            raise ValueError("channels must name at least one block width")
        if norm not in SFCN_NORMS:
            raise ValueError(f"unknown sfcn norm {norm!r}; expected one of {sorted(SFCN_NORMS)}")
        widths = [1, *channels]
        self.blocks = nn.Sequential(
            *(SFCN2DBlock(c_in, c_out, fused_norm_pool, norm) for c_in, c_out in zip(widths[:-1], widths[1:]))
        )
        self.reduce = nn.Sequential(
            nn.Conv2d(widths[-1], feature_dim, kernel_size=1),
            SFCN_NORMS[norm](feature_dim),
            nn.ReLU(inplace=True),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(1),
        )
        self.projection = nn.Sequential(nn.Dropout(dropout), nn.Linear(feature_dim, embed_dim))
        self.feature_dim = feature_dim

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.reduce(self.blocks(images))

    def project(self, features: torch.Tensor) -> torch.Tensor:
        return self.projection(features)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.project(self.features(images))


def build_resnet_backbone(name: str, in_channels: int) -> ResNet:
    """MONAI's 2D ResNet laid out as torchvision's (7x7/2 stem, max-pool, conv+bn downsample without
    bias), without its fc, so that a torchvision state dict fits it key for key."""
    if name not in RESNET_LAYERS:
        raise ValueError(f"unknown ResNet {name!r}; expected one of {sorted(RESNET_LAYERS)}")
    return ResNet(
        block="basic",
        layers=list(RESNET_LAYERS[name]),
        block_inplanes=list(RESNET_WIDTHS),
        spatial_dims=2,
        n_input_channels=in_channels,
        conv1_t_size=7,
        conv1_t_stride=2,
        no_max_pool=False,
        shortcut_type="B",
        bias_downsample=False,
        feed_forward=False,
    )


def load_torchvision_resnet_weights(backbone: ResNet, path: str | Path, sum_input_channels: bool) -> None:
    """Load a torchvision-style ResNet state dict from ``path`` into ``backbone``, strictly.

    ``fc.*`` is dropped (the backbone has no fc). With ``sum_input_channels`` the RGB conv1 kernel is
    summed over its input channels, giving a one-channel conv1 that responds to a grey slice as the RGB
    kernel does to that slice repeated three times. Any missing or unexpected key or shape mismatch raises
    one ValueError naming them all.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"pretrained ResNet weights not found: {path}")
    loaded = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(loaded, Mapping) or not all(isinstance(v, torch.Tensor) for v in loaded.values()):
        raise ValueError(f"{path} does not hold a state dict (a mapping of names to tensors)")
    state = {key: value for key, value in loaded.items() if not key.startswith("fc.")}
    if sum_input_channels and "conv1.weight" in state:
        state["conv1.weight"] = state["conv1.weight"].sum(dim=1, keepdim=True)
    _check_state_dict_fits(state, backbone.state_dict(), path)
    backbone.load_state_dict(state, strict=True)


def _check_state_dict_fits(state: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor], path: Path) -> None:
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mismatched = [
        f"{key}: file {tuple(state[key].shape)} vs model {tuple(expected[key].shape)}"
        for key in sorted(set(state) & set(expected))
        if state[key].shape != expected[key].shape
    ]
    found = {"missing keys": missing, "unexpected keys": unexpected, "shape mismatches": mismatched}
    problems = [f"{label}: {', '.join(items)}" for label, items in found.items() if items]
    if problems:
        raise ValueError(f"pretrained ResNet weights in {path} do not fit the 2D ResNet; " + "; ".join(problems))


class ResNetSliceEncoder(nn.Module):
    """MONAI 2D ResNet-18/34 without fc (512 features) -> Linear -> ``embed_dim``.

    ``in_channel_mode``: "repeat" feeds the slice repeated to 3 channels (as the paper); "sum" uses a
    one-channel conv1 (with pretrained weights, the sum of the RGB kernels). Both give the same output
    for the same pretrained weights; "sum" saves the 3x work of the first conv.
    """

    def __init__(
        self,
        name: str = "resnet18",
        embed_dim: int = 32,
        in_channel_mode: str = "repeat",
        pretrained_weights: str | Path | None = None,
    ) -> None:
        super().__init__()
        if in_channel_mode not in IN_CHANNEL_MODES:
            raise ValueError(f"unknown in_channel_mode {in_channel_mode!r}; expected one of {IN_CHANNEL_MODES}")
        self.repeat_channels = in_channel_mode == "repeat"
        self.backbone = build_resnet_backbone(name, in_channels=3 if self.repeat_channels else 1)
        if pretrained_weights is not None:
            sum_input_channels = not self.repeat_channels
            load_torchvision_resnet_weights(self.backbone, pretrained_weights, sum_input_channels)
        self.to_embedding = nn.Linear(RESNET_WIDTHS[-1], embed_dim)
        self.feature_dim = embed_dim

    def features(self, images: torch.Tensor) -> torch.Tensor:
        if self.repeat_channels:
            images = images.expand(-1, 3, -1, -1)
        return self.to_embedding(self.backbone(images))

    def project(self, features: torch.Tensor) -> torch.Tensor:
        return features

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.project(self.features(images))


def build_slice_encoder(
    name: str,
    embed_dim: int,
    sfcn_channels: Sequence[int] = SFCN2D_CHANNELS,
    sfcn_feature_dim: int = 64,
    dropout: float = 0.5,
    in_channel_mode: str = "repeat",
    pretrained_weights: str | Path | None = None,
    fused_norm_pool: bool = False,
    sfcn_norm: str = "instance",
) -> SFCN2DEncoder | ResNetSliceEncoder:
    """``name``: "sfcn2d", "resnet18" or "resnet34". The ``sfcn_*``, ``dropout`` and ``fused_norm_pool``
    options shape only "sfcn2d", ``in_channel_mode`` and ``pretrained_weights`` only the ResNets."""
    if name == "sfcn2d":
        if pretrained_weights is not None:
            raise ValueError("pretrained_weights apply to the ResNet encoders only, not to 'sfcn2d'")
        return SFCN2DEncoder(embed_dim, sfcn_channels, sfcn_feature_dim, dropout, fused_norm_pool, sfcn_norm)
    if name in RESNET_LAYERS:
        return ResNetSliceEncoder(name, embed_dim, in_channel_mode, pretrained_weights)
    raise ValueError(f"unknown encoder {name!r}; expected 'sfcn2d' or one of {sorted(RESNET_LAYERS)}")
