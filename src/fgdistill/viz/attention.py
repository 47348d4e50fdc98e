"""Pictures of what FGD distils: spatial and channel attention of teacher and student, and masks.

FGD (Yang et al., CVPR 2022, Figure 1) rests on one observation: the teacher's and the student's
attention differ, most of all on the foreground. :func:`plot_attention` draws, for each FPN level
of one image, the image as the network saw it, the teacher's and the student's spatial attention,
their absolute difference, FGD's foreground and background masks laid over the image (when
boxes are given), and the channel attention of teacher, student and an optional baseline
student. Every map comes from :mod:`fgdistill.losses.attention` and
:mod:`fgdistill.losses.masks`, the very functions the loss uses; nothing is recomputed here.

:func:`extract_features` gets the features the way the distiller does: the student's transform
runs once, and its padded batch goes through every backbone.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from torch import Tensor, nn

from fgdistill.errors import CompatibilityError, DataError
from fgdistill.losses import attention as _attention
from fgdistill.losses import masks as _masks
from fgdistill.models import levels as _levels

__all__ = [
    "ATTENTION_CAPTION",
    "AttentionFeatures",
    "AttentionFigure",
    "extract_features",
    "load_gt_boxes",
    "plot_attention",
]

logger = logging.getLogger(__name__)

ATTENTION_CAPTION = (
    "One row per FPN level (p3 has stride 8, p4 16, ...). From the left: the image as the "
    "network saw it (resized; grey is padding; cyan boxes are ground truth); the teacher's and "
    "the student's spatial attention A_s = H*W * softmax(mean_c |F| / t) over positions, on one "
    "colour scale per row (1.0 = average, brighter = where the features are strong); the "
    "absolute difference |A_s teacher - A_s student|, which FGD's attention loss shrinks (the "
    "number is its sum over the map); with ground truth, FGD's foreground mask (weight "
    "1 / box area in cells, so small objects weigh more) and background mask (1 / number of "
    "background cells) over the image; and the channel attention A_c of every channel, sorted "
    "by the teacher's value, with each student's L1 distance to the teacher in the legend. A "
    "student distilled with FGD should be closer to the teacher (smaller differences, curves "
    "nearer the black one) than a baseline student trained without it."
)


# ----------------------------------------------------------------------------------------------
# inputs


@dataclass
class AttentionFeatures:
    """FPN features of teacher, student and optional baseline on one padded input batch.

    Attributes:
        image: ``FloatTensor[3, h, w]`` in ``[0, 1]``: the resized image the networks saw,
            without the padding (``h <= H_in``, ``w <= W_in``).
        batch_shape: ``(H_in, W_in)`` of the padded batch.
        boxes: ``FloatTensor[K, 4]`` xyxy in batch pixels, or ``None`` without ground truth.
        teacher, student, baseline: ``{level: FloatTensor[1, C, H, W]}`` keyed ``"p3"``, ...
    """

    image: Tensor
    batch_shape: tuple[int, int]
    boxes: Tensor | None
    teacher: dict[str, Tensor]
    student: dict[str, Tensor]
    baseline: dict[str, Tensor] | None = None


def _named_levels(model: nn.Module, feats: Mapping[str, Tensor]) -> dict[str, Tensor]:
    mapping = _levels.feature_levels(model)
    return {level: feats[key] for level, key in mapping.items() if key in feats}


@torch.no_grad()
def extract_features(
    student: nn.Module,
    teacher: nn.Module,
    image: Tensor,
    *,
    boxes: Tensor | None = None,
    baseline: nn.Module | None = None,
) -> AttentionFeatures:
    """Run the student's transform once and every backbone on its padded batch.

    This is what the distiller does in training: the teacher never runs its own transform, so
    both see exactly the same pixels. The models run in eval mode (the student's transform
    then resizes to its test size) and are put back in their former mode afterwards.

    Args:
        student: a torchvision-style detector with ``.transform`` and ``.backbone``.
        teacher: the same, for the teacher (only its backbone runs).
        image: ``FloatTensor[3, H, W]`` in ``[0, 1]`` (``uint8`` is scaled).
        boxes: optional ``FloatTensor[K, 4]``, xyxy in the pixels of ``image``; returned scaled
            to the batch.
        baseline: an optional second student (e.g. trained without FGD), run on the same batch.

    Returns:
        :class:`AttentionFeatures` with the levels named by stride (``"p3"`` = stride 8).

    Raises:
        DataError: ``image`` or ``boxes`` has the wrong shape.
    """
    image = _check_image(image)
    if boxes is not None:
        boxes = _check_boxes(boxes)
    models = {"student": student, "teacher": teacher}
    if baseline is not None:
        models["baseline"] = baseline
    for name, m in models.items():
        if name != "student":
            _warn_if_normalised_differently(student, m, name)
    modes = {sub: sub.training for m in models.values() for sub in m.modules()}
    try:
        for m in models.values():
            m.eval()
        device = next(student.parameters()).device
        targets = None
        if boxes is not None:
            labels = torch.ones(len(boxes), dtype=torch.int64, device=device)
            targets = [{"boxes": boxes.to(device), "labels": labels}]
        transform = student.transform
        if not isinstance(transform, nn.Module):
            raise CompatibilityError("the student has no .transform module (torchvision style)")
        batch, targets_out = transform([image.to(device)], targets)
        tensors = batch.tensors
        batch_shape = (int(tensors.shape[-2]), int(tensors.shape[-1]))
        h, w = (int(v) for v in batch.image_sizes[0])
        shown = _unnormalise(transform, tensors[0, :, :h, :w], image)
        feats = {name: _named_levels(m, _backbone(m)(tensors)) for name, m in models.items()}
    finally:
        for sub, mode in modes.items():  # per module: frozen parts stay in eval mode
            sub.training = mode
    scaled = targets_out[0]["boxes"].float().cpu() if targets_out is not None else None
    return AttentionFeatures(
        image=shown.cpu(),
        batch_shape=batch_shape,
        boxes=scaled,
        teacher={k: v.float().cpu() for k, v in feats["teacher"].items()},
        student={k: v.float().cpu() for k, v in feats["student"].items()},
        baseline=(
            {k: v.float().cpu() for k, v in feats["baseline"].items()}
            if "baseline" in feats
            else None
        ),
    )


def _warn_if_normalised_differently(student: nn.Module, other: nn.Module, name: str) -> None:
    """The other model sees the student's normalised batch; say so if it expects another."""
    s_tf, o_tf = getattr(student, "transform", None), getattr(other, "transform", None)
    for attr in ("image_mean", "image_std"):
        s_val, o_val = getattr(s_tf, attr, None), getattr(o_tf, attr, None)
        if s_val is not None and o_val is not None and list(s_val) != list(o_val):
            logger.warning(
                "the %s normalises images with %s %s, the student with %s: it sees the "
                "student's batch, as in distillation, so its maps may be off",
                name,
                attr,
                list(o_val),
                list(s_val),
            )


