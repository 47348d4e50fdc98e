"""The released recipes: P6/P7 from C5, the FCOS schedule, multi-scale training."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fgdistill.cli.train_cmds import resolve_config_path
from fgdistill.engine.config import load_config
from fgdistill.engine.param_groups import bias_param_groups
from fgdistill.engine.runner import build_optimizer_and_schedule
from fgdistill.engine.trainer import WarmupMultiStepSchedule
from fgdistill.errors import ConfigError
from fgdistill.models import build_detector, model_spec

TINY = {"backbone": "resnet18", "num_classes": 3, "fpn_channels": 32, "min_size": 64}


@pytest.mark.parametrize("arch", ["retinanet", "reppoints"])
def test_p6_from_c5(arch: str) -> None:
    torch.manual_seed(0)
    model = build_detector(arch, **TINY, max_size=64, p6_from="c5").eval()
    extra = model.backbone.fpn.extra_blocks
    assert extra.p6.in_channels == 512 and not extra.use_P5
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        c5 = model.backbone.body(x)["2"]
        out = model.backbone(x)
        assert torch.allclose(out["p6"], extra.p6(c5), atol=1e-6)
        assert torch.allclose(out["p7"], extra.p7(torch.relu(out["p6"])), atol=1e-6)
    assert model_spec(model)["p6_from"] == "c5"  # type: ignore[index]
    default = build_detector(arch, **TINY, max_size=64).eval()
    assert default.backbone.fpn.extra_blocks.use_P5
    assert "p6_from" not in model_spec(default)  # type: ignore[operator]
    with torch.no_grad():
        out = default.backbone(x)
        p6 = default.backbone.fpn.extra_blocks.p6(out["2"])
    assert torch.allclose(out["p6"], p6, atol=1e-6)
    with pytest.raises(ConfigError, match="one-stage"):
        build_detector("faster_rcnn", **TINY, p6_from="c5")


@pytest.mark.parametrize(
    "name",
    [
        "coco/retinanet_r50_baseline",
        "coco/retinanet_r101_teacher",
        "coco/retinanet_x101_64x4d_teacher",
        "coco/fgd_retinanet_r101_r50",
        "coco/fgd_retinanet_x101_64x4d_r50",
        "coco/reppoints_r50_baseline",
        "coco/reppoints_x101_64x4d_teacher",
        "coco/fgd_reppoints_x101_64x4d_r50",
    ],
)
def test_coco_one_stage_configs_take_p6_from_c5(name: str) -> None:
    cfg = load_config(resolve_config_path(name))
    assert cfg.model.extra["p6_from"] == "c5"
    if cfg.distill is not None:
        assert cfg.distill.teacher.extra["p6_from"] == "c5"


def test_multi_scale_training_draws_each_size_and_evaluates_at_the_last() -> None:
    torch.manual_seed(0)
    model = build_detector("retinanet", **{**TINY, "min_size": [48, 80]}, max_size=200)
    assert model_spec(model)["min_size"] == [48, 80]  # type: ignore[index]
    images = [torch.rand(3, 100, 100)]
    model.train()
    seen = set()
    for _ in range(30):
        batch, _ = model.transform(images, [{"boxes": torch.zeros(0, 4)}])
        seen.add(batch.image_sizes[0][0])
    assert seen == {48, 80}
    model.eval()
    batch, _ = model.transform(images)
    assert batch.image_sizes[0] == (80, 80)
    rebuilt = build_detector(**model_spec(model))  # type: ignore[arg-type]
    assert tuple(rebuilt.transform.min_size) == (48, 80)


def test_config_takes_a_list_of_sizes() -> None:
    cfg = load_config(None, ["model.min_size=[640, 800]"])
    assert cfg.model.min_size == [640, 800]
    with pytest.raises(ConfigError, match="min_size"):
        load_config(None, ["model.min_size=[0, 800]"])
    with pytest.raises(ConfigError, match="min_size"):
        load_config(None, ["model.min_size=[]"])
    fcos = load_config(resolve_config_path("coco/fgd_fcos_r101_r50"))
    assert fcos.model.min_size == [640, 800]


def test_constant_warmup() -> None:
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.01)
    s = WarmupMultiStepSchedule(
        opt, milestones=[1000], warmup_iters=500, warmup_factor=1 / 3, warmup_method="constant"
    )
    assert s.factor(0) == pytest.approx(1 / 3) and s.factor(499) == pytest.approx(1 / 3)
    assert s.factor(500) == 1.0 and s.factor(1000) == pytest.approx(0.1)
    linear = WarmupMultiStepSchedule(opt, milestones=[], warmup_iters=500, warmup_factor=1 / 3)
    assert linear.factor(250) == pytest.approx(2 / 3)


def test_bias_groups_leave_norm_layers_alone() -> None:
    model = build_detector("fcos", **TINY, max_size=64)
    groups = bias_param_groups(model, lr=0.01, weight_decay=1e-4, bias_lr_mult=2, bias_decay_mult=0)
    base, biases = groups
    assert (biases["lr"], biases["weight_decay"]) == (0.02, 0.0)
    assert (base["lr"], base["weight_decay"]) == (0.01, 1e-4)
    ids = {id(p) for p in biases["params"]}
    cls_conv = model.head.classification_head.cls_logits
    gn = model.head.classification_head.conv[1]
    assert isinstance(gn, nn.GroupNorm)
    assert id(cls_conv.bias) in ids and id(gn.bias) not in ids and id(cls_conv.weight) not in ids
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert len(base["params"]) + len(biases["params"]) == len(trainable)


def test_fcos_config_builds_the_released_schedule() -> None:
    cfg = load_config(resolve_config_path("coco/fcos_r50_baseline"), ["data.batch_size=16"])
    # the released FCOS student: linear warm-up from 1/3 (its lr_config sets warmup='linear'
    # over mmdetection's constant one), biases at 2x the lr without weight decay
    assert (cfg.optim.warmup, cfg.optim.bias_lr_mult, cfg.optim.bias_decay_mult) == (
        "linear",
        2.0,
        0.0,
    )
    assert cfg.optim.warmup_factor == pytest.approx(1 / 3)
    model = build_detector("fcos", **TINY, max_size=64)
    optimizer, schedule = build_optimizer_and_schedule(cfg, model, iters_per_epoch=1000)
    lrs = [g["lr"] for g in optimizer.param_groups]
    decays = [g["weight_decay"] for g in optimizer.param_groups]
    assert lrs == pytest.approx([0.01, 0.02]) and decays == [1e-4, 0.0]
    assert schedule.set_iteration(0) == pytest.approx(0.01 / 3)
    assert optimizer.param_groups[1]["lr"] == pytest.approx(0.02 / 3)
    assert schedule.set_iteration(250) == pytest.approx(0.01 * 2 / 3)
    assert schedule.set_iteration(500) == pytest.approx(0.01)
