"""Foreground and background masks of FGD, built without a Python loop over boxes.

The rules follow the authors' released ``FeatureLoss`` (see ``tests/fixtures`` and the fixture
README), with one deliberate difference: boxes are scaled by the *input batch* size (padding
included) rather than by the unpadded image size, because the feature map covers the padded batch.

For a feature map of ``H x W`` cells and an input batch of ``H_in x W_in`` pixels, a box
``(x1, y1, x2, y2)`` is scaled to cell units (``x / W_in * W``, ``y / H_in * H``), its edges are
rounded outwards (``floor`` for x1, y1 and ``ceil`` for x2, y2) and it covers the *inclusive* cell
range ``[floor(y1), ceil(y2)] x [floor(x1), ceil(x2)]``, clipped to the map. Its weight is
``1 / ((ceil(y2) - floor(y1) + 1) * (ceil(x2) - floor(x1) + 1))``, the count taken before
clipping. Where boxes overlap, the larger weight (the smaller box) wins. The background mask is 1
where no box lies, divided by its sum for that image; it stays all zero when boxes cover the map.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torch.nn.utils.rnn import pad_sequence

__all__ = ["fgd_masks"]


def _check_hw(name: str, value: tuple[float, float]) -> tuple[float, float]:
    try:
        first, second = value
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a pair (H, W), got {value!r}") from None
    if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in (first, second)):
        raise ValueError(f"{name} must hold two numbers, got {value!r}")
    if not (first > 0 and second > 0):
        raise ValueError(f"{name} must be positive, got {value!r}")
    return first, second


def fgd_masks(
    boxes: Sequence[Tensor],
    feature_hw: tuple[int, int],
    batch_shape: tuple[int, int],
    *,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> tuple[Tensor, Tensor]:
    """Foreground and background masks of FGD for one feature level.

    Vectorised over images and boxes: the boxes are padded into one ``[N, K_max, 4]`` tensor (with
    NaN rows, which cover no cell), each box's row and column ranges are compared against
    ``arange`` vectors, and the weights are reduced with a max over boxes. No value is read back
    to the host, so the function runs without synchronisation on CUDA.

    Args:
        boxes: N tensors ``FloatTensor[K_i, 4]``, xyxy in pixels of the input batch; ``K_i`` may
            be 0.
        feature_hw: ``(H, W)`` of the feature map.
        batch_shape: ``(H_in, W_in)`` of the input batch, padding included.
        dtype: floating dtype of the masks; default: the boxes' dtype if floating, else float32.
        device: device of the masks; default: the boxes' device (CPU when ``boxes`` is empty).

    Returns:
        ``(fg [N, H, W], bg [N, H, W])``. ``fg`` holds each covered cell's largest box weight and
        0 elsewhere; ``bg`` is 1 / (number of uncovered cells) on uncovered cells, else 0.

    Raises:
        ValueError: a box tensor is not ``[K, 4]``, or a size is not a positive pair.
    """
    height, width = _check_hw("feature_hw", feature_hw)
    if not (isinstance(height, int) and isinstance(width, int)):
        raise ValueError(f"feature_hw must hold two ints, got {feature_hw!r}")
    in_height, in_width = _check_hw("batch_shape", batch_shape)
    for i, b in enumerate(boxes):
        if not isinstance(b, Tensor):
            raise ValueError(f"boxes[{i}] must be a torch.Tensor, got {type(b).__name__}")
        if b.dim() != 2 or b.shape[1] != 4:
            raise ValueError(f"boxes[{i}] must have shape [K, 4], got {tuple(b.shape)}")

    if device is None:
        device = boxes[0].device if len(boxes) > 0 else torch.device("cpu")
    if dtype is None:
        dtype = boxes[0].dtype if len(boxes) > 0 and boxes[0].is_floating_point() else torch.float32
    if not dtype.is_floating_point:
        raise ValueError(f"mask dtype must be floating point, got {dtype}")
    n = len(boxes)
    k_max = max((b.shape[0] for b in boxes), default=0)

    if k_max == 0:
        fg = torch.zeros((n, height, width), dtype=dtype, device=device)
    else:
        # Do the scaling in at least the boxes' own precision (the reference works in the boxes'
        # dtype, and floor/ceil are sensitive to it).
        work_dtype = torch.promote_types(dtype, boxes[0].dtype) if n else dtype
        if not work_dtype.is_floating_point:
            work_dtype = dtype
        padded = pad_sequence(
            [b.to(device=device, dtype=work_dtype) for b in boxes],
            batch_first=True,
            padding_value=float("nan"),
        )  # [N, K_max, 4]; padding rows are NaN and cover nothing
        x1 = torch.floor(padded[..., 0] / in_width * width)
        y1 = torch.floor(padded[..., 1] / in_height * height)
        x2 = torch.ceil(padded[..., 2] / in_width * width)
        y2 = torch.ceil(padded[..., 3] / in_height * height)
        weight = 1.0 / ((y2 - y1 + 1.0) * (x2 - x1 + 1.0))  # [N, K_max], count before clipping

        rows = torch.arange(height, device=device, dtype=work_dtype)
        cols = torch.arange(width, device=device, dtype=work_dtype)
        in_rows = (rows >= y1[..., None]) & (rows <= y2[..., None])  # [N, K_max, H]
        in_cols = (cols >= x1[..., None]) & (cols <= x2[..., None])  # [N, K_max, W]
        # A row weight that is 0 outside the box's rows; NaN boxes never pass the comparisons.
        row_weight = torch.where(in_rows, weight[..., None], 0.0).to(dtype)  # [N, K_max, H]
        covered = row_weight[..., :, None] * in_cols[..., None, :].to(dtype)  # [N, K, H, W]
        fg = covered.amax(dim=1)

    bg = (fg == 0).to(dtype)
    bg = bg / bg.sum(dim=(1, 2), keepdim=True).clamp_min(1.0)
    return fg, bg