def _backbone(model: nn.Module) -> nn.Module:
    backbone = getattr(model, "backbone", None)
    if not isinstance(backbone, nn.Module):
        raise CompatibilityError(
            f"{type(model).__name__} has no .backbone module (torchvision-style detector)"
        )
    return backbone


def _unnormalise(transform: nn.Module, normalised: Tensor, original: Tensor) -> Tensor:
    """The resized image in ``[0, 1]``, undoing the transform's normalisation when it has one."""
    mean = getattr(transform, "image_mean", None)
    std = getattr(transform, "image_std", None)
    if mean is not None and std is not None:
        m = torch.as_tensor(mean, dtype=normalised.dtype, device=normalised.device)[:, None, None]
        s = torch.as_tensor(std, dtype=normalised.dtype, device=normalised.device)[:, None, None]
        return (normalised * s + m).clamp(0, 1)
    size = tuple(normalised.shape[-2:])
    return torch.nn.functional.interpolate(
        original[None].float(), size=size, mode="bilinear", align_corners=False
    )[0].clamp(0, 1)


# ----------------------------------------------------------------------------------------------
# the figure


@dataclass
class AttentionFigure:
    """What :func:`plot_attention` drew, for reports and tests.

    Attributes:
        path: the PNG written.
        size: ``(width, height)`` of the PNG in pixels.
        levels: the FPN levels drawn, one row each, top to bottom.
        columns: the panel names of every row, left to right.
        spatial: ``{level: {name: ndarray[H, W]}}``, the arrays drawn in the map panels:
            ``"teacher"``, ``"student"``, ``"|teacher-student|"``, ``"fg mask"``, ``"bg mask"``,
            ``"|teacher-baseline|"``, and ``"baseline"`` (the baseline's own map, which is
            shown through its difference to the teacher).
        channel: ``{level: {"teacher" | "student" | "baseline": ndarray[C]}}``, the channel
            attention drawn (in channel order, before sorting for display).
        distance: ``{level: {"student" | "baseline": {"spatial": float, "channel": float}}}``,
            each model's L1 distance to the teacher, ``sum |A_s^T - A_s|`` and
            ``sum |A_c^T - A_c|`` (FGD's unweighted attention loss for one image); ``channel``
            is NaN when the channel counts differ. Numbers for a report's table.
        caption: how to read the picture (for reports).
    """

    path: Path
    size: tuple[int, int]
    levels: list[str]
    columns: list[str]
    spatial: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    channel: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    distance: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)
    caption: str = ATTENTION_CAPTION


