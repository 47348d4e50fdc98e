"""Shape and contract tests for the RepPoints detector (CPU, random weights)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torchvision.models.detection.backbone_utils import BackboneWithFPN, resnet_fpn_backbone
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops import box_iou, deform_conv2d
from torchvision.ops.feature_pyramid_network import LastLevelP6P7

from fgdistill.errors import DataError
from fgdistill.models.reppoints import (
    IGNORE,
    NEGATIVE,
    RepPoints,
    RepPointsHead,
    assign_max_iou,
    assign_points,
    deform_conv2d_by_sampling,
    moment_boxes,
    pairwise_iou_batched,
)

NUM_CLASSES = 3  # background + 2


def small_backbone(channels: int = 32) -> BackboneWithFPN:
    """ResNet-18 FPN with P3-P7 like torchvision's RetinaNet backbone, but narrow."""
    body = torchvision.models.resnet18(weights=None)
    return BackboneWithFPN(
        body,
        {"layer2": "0", "layer3": "1", "layer4": "2"},
        [128, 256, 512],
        channels,
        extra_blocks=LastLevelP6P7(channels, channels),
    )


def small_model(**kwargs: object) -> RepPoints:
    torch.manual_seed(0)
    options: dict = {"min_size": 96, "max_size": 96, "head_channels": 32, "stacked_convs": 1}
    options.update(kwargs)
    return RepPoints(small_backbone(), NUM_CLASSES, **options)


def images_and_targets() -> tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]]:
    g = torch.Generator().manual_seed(0)
    images = [torch.rand(3, 80, 100, generator=g), torch.rand(3, 96, 96, generator=g)]
    targets = [
        {"boxes": torch.tensor([[10.0, 12.0, 60.0, 70.0]]), "labels": torch.tensor([1])},
        {
            "boxes": torch.tensor([[5.0, 5.0, 40.0, 30.0], [30.0, 40.0, 90.0, 95.0]]),
            "labels": torch.tensor([2, 1]),
        },
    ]
    return images, targets


@pytest.fixture(scope="module")
def model() -> RepPoints:
    return small_model()


# ---- pure functions ----------------------------------------------------------------------


def test_moment_boxes_centre_and_scale() -> None:
    # Four points at (y, x) = (10 +- 2, 20 +- 3): mean (10, 20), std (2, 3).
    pts = torch.tensor([[8.0, 17.0], [12.0, 23.0], [8.0, 23.0], [12.0, 17.0]])
    box = moment_boxes(pts, torch.zeros(2))
    torch.testing.assert_close(box, torch.tensor([17.0, 8.0, 23.0, 12.0]), atol=1e-3, rtol=0)
    # log-scale (x, y) = (log 2, 0) doubles the width only.
    box2 = moment_boxes(pts, torch.tensor([math.log(2.0), 0.0]))
    torch.testing.assert_close(box2, torch.tensor([14.0, 8.0, 26.0, 12.0]), atol=1e-3, rtol=0)


def test_moment_boxes_finite_gradient_when_points_coincide() -> None:
    pts = torch.ones(9, 2, requires_grad=True)
    moment_boxes(pts, torch.zeros(2)).sum().backward()
    assert pts.grad is not None and torch.isfinite(pts.grad).all()


def test_pairwise_iou_batched_matches_torchvision() -> None:
    g = torch.Generator().manual_seed(0)
    xy = torch.rand(2, 5, 2, generator=g) * 50
    a = torch.cat([xy, xy + 1 + torch.rand(2, 5, 2, generator=g) * 30], dim=-1)
    xy = torch.rand(2, 7, 2, generator=g) * 50
    b = torch.cat([xy, xy + 1 + torch.rand(2, 7, 2, generator=g) * 30], dim=-1)
    iou = pairwise_iou_batched(a, b)
    assert iou.shape == (2, 5, 7)
    for i in range(2):
        torch.testing.assert_close(iou[i], box_iou(a[i], b[i]))


def test_assign_points_level_and_location() -> None:
    shapes = [(16, 16), (8, 8), (4, 4), (2, 2), (1, 1)]
    strides = [8, 16, 32, 64, 128]
    # 64x64 box centred at (x=66, y=30): level floor(log2(64 / 4)) = 4 -> stride 16 (index 1);
    # nearest location col round(66/16)=4, row round(30/16)=2.
    # 10x10 box: log2(10/4) < 3 -> clamped to stride 8; centre (20, 20) -> (2.5 -> 2, 2.5 -> 2).
    gt = torch.tensor([[[34.0, -2.0, 98.0, 62.0], [15.0, 15.0, 25.0, 25.0], [0, 0, 0, 0]]])
    valid = torch.tensor([[True, True, False]])
    matched = assign_points(gt, valid, shapes, strides)
    assert matched.shape == (1, 256 + 64 + 16 + 4 + 1)
    pos = torch.nonzero(matched[0] >= 0).squeeze(1).tolist()
    assert sorted(pos) == [2 * 16 + 2, 256 + 2 * 8 + 4]
    assert matched[0, 256 + 2 * 8 + 4] == 0
    assert matched[0, 2 * 16 + 2] == 1


