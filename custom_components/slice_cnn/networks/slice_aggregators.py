"""Pooling of slice embeddings (B, S, F) into one volume embedding (B, F).

All aggregators are invariant to the order of the slices (slice position enters only through the
position embedding added before them) and accept any number of slices, so they work unchanged when slices
are dropped. Each returns ``(pooled, weights)``: ``weights`` are the attention weights (B, heads, S) of
``AttentionSlicePool`` and None otherwise. One return type for all keeps the set network scriptable.
"""
from __future__ import annotations

import torch
from torch import nn

AGGREGATIONS = ("mean", "max", "attention", "transformer")


def _check_heads(dim: int, num_heads: int) -> None:
    if num_heads < 1 or dim % num_heads:
        raise ValueError(f"the embedding size {dim} must be a multiple of num_heads={num_heads}")


class MeanSlicePool(nn.Module):
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        return x.mean(dim=1), None


class MaxSlicePool(nn.Module):
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        return torch.amax(x, dim=1), None


class AttentionSlicePool(nn.Module):
    """Attention pooling with one learned query (Gupta et al.): keys and values are linear maps of the
    slice embeddings, the feature dimension is split into ``num_heads`` heads, each head takes a softmax
    over slices; the pooled heads are concatenated, then LayerNorm + Linear."""

    def __init__(self, dim: int, num_heads: int = 4) -> None:
        super().__init__()
        _check_heads(dim, num_heads)
        self.num_heads = num_heads
        self.query = nn.Parameter(torch.randn(dim) * dim**-0.5)
        self.key = nn.Linear(dim, dim)
        self.value = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        batch, num_slices, dim = x.shape
        head_dim = dim // self.num_heads
        keys = self.key(x).view(batch, num_slices, self.num_heads, head_dim)
        values = self.value(x).view(batch, num_slices, self.num_heads, head_dim)
        query = self.query.view(self.num_heads, head_dim)
        scores = torch.einsum("bshd,hd->bhs", keys, query) * head_dim**-0.5
        weights = scores.softmax(dim=-1)
        pooled = torch.einsum("bhs,bshd->bhd", weights, values).reshape(batch, dim)
        return self.out(self.norm(pooled)), weights


class TransformerSlicePool(nn.Module):
    """A small pre-norm self-attention stack over the slices, then the mean over slices (not in the
    original papers). Without a position embedding it is a permutation-invariant set function."""

    def __init__(self, dim: int, num_heads: int = 4, num_layers: int = 2, dropout: float = 0.1) -> None:
        super().__init__()
        _check_heads(dim, num_heads)
        layer = nn.TransformerEncoderLayer(
            d_model=dim, nhead=num_heads, dim_feedforward=4 * dim, dropout=dropout, batch_first=True, norm_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, num_layers, norm=nn.LayerNorm(dim), enable_nested_tensor=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.encoder(x).mean(dim=1), None


def build_aggregator(name: str, dim: int, num_heads: int = 4, transformer_layers: int = 2) -> nn.Module:
    if name == "mean":
        return MeanSlicePool()
    if name == "max":
        return MaxSlicePool()
    if name == "attention":
        return AttentionSlicePool(dim, num_heads)
    if name == "transformer":
        return TransformerSlicePool(dim, num_heads, transformer_layers)
    raise ValueError(f"unknown aggregation {name!r}; expected one of {AGGREGATIONS}")
