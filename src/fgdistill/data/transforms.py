"""Augmentations acting on ``(image, target)`` pairs.

Resizing and normalisation belong to the detector's own ``model.transform``; only geometric
augmentations that must move boxes and masks together with the image live here. Randomness comes
from torch's global RNG, which :func:`fgdistill.data.loader.build_loader` seeds per worker.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from fgdistill.data.coco import Target

__all__ = ["Compose", "RandomHorizontalFlip", "hflip"]


def hflip(image: Tensor, target: Target) -> tuple[Tensor, Target]:
    """Mirror an image and its target left-right.

    Args:
        image: Tensor[C, H, W].
        target: dict with ``boxes`` FloatTensor[K, 4] (xyxy, pixels) and optional ``masks``
            Tensor[K, H, W]; other entries are copied unchanged.

    Returns:
        The flipped image and a new target dict (the input is not modified). A box
        ``[x0, y0, x1, y1]`` becomes ``[W - x1, y0, W - x0, y1]``.
    """
    width = image.shape[-1]
    flipped = image.flip(-1)
    out = dict(target)
    if "boxes" in target:
        boxes = target["boxes"]
        new = boxes.clone()
        new[:, 0] = width - boxes[:, 2]
        new[:, 2] = width - boxes[:, 0]
        out["boxes"] = new
    if "masks" in target:
        out["masks"] = target["masks"].flip(-1)
    return flipped, out


class RandomHorizontalFlip:
    """Flip image, boxes and masks left-right with probability ``p`` (torch's RNG)."""

    def __init__(self, p: float = 0.5) -> None:
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"flip probability must be in [0, 1], got {p}")
        self.p = p

    def __call__(self, image: Tensor, target: Target) -> tuple[Tensor, Target]:
        """Image Tensor[C, H, W], target with ``boxes`` [K, 4] xyxy and optional ``masks``."""
        if self.p > 0 and torch.rand(()) < self.p:
            return hflip(image, target)
        return image, target

    def __repr__(self) -> str:
        return f"RandomHorizontalFlip(p={self.p})"


class Compose:
    """Apply ``(image, target) -> (image, target)`` transforms in order."""

    def __init__(self, transforms: Sequence[Callable[[Tensor, Target], tuple[Tensor, Target]]]):
        self.transforms = list(transforms)

    def __call__(self, image: Tensor, target: Target) -> tuple[Tensor, Target]:
        """Image Tensor[C, H, W] and its target, passed through every transform."""
        for t in self.transforms:
            image, target = t(image, target)
        return image, target

    def __repr__(self) -> str:
        return f"Compose({self.transforms!r})"