def test_assign_points_collision_keeps_nearest_centre() -> None:
    shapes, strides = [(8, 8)], [8]
    # Both boxes fall on location (2, 2) at (16, 16); the second is centred exactly on it.
    gt = torch.tensor([[[5.0, 5.0, 29.0, 29.0], [4.0, 4.0, 28.0, 28.0]]])
    matched = assign_points(gt, torch.ones(1, 2, dtype=torch.bool), shapes, strides)
    assert int((matched >= 0).sum()) == 1
    assert matched[0, 2 * 8 + 2] == 1


def test_assign_max_iou_thresholds_and_low_quality() -> None:
    iou = torch.tensor([[[0.7, 0.45, 0.1, 0.3], [0.0, 0.0, 0.2, 0.1]]])
    valid = torch.ones(1, 2, dtype=torch.bool)
    matched = assign_max_iou(iou, valid, 0.5, 0.4)
    # loc0 positive for gt0; loc1 ignored; loc2 is gt1's best -> positive; loc3 negative.
    assert matched.tolist() == [[0, IGNORE, 1, NEGATIVE]]
    # A padded (invalid) ground truth never matches.
    matched = assign_max_iou(iou, torch.tensor([[True, False]]), 0.5, 0.4)
    assert matched.tolist() == [[0, IGNORE, NEGATIVE, NEGATIVE]]


# ---- head --------------------------------------------------------------------------------


