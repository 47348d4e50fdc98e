"""Distiller: one training step, frozen teacher, frames, inheriting, saving, errors."""

from __future__ import annotations

import copy
import math
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from fgdistill.errors import CompatibilityError, ConfigError
from fgdistill.losses import FGDHyperParams, fgd_masks
from fgdistill.models import (
    Distiller,
    LevelInfo,
    build_detector,
    inherit_weights,
    load_state_dict_checked,
    model_spec,
)
from fgdistill.models.presets import PRESETS

TINY: dict[str, Any] = {"backbone": "resnet18", "num_classes": 3, "min_size": 64, "max_size": 96}
# Two images of different sizes and aspect ratios: 40x60 is scaled by 1.6 to 64x96, 80x50 by 1.2
# to 96x60, and the batch is padded to 96x96.
SIZES = ((40, 60), (80, 50))
SCALES = (1.6, 1.2)
BOXES = ([[6.0, 4.0, 30.0, 22.0]], [[10.0, 41.0, 45.0, 78.0], [2.0, 2.0, 12.0, 14.0]])


def detector(arch: str, fpn: int = 32, seed: int = 0, **kwargs: Any) -> nn.Module:
    torch.manual_seed(seed)
    return build_detector(arch, fpn_channels=fpn, **{**TINY, **kwargs})


def batch(with_masks: bool = False) -> tuple[list[Tensor], list[dict[str, Tensor]]]:
    gen = torch.Generator().manual_seed(0)
    images, targets = [], []
    for (h, w), boxes in zip(SIZES, BOXES, strict=True):
        images.append(torch.rand(3, h, w, generator=gen))
        target = {"boxes": torch.tensor(boxes), "labels": torch.arange(1, len(boxes) + 1)}
        if with_masks:
            masks = torch.zeros(len(boxes), h, w, dtype=torch.uint8)
            for k, (x1, y1, x2, y2) in enumerate(boxes):
                masks[k, int(y1) : int(y2), int(x1) : int(x2)] = 1
            target["masks"] = masks
        targets.append(target)
    return images, targets


def total(losses: dict[str, Tensor]) -> Tensor:
    """The trainer's view: the sum of the loss dict."""
    return torch.stack(list(losses.values())).sum()


def _bn_stats(model: nn.Module) -> dict[str, Tensor]:
    return {
        k: v.clone()
        for k, v in model.state_dict().items()
        if k.endswith(("running_mean", "running_var", "num_batches_tracked"))
    }


def test_train_step_gradients_and_frozen_teacher() -> None:
    student, teacher = detector("retinanet"), detector("retinanet", fpn=64, seed=1)
    teacher.train()  # trainable BatchNorm in train mode: the distiller must still freeze it
    stats = _bn_stats(teacher)
    assert stats
    distiller = Distiller(student, teacher)
    assert distiller.levels == ("p3", "p4", "p5", "p6", "p7")
    assert distiller.fgd.hparams["p5"] == PRESETS["retinanet"]
    opt = torch.optim.SGD(distiller.parameters(), lr=0.01)
    images, targets = batch()
    for _ in range(2):
        distiller.train()
        losses = distiller(images, targets)
        expected_fgd = {f"fgd/{lv}/{t}" for lv in distiller.levels for t in ("fg", "bg")}
        assert {"classification", "bbox_regression"} | expected_fgd <= set(losses)
        assert all(v.dim() == 0 and torch.isfinite(v) for v in losses.values())
        opt.zero_grad()
        total(losses).backward()
        for name, p in distiller.named_parameters():
            assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert any(p.grad.abs().sum() > 0 for p in distiller.fgd.parameters())
        opt.step()

    # the teacher: no gradient, no statistic moved, eval mode, not seen by the optimizer
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    after = _bn_stats(teacher)
    assert all(torch.equal(stats[k], after[k]) for k in stats)
    assert not any(m.training for m in teacher.modules())
    teacher_ids = {id(p) for p in teacher.parameters()}
    assert not teacher_ids & {id(p) for p in distiller.parameters()}
    own = {id(p) for p in student.parameters()} | {id(p) for p in distiller.fgd.parameters()}
    assert own == {id(p) for p in distiller.parameters()}
    assert all(k.startswith(("student.", "fgd.")) for k in distiller.state_dict())
    # the student's BatchNorm did train
    assert student.backbone.body.bn1.num_batches_tracked.item() == 2


