"""Instance masks (Mask R-CNN) painted by ``draw_detections``."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fgdistill.viz.draw import PALETTE, draw_detections


def test_masks_are_painted_in_their_label_colour() -> None:
    image = torch.zeros(3, 60, 80)
    boxes = torch.tensor([[5.0, 25.0, 40.0, 55.0], [45.0, 25.0, 75.0, 55.0]])
    masks = torch.zeros(2, 1, 60, 80)
    masks[0, 0, 40:50, 10:20] = 0.9
    masks[1, 0, 40:50, 55:65] = 0.9
    scores = torch.tensor([0.9, 0.2])
    out = np.asarray(
        draw_detections(
            image, boxes, torch.tensor([1, 2]), scores, masks=masks, score_threshold=0.5
        )
    )
    assert out.shape == (60, 80, 3)
    expected = np.round(0.45 * np.asarray(PALETTE[1], dtype=np.float32))
    np.testing.assert_array_equal(out[45, 15], expected)  # inside the kept mask
    assert out[45, 60].sum() == 0  # the low-score detection's mask is not painted
    assert out[35, 15].sum() == 0  # inside the box, outside its mask


def test_masks_must_fit_the_image_and_the_boxes() -> None:
    image = torch.zeros(3, 20, 30)
    boxes = torch.tensor([[2.0, 2.0, 12.0, 12.0]])
    with pytest.raises(ValueError, match="the image's size"):
        draw_detections(image, boxes, torch.tensor([1]), masks=torch.zeros(1, 1, 10, 10))
    with pytest.raises(ValueError, match="2 masks for 1 boxes"):
        draw_detections(image, boxes, torch.tensor([1]), masks=torch.zeros(2, 20, 30))
