"""Spatial and channel attention of a feature map, as FGD defines them.

FGD (Yang et al., "Focal and Global Knowledge Distillation for Detectors", CVPR 2022, eq. 2-3)
measures where a feature map is "active" from the mean absolute activation:

* spatial attention ``A_s = H*W * softmax_over_HW(mean_c |F| / t)``, shape ``[N, H, W]``;
* channel attention ``A_c = C * softmax_over_C(mean_hw |F| / t)``, shape ``[N, C]``.

Both are scaled so that they average to 1. This module is the single implementation used by the
loss and by the visualisation code. The loss reuses :func:`abs_means` so that one pass over
``|F|`` gives both reductions.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "abs_means",
    "attention_from_means",
    "channel_attention",
    "spatial_attention",
]


def _check_feature(feat: Tensor, temperature: float) -> None:
    if not isinstance(feat, Tensor):
        raise ValueError(f"feature map must be a torch.Tensor, got {type(feat).__name__}")
    if feat.dim() != 4:
        raise ValueError(f"feature map must be [N, C, H, W], got shape {tuple(feat.shape)}")
    if not feat.is_floating_point():
        raise ValueError(f"feature map must be floating point, got {feat.dtype}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")


def abs_means(feat: Tensor) -> tuple[Tensor, Tensor]:
    """Mean absolute activation over channels and over positions.

    Args:
        feat: ``FloatTensor[N, C, H, W]``.

    Returns:
        ``(spatial_mean [N, H, W], channel_mean [N, C])``: ``mean_c |F|`` and ``mean_hw |F|``.
    """
    magnitude = feat.abs()
    return magnitude.mean(dim=1), magnitude.mean(dim=(2, 3))


def attention_from_means(
    spatial_mean: Tensor, channel_mean: Tensor, temperature: float
) -> tuple[Tensor, Tensor]:
    """Turn the mean absolute activations into FGD's spatial and channel attention.

    Args:
        spatial_mean: ``FloatTensor[N, H, W]``, ``mean_c |F|``.
        channel_mean: ``FloatTensor[N, C]``, ``mean_hw |F|``.
        temperature: softmax temperature ``t > 0``.

    Returns:
        ``(A_s [N, H, W], A_c [N, C])``, each summing to ``H*W`` and ``C`` per image.
    """
    n, h, w = spatial_mean.shape
    channels = channel_mean.shape[1]
    spatial = torch.softmax(spatial_mean.reshape(n, h * w) / temperature, dim=1)
    channel = torch.softmax(channel_mean / temperature, dim=1)
    return (h * w) * spatial.reshape(n, h, w), channels * channel


def spatial_attention(feat: Tensor, temperature: float) -> Tensor:
    """Spatial attention ``H*W * softmax_over_HW(mean_c |F| / t)``.

    Args:
        feat: ``FloatTensor[N, C, H, W]``.
        temperature: softmax temperature ``t > 0`` (FGD uses 0.5; 0.8 for FCOS).

    Returns:
        ``FloatTensor[N, H, W]``, non-negative, summing to ``H*W`` for each image.
    """
    _check_feature(feat, temperature)
    n, _, h, w = feat.shape
    weights = torch.softmax(feat.abs().mean(dim=1).reshape(n, h * w) / temperature, dim=1)
    return (h * w) * weights.reshape(n, h, w)


def channel_attention(feat: Tensor, temperature: float) -> Tensor:
    """Channel attention ``C * softmax_over_C(mean_hw |F| / t)``.

    Args:
        feat: ``FloatTensor[N, C, H, W]``.
        temperature: softmax temperature ``t > 0``.

    Returns:
        ``FloatTensor[N, C]``, non-negative, summing to ``C`` for each image.
    """
    _check_feature(feat, temperature)
    channels = feat.shape[1]
    return channels * torch.softmax(feat.abs().mean(dim=(2, 3)) / temperature, dim=1)