_PANEL_IN = 2.6  # inches per panel side
_TITLE_IN = 0.6  # inches above the panels for the figure's title


def plot_attention(
    image: Tensor,
    teacher: Mapping[str, Tensor],
    student: Mapping[str, Tensor],
    out: str | Path,
    *,
    boxes: Tensor | None = None,
    batch_shape: tuple[int, int] | None = None,
    temperature: float = 0.5,
    baseline: Mapping[str, Tensor] | None = None,
    levels: Sequence[str] | None = None,
    title: str | None = None,
    dpi: int = 100,
) -> AttentionFigure:
    """Draw teacher and student attention per FPN level, with FGD's masks, into a PNG.

    Args:
        image: ``FloatTensor[3, h, w]`` in ``[0, 1]`` (``uint8`` is scaled): the resized,
            unpadded image, placed at the top-left of the batch as the transform does.
        teacher: ``{level: FloatTensor[1, C_t, H, W]}`` from the teacher's backbone.
        student: ``{level: FloatTensor[1, C_s, H, W]}`` on the same batch (same ``H, W``).
        out: the PNG to write (parent directories are created).
        boxes: optional ``FloatTensor[K, 4]``, xyxy in batch pixels; adds the fg and bg mask
            panels (``K`` may be 0: no foreground).
        batch_shape: ``(H_in, W_in)`` of the padded batch; default ``(h, w)`` (no padding).
        temperature: the FGD temperature ``t`` (0.5 in the paper, 0.8 for FCOS).
        baseline: optional ``{level: FloatTensor[1, C_b, H, W]}`` of a second student (e.g.
            trained without FGD) on the same batch; adds its difference panel and its curve in
            the channel plot.
        levels: the levels to draw, e.g. ``["p3", "p5"]``; default: every level both have.
        title: heading of the figure.
        dpi: resolution; every panel is 2.6 x 2.6 inches.

    Returns:
        An :class:`AttentionFigure` with the path, pixel size, layout and the arrays drawn.

    Raises:
        DataError: a shape is wrong, or a requested level is missing.
        CompatibilityError: teacher and student maps of a level differ in size.
    """
    image = _check_image(image)
    h_img, w_img = int(image.shape[1]), int(image.shape[2])
    if batch_shape is None:
        batch_shape = (h_img, w_img)
    h_in, w_in = int(batch_shape[0]), int(batch_shape[1])
    if h_in < h_img or w_in < w_img:
        raise DataError(
            f"batch_shape {tuple(batch_shape)} is smaller than the image {h_img}x{w_img}"
        )
    if not temperature > 0:
        raise DataError(f"temperature must be > 0, got {temperature}")
    if boxes is not None:
        boxes = _check_boxes(boxes)
    chosen = _choose_levels(teacher, student, baseline, levels)
    feats = {lvl: _level_features(lvl, teacher, student, baseline) for lvl in chosen}

    columns = ["image", "teacher", "student", "|teacher-student|"]
    if baseline is not None:
        columns.append("|teacher-baseline|")
    if boxes is not None:
        columns += ["fg mask", "bg mask"]
    columns.append("channel attention")

    nrows, ncols = len(chosen), len(columns)
    width_in, height_in = _PANEL_IN * ncols, _PANEL_IN * nrows + _TITLE_IN
    fig = plt.figure(figsize=(width_in, height_in), dpi=dpi)
    # A fixed grid (no layout engine): same pixel size every time, and fast to draw.
    grid = fig.subplots(
        nrows,
        ncols,
        squeeze=False,
        gridspec_kw={
            "left": 0.45 / width_in,
            "right": 1 - 0.1 / width_in,
            "top": 1 - (_TITLE_IN + 0.3) / height_in,
            "bottom": 0.45 / height_in,
            "wspace": 0.35,
            "hspace": 0.45,
        },
    )
    result = AttentionFigure(
        path=Path(out), size=(0, 0), levels=list(chosen), columns=list(columns)
    )
    picture = image.permute(1, 2, 0).numpy()
    try:
        for row, level in enumerate(chosen):
            roles = feats[level]
            spatial = {
                k: _attention.spatial_attention(v, temperature)[0].numpy() for k, v in roles.items()
            }
            channel = {
                k: _attention.channel_attention(v, temperature)[0].numpy() for k, v in roles.items()
            }
            drawn: dict[str, np.ndarray] = dict(spatial)
            drawn["|teacher-student|"] = np.abs(spatial["teacher"] - spatial["student"])
            if "baseline" in spatial:
                drawn["|teacher-baseline|"] = np.abs(spatial["teacher"] - spatial["baseline"])
            hw = (int(roles["teacher"].shape[-2]), int(roles["teacher"].shape[-1]))
            if boxes is not None:
                fg, bg = _masks.fgd_masks([boxes], hw, (h_in, w_in))
                drawn["fg mask"], drawn["bg mask"] = fg[0].numpy(), bg[0].numpy()
            result.spatial[level] = drawn
            result.channel[level] = channel
            result.distance[level] = {
                role: {
                    "spatial": float(np.abs(spatial["teacher"] - spatial[role]).sum()),
                    "channel": (
                        float(np.abs(channel["teacher"] - channel[role]).sum())
                        if channel[role].shape == channel["teacher"].shape
                        else float("nan")
                    ),
                }
                for role in spatial
                if role != "teacher"
            }
            label = f"{level}: stride {_level_stride(level, h_in / hw[0]):g}, {hw[0]}x{hw[1]} cells"
            _draw_row(fig, list(grid[row]), columns, drawn, channel, picture, (h_in, w_in), boxes)
            grid[row][0].set_ylabel(label, fontsize=10)
            grid[row][0].set_title("input image" if row == 0 else "", fontsize=10)

        heading = title or "Teacher vs student attention"
        fig.suptitle(f"{heading}  (temperature t = {temperature:g})", fontsize=12)
        path = Path(out)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=dpi)
        result.size = _pixel_size(fig, dpi)
    finally:
        plt.close(fig)
    logger.debug("wrote attention figure %s", path)
    return result