@pytest.mark.parametrize("groups", [1, 2])
def test_deform_conv_by_sampling_matches_torchvision(groups: int) -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 6, 7, 5, generator=g, dtype=torch.float64, requires_grad=True)
    # Offsets up to +-4 pixels: some taps fall outside the map (zero padding).
    off = (torch.rand(2, 18, 7, 5, generator=g, dtype=torch.float64) * 8 - 4).requires_grad_()
    w = torch.randn(4, 6 // groups, 3, 3, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, generator=g, dtype=torch.float64, requires_grad=True)
    upstream = torch.randn(2, 4, 7, 5, generator=g, dtype=torch.float64)
    ref = deform_conv2d(x, off, w, b, padding=(1, 1))
    ref_grads = torch.autograd.grad((ref * upstream).sum(), (x, off, w, b))
    out = deform_conv2d_by_sampling(x, off, w, b)
    grads = torch.autograd.grad((out * upstream).sum(), (x, off, w, b))
    torch.testing.assert_close(out, ref)
    for name, got, want in zip(
        ("input", "offset", "weight", "bias"), grads, ref_grads, strict=True
    ):
        torch.testing.assert_close(got, want, msg=lambda m, n=name: f"grad {n}: {m}")


@pytest.mark.parametrize("impl", ["torchvision", "sampling"])
def test_dcn_at_regular_grid_equals_plain_conv(impl: str) -> None:
    """With initial points on the regular 3x3 grid, the deformable conv is a plain conv, which
    checks the (dy, dx) ordering of the points against deform_conv2d's offsets."""
    torch.manual_seed(0)
    head = RepPointsHead(8, 2, channels=8, stacked_convs=1, deform_impl=impl)
    with torch.no_grad():
        head.pts_init_out.weight.zero_()
        head.pts_init_out.bias.copy_(head.base_offset.flatten())
        head.dcn_weight.normal_()
    x = torch.randn(2, 8, 6, 7)
    cls, pts_init, _ = head.forward_level(x)
    dcn = F.relu(
        torch.cat(
            (
                F.conv2d(head.cls_tower(x), head.dcn_weight[:8], head.dcn_bias[:8], padding=1),
                F.conv2d(head.reg_tower(x), head.dcn_weight[8:], head.dcn_bias[8:], padding=1),
            ),
            1,
        )
    )
    torch.testing.assert_close(cls, head.cls_out(dcn[:, :8]), atol=1e-4, rtol=1e-4)
    assert pts_init.shape == (2, 18, 6, 7)


def test_head_rejects_non_square_points() -> None:
    with pytest.raises(ValueError, match="num_points"):
        RepPointsHead(8, 2, num_points=8, channels=8)
    with pytest.raises(ValueError, match="deform_impl"):
        RepPointsHead(8, 2, channels=8, deform_impl="cuda")


# ---- detector contract --------------------------------------------------------------------


def test_has_torchvision_attributes() -> None:
    m = RepPoints(
        resnet_fpn_backbone(
            backbone_name="resnet18",
            weights=None,
            trainable_layers=5,
            returned_layers=[2, 3, 4],
            extra_blocks=LastLevelP6P7(256, 256),
        ),
        NUM_CLASSES,
        min_size=64,
        max_size=64,
    )
    assert isinstance(m.transform, GeneralizedRCNNTransform)
    assert isinstance(m.backbone, nn.Module)
    assert m.transform.min_size == (64,)
    m.eval()
    with torch.no_grad():
        out = m([torch.rand(3, 50, 60)])
    assert set(out[0]) == {"boxes", "labels", "scores"}


def test_train_mode_losses(model: RepPoints) -> None:
    images, targets = images_and_targets()
    model.train()
    losses = model(images, targets)
    assert isinstance(losses, dict)
    assert set(losses) == {"classification", "bbox_init", "bbox_refine"}
    for name, value in losses.items():
        assert value.dim() == 0, name
        assert torch.isfinite(value), name
        assert value.item() > 0, name


def test_eval_output_format(model: RepPoints) -> None:
    images, _ = images_and_targets()
    model.eval()
    model.score_thresh = 0.0
    model.detections_per_img = 7
    try:
        with torch.no_grad():
            out = model(images)
    finally:
        model.score_thresh = 0.05
        model.detections_per_img = 100
    assert isinstance(out, list) and len(out) == 2
    for det, img in zip(out, images, strict=True):
        assert set(det) == {"boxes", "labels", "scores"}
        d = det["boxes"].shape[0]
        assert 0 < d <= 7
        assert det["boxes"].shape == (d, 4) and det["boxes"].dtype == torch.float32
        assert det["labels"].dtype == torch.int64 and det["scores"].shape == (d,)
        assert det["labels"].min() >= 1 and det["labels"].max() < NUM_CLASSES
        assert (det["scores"][:-1] >= det["scores"][1:]).all()
        # Boxes are in the original image's pixels (clipped to the image).
        h, w = img.shape[-2:]
        assert (det["boxes"][:, 0::2] <= w + 1e-3).all() and (
            det["boxes"][:, 1::2] <= h + 1e-3
        ).all()
        assert (det["boxes"] >= -1e-3).all()
        assert (det["boxes"][:, 2:] >= det["boxes"][:, :2]).all()


def test_eval_with_targets_returns_detections(model: RepPoints) -> None:
    """As in torchvision, targets given in eval mode do not turn the output into losses."""
    images, targets = images_and_targets()
    model.eval()
    with torch.no_grad():
        out = model(images, targets)
    assert isinstance(out, list) and len(out) == 2 and "boxes" in out[0]


def test_scripts_for_inference() -> None:
    """torch.jit.script compiles the eval path; it detects what the eager model detects."""
    m = small_model(score_thresh=0.0, detections_per_img=7).eval()
    # Sizes the transform keeps: scripted, torchvision's transform rounds some resized sizes
    # differently (its scale factor is float32 there; see fgdistill.export).
    g = torch.Generator().manual_seed(0)
    images = [torch.rand(3, 64, 96, generator=g), torch.rand(3, 96, 96, generator=g)]
    scripted = torch.jit.script(m)
    with torch.no_grad():
        eager, script = m(images), scripted(images)
    assert isinstance(eager, list) and isinstance(script, list)
    for a, b in zip(eager, script, strict=True):
        assert a["boxes"].shape[0] > 0
        for key in ("boxes", "scores", "labels"):
            torch.testing.assert_close(a[key], b[key])
    scripted.train()
    with pytest.raises(torch.jit.Error, match="inference only"):
        scripted(images)


def test_empty_targets_give_zero_box_losses(model: RepPoints) -> None:
    images, _ = images_and_targets()
    empty = [
        {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)} for _ in images
    ]
    model.train()
    model.zero_grad()
    losses = model(images, empty)
    assert losses["bbox_init"].item() == 0.0
    assert losses["bbox_refine"].item() == 0.0
    assert torch.isfinite(losses["classification"]) and losses["classification"].item() > 0
    sum(losses.values()).backward()
    assert model.head.cls_out.weight.grad is not None
    assert torch.isfinite(model.head.cls_out.weight.grad).all()


def test_mixed_empty_and_nonempty_targets(model: RepPoints) -> None:
    images, targets = images_and_targets()
    targets[0] = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}
    model.train()
    losses = model(images, targets)
    assert all(torch.isfinite(v) for v in losses.values())
    assert losses["bbox_init"].item() > 0


