"""RepPoints detector (Yang et al., "RepPoints: Point Set Representation for Object Detection",
ICCV 2019), following torchvision's detector contract.

The model has the same outer shape as :class:`torchvision.models.detection.RetinaNet`:

- ``model.transform`` is a :class:`~torchvision.models.detection.transform.GeneralizedRCNNTransform`
  (resize, normalise, pad to a multiple of 32, rescale boxes);
- ``model.backbone`` is an FPN backbone whose output is an ordered dict of levels P3-P7
  (keys ``'0', '1', '2', 'p6', 'p7'``, strides 8 ... 128), with an ``out_channels`` attribute;
- ``model(images, targets)`` in train mode returns a dict of named loss tensors
  (``classification``, ``bbox_init``, ``bbox_refine``), and in eval mode a list of dicts with
  ``boxes`` (xyxy, original image pixels), ``labels`` (``1 .. num_classes - 1``) and ``scores``.

How it follows the paper (and the authors' released code in mmdetection):

- Each feature location carries ``num_points`` (9) representative points, predicted as
  offsets ``(dy, dx)`` in units of the level's stride from the location's centre.
- Stage 1 (initial points) comes from a GroupNorm conv tower; stage 2 (classification and a
  refinement of the points) comes from a second tower followed by 3x3 deformable convolutions
  (:func:`torchvision.ops.deform_conv2d`) whose 9 sampling positions are the initial points. As in
  the paper's code the points fed to the deformable convolution carry only 0.1 of the gradient
  (``gradient_mul``), and the refined points are ``initial.detach() + refinement``.
- Points become boxes by the moment transform: the box centre is the mean of the points and the
  half sizes are the points' standard deviations times ``exp`` of a learned, shared log-scale
  (the "moment transfer", learned with a 0.01 gradient multiplier as in the released code).
- Stage 1 is assigned by the point assigner: a ground-truth box of size ``w x h`` goes to level
  ``floor(log2(sqrt(w h) / 4))`` (clamped to the available levels) and, on that level, to the
  single location nearest its centre. Stage 2 and the classifier are assigned by max-IoU between
  the ground truth and the (detached) stage-1 boxes: positive at IoU >= 0.5, negative below 0.4,
  and every ground truth also keeps its best-matching location ("low-quality" matches).
- Losses: sigmoid focal loss (alpha 0.25, gamma 2) normalised by the number of stage-2
  positives; smooth L1 (beta 0.11) on boxes divided by ``4 * stride``, weighted 0.5 (stage 1) and
  1.0 (stage 2), each normalised by its number of positives.

The classifier predicts ``num_classes - 1`` sigmoid scores (no background logit); label ``k`` in
the output means class ``k`` of torchvision's convention (``0`` is background).
"""

from __future__ import annotations

import logging
import math
from collections import OrderedDict
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection import _utils as det_utils
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops import batched_nms, clip_boxes_to_image, deform_conv2d, sigmoid_focal_loss

from fgdistill.errors import DataError

__all__ = [
    "RepPoints",
    "RepPointsHead",
    "assign_max_iou",
    "assign_points",
    "deform_conv2d_by_sampling",
    "moment_boxes",
    "pairwise_iou_batched",
    "validate_targets",
]

logger = logging.getLogger(__name__)

# Matched-index codes used by the assigners.
NEGATIVE = -1
IGNORE = -2


# --------------------------------------------------------------------------------------------
# Pure tensor functions
# --------------------------------------------------------------------------------------------


def moment_boxes(points: Tensor, log_scale: Tensor, eps: float = 1e-6) -> Tensor:
    """Moment-based conversion of point sets to boxes.

    Args:
        points: ``FloatTensor[..., P, 2]``, point coordinates as ``(y, x)``.
        log_scale: ``FloatTensor[2]``, the learned moment transfer ``(log s_x, log s_y)``.
        eps: added to the variance so that the gradient stays finite when all points coincide.

    Returns:
        ``FloatTensor[..., 4]`` boxes ``(x1, y1, x2, y2)`` centred on the mean of the points, with
        half width ``std_x * exp(log s_x)`` and half height ``std_y * exp(log s_y)``.
    """
    mean = points.mean(dim=-2)
    var = points.var(dim=-2, correction=0)
    std = torch.sqrt(var + eps)
    cy, cx = mean[..., 0], mean[..., 1]
    half_h = std[..., 0] * torch.exp(log_scale[1])
    half_w = std[..., 1] * torch.exp(log_scale[0])
    return torch.stack((cx - half_w, cy - half_h, cx + half_w, cy + half_h), dim=-1)


