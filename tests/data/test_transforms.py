"""Horizontal flip of image, boxes and masks."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fgdistill.data.coco import CocoDetection
from fgdistill.data.transforms import Compose, RandomHorizontalFlip, hflip


def _mask_box(mask: torch.Tensor) -> list[float]:
    """Tight xyxy box (pixel edges) of a [H, W] mask."""
    ys, xs = torch.nonzero(mask, as_tuple=True)
    return [xs.min().item(), ys.min().item(), xs.max().item() + 1, ys.max().item() + 1]


def test_hflip_moves_image_boxes_and_masks_together() -> None:
    h, w = 6, 10
    image = torch.zeros(3, h, w)
    image[0, 1:4, 2:5] = 1.0  # a red patch at x 2..5, y 1..4
    masks = (image[0] > 0).to(torch.uint8)[None]
    target = {"boxes": torch.tensor([[2.0, 1.0, 5.0, 4.0]]), "masks": masks, "image_id": 3}
    flipped, out = hflip(image, target)
    assert out["boxes"].tolist() == [[5.0, 1.0, 8.0, 4.0]]  # [W - x1, y0, W - x0, y1]
    assert _mask_box(out["masks"][0]) == out["boxes"][0].tolist()
    assert torch.equal((flipped[0] > 0).to(torch.uint8), out["masks"][0])
    assert out["image_id"] == 3
    # the input is left untouched, and flipping twice is the identity
    assert target["boxes"].tolist() == [[2.0, 1.0, 5.0, 4.0]]
    back, again = hflip(flipped, out)
    assert torch.equal(back, image) and torch.equal(again["boxes"], target["boxes"])
    assert torch.equal(again["masks"], masks)


def test_hflip_on_generated_data_keeps_masks_inside_boxes(synth_dataset: Path) -> None:
    ds = CocoDetection(
        synth_dataset / "annotations" / "instances_val.json", synth_dataset / "val", masks=True
    )
    for idx in range(len(ds)):
        image, target = ds[idx]
        flipped, out = hflip(image, target)
        assert torch.equal(flipped, image.flip(-1))
        for box, mask in zip(out["boxes"], out["masks"], strict=True):
            # generated boxes are tight around the visible mask, before and after the flip
            assert _mask_box(mask) == box.tolist()


def test_empty_targets_flip() -> None:
    image = torch.rand(3, 4, 5)
    target = {"boxes": torch.zeros(0, 4), "masks": torch.zeros(0, 4, 5, dtype=torch.uint8)}
    _, out = hflip(image, target)
    assert out["boxes"].shape == (0, 4) and out["masks"].shape == (0, 4, 5)


def test_random_flip_probability_and_seed() -> None:
    image = torch.arange(6.0).reshape(1, 2, 3)
    target = {"boxes": torch.tensor([[0.0, 0.0, 1.0, 1.0]])}
    assert torch.equal(RandomHorizontalFlip(p=1.0)(image, target)[0], image.flip(-1))
    assert torch.equal(RandomHorizontalFlip(p=0.0)(image, target)[0], image)

    def draws(seed: int) -> list[bool]:
        torch.manual_seed(seed)
        flip = Compose([RandomHorizontalFlip(0.5)])
        return [not torch.equal(flip(image, target)[0], image) for _ in range(200)]

    first = draws(1)
    assert first == draws(1)
    assert 70 < sum(first) < 130
    assert first != draws(2)
    with pytest.raises(ValueError, match="probability"):
        RandomHorizontalFlip(1.5)
