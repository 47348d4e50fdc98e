"""Drawing detections: boxes land where they should, thresholds and image modes."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from fgdistill.viz.draw import PALETTE, draw_detections, to_pil, unique_png_names


def test_box_outline_is_drawn_in_the_label_colour() -> None:
    image = torch.zeros(3, 60, 80)
    out = draw_detections(
        image,
        torch.tensor([[10.0, 20.0, 50.0, 40.0]]),
        torch.tensor([2]),
        torch.tensor([0.9]),
        names=["a", "b"],
        line_width=1,
    )
    assert out.size == (80, 60)
    px = np.asarray(out)
    assert tuple(px[40, 30]) == PALETTE[2]  # bottom edge
    assert tuple(px[30, 50]) == PALETTE[2]  # right edge
    assert tuple(px[30, 30]) == (0, 0, 0)  # inside stays untouched
    assert np.asarray(to_pil(image)).sum() == 0  # the input is not modified


def test_threshold_and_ground_truth_without_scores() -> None:
    image = Image.new("RGB", (40, 40), (255, 255, 255))
    boxes = torch.tensor([[5.0, 5.0, 30.0, 30.0]])
    low = draw_detections(image, boxes, [1], [0.1], score_threshold=0.5)
    assert np.asarray(low).min() == 255  # nothing drawn below the threshold
    gt = draw_detections(image, boxes, [1])  # no scores: ground truth, always drawn
    assert np.asarray(gt).min() < 255


def test_grey_and_rgba_inputs_become_rgb() -> None:
    grey = Image.new("L", (16, 12), 128)
    rgba = Image.new("RGBA", (16, 12), (1, 2, 3, 4))
    for image in (grey, rgba, np.zeros((12, 16), dtype=np.uint8)):
        out = draw_detections(image, torch.zeros(0, 4), torch.zeros(0, dtype=torch.int64))
        assert out.mode == "RGB" and out.size == (16, 12)


def test_picture_names_never_repeat() -> None:
    # a.png and sub/a.png share a stem; a third file is itself named a_2
    assert unique_png_names(["a", "a", "a_2", "b"]) == ["a.png", "a_2.png", "a_2_2.png", "b.png"]
    names = unique_png_names(["x"] * 5)
    assert len(set(names)) == 5