def _level_features(
    level: str,
    teacher: Mapping[str, Tensor],
    student: Mapping[str, Tensor],
    baseline: Mapping[str, Tensor] | None,
) -> dict[str, Tensor]:
    """``{"teacher", "student"[, "baseline"]: FloatTensor[1, C, H, W]}`` of one level, checked."""
    roles = {
        "teacher": _check_feature(teacher[level], f"teacher[{level!r}]"),
        "student": _check_feature(student[level], f"student[{level!r}]"),
    }
    if baseline is not None:
        roles["baseline"] = _check_feature(baseline[level], f"baseline[{level!r}]")
    hw = tuple(roles["teacher"].shape[-2:])
    for name, feat in roles.items():
        if tuple(feat.shape[-2:]) != hw:
            raise CompatibilityError(
                f"level {level}: teacher map is {hw[0]}x{hw[1]} but {name} map is "
                f"{feat.shape[-2]}x{feat.shape[-1]}; they must come from the same input batch"
            )
    return roles


def _draw_row(
    fig: Figure,
    axes: list[Axes],
    columns: Sequence[str],
    drawn: Mapping[str, np.ndarray],
    channel: Mapping[str, np.ndarray],
    picture: np.ndarray,
    batch_shape: tuple[int, int],
    boxes: Tensor | None,
) -> None:
    """Draw one level's panels, left to right, in the order of ``columns``."""
    h_in, w_in = batch_shape
    h_img, w_img = picture.shape[:2]
    extent = (0.0, float(w_in), float(h_in), 0.0)
    att_max = max(float(drawn[k].max()) for k in channel)  # one scale for all the models
    diff_max = max(float(drawn[k].max()) for k in drawn if k.startswith("|")) or 1.0
    for ax, name in zip(axes, columns, strict=True):
        if name == "image":
            _draw_image(ax, picture, h_img, w_img, h_in, w_in, boxes)
        elif name in ("teacher", "student"):
            title = f"{name} spatial attention"
            _draw_map(fig, ax, drawn[name], extent, boxes, "viridis", 0.0, att_max, title)
        elif name.startswith("|"):
            other = name[len("|teacher-") : -1]
            title = f"|teacher − {other}|  sum {drawn[name].sum():.3g}"
            _draw_map(fig, ax, drawn[name], extent, boxes, "inferno", 0.0, diff_max, title)
        elif name in ("fg mask", "bg mask"):
            _draw_mask(fig, ax, picture, drawn[name], h_img, w_img, h_in, w_in, extent, name, boxes)
        else:
            _draw_channels(ax, channel)
        if name not in ("image", "channel attention"):
            ax.set_xticks([])
            ax.set_yticks([])