@pytest.mark.parametrize(
    ("arch", "levels"),
    [
        ("fcos", ("p3", "p4", "p5", "p6", "p7")),
        ("faster_rcnn", ("p2", "p3", "p4", "p5")),
        ("mask_rcnn", ("p2", "p3", "p4", "p5")),
        ("reppoints", ("p3", "p4", "p5", "p6", "p7")),
    ],
)
def test_one_step_for_each_arch(arch: str, levels: tuple[str, ...]) -> None:
    distiller = Distiller(detector(arch), detector(arch, seed=1))
    assert distiller.levels == levels
    assert distiller.fgd.hparams[levels[0]] == PRESETS[arch]
    images, targets = batch(with_masks=arch == "mask_rcnn")
    losses = distiller(images, targets)
    assert {f"fgd/{lv}/global" for lv in levels} <= set(losses)
    loss = total(losses)
    assert torch.isfinite(loss)
    loss.backward()
    assert all(p.grad is not None for p in distiller.fgd.parameters())


def test_mismatched_channels_and_mse_baseline() -> None:
    student, teacher = detector("retinanet", fpn=32), detector("retinanet", fpn=64, seed=1)
    for loss_type, term in (("fgd", "fg"), ("mse", "mse")):
        distiller = Distiller(student, teacher, method=loss_type)
        align = [m for n, m in distiller.fgd.named_modules() if n.endswith("align")]
        assert len(align) == 5 and all(
            isinstance(m, nn.Conv2d) and (m.in_channels, m.out_channels) == (32, 64) for m in align
        )
        losses = distiller(*batch())
        assert f"fgd/p7/{term}" in losses
        total(losses).backward()
        assert all(m.weight.grad is not None for m in align)


def test_different_detector_types_distil_common_levels() -> None:
    student, teacher = detector("retinanet"), detector("faster_rcnn", seed=1)
    with pytest.raises(CompatibilityError, match=r"teacher has no FPN level\(s\) \['p7'\]") as info:
        Distiller(student, teacher)
    assert "levels=['p3', 'p4', 'p5', 'p6']" in str(info.value)
    distiller = Distiller(student, teacher, levels=["p3", "p4", "p5"])
    losses = distiller(*batch())
    assert {k.split("/")[1] for k in losses if k.startswith("fgd/")} == {"p3", "p4", "p5"}


@pytest.mark.parametrize("switch_off", ["zero_weights", "zero_scale"])
def test_fgd_off_is_plain_student_training(switch_off: str) -> None:
    student = detector("faster_rcnn")  # samples proposals at random: the seed matters
    plain = copy.deepcopy(student)
    teacher = detector("faster_rcnn", seed=1)
    if switch_off == "zero_weights":
        off = FGDHyperParams(alpha=0.0, beta=0.0, gamma=0.0, lambda_=0.0)
        distiller = Distiller(student, teacher, hparams=off)
    else:
        distiller = Distiller(student, teacher)
        distiller.fgd_weight_scale = 0.0
    images, targets = batch()

    torch.manual_seed(123)
    distilled = distiller(images, targets)
    total(distilled).backward()
    torch.manual_seed(123)
    reference = plain(images, targets)
    total(reference).backward()

    assert all(v.item() == 0.0 for k, v in distilled.items() if k.startswith("fgd/"))
    assert {k: v for k, v in distilled.items() if not k.startswith("fgd/")}.keys() == set(reference)
    for key, value in reference.items():
        assert torch.equal(distilled[key], value), key
    for (name, p), q in zip(student.named_parameters(), plain.parameters(), strict=True):
        assert (p.grad is None) == (q.grad is None), name
        if p.grad is not None:
            assert torch.equal(p.grad, q.grad), name


def _cells(lo: float, hi: float, scale: float, size: int) -> tuple[int, int]:
    """Inclusive cell range of an edge pair in cell units, clipped (the FGD box rule)."""
    return max(math.floor(lo * scale), 0), min(math.ceil(hi * scale), size - 1)