@pytest.mark.parametrize(
    ("bad", "match"),
    [
        ({"boxes": torch.tensor([1.0, 2.0, 3.0, 4.0]), "labels": torch.tensor([1])}, "\\[K, 4\\]"),
        ({"boxes": torch.zeros(1, 5), "labels": torch.tensor([1])}, "\\[K, 4\\]"),
        ({"boxes": torch.tensor([[10.0, 10.0, 10.0, 20.0]]), "labels": torch.tensor([1])}, "width"),
        ({"boxes": torch.tensor([[10.0, 30.0, 20.0, 20.0]]), "labels": torch.tensor([1])}, "width"),
        ({"boxes": torch.tensor([[0.0, 0.0, 9.0, math.nan]]), "labels": torch.tensor([1])}, "NaN"),
        ({"boxes": torch.tensor([[0.0, 0.0, 9.0, 9.0]]), "labels": torch.tensor([0])}, "label 0"),
        ({"boxes": torch.tensor([[0.0, 0.0, 9.0, 9.0]]), "labels": torch.tensor([3])}, "label 3"),
        ({"boxes": torch.tensor([[0.0, 0.0, 9.0, 9.0]]), "labels": torch.tensor([1, 2])}, "labels"),
        ({"boxes": torch.tensor([[0.0, 0.0, 9.0, 9.0]])}, "'labels'"),
    ],
)
def test_bad_target_rejected_naming_image(model: RepPoints, bad: dict, match: str) -> None:
    images, targets = images_and_targets()
    targets[1] = bad
    model.train()
    with pytest.raises(DataError, match=match) as info:
        model(images, targets)
    assert "image 1" in str(info.value)
    assert isinstance(info.value, ValueError)


def test_missing_targets_in_training(model: RepPoints) -> None:
    images, targets = images_and_targets()
    model.train()
    with pytest.raises(ValueError, match="targets"):
        model(images)
    with pytest.raises(ValueError, match="2 images but 1 targets"):
        model(images, targets[:1])


def test_gradient_reaches_every_parameter() -> None:
    m = small_model()
    images, targets = images_and_targets()
    m.train()
    sum(m(images, targets).values()).backward()
    missing = [
        name
        for name, p in m.named_parameters()
        if p.requires_grad and (p.grad is None or not torch.any(p.grad != 0))
    ]
    assert missing == []
    assert torch.isfinite(m.moment_transfer.grad).all()  # type: ignore[arg-type]


def test_initial_points_get_gradient_through_dcn_scaled() -> None:
    """Only the classification loss: the initial points still learn (0.1 x) via the DCN."""
    m = small_model()
    images, targets = images_and_targets()
    m.train()
    m(images, targets)["classification"].backward()
    grad = m.head.pts_init_out.weight.grad
    assert grad is not None and torch.any(grad != 0)


def test_deform_impls_give_the_same_losses() -> None:
    images, targets = images_and_targets()
    losses = {}
    for impl in ("torchvision", "sampling"):
        m = small_model(deform_impl=impl)  # same seed, same weights
        m.train()
        losses[impl] = m(images, targets)
    for name, value in losses["torchvision"].items():
        torch.testing.assert_close(losses["sampling"][name], value, rtol=1e-4, atol=1e-5)


def test_rejects_backbone_without_out_channels() -> None:
    with pytest.raises(ValueError, match="out_channels"):
        RepPoints(nn.Identity(), NUM_CLASSES)
    with pytest.raises(ValueError, match="num_classes"):
        RepPoints(small_backbone(), 1)


@pytest.mark.slow
@pytest.mark.usefixtures("one_thread")
def test_overfits_two_images() -> None:
    m = small_model()
    g = torch.Generator().manual_seed(0)
    images = [torch.rand(3, 96, 96, generator=g) * 0.2 for _ in range(2)]
    images[0][:, 20:80, 15:75] += 0.7
    images[1][:, 10:50, 30:90] += 0.7
    targets = [
        {"boxes": torch.tensor([[15.0, 20.0, 75.0, 80.0]]), "labels": torch.tensor([1])},
        {"boxes": torch.tensor([[30.0, 10.0, 90.0, 50.0]]), "labels": torch.tensor([2])},
    ]
    opt = torch.optim.Adam(m.parameters(), lr=1e-3)
    m.train()
    history = []
    for _ in range(40):
        losses = m(images, targets)
        total = sum(losses.values())
        opt.zero_grad()
        total.backward()
        opt.step()
        history.append(total.item())
    assert sum(history[-5:]) / 5 < 0.5 * sum(history[:3]) / 3
    m.eval()
    with torch.no_grad():
        det = m(images)[0]
    assert det["boxes"].shape[0] > 0
    assert float(box_iou(det["boxes"][:1], targets[0]["boxes"])[0, 0]) > 0.5
