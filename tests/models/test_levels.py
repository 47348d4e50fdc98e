"""Level names by stride for torchvision backbones."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torchvision.models.detection import fasterrcnn_mobilenet_v3_large_fpn

from fgdistill.errors import CompatibilityError
from fgdistill.models.build import build_detector
from fgdistill.models.levels import (
    backbone_levels,
    feature_levels,
    level_channels,
    level_name,
    level_strides,
    rename_features,
)


def _tiny(arch: str, backbone: str = "resnet18", fpn: int = 32) -> nn.Module:
    return build_detector(
        arch, backbone=backbone, num_classes=3, fpn_channels=fpn, min_size=64, max_size=96
    )


def test_one_stage_keys_are_p3_to_p7() -> None:
    model = _tiny("retinanet", fpn=48)
    assert feature_levels(model) == {"p3": "0", "p4": "1", "p5": "2", "p6": "p6", "p7": "p7"}
    assert level_strides(model) == {"p3": 8, "p4": 16, "p5": 32, "p6": 64, "p7": 128}
    assert level_channels(model) == dict.fromkeys(("p3", "p4", "p5", "p6", "p7"), 48)


@pytest.mark.parametrize("backbone", ["resnet18", "mobilenet_v3_large"])
def test_two_stage_keys_are_p2_to_p6(backbone: str) -> None:
    model = _tiny("faster_rcnn", backbone)
    assert feature_levels(model) == {"p2": "0", "p3": "1", "p4": "2", "p5": "3", "p6": "pool"}
    assert level_strides(model) == {"p2": 4, "p3": 8, "p4": 16, "p5": 32, "p6": 64}


def test_probe_leaves_batchnorm_and_modes_alone_and_is_cached() -> None:
    model = _tiny("fcos")
    model.train()
    bn = model.backbone.body.bn1
    before = bn.running_mean.clone()
    calls = []
    handle = model.backbone.register_forward_hook(lambda *_: calls.append(1))
    try:
        feature_levels(model)
        level_strides(model)
        backbone_levels(model.backbone)  # the backbone itself is accepted too
    finally:
        handle.remove()
    assert len(calls) == 1
    assert torch.equal(bn.running_mean, before)
    assert all(m.training for m in model.modules())
    assert bn.num_batches_tracked.item() == 0


def test_level_name() -> None:
    assert level_name(4) == "p2"
    assert level_name(128) == "p7"
    for bad in (1, 3, 12):
        with pytest.raises(CompatibilityError, match=str(bad)):
            level_name(bad)


def test_duplicate_strides_are_rejected() -> None:
    # torchvision's own MobileNetV3 FPN returns two stride-32 maps; they cannot both be named.
    model = fasterrcnn_mobilenet_v3_large_fpn(weights=None, weights_backbone=None, num_classes=3)
    with pytest.raises(CompatibilityError, match="stride 32"):
        feature_levels(model)


class _OddStride(nn.Module):
    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"a": nn.functional.avg_pool2d(x, 4), "b": x[:, :, ::3, ::3]}


def test_non_power_of_two_stride_is_rejected() -> None:
    with pytest.raises(CompatibilityError, match="'b'"):
        backbone_levels(_OddStride())


def test_rename_features() -> None:
    feats = {"0": torch.zeros(1, 2, 8, 8), "p6": torch.ones(1, 2, 1, 1)}
    renamed = rename_features(feats, {"p3": "0", "p6": "p6"}, ["p6"])
    assert list(renamed) == ["p6"] and renamed["p6"] is feats["p6"]
    with pytest.raises(CompatibilityError, match="p7"):
        rename_features(feats, {"p3": "0"}, ["p3", "p7"])


class _NoMetaBackbone(nn.Module):
    """A backbone the meta device cannot run (it reads a value), so the probe runs it for real."""

    def __init__(self) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        y = self.bn(x + 1.0)
        if float(y.abs().sum()) >= 0:  # needs real data
            y = nn.functional.avg_pool2d(y, 8)
        return {"0": y, "1": nn.functional.avg_pool2d(y, 2)}


def test_probe_falls_back_to_a_real_run_without_touching_statistics() -> None:
    backbone = _NoMetaBackbone().train()
    assert [info.key for info in backbone_levels(backbone).values()] == ["0", "1"]
    assert level_strides(backbone) == {"p3": 8, "p4": 16}
    assert level_channels(backbone) == {"p3": 3, "p4": 3}
    assert torch.equal(backbone.bn.running_mean, torch.zeros(3))
    assert backbone.training and backbone.bn.training