def _pixel_size(fig: Figure, dpi: int) -> tuple[int, int]:
    width, height = fig.get_size_inches() * dpi
    return round(float(width)), round(float(height))


def _choose_levels(
    teacher: Mapping[str, Tensor],
    student: Mapping[str, Tensor],
    baseline: Mapping[str, Tensor] | None,
    levels: Sequence[str] | None,
) -> list[str]:
    available = [k for k in teacher if k in student and (baseline is None or k in baseline)]
    if levels is None:
        if not available:
            raise CompatibilityError(
                f"teacher levels {sorted(teacher)} and student levels {sorted(student)} "
                "have none in common"
            )
        return sorted(available, key=_level_order)
    chosen = list(dict.fromkeys(levels))
    missing = [lvl for lvl in chosen if lvl not in available]
    if missing:
        raise DataError(
            f"level(s) {', '.join(missing)} not available; the models have "
            f"{', '.join(sorted(available, key=_level_order)) or 'none in common'}"
        )
    if not chosen:
        raise DataError("no levels to draw")
    return chosen


def _level_stride(level: str, measured: float) -> float:
    """``2**k`` for a level named ``"pk"``; the measured ratio for any other name."""
    digits = level[1:] if level[:1] == "p" else ""
    return float(2 ** int(digits)) if digits.isdigit() else measured


def _level_order(name: str) -> tuple[int, str]:
    digits = name[1:] if name[:1] == "p" else ""
    return (int(digits), name) if digits.isdigit() else (1000, name)


def _check_image(image: Tensor) -> Tensor:
    if not isinstance(image, Tensor) or image.dim() != 3 or image.shape[0] != 3:
        shape = tuple(image.shape) if isinstance(image, Tensor) else type(image).__name__
        raise DataError(f"image must be a [3, H, W] tensor, got {shape}")
    if image.dtype == torch.uint8:
        return image.float() / 255.0
    if not image.is_floating_point():
        raise DataError(f"image must be float in [0, 1] or uint8, got {image.dtype}")
    return image.detach().float().cpu()