def test_frame_boxes_land_on_the_right_cells_of_every_level() -> None:
    student, teacher = detector("retinanet"), detector("retinanet", seed=1)
    distiller = Distiller(student, teacher)
    teacher_transform_calls: list[int] = []
    handle = teacher.transform.register_forward_hook(lambda *_: teacher_transform_calls.append(1))
    try:
        images, targets = batch()
        out = distiller.forward_features(images, targets)
    finally:
        handle.remove()
    assert not teacher_transform_calls  # the teacher never runs its own transform
    assert not any(t.requires_grad for t in out.teacher_features.values())
    assert all(t.requires_grad for t in out.student_features.values())
    assert out.batch_shape == (96, 96)
    assert out.image_sizes == [(64, 96), (96, 60)]
    hand = [torch.tensor(b) * s for b, s in zip(BOXES, SCALES, strict=True)]
    for got, want in zip(out.boxes, hand, strict=True):
        torch.testing.assert_close(got, want)
    # eval mode: the same frame, with detections instead of losses
    distiller.eval()
    seen = distiller.forward_features(images, targets)
    distiller.train()
    assert seen.losses == {} and seen.detections is not None and len(seen.detections) == 2
    for got, want in zip(seen.boxes, hand, strict=True):
        torch.testing.assert_close(got, want)
    # the teacher ran on the student's padded batch
    with torch.no_grad():
        padded = student.transform(images, copy.deepcopy(targets))[0].tensors
        teacher_out = teacher.backbone(padded)
    for lvl, key in (("p3", "0"), ("p7", "p7")):
        torch.testing.assert_close(out.teacher_features[lvl], teacher_out[key])

    h_in, w_in = out.batch_shape
    naive_differs = False
    for lvl, feat in out.student_features.items():
        h, w = feat.shape[-2:]
        assert (h, w) == out.teacher_features[lvl].shape[-2:]
        fg, _bg = fgd_masks(out.boxes, (h, w), out.batch_shape)
        for i, boxes in enumerate(hand):
            expected = torch.zeros(h, w, dtype=torch.bool)
            for x1, y1, x2, y2 in boxes.tolist():
                r0, r1 = _cells(y1, y2, h / h_in, h)
                c0, c1 = _cells(x1, x2, w / w_in, w)
                expected[r0 : r1 + 1, c0 : c1 + 1] = True
            assert torch.equal(fg[i] > 0, expected), (lvl, i)
        # the released code's frame (scaled by the unpadded image size) puts them elsewhere
        wrong = [
            b * torch.tensor([w_in / iw, h_in / ih] * 2)
            for b, (ih, iw) in zip(out.boxes, out.image_sizes, strict=True)
        ]
        naive_differs |= not torch.equal(fgd_masks(wrong, (h, w), out.batch_shape)[0], fg)
    assert naive_differs


def test_hooks_are_removed_and_nothing_is_kept() -> None:
    student = detector("retinanet")
    distiller = Distiller(student, detector("retinanet", seed=1))
    distiller(*batch())
    bad_targets = [{"boxes": torch.zeros(1, 3), "labels": torch.ones(1, dtype=torch.int64)}] * 2
    with pytest.raises((ValueError, AssertionError, RuntimeError)):
        distiller(batch()[0], bad_targets)
    assert not student.transform._forward_hooks and not student.backbone._forward_hooks
    assert not [v for v in vars(distiller).values() if isinstance(v, Tensor)]
    assert set(dict(distiller.named_buffers())) <= {
        f"student.{k}" for k, _ in student.named_buffers()
    } | {f"fgd.{k}" for k, _ in distiller.fgd.named_buffers()}


def test_empty_targets() -> None:
    distiller = Distiller(detector("retinanet"), detector("retinanet", seed=1))
    images, targets = batch()
    targets[1] = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}
    losses = distiller(images, targets)
    assert all(torch.isfinite(v) for v in losses.values())


def test_eval_mode_is_the_student_and_teacher_follows_devices_and_dtypes() -> None:
    student, teacher = detector("fcos", detections_per_img=5), detector("fcos", seed=1)
    distiller = Distiller(student, teacher).eval()
    images, _ = batch()
    with torch.no_grad():
        got, want = distiller(images), student(images)
    assert len(got) == 2
    for a, b in zip(got, want, strict=True):
        assert torch.equal(a["boxes"], b["boxes"]) and torch.equal(a["scores"], b["scores"])
    distiller.to(torch.float64)
    assert all(p.dtype == torch.float64 for p in teacher.parameters())
    assert all(p.dtype == torch.float64 for p in distiller.parameters())
    distiller.float().train()
    assert all(p.dtype == torch.float32 for p in teacher.parameters())
    assert not teacher.training and student.training


