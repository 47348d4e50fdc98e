from types import ModuleType
from typing import Any

import pytest
import torch

from fgdistill.losses import fgd_masks

from ._cases import CASE_IDS, CASES

F64 = torch.float64


def masks(boxes: list[list[list[float]]], hw=(4, 4), batch=(32, 32)):
    tensors = [torch.tensor(b, dtype=F64).reshape(-1, 4) for b in boxes]
    return fgd_masks(tensors, hw, batch)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_matches_reference_masks(case: dict[str, Any]) -> None:
    h, w = case["student"].shape[2:]
    fg, bg = fgd_masks(case["boxes"], (h, w), case["batch_shape"])
    assert fg.dtype == F64 and fg.shape == case["fg_mask"].shape
    torch.testing.assert_close(fg, case["fg_mask"], rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(bg, case["bg_mask"], rtol=1e-6, atol=1e-9)


def test_no_boxes() -> None:
    fg, bg = masks([[], []])
    assert fg.shape == (2, 4, 4)
    assert torch.count_nonzero(fg) == 0
    torch.testing.assert_close(bg, torch.full((2, 4, 4), 1 / 16, dtype=F64))


def test_empty_batch_list() -> None:
    fg, bg = fgd_masks([], (3, 5), (24, 40))
    assert fg.shape == bg.shape == (0, 3, 5)


def test_border_box() -> None:
    # (24, 24, 32, 32) in a 32x32 batch on a 4x4 map: cells floor(3)..ceil(4) -> rows/cols 3..4,
    # clipped to 3; weight counts the unclipped 2x2 cells.
    fg, bg = masks([[[24, 24, 32, 32]]])
    expected = torch.zeros(1, 4, 4, dtype=F64)
    expected[0, 3, 3] = 0.25
    torch.testing.assert_close(fg, expected)
    expected_bg = torch.full((1, 4, 4), 1 / 15, dtype=F64)
    expected_bg[0, 3, 3] = 0
    torch.testing.assert_close(bg, expected_bg)


def test_box_covering_everything() -> None:
    fg, bg = masks([[[0, 0, 32, 32]], [[1, 1, 2, 2]]])
    torch.testing.assert_close(fg[0], torch.full((4, 4), 1 / 25, dtype=F64))
    assert torch.count_nonzero(bg[0]) == 0  # stays zero, no division by zero
    assert torch.isfinite(bg).all()
    # the other image is independent: x and y 0.125..0.25 -> cells 0..1, weight 1/4
    expected = torch.zeros(4, 4, dtype=F64)
    expected[:2, :2] = 0.25
    torch.testing.assert_close(fg[1], expected)
    torch.testing.assert_close(bg[1], torch.where(expected > 0, 0.0, 1 / 12).to(F64))


@pytest.mark.parametrize("reverse", [False, True])
def test_nested_boxes_smallest_wins(reverse: bool) -> None:
    big = [0, 0, 24, 24]  # cells 0..3 -> weight 1/16
    small = [8, 8, 15, 15]  # x: 1 .. 1.875 -> cells 1..2 -> weight 1/4
    boxes = [small, big] if reverse else [big, small]
    fg, _ = masks([boxes])
    expected = torch.full((1, 4, 4), 1 / 16, dtype=F64)
    expected[0, 1:3, 1:3] = 0.25
    torch.testing.assert_close(fg, expected)


def test_boxes_partly_and_wholly_outside() -> None:
    # x1=-2, y1=-1, x2=1, y2=5 in cells: rows clip to 0..3, cols to 0..1; weight 1/(7*4)
    partly = [-16, -8, 8, 40]
    outside = [40, 40, 50, 50]  # starts at cell 5: covers nothing
    fg, bg = masks([[partly, outside]])
    expected = torch.zeros(1, 4, 4, dtype=F64)
    expected[0, :, 0:2] = 1 / 28
    torch.testing.assert_close(fg, expected)
    assert torch.count_nonzero(bg[0, :, 2:]) == 8


def test_degenerate_box_covers_nothing() -> None:
    fg, _ = masks([[[16, 16, 8, 8]]])  # x2 < x1
    assert torch.count_nonzero(fg) == 0


def test_scaled_by_batch_shape_not_image_size() -> None:
    # A 4x8 map of a 32x64 (padded) batch: stride 8 both ways. The box spans pixel columns 8..16
    # -> cells 1..2, rows 0..8 -> cells 0..1.
    fg, _ = fgd_masks([torch.tensor([[8.0, 0.0, 16.0, 8.0]])], (4, 8), (32, 64))
    expected = torch.zeros(1, 4, 8)
    expected[0, 0:2, 1:3] = 0.25
    torch.testing.assert_close(fg, expected)
    # the same box in a batch twice as wide lands on half the columns
    fg2, _ = fgd_masks([torch.tensor([[8.0, 0.0, 16.0, 8.0]])], (4, 8), (32, 128))
    assert torch.count_nonzero(fg2[0, 0]) == 2 and fg2[0, 0, 0] > 0


def test_matches_loop_port_on_random_boxes(loop_reference: ModuleType) -> None:
    gen = torch.Generator().manual_seed(3)
    boxes = []
    for k in (0, 7, 40, 1):
        xy = torch.rand(k, 2, generator=gen, dtype=F64) * torch.tensor([200.0, 120.0], dtype=F64)
        wh = torch.rand(k, 2, generator=gen, dtype=F64) * 80
        boxes.append(torch.cat([xy - 10, xy + wh], dim=1))
    fg, bg = fgd_masks(boxes, (15, 25), (120, 200))
    fg_ref, bg_ref = loop_reference.loop_fgd_masks(boxes, (15, 25), (120, 200))
    torch.testing.assert_close(fg, fg_ref, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(bg, bg_ref, rtol=1e-6, atol=1e-9)


def test_dtype_and_device_follow_arguments() -> None:
    boxes = [torch.tensor([[0, 0, 16, 16]])]  # integer boxes
    fg, bg = fgd_masks(boxes, (4, 4), (32, 32))
    assert fg.dtype == torch.float32 and bg.dtype == torch.float32
    fg64, _ = fgd_masks(boxes, (4, 4), (32, 32), dtype=F64)
    assert fg64.dtype == F64
    torch.testing.assert_close(fg64[0, 0, 0], torch.tensor(1 / 9, dtype=F64))


@pytest.mark.parametrize(
    ("boxes", "hw", "batch", "match"),
    [
        ([torch.zeros(2, 5)], (4, 4), (32, 32), r"boxes\[0\] must have shape \[K, 4\]"),
        ([torch.zeros(4)], (4, 4), (32, 32), r"boxes\[0\]"),
        ([torch.zeros(0, 4), [1, 2, 3, 4]], (4, 4), (32, 32), r"boxes\[1\] must be a torch.Tensor"),
        ([torch.zeros(0, 4)], (4.5, 4), (32, 32), "feature_hw"),
        ([torch.zeros(0, 4)], (4, 4), (0, 32), "batch_shape"),
        ([torch.zeros(0, 4)], (4, 4), 32, "batch_shape"),
    ],
)
def test_invalid_inputs(boxes: Any, hw: Any, batch: Any, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        fgd_masks(boxes, hw, batch)