def _check_boxes(boxes: Tensor) -> Tensor:
    if not isinstance(boxes, Tensor) or boxes.dim() != 2 or boxes.shape[1] != 4:
        shape = tuple(boxes.shape) if isinstance(boxes, Tensor) else type(boxes).__name__
        raise DataError(f"boxes must be a [K, 4] xyxy tensor, got {shape}")
    return boxes.detach().float().cpu()


def _check_feature(feat: Tensor, name: str) -> Tensor:
    if not isinstance(feat, Tensor) or feat.dim() != 4 or feat.shape[0] != 1:
        shape = tuple(feat.shape) if isinstance(feat, Tensor) else type(feat).__name__
        raise DataError(f"{name} must be a [1, C, H, W] tensor (one image), got {shape}")
    return feat.detach().float().cpu()


# ----------------------------------------------------------------------------------------------
# panels


def _draw_boxes(ax: Axes, boxes: Tensor | None, colour: str = "cyan") -> None:
    if boxes is None:
        return
    for x1, y1, x2, y2 in boxes.tolist():
        ax.add_patch(
            Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, edgecolor=colour, linewidth=1.0)
        )


def _frame(ax: Axes, h_in: int, w_in: int) -> None:
    ax.set_xlim(0, w_in)
    ax.set_ylim(h_in, 0)
    ax.set_facecolor("#9a9a9a")  # the padding


def _draw_image(
    ax: Axes,
    picture: np.ndarray,
    h_img: int,
    w_img: int,
    h_in: int,
    w_in: int,
    boxes: Tensor | None,
) -> None:
    ax.imshow(picture, extent=(0, w_img, h_img, 0), interpolation="bilinear")
    _draw_boxes(ax, boxes)
    _frame(ax, h_in, w_in)
    ax.tick_params(labelsize=7)


def _draw_map(
    fig: Figure,
    ax: Axes,
    values: np.ndarray,
    extent: tuple[float, float, float, float],
    boxes: Tensor | None,
    cmap: str,
    vmin: float,
    vmax: float,
    title: str,
) -> None:
    shown = ax.imshow(
        values, extent=extent, cmap=cmap, vmin=vmin, vmax=vmax, interpolation="nearest"
    )
    _draw_boxes(ax, boxes, "white")
    ax.set_title(title, fontsize=9)
    fig.colorbar(shown, ax=ax, fraction=0.046, pad=0.02).ax.tick_params(labelsize=7)


def _draw_mask(
    fig: Figure,
    ax: Axes,
    picture: np.ndarray,
    mask: np.ndarray,
    h_img: int,
    w_img: int,
    h_in: int,
    w_in: int,
    extent: tuple[float, float, float, float],
    name: str,
    boxes: Tensor | None,
) -> None:
    ax.imshow(picture.mean(axis=2), cmap="gray", vmin=0, vmax=1, extent=(0, w_img, h_img, 0))
    _frame(ax, h_in, w_in)
    covered = np.ma.masked_equal(mask, 0.0)
    cells = int((mask > 0).sum())
    if name == "fg mask":
        vmax = float(mask.max()) if cells else 1.0
        shown = ax.imshow(
            covered,
            extent=extent,
            cmap="autumn",
            alpha=0.65,
            vmin=0.0,
            vmax=vmax,
            interpolation="nearest",
        )
        _draw_boxes(ax, boxes)
        label = f"FGD fg mask: {_cells(cells)}" if cells else "FGD fg mask: empty (no boxes)"
        bar = fig.colorbar(shown, ax=ax, fraction=0.046, pad=0.02)
        bar.ax.tick_params(labelsize=7)
        bar.set_label("weight 1/box area", fontsize=7)
    else:
        ax.imshow(
            covered,
            extent=extent,
            cmap="winter",
            alpha=0.55,
            vmin=0.0,
            vmax=max(float(mask.max()), 1e-12),
            interpolation="nearest",
        )
        _draw_boxes(ax, boxes, "white")
        if cells:
            label = f"FGD bg mask: {_cells(cells)}, each 1/{cells}"
        else:
            label = "FGD bg mask: empty (all foreground)"
    ax.set_title(label, fontsize=9)