def test_fgd_weight_scale_multiplies_the_terms() -> None:
    distiller = Distiller(detector("retinanet"), detector("retinanet", seed=1))
    images, targets = batch()
    full = distiller(images, targets)
    distiller.fgd_weight_scale = 0.25
    quarter = distiller(images, targets)
    for key, value in full.items():
        factor = 0.25 if key.startswith("fgd/") else 1.0
        torch.testing.assert_close(quarter[key], value * factor)
    with pytest.raises(ConfigError, match="fgd_weight_scale"):
        distiller.fgd_weight_scale = -1.0


def test_teacher_rms_normalisation_reaches_the_loss() -> None:
    raw = Distiller(detector("retinanet"), detector("retinanet", seed=1), levels=["p3"])
    norm = Distiller(
        detector("retinanet"), detector("retinanet", seed=1), levels=["p3"], normalize="teacher_rms"
    )
    norm.fgd.load_state_dict(raw.fgd.state_dict())
    assert norm.fgd.normalize == "teacher_rms"
    images, targets = batch()
    batch_out = raw.forward_features(images, targets)
    rms = batch_out.teacher_features["p3"].pow(2).mean().sqrt()
    with torch.no_grad():
        got = norm(images, targets)
    assert got["fgd/p3/fg"] > 0
    expected, _ = raw.fgd(
        {"p3": batch_out.student_features["p3"].detach() / rms},
        {"p3": batch_out.teacher_features["p3"] / rms},
        batch_out.boxes,
        batch_out.batch_shape,
    )
    for key, value in expected.items():
        torch.testing.assert_close(got[key], value, rtol=1e-4, atol=1e-6)


def test_inheriting_copies_neck_and_heads_and_leaves_the_backbone() -> None:
    student = detector("retinanet")
    teacher = detector("retinanet", seed=1, backbone="resnet34", num_classes=5)
    body_before = {k: v.clone() for k, v in student.backbone.body.state_dict().items()}
    logits_before = student.head.classification_head.cls_logits.weight.detach().clone()
    assert not torch.equal(
        student.backbone.fpn.layer_blocks[0][0].weight,
        teacher.backbone.fpn.layer_blocks[0][0].weight,
    )
    distiller = Distiller(student, teacher, inherit_teacher=True)
    report = distiller.inherit_report
    assert report is not None
    s_state, t_state = student.state_dict(), teacher.state_dict()
    assert any(k.startswith("backbone.fpn.") for k in report.copied)
    assert any(k.startswith("head.regression_head.") for k in report.copied)
    for key in report.copied:
        assert torch.equal(s_state[key], t_state[key]), key
    # 5 classes vs 3: the classifier's last layer does not fit and keeps its own initialisation
    assert set(report.wrong_shape) == {
        "head.classification_head.cls_logits.weight",
        "head.classification_head.cls_logits.bias",
    }
    assert torch.equal(student.head.classification_head.cls_logits.weight, logits_before)
    for key, value in student.backbone.body.state_dict().items():
        assert torch.equal(value, body_before[key]), key
    assert "copied" in report.describe() and "another shape" in report.describe()
    without = Distiller(detector("retinanet"), teacher)
    assert without.inherit_report is None


def test_inheriting_reppoints_takes_the_learned_moment_transfer() -> None:
    student = detector("reppoints")
    teacher = detector("reppoints", seed=1, backbone="resnet34")
    with torch.no_grad():
        teacher.moment_transfer.copy_(torch.tensor([0.25, -0.5]))
    report = inherit_weights(student, teacher)
    # the head's points were trained against the teacher's box scale: it comes along
    assert "moment_transfer" in report.copied
    torch.testing.assert_close(student.moment_transfer.detach(), torch.tensor([0.25, -0.5]))
    assert not any(k.startswith("backbone.body.") for k in report.copied)


def test_student_state_dict_rebuilds_as_a_plain_detector() -> None:
    student = detector("retinanet")
    distiller = Distiller(student, detector("retinanet", fpn=64, seed=1))
    state = distiller.student_state_dict()
    assert set(state) == set(student.state_dict())
    spec = model_spec(student)
    assert spec is not None
    rebuilt = build_detector(**spec)
    report = load_state_dict_checked(rebuilt, state, source="distilled student")
    assert report.ok
    assert torch.equal(
        rebuilt.head.regression_head.bbox_reg.weight, state["head.regression_head.bbox_reg.weight"]
    )