def pairwise_iou_batched(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """IoU between every pair of boxes, per image.

    Args:
        boxes1: ``FloatTensor[N, K, 4]`` xyxy.
        boxes2: ``FloatTensor[N, A, 4]`` xyxy.

    Returns:
        ``FloatTensor[N, K, A]``; zero where a union is empty.
    """
    area1 = (boxes1[..., 2] - boxes1[..., 0]).clamp(min=0) * (
        boxes1[..., 3] - boxes1[..., 1]
    ).clamp(min=0)
    area2 = (boxes2[..., 2] - boxes2[..., 0]).clamp(min=0) * (
        boxes2[..., 3] - boxes2[..., 1]
    ).clamp(min=0)
    lt = torch.maximum(boxes1[:, :, None, :2], boxes2[:, None, :, :2])
    rb = torch.minimum(boxes1[:, :, None, 2:], boxes2[:, None, :, 2:])
    wh = (rb - lt).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    union = area1[:, :, None] + area2[:, None, :] - inter
    return torch.where(union > 0, inter / union.clamp(min=1e-12), torch.zeros_like(inter))


def assign_points(
    gt_boxes: Tensor,
    gt_valid: Tensor,
    level_shapes: list[tuple[int, int]],
    strides: list[int],
    base_scale: float = 4.0,
) -> Tensor:
    """Point assigner of the initial stage: each ground truth goes to one location.

    A box of size ``w x h`` goes to level ``floor(log2(sqrt(w h) / base_scale))`` (in units of
    ``log2(stride)``, clamped to the available levels), at the location nearest its centre. When
    two boxes claim one location, the one whose centre is nearer (in units of its own size) wins.

    Args:
        gt_boxes: ``FloatTensor[N, K, 4]`` xyxy, padded per image.
        gt_valid: ``BoolTensor[N, K]``, which of the ``K`` slots hold a real box.
        level_shapes: ``(H_l, W_l)`` of each level, finest first.
        strides: stride of each level, consecutive powers of two, finest first.
        base_scale: the paper's point-assigner scale (4).

    Returns:
        ``LongTensor[N, A]``, ``A = sum H_l W_l``: the matched ground-truth slot, or ``-1``.
    """
    n = gt_valid.shape[0]
    device = gt_boxes.device
    num_locs = [h * w for h, w in level_shapes]
    total = sum(num_locs)
    matched = torch.full((n, total), NEGATIVE, dtype=torch.long, device=device)
    img_idx, gt_idx = torch.nonzero(gt_valid, as_tuple=True)
    if img_idx.numel() == 0:
        return matched

    boxes = gt_boxes[img_idx, gt_idx]
    wh = (boxes[:, 2:] - boxes[:, :2]).clamp(min=1e-6)
    centre = (boxes[:, :2] + boxes[:, 2:]) / 2
    lvl_min = int(math.log2(strides[0]))
    box_lvl = torch.floor(torch.log2(torch.sqrt(wh[:, 0] * wh[:, 1]) / base_scale))
    level = (box_lvl.long() - lvl_min).clamp(0, len(strides) - 1)

    stride_t = torch.tensor(strides, device=device, dtype=boxes.dtype)[level]
    heights = torch.tensor([s[0] for s in level_shapes], device=device)[level]
    widths = torch.tensor([s[1] for s in level_shapes], device=device)[level]
    offsets = torch.tensor([0, *num_locs[:-1]], device=device).cumsum(0)[level]
    # Locations sit at (j * stride, i * stride); round the centre to the nearest one.
    col = torch.minimum(torch.round(centre[:, 0] / stride_t).long().clamp(min=0), widths - 1)
    row = torch.minimum(torch.round(centre[:, 1] / stride_t).long().clamp(min=0), heights - 1)
    loc = offsets + row * widths + col
    point = torch.stack((col, row), dim=1).to(boxes.dtype) * stride_t[:, None]
    dist = ((point - centre) / wh).norm(dim=1)

    # Resolve collisions: sort by distance, keep the first claim on each (image, location).
    flat = img_idx * total + loc
    order = torch.argsort(dist, stable=True)
    flat_sorted = flat[order]
    uniq, inverse = torch.unique(flat_sorted, return_inverse=True)
    positions = torch.arange(flat_sorted.numel(), device=device)
    first = torch.full((uniq.numel(),), flat_sorted.numel(), dtype=torch.long, device=device)
    first = first.scatter_reduce(0, inverse, positions, reduce="amin")
    winners = order[first]
    matched.view(-1)[flat[winners]] = gt_idx[winners]
    return matched


def assign_max_iou(
    iou: Tensor,
    gt_valid: Tensor,
    pos_thresh: float = 0.5,
    neg_thresh: float = 0.4,
    low_quality: bool = True,
) -> Tensor:
    """Max-IoU assigner of the refinement stage.

    Args:
        iou: ``FloatTensor[N, K, A]`` between padded ground truth and the stage-1 boxes.
        gt_valid: ``BoolTensor[N, K]``.
        pos_thresh: IoU at or above which a location is positive.
        neg_thresh: IoU below which a location is negative; in between it is ignored.
        low_quality: also make each ground truth's best location(s) positive (when IoU > 0).

    Returns:
        ``LongTensor[N, A]``: matched slot for positives, ``-1`` negative, ``-2`` ignored.
    """
    n, k, a = iou.shape
    if k == 0:
        return torch.full((n, a), NEGATIVE, dtype=torch.long, device=iou.device)
    iou = torch.where(gt_valid[:, :, None], iou, torch.full_like(iou, -1.0))
    best_iou, best_gt = iou.max(dim=1)
    matched = torch.where(
        best_iou >= pos_thresh,
        best_gt,
        torch.where(
            best_iou < neg_thresh,
            torch.full_like(best_gt, NEGATIVE),
            torch.full_like(best_gt, IGNORE),
        ),
    )
    if low_quality:
        best_per_gt = iou.max(dim=2, keepdim=True).values
        is_best = (iou == best_per_gt) & (best_per_gt > 0) & gt_valid[:, :, None]
        any_best = is_best.any(dim=1)
        # Among the ground truths for which this location is the best, take the highest IoU.
        lq_gt = torch.where(is_best, iou, torch.full_like(iou, -1.0)).argmax(dim=1)
        matched = torch.where(any_best, lq_gt, matched)
    return matched


def deform_conv2d_by_sampling(
    input: Tensor, offset: Tensor, weight: Tensor, bias: Tensor | None = None
) -> Tensor:
    """Deformable convolution (stride 1, "same" padding, one offset group, no mask) computed as
    bilinear sampling (:func:`torch.nn.functional.grid_sample`) followed by one matrix product.

    It computes what ``torchvision.ops.deform_conv2d(input, offset, weight, bias,
    padding=k // 2)`` computes (same zero padding outside the map, same bilinear weights), with
    the weight's groups inferred from its shape. On a CPU it trains several times faster than
    torchvision's kernel, which is single-threaded and slow in backward; it keeps the sampled
    ``[N, C_in * k * k, H * W]`` tensor for backward, so on a GPU torchvision's kernel (which
    recomputes it) is the leaner choice.

    Args:
        input: ``FloatTensor[N, C_in, H, W]``.
        offset: ``FloatTensor[N, 2 k k, H, W]``, pairs ``(dy, dx)`` per kernel tap, row-major.
        weight: ``FloatTensor[C_out, C_in / groups, k, k]`` with ``k`` odd.
        bias: ``FloatTensor[C_out]`` or ``None``.

    Returns:
        ``FloatTensor[N, C_out, H, W]``.
    """
    n, c_in, h, w = input.shape
    c_out, c_per_group, k, _ = weight.shape
    groups = c_in // c_per_group
    taps = k * k
    if offset.shape != (n, 2 * taps, h, w) or k % 2 == 0 or groups * c_per_group != c_in:
        raise ValueError(
            f"deform_conv2d_by_sampling: bad shapes input {list(input.shape)}, offset "
            f"{list(offset.shape)}, weight {list(weight.shape)}"
        )
    r = torch.arange(k, device=input.device, dtype=offset.dtype) - k // 2
    ky, kx = torch.meshgrid(r, r, indexing="ij")
    gy = torch.arange(h, device=input.device, dtype=offset.dtype)
    gx = torch.arange(w, device=input.device, dtype=offset.dtype)
    off = offset.view(n, taps, 2, h, w)
    pos_y = off[:, :, 0] + ky.reshape(1, taps, 1, 1) + gy.view(1, 1, h, 1)
    pos_x = off[:, :, 1] + kx.reshape(1, taps, 1, 1) + gx.view(1, 1, 1, w)
    # Pixel centres at integer positions, align_corners=False: p -> (p + 0.5) * 2 / size - 1.
    grid = torch.stack(((pos_x + 0.5) * (2.0 / w) - 1.0, (pos_y + 0.5) * (2.0 / h) - 1.0), dim=-1)
    sampled = F.grid_sample(
        input,
        grid.view(n, taps * h, w, 2).to(input.dtype),
        mode="bilinear",
        padding_mode="zeros",
        align_corners=False,
    )  # [N, C_in, taps * H, W]
    cols = sampled.view(n, groups, c_per_group * taps, h * w)
    out = torch.matmul(weight.reshape(groups, c_out // groups, c_per_group * taps), cols)
    out = out.view(n, c_out, h, w)
    if bias is not None:
        out = out + bias.view(1, c_out, 1, 1)
    return out


def validate_targets(
    targets: list[dict[str, Tensor]] | None, num_images: int, num_classes: int
) -> None:
    """Check training targets; raise :class:`~fgdistill.errors.DataError` naming the image.

    Each target must hold ``boxes`` (``FloatTensor[K, 4]`` xyxy, finite, positive width and
    height) and ``labels`` (``Int64Tensor[K]`` in ``1 .. num_classes - 1``).
    """
    if targets is None:
        raise DataError("RepPoints: targets are required in training mode")
    if len(targets) != num_images:
        raise DataError(f"RepPoints: got {num_images} images but {len(targets)} targets")
    for i, target in enumerate(targets):
        if not isinstance(target, dict) or "boxes" not in target or "labels" not in target:
            raise DataError(f"target for image {i}: expected a dict with 'boxes' and 'labels'")
        boxes, labels = target["boxes"], target["labels"]
        if not isinstance(boxes, Tensor) or boxes.dim() != 2 or boxes.shape[-1] != 4:
            shape = tuple(boxes.shape) if isinstance(boxes, Tensor) else type(boxes).__name__
            raise DataError(f"target for image {i}: boxes must be a tensor [K, 4], got {shape}")
        if not boxes.is_floating_point():
            raise DataError(
                f"target for image {i}: boxes must be floating point, got {boxes.dtype}"
            )
        if not isinstance(labels, Tensor) or labels.dim() != 1 or labels.numel() != len(boxes):
            shape = tuple(labels.shape) if isinstance(labels, Tensor) else type(labels).__name__
            raise DataError(
                f"target for image {i}: labels must be a tensor [K] with K={len(boxes)}, "
                f"got {shape}"
            )
        if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
            raise DataError(f"target for image {i}: labels must be integers, got {labels.dtype}")
        if not torch.isfinite(boxes).all():
            raise DataError(f"target for image {i}: boxes contain NaN or infinity")
        bad = (boxes[:, 2:] <= boxes[:, :2]).any(dim=1)
        if bad.any():
            j = int(torch.nonzero(bad)[0, 0])
            raise DataError(
                f"target for image {i}: box {j} {boxes[j].tolist()} has non-positive width "
                "or height (boxes are x1, y1, x2, y2)"
            )
        out = (labels < 1) | (labels >= num_classes)
        if out.any():
            j = int(torch.nonzero(out)[0, 0])
            raise DataError(
                f"target for image {i}: label {int(labels[j])} of box {j} is outside "
                f"1..{num_classes - 1} (num_classes={num_classes} includes background 0)"
            )


# --------------------------------------------------------------------------------------------
# Head
# --------------------------------------------------------------------------------------------


def _tower(in_channels: int, channels: int, depth: int) -> nn.Sequential:
    groups = math.gcd(32, channels)
    layers: list[nn.Module] = []
    for d in range(depth):
        layers.append(
            nn.Conv2d(in_channels if d == 0 else channels, channels, 3, padding=1, bias=False)
        )
        layers.append(nn.GroupNorm(groups, channels))
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


class RepPointsHead(nn.Module):
    """The two-stage RepPoints head, shared over FPN levels.

    For each level ``x`` of shape ``FloatTensor[N, C_in, H, W]`` it returns

    - ``cls_logits``: ``FloatTensor[N, num_fg, H, W]``;
    - ``pts_init``: ``FloatTensor[N, 2P, H, W]``, initial points, pairs ``(dy, dx)`` in strides;
    - ``pts_refine``: ``FloatTensor[N, 2P, H, W]``, refined points (``pts_init.detach()`` plus a
      learned refinement).

    Args:
        in_channels: channels of the FPN levels.
        num_fg: number of foreground classes (sigmoid outputs).
        num_points: points per location; a square of an odd number (9 = 3x3 kernel).
        channels: width of the towers and point branches.
        stacked_convs: depth of the two GroupNorm towers.
        gradient_mul: gradient fraction of the initial points fed to the deformable convs.
        prior_prob: initial foreground probability of the classifier.
        deform_impl: ``"torchvision"`` (:func:`torchvision.ops.deform_conv2d`), ``"sampling"``
            (:func:`deform_conv2d_by_sampling`, the same function, faster on a CPU) or
            ``"auto"``: torchvision on CUDA, sampling elsewhere.
    """

    def __init__(
        self,
        in_channels: int,
        num_fg: int,
        *,
        num_points: int = 9,
        channels: int = 256,
        stacked_convs: int = 3,
        gradient_mul: float = 0.1,
        prior_prob: float = 0.01,
        deform_impl: str = "auto",
    ) -> None:
        super().__init__()
        if deform_impl not in ("auto", "torchvision", "sampling"):
            raise ValueError(
                f"deform_impl must be 'auto', 'torchvision' or 'sampling', got {deform_impl!r}"
            )
        self.deform_impl = deform_impl
        kernel = math.isqrt(num_points)
        if kernel * kernel != num_points or kernel % 2 == 0:
            raise ValueError(f"num_points must be the square of an odd number, got {num_points}")
        self.num_points = num_points
        self.kernel = kernel
        self.num_fg = num_fg
        self.channels = channels
        self.gradient_mul = gradient_mul

        self.cls_tower = _tower(in_channels, channels, stacked_convs)
        self.reg_tower = _tower(in_channels, channels, stacked_convs)
        tower_out = channels if stacked_convs > 0 else in_channels
        self.pts_init_conv = nn.Conv2d(tower_out, channels, 3, padding=1)
        self.pts_init_out = nn.Conv2d(channels, 2 * num_points, 1)
        # Two deformable convs (classification, refinement) sharing the same offsets, run as one
        # grouped deform_conv2d (groups inferred from the weight): weight[:channels] reads the
        # cls tower, weight[channels:] the reg tower.
        self.dcn_weight = nn.Parameter(torch.empty(2 * channels, tower_out, kernel, kernel))
        self.dcn_bias = nn.Parameter(torch.zeros(2 * channels))
        self.cls_out = nn.Conv2d(channels, num_fg, 1)
        self.pts_refine_out = nn.Conv2d(channels, 2 * num_points, 1)

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, std=0.01)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        nn.init.normal_(self.dcn_weight, std=0.01)
        assert self.cls_out.bias is not None
        nn.init.constant_(self.cls_out.bias, -math.log((1 - prior_prob) / prior_prob))

        # Regular kernel grid (dy, dx) per tap, row-major, as deform_conv2d orders its offsets.
        r = torch.arange(kernel, dtype=torch.float32) - kernel // 2
        yy, xx = torch.meshgrid(r, r, indexing="ij")
        base = torch.stack((yy.reshape(-1), xx.reshape(-1)), dim=1).reshape(1, -1, 1, 1)
        self.register_buffer("base_offset", base, persistent=False)

    def forward_level(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``x``: ``FloatTensor[N, C_in, H, W]`` -> ``(cls_logits, pts_init, pts_refine)``."""
        cls_feat = self.cls_tower(x)
        reg_feat = self.reg_tower(x)
        pts_init = self.pts_init_out(F.relu(self.pts_init_conv(reg_feat)))
        pts_dcn = (1 - self.gradient_mul) * pts_init.detach() + self.gradient_mul * pts_init
        offset = pts_dcn - self.base_offset.to(pts_dcn.dtype)
        feats = torch.cat((cls_feat, reg_feat), dim=1)
        impl = self.deform_impl
        if impl == "auto":
            impl = "torchvision" if x.is_cuda else "sampling"
        if impl == "torchvision":
            pad = self.kernel // 2
            dcn = deform_conv2d(feats, offset, self.dcn_weight, self.dcn_bias, padding=(pad, pad))
        else:
            dcn = deform_conv2d_by_sampling(feats, offset, self.dcn_weight, self.dcn_bias)
        dcn = F.relu(dcn)
        cls_logits = self.cls_out(dcn[:, : self.channels])
        pts_refine = self.pts_refine_out(dcn[:, self.channels :]) + pts_init.detach()
        return cls_logits, pts_init, pts_refine

    def forward(self, features: list[Tensor]) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
        """``features``: one ``FloatTensor[N, C_in, H_l, W_l]`` per level -> per-level lists."""
        cls_all, init_all, refine_all = [], [], []
        for x in features:
            c, i, r = self.forward_level(x)
            cls_all.append(c)
            init_all.append(i)
            refine_all.append(r)
        return cls_all, init_all, refine_all


# --------------------------------------------------------------------------------------------
# Detector
# --------------------------------------------------------------------------------------------


class RepPoints(nn.Module):
    """RepPoints detector with torchvision's detector contract.

    Train mode: ``model(images, targets)`` -> ``{"classification", "bbox_init", "bbox_refine"}``
    loss tensors. Eval mode: ``model(images)`` -> one dict per image with ``boxes``
    (``FloatTensor[D, 4]`` xyxy in original image pixels), ``labels`` (``Int64Tensor[D]``) and
    ``scores`` (``FloatTensor[D]``).

    ``torch.jit.script`` compiles it for inference (eval mode; the training path is left out)
    and ``torch.onnx.export(..., dynamo=False)`` traces it with dynamic image sizes.

    ``images`` is a list of ``FloatTensor[3, H_i, W_i]`` in ``[0, 1]``; ``targets`` a list of
    dicts with ``boxes`` (``FloatTensor[K_i, 4]`` xyxy pixels) and ``labels``
    (``Int64Tensor[K_i]`` in ``1 .. num_classes - 1``).

    Args:
        backbone: FPN backbone returning an ordered dict of levels with strides that are
            consecutive powers of two (P3-P7 for torchvision's RetinaNet backbone); must have
            ``out_channels``.
        num_classes: number of classes including background (torchvision's convention).
        min_size, max_size, image_mean, image_std: passed to ``GeneralizedRCNNTransform``.
        num_points: representative points per location (9).
        head_channels: width of the head.
        stacked_convs: depth of the GroupNorm towers (3 in the paper).
        score_thresh, nms_thresh, detections_per_img, topk_candidates: post-processing, as in
            torchvision's RetinaNet.
        point_base_scale: the point assigner's scale and the box-loss normaliser (4).
        pos_iou_thresh, neg_iou_thresh: max-IoU assigner thresholds of the refinement stage.
        loss_init_weight, loss_refine_weight: weights of the two box losses (0.5, 1.0).
        smooth_l1_beta: smooth L1 transition point on normalised boxes (0.11).
        focal_alpha, focal_gamma: focal loss parameters (0.25, 2).
        gradient_mul: gradient fraction of the initial points fed to the deformable convs (0.1).
        moment_mul: gradient fraction of the learned moment transfer (0.01).
        deform_impl: how the deformable convolutions run (see :class:`RepPointsHead`);
            ``"auto"`` uses :func:`torchvision.ops.deform_conv2d` on CUDA and the equivalent,
            faster sampling form on a CPU.
        **kwargs: further arguments of ``GeneralizedRCNNTransform`` (e.g. ``fixed_size``).
    """

    def __init__(
        self,
        backbone: nn.Module,
        num_classes: int,
        *,
        min_size: int = 800,
        max_size: int = 1333,
        image_mean: list[float] | None = None,
        image_std: list[float] | None = None,
        num_points: int = 9,
        head_channels: int = 256,
        stacked_convs: int = 3,
        score_thresh: float = 0.05,
        nms_thresh: float = 0.5,
        detections_per_img: int = 100,
        topk_candidates: int = 1000,
        point_base_scale: float = 4.0,
        pos_iou_thresh: float = 0.5,
        neg_iou_thresh: float = 0.4,
        loss_init_weight: float = 0.5,
        loss_refine_weight: float = 1.0,
        smooth_l1_beta: float = 0.11,
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
        gradient_mul: float = 0.1,
        moment_mul: float = 0.01,
        deform_impl: str = "auto",
        **kwargs: Any,
    ) -> None:
        super().__init__()
        if not hasattr(backbone, "out_channels"):
            raise ValueError("backbone should have an attribute out_channels (number of channels)")
        if num_classes < 2:
            raise ValueError(f"num_classes includes background and must be >= 2, got {num_classes}")
        self.backbone = backbone
        self.num_classes = num_classes
        if image_mean is None:
            image_mean = [0.485, 0.456, 0.406]
        if image_std is None:
            image_std = [0.229, 0.224, 0.225]
        self.transform = GeneralizedRCNNTransform(
            min_size, max_size, image_mean, image_std, **kwargs
        )
        self.head = RepPointsHead(
            int(backbone.out_channels),  # type: ignore[arg-type]
            num_classes - 1,
            num_points=num_points,
            channels=head_channels,
            stacked_convs=stacked_convs,
            gradient_mul=gradient_mul,
            deform_impl=deform_impl,
        )
        # Learned moment transfer (log s_x, log s_y), shared by both stages and all levels.
        self.moment_transfer = nn.Parameter(torch.zeros(2))
        self.moment_mul = moment_mul

        self.score_thresh = score_thresh
        self.nms_thresh = nms_thresh
        self.detections_per_img = detections_per_img
        self.topk_candidates = topk_candidates
        self.point_base_scale = point_base_scale
        self.pos_iou_thresh = pos_iou_thresh
        self.neg_iou_thresh = neg_iou_thresh
        self.loss_init_weight = loss_init_weight
        self.loss_refine_weight = loss_refine_weight
        self.smooth_l1_beta = smooth_l1_beta
        self.focal_alpha = focal_alpha
        self.focal_gamma = focal_gamma

    # ---- geometry --------------------------------------------------------------------------

    @staticmethod
    def _strides(batch_hw: tuple[int, int], features: list[Tensor]) -> list[int]:
        """Stride of each level: the finest level's power of two (from the padded batch size),
        doubling per level as in an FPN with P6/P7. Coarse levels are not measured because a
        1x1 map (small inputs) does not tell its stride."""
        ratio = max(batch_hw[0] / features[0].shape[-2], batch_hw[1] / features[0].shape[-1])
        # Written for TorchScript: no math.log2, int ** int and round() are floats there.
        first = 1 << int(round(math.log(ratio) / math.log(2.0)))  # noqa: RUF046
        for i in range(1, len(features)):
            if features[i].shape[-2] > features[i - 1].shape[-2]:
                raise ValueError("RepPoints needs FPN levels ordered from fine to coarse")
        return [first << i for i in range(len(features))]

    def _log_scale(self) -> Tensor:
        mt = self.moment_transfer
        return self.moment_mul * mt + (1 - self.moment_mul) * mt.detach()

    def _points_to_boxes(self, pts: Tensor, stride: int, log_scale: Tensor) -> Tensor:
        """``pts``: ``FloatTensor[N, 2P, H, W]`` (strides) -> ``FloatTensor[N, H*W, 4]`` pixels."""
        n, c, h, w = pts.shape
        p = c // 2
        pts = pts.float()  # box coordinates in float32 also under autocast
        pts = pts.view(n, p, 2, h, w).permute(0, 3, 4, 1, 2).reshape(n, h * w, p, 2)
        boxes = moment_boxes(pts, log_scale)  # in strides, relative to the location
        ys = torch.arange(h, device=pts.device, dtype=pts.dtype)
        xs = torch.arange(w, device=pts.device, dtype=pts.dtype)
        gy, gx = torch.meshgrid(ys, xs, indexing="ij")
        centre = torch.stack((gx, gy, gx, gy), dim=-1).reshape(1, h * w, 4)
        return (boxes + centre) * stride

    # ---- forward ---------------------------------------------------------------------------

    def forward(
        self, images: list[Tensor], targets: list[dict[str, Tensor]] | None = None
    ) -> dict[str, Tensor] | list[dict[str, Tensor]]:
        """Train mode: dict of losses. Eval mode: list of detections (see the class docstring)."""
        if (self.training or targets is not None) and not torch.jit.is_scripting():
            # Like torchvision, targets given in eval mode are resized too (not used for output).
            validate_targets(targets, len(images), self.num_classes)
        original_sizes: list[tuple[int, int]] = []
        for img in images:
            if img.dim() != 3:
                raise DataError(f"expected images of shape [C, H, W], got {list(img.shape)}")
            # No int(): traced for ONNX, the sizes stay symbolic (they are ints otherwise).
            original_sizes.append((img.shape[-2], img.shape[-1]))

        image_list, t_targets = self.transform(images, targets)
        features = self.backbone(image_list.tensors)
        if isinstance(features, Tensor):
            features = OrderedDict([("0", features)])
        feats = list(features.values())
        batch_hw = (int(image_list.tensors.shape[-2]), int(image_list.tensors.shape[-1]))
        strides = self._strides(batch_hw, feats)

        cls_logits, pts_init, pts_refine = self.head(feats)
        log_scale = self._log_scale()

        if self.training and torch.jit.is_scripting():
            raise RuntimeError("RepPoints: TorchScript runs inference only; call .eval() first")
        if self.training and not torch.jit.is_scripting():
            assert t_targets is not None
            return self.compute_loss(
                t_targets, cls_logits, pts_init, pts_refine, strides, log_scale
            )

        boxes = [
            self._points_to_boxes(r, s, log_scale) for r, s in zip(pts_refine, strides, strict=True)
        ]
        detections = self.postprocess_detections(cls_logits, boxes, image_list.image_sizes)
        return self.transform.postprocess(detections, image_list.image_sizes, original_sizes)

    # ---- training --------------------------------------------------------------------------

    def compute_loss(
        self,
        targets: list[dict[str, Tensor]],
        cls_logits: list[Tensor],
        pts_init: list[Tensor],
        pts_refine: list[Tensor],
        strides: list[int],
        log_scale: Tensor,
    ) -> dict[str, Tensor]:
        """Losses from per-level head outputs (``FloatTensor[N, *, H_l, W_l]``) and targets in
        padded-batch pixels. Returns ``classification``, ``bbox_init``, ``bbox_refine``."""
        n = cls_logits[0].shape[0]
        device = cls_logits[0].device
        level_shapes = [(int(c.shape[-2]), int(c.shape[-1])) for c in cls_logits]

        logits = torch.cat([c.flatten(2).transpose(1, 2) for c in cls_logits], dim=1)  # [N,A,C]
        init_boxes = torch.cat(
            [
                self._points_to_boxes(p, s, log_scale)
                for p, s in zip(pts_init, strides, strict=True)
            ],
            dim=1,
        )
        refine_boxes = torch.cat(
            [
                self._points_to_boxes(p, s, log_scale)
                for p, s in zip(pts_refine, strides, strict=True)
            ],
            dim=1,
        )
        loc_stride = torch.cat(
            [
                torch.full((h * w,), float(s), device=device)
                for (h, w), s in zip(level_shapes, strides, strict=True)
            ]
        )
        norm = (self.point_base_scale * loc_stride)[None, :, None]  # [1, A, 1]

        # Pad the ground truth to [N, K, 4].
        k = max(int(t["boxes"].shape[0]) for t in targets)
        gt_boxes = init_boxes.new_zeros((n, k, 4))
        gt_labels = torch.zeros((n, k), dtype=torch.long, device=device)
        gt_valid = torch.zeros((n, k), dtype=torch.bool, device=device)
        for i, t in enumerate(targets):
            m = int(t["boxes"].shape[0])
            gt_boxes[i, :m] = t["boxes"].to(gt_boxes.dtype)
            gt_labels[i, :m] = t["labels"]
            gt_valid[i, :m] = True

        # Stage 1: point assignment.
        init_match = assign_points(gt_boxes, gt_valid, level_shapes, strides, self.point_base_scale)
        loss_init = self._box_loss(init_boxes, gt_boxes, init_match, norm)

        # Stage 2: max-IoU assignment against the detached initial boxes.
        iou = pairwise_iou_batched(gt_boxes, init_boxes.detach())
        refine_match = assign_max_iou(iou, gt_valid, self.pos_iou_thresh, self.neg_iou_thresh)
        loss_refine = self._box_loss(refine_boxes, gt_boxes, refine_match, norm)

        pos = refine_match >= 0
        valid = refine_match != IGNORE
        num_pos = max(int(pos.sum()), 1)
        cls_target = torch.zeros_like(logits)
        img_i, loc_i = torch.nonzero(pos, as_tuple=True)
        labels = gt_labels[img_i, refine_match[img_i, loc_i]]
        cls_target[img_i, loc_i, labels - 1] = 1.0
        loss_cls = (
            sigmoid_focal_loss(
                logits[valid],
                cls_target[valid],
                alpha=self.focal_alpha,
                gamma=self.focal_gamma,
                reduction="sum",
            )
            / num_pos
        )
        return {
            "classification": loss_cls,
            "bbox_init": self.loss_init_weight * loss_init,
            "bbox_refine": self.loss_refine_weight * loss_refine,
        }

    def _box_loss(self, pred: Tensor, gt_boxes: Tensor, match: Tensor, norm: Tensor) -> Tensor:
        """Smooth L1 of ``pred`` ``[N, A, 4]`` vs matched ground truth, normalised by ``norm``
        ``[1, A, 1]``, summed over coordinates and averaged over positives (0 if none)."""
        img_i, loc_i = torch.nonzero(match >= 0, as_tuple=True)
        target = gt_boxes[img_i, match[img_i, loc_i]]
        scale = norm[0, loc_i]
        loss = F.smooth_l1_loss(
            pred[img_i, loc_i] / scale, target / scale, beta=self.smooth_l1_beta, reduction="sum"
        )
        return loss / max(int(img_i.numel()), 1)

    # ---- inference -------------------------------------------------------------------------

    def postprocess_detections(
        self, cls_logits: list[Tensor], boxes: list[Tensor], image_sizes: list[tuple[int, int]]
    ) -> list[dict[str, Tensor]]:
        """Per-level top-k and score threshold, then class-wise NMS, per image.

        Args:
            cls_logits: per level ``FloatTensor[N, C, H_l, W_l]``.
            boxes: per level ``FloatTensor[N, H_l*W_l, 4]`` xyxy in padded-batch pixels.
            image_sizes: ``(H, W)`` of each resized image (before padding).

        Returns:
            Per image a dict with ``boxes`` ``[D, 4]``, ``scores`` ``[D]``, ``labels`` ``[D]``.
        """
        detections: list[dict[str, Tensor]] = []
        for i, size in enumerate(image_sizes):
            all_boxes, all_scores, all_labels = [], [], []
            for logits_l, boxes_l in zip(cls_logits, boxes, strict=True):
                num_fg = logits_l.shape[1]
                scores = torch.sigmoid(logits_l[i].flatten(1).t()).flatten()  # [HW*C]
                keep = torch.nonzero(scores > self.score_thresh).squeeze(1)
                scores = scores[keep]
                # min(topk_candidates, len(keep)), kept symbolic when traced for ONNX.
                topk = det_utils._topk_min(keep, self.topk_candidates, 0)
                scores, idx = scores.topk(topk)
                keep = keep[idx]
                loc = torch.div(keep, num_fg, rounding_mode="floor")
                all_boxes.append(clip_boxes_to_image(boxes_l[i, loc], size))
                all_scores.append(scores)
                all_labels.append(keep % num_fg + 1)
            b = torch.cat(all_boxes)
            s = torch.cat(all_scores)
            lab = torch.cat(all_labels)
            kept = batched_nms(b, s, lab, self.nms_thresh)[: self.detections_per_img]
            detections.append({"boxes": b[kept], "scores": s[kept], "labels": lab[kept]})
        return detections