def _cells(count: int) -> str:
    return f"{count} cell" if count == 1 else f"{count} cells"


_ROLE_STYLE: dict[str, dict[str, Any]] = {
    "teacher": {"color": "black", "linewidth": 1.4, "linestyle": "-"},
    "student": {"color": "tab:orange", "linewidth": 1.1, "linestyle": "-"},
    "baseline": {"color": "tab:blue", "linewidth": 1.0, "linestyle": "--"},
}


def _draw_channels(ax: Axes, channel: Mapping[str, np.ndarray]) -> None:
    teacher = channel["teacher"]
    same = all(len(v) == len(teacher) for v in channel.values())
    if same:
        order = np.argsort(-teacher, kind="stable")
        x: np.ndarray = np.arange(len(teacher))
        for role, values in channel.items():
            label = role
            if role != "teacher":
                label = f"{role} (L1 to teacher {np.abs(values - teacher).sum():.3g})"
            ax.plot(x, values[order], label=label, **_ROLE_STYLE[role])
        ax.set_xlabel("channel (sorted by teacher A_c)", fontsize=8)
    else:
        for role, values in channel.items():
            x = np.linspace(0, 1, len(values))
            ax.plot(
                x, np.sort(values)[::-1], label=f"{role} ({len(values)} ch)", **_ROLE_STYLE[role]
            )
        ax.set_xlabel("channel rank / count (counts differ)", fontsize=8)
    ax.axhline(1.0, color="grey", linewidth=0.6, linestyle=":")
    values = np.concatenate([np.asarray(v, dtype=np.float64) for v in channel.values()])
    low, high = float(values.min()), float(values.max())
    if low > 0 and high / low > 50:  # one dominant channel would flatten all the others
        ax.set_yscale("log")
        # Below 1e-3 a channel carries no weight worth seeing; do not let such values (down to
        # 1e-40 on an untrained teacher) squeeze the rest into the top of the plot.
        ax.set_ylim(max(low, 1e-3) / 1.5, high * 1.5)
        ax.set_title("channel attention A_c (log scale)", fontsize=9)
    else:
        ax.set_title("channel attention A_c", fontsize=9)
    ax.tick_params(labelsize=7)
    ax.legend(fontsize=6.5, loc="upper right")
    ax.grid(alpha=0.3)


def load_gt_boxes(ann_file: str | Path, image_names: Sequence[str]) -> dict[str, torch.Tensor]:
    """Ground-truth boxes of the named images from a COCO annotation file, as training sees them.

    The file is read and validated by the dataset class, and each image's boxes are its training
    target's: crowd annotations and degenerate boxes left out, boxes clipped to the image. So
    the foreground masks drawn from them are the masks the loss uses. Images are matched by file
    name (the base name of ``file_name``; the first entry of a repeated name).

    Args:
        ann_file: COCO-format instances JSON.
        image_names: base names of the image files.

    Returns:
        ``{name: FloatTensor[K, 4]}`` xyxy in the image's pixels, for each name found (``K`` may
        be 0); names not in the file are absent.

    Raises:
        DataError: the file is missing or not a valid COCO instances file (naming the entry).
    """
    from fgdistill.data.coco import CocoDetection

    path = Path(ann_file)
    if not path.is_file():
        raise DataError(f"annotation file {path} not found")
    dataset = CocoDetection(path, path.parent, train=True, filter_empty=False)
    wanted = set(image_names)
    boxes: dict[str, torch.Tensor] = {}
    for info in dataset.index.images:
        name = Path(info.file_name).name
        if name in wanted and name not in boxes:
            boxes[name] = dataset.target(info)["boxes"]
    return boxes