def test_incompatible_pairs_are_clear_errors() -> None:
    student, teacher = detector("retinanet"), detector("retinanet", seed=1)
    with pytest.raises(CompatibilityError, match="same module"):
        Distiller(student, student)
    with pytest.raises(CompatibilityError, match="no `transform`"):
        Distiller(student, nn.Linear(2, 2))
    with pytest.raises(CompatibilityError, match=r"student has no FPN level\(s\) \['p2'\]"):
        Distiller(student, teacher, levels=["p2", "p3"])
    with pytest.raises(ConfigError, match="names like 'p3'"):
        Distiller(student, teacher, levels=["P3"])
    with pytest.raises(ConfigError, match="unknown detector family 'yolo'"):
        Distiller(student, teacher, family="yolo")
    with pytest.raises(ConfigError, match="method"):
        Distiller(student, teacher, method="l1")
    with pytest.raises(ConfigError, match="normalize must be one of"):
        Distiller(student, teacher, levels=["p3"], normalize="layer")
    with pytest.raises(CompatibilityError, match=r"p4 \(student 16, teacher 32\)"):
        Distiller._check_pair(
            ("p3", "p4"),
            {"p3": LevelInfo("0", 8, 32), "p4": LevelInfo("1", 16, 32)},
            {"p3": LevelInfo("0", 8, 32), "p4": LevelInfo("1", 32, 32)},
        )
    odd = detector("retinanet", seed=1, image_mean=[0.5, 0.5, 0.5])
    with pytest.raises(CompatibilityError, match="image_mean"):
        Distiller(student, odd)


def test_ddp_wraps_only_the_student_and_fgd(tmp_path: Any) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    if not dist.is_available() or dist.is_initialized():
        pytest.skip("torch.distributed unavailable or already initialised")
    dist.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1
    )
    try:
        student, teacher = detector("retinanet"), detector("retinanet", fpn=64, seed=1)
        ddp = DistributedDataParallel(Distiller(student, teacher))
        wrapped = {id(p) for p in ddp.parameters()}
        assert not wrapped & {id(p) for p in teacher.parameters()}
        losses = ddp(*batch())
        total(losses).backward()  # every parameter is used: no find_unused_parameters needed
        assert all(p.grad is not None for p in ddp.parameters())
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("method", ["pkd", "cwd", "mgd"])
def test_other_methods_train_with_the_student_and_stay_out_of_its_state(method: str) -> None:
    distiller = Distiller(detector("retinanet"), detector("retinanet", seed=1), method=method)
    losses = distiller(*batch())
    levels = ("p3", "p4", "p5", "p6") if method == "pkd" else ("p3", "p4", "p5", "p6", "p7")
    assert {k for k in losses if k.startswith("fgd/")} == {f"fgd/{lv}/{method}" for lv in levels}
    total(losses).backward()
    own = list(distiller.fgd.parameters())
    assert (len(own) > 0) == (method == "mgd")
    assert all(p.grad is not None for p in own)
    assert set(distiller.student_state_dict()) == set(distiller.student.state_dict())
    assert not any(k.startswith("fgd.") for k in distiller.student_state_dict())


def test_a_reppoints_teacher_distils_a_retinanet_student() -> None:
    # a heterogeneous pair: the same levels and strides, each detector its own head
    student, teacher = detector("retinanet"), detector("reppoints", seed=1)
    for method in ("fgd", "pkd"):
        distiller = Distiller(student, teacher, method=method, inherit_teacher=True)
        assert distiller.family == "retinanet"  # the student's presets
        report = distiller.inherit_report
        assert report is not None and any(k.startswith("backbone.fpn.") for k in report.copied)
        assert not any(k.startswith("head.") for k in report.copied)  # other heads
        total(distiller(*batch())).backward()
    # PKD and CWD have no align layer: other channels are refused, naming both
    wide = detector("reppoints", fpn=64, seed=1)
    for method in ("pkd", "cwd"):
        with pytest.raises(CompatibilityError, match=rf"with {method}: level p3: .*32.*64"):
            Distiller(student, wide, method=method)
