"""Drawing detections on images: boxes, labels and scores (``fgdistill predict``'s pictures)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

__all__ = ["PALETTE", "draw_detections", "to_pil", "unique_png_names"]

#: Distinct colours, one per label (cycled).
PALETTE: tuple[tuple[int, int, int], ...] = (
    (230, 25, 75),
    (60, 180, 75),
    (0, 130, 200),
    (245, 130, 48),
    (145, 30, 180),
    (70, 240, 240),
    (240, 50, 230),
    (210, 245, 60),
    (250, 190, 212),
    (0, 128, 128),
    (170, 110, 40),
    (128, 0, 0),
)


def to_pil(image: torch.Tensor | np.ndarray | Image.Image) -> Image.Image:
    """An RGB PIL image from a ``FloatTensor[3, H, W]`` in [0, 1], an ``HxWx3`` uint8 array or
    a PIL image of any mode (grey and RGBA are converted)."""
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if isinstance(image, torch.Tensor):
        tensor = image.detach().cpu().clamp(0, 1).mul(255).round().byte()
        if tensor.ndim == 3 and tensor.shape[0] in (1, 3):
            tensor = tensor.permute(1, 2, 0)
        array = tensor.numpy()
    else:
        array = np.asarray(image)
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    return Image.fromarray(array.astype(np.uint8)).convert("RGB")


def draw_detections(
    image: torch.Tensor | np.ndarray | Image.Image,
    boxes: torch.Tensor | Sequence[Sequence[float]],
    labels: torch.Tensor | Sequence[int],
    scores: torch.Tensor | Sequence[float] | None = None,
    *,
    names: Sequence[str] | None = None,
    score_threshold: float = 0.0,
    line_width: int | None = None,
    masks: torch.Tensor | None = None,
    mask_threshold: float = 0.5,
) -> Image.Image:
    """Return a copy of ``image`` with boxes, label names and scores drawn.

    Args:
        image: see :func:`to_pil`.
        boxes: ``FloatTensor[N, 4]``, xyxy in pixels of ``image``.
        labels: ``Int64Tensor[N]``, contiguous labels (1..K; 0 is background).
        scores: ``FloatTensor[N]`` or ``None`` (ground truth).
        names: ``names[label - 1]`` is the text drawn for a label; labels are drawn as numbers
            without it.
        score_threshold: detections below it are left out.
        line_width: box outline width; default scales with the image size.
        masks: optional instance masks, ``FloatTensor[N, 1, H, W]`` or ``[N, H, W]`` in [0, 1]
            (Mask R-CNN's ``"masks"`` output) in the order of ``boxes``; each is filled with its
            label's colour, half transparent, where it exceeds ``mask_threshold``.
    """
    canvas = to_pil(image).copy()
    font = ImageFont.load_default()
    box_list = torch.as_tensor(boxes, dtype=torch.float32).reshape(-1, 4).tolist()
    label_list = [int(x) for x in torch.as_tensor(labels).reshape(-1).tolist()]
    score_list: list[float | None] = (
        [float(x) for x in torch.as_tensor(scores).reshape(-1).tolist()]
        if scores is not None
        else [None] * len(box_list)
    )
    if line_width is None:
        line_width = max(1, round(max(canvas.size) / 200))
    order = sorted(range(len(box_list)), key=lambda i: score_list[i] or 0.0)
    if masks is not None:
        keep = [i for i in order if (sc := score_list[i]) is None or sc >= score_threshold]
        if int(torch.as_tensor(masks).shape[0]) != len(box_list):
            raise ValueError(f"got {len(torch.as_tensor(masks))} masks for {len(box_list)} boxes")
        canvas = _paint_masks(canvas, masks, keep, [label_list[i] for i in keep], mask_threshold)
    draw = ImageDraw.Draw(canvas)
    for i in order:  # highest scores drawn last, on top
        score = score_list[i]
        if score is not None and score < score_threshold:
            continue
        x1, y1, x2, y2 = box_list[i]
        label = label_list[i]
        colour = PALETTE[label % len(PALETTE)]
        draw.rectangle((x1, y1, x2, y2), outline=colour, width=line_width)
        name = names[label - 1] if names is not None and 0 < label <= len(names) else str(label)
        text = name if score is None else f"{name} {score:.2f}"
        left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
        tw, th = right - left, bottom - top
        ty = y1 - th - 2 if y1 - th - 2 >= 0 else y1
        draw.rectangle((x1, ty, x1 + tw + 2, ty + th + 2), fill=colour)
        draw.text((x1 + 1, ty), text, fill=(255, 255, 255), font=font)
    return canvas


def _paint_masks(
    canvas: Image.Image,
    masks: torch.Tensor,
    keep: Sequence[int],
    labels: Sequence[int],
    threshold: float,
    alpha: float = 0.45,
) -> Image.Image:
    """Blend each kept mask (``masks[i] > threshold``) with its label's colour."""
    m = torch.as_tensor(masks).detach().cpu()
    if m.ndim == 4 and m.shape[1] == 1:
        m = m[:, 0]
    width, height = canvas.size
    if m.ndim != 3 or tuple(m.shape[1:]) != (height, width):
        raise ValueError(
            f"masks must be [N, 1, H, W] or [N, H, W] with H, W = {height}, {width} (the "
            f"image's size), got {tuple(torch.as_tensor(masks).shape)}"
        )
    array = np.asarray(canvas, dtype=np.float32).copy()
    for i, label in zip(keep, labels, strict=True):
        area = (m[i] > threshold).numpy()
        colour = np.asarray(PALETTE[label % len(PALETTE)], dtype=np.float32)
        array[area] = (1 - alpha) * array[area] + alpha * colour
    return Image.fromarray(array.round().clip(0, 255).astype(np.uint8))


def unique_png_names(stems: Sequence[str]) -> list[str]:
    """``<stem>.png`` for each stem, in order; a repeated name gets ``_2``, ``_3``, ... until it
    is new, so no picture overwrites another (``a``, ``a``, ``a_2`` give ``a.png``,
    ``a_2.png``, ``a_2_2.png``)."""
    names: list[str] = []
    taken: set[str] = set()
    for stem in stems:
        name, k = f"{stem}.png", 2
        while name in taken:
            name, k = f"{stem}_{k}.png", k + 1
        taken.add(name)
        names.append(name)
    return names
