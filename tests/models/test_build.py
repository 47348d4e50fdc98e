"""build_detector: architectures, backbones, options, weights and checkpoints."""

from __future__ import annotations

import sys
import urllib.error
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torchvision.models import resnet18
from torchvision.models.detection import FCOS, FasterRCNN, MaskRCNN, RetinaNet
from torchvision.ops import FrozenBatchNorm2d

from fgdistill.errors import CheckpointError, ConfigError
from fgdistill.models.build import build_detector, load_detector, model_spec
from fgdistill.models.checkpoint import save_model_spec
from fgdistill.models.weights import load_state_dict_checked

TINY: dict[str, Any] = {
    "backbone": "resnet18",
    "num_classes": 3,
    "fpn_channels": 32,
    "min_size": 64,
    "max_size": 96,
}


def _batch() -> tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]]:
    images = [torch.rand(3, 64, 80), torch.rand(3, 72, 64)]
    targets = []
    for h, w, box, label in ((64, 80, [4.0, 6.0, 40.0, 50.0], 1), (72, 64, [10.0, 8, 60, 70], 2)):
        masks = torch.zeros(1, h, w, dtype=torch.uint8)
        masks[0, int(box[1]) : int(box[3]), int(box[0]) : int(box[2])] = 1
        targets.append(
            {"boxes": torch.tensor([box]), "labels": torch.tensor([label]), "masks": masks}
        )
    return images, targets


@pytest.mark.parametrize(
    ("arch", "cls", "loss_keys"),
    [
        ("retinanet", RetinaNet, {"classification", "bbox_regression"}),
        ("fcos", FCOS, {"classification", "bbox_regression", "bbox_ctrness"}),
        ("faster_rcnn", FasterRCNN, {"loss_classifier", "loss_objectness"}),
        ("mask_rcnn", MaskRCNN, {"loss_mask", "loss_classifier"}),
    ],
)
def test_each_arch_follows_torchvision_contract(arch: str, cls: type, loss_keys: set[str]) -> None:
    torch.manual_seed(0)
    small = (
        {"detections_per_img": 5, "topk_candidates": 20}
        if arch in ("retinanet", "fcos")
        else {"box_detections_per_img": 5, "rpn_post_nms_top_n_test": 20}
    )
    model = build_detector(arch, **TINY, **small)
    assert isinstance(model, cls)
    assert model.transform.min_size == (64,) and model.transform.max_size == 96
    images, targets = _batch()
    model.train()
    losses = model(images, targets)
    assert loss_keys <= set(losses) and all(torch.isfinite(v) for v in losses.values())
    model.eval()
    with torch.no_grad():
        out = model(images)
    assert len(out) == 2 and {"boxes", "labels", "scores"} <= set(out[0])
    assert len(out[0]["boxes"]) <= 5
    spec = model_spec(model)
    assert spec is not None and spec["arch"] == arch and spec["fpn_channels"] == 32
    assert all(spec[k] == v for k, v in small.items())  # detector options are recorded too


def test_defaults_without_weights_train_everything_with_batchnorm() -> None:
    model = build_detector("retinanet", **TINY)
    body = model.backbone.body
    assert all(p.requires_grad for p in model.parameters())
    assert isinstance(body.bn1, nn.BatchNorm2d)
    assert not any(isinstance(m, FrozenBatchNorm2d) for m in model.modules())
    spec = model_spec(model)
    assert spec is not None and spec["frozen_bn"] is False and spec["trainable_layers"] == 5


def test_trainable_layers_and_frozen_bn() -> None:
    model = build_detector("faster_rcnn", trainable_layers=2, frozen_bn=True, **TINY)
    body = model.backbone.body
    assert isinstance(body.bn1, FrozenBatchNorm2d)
    for name, param in body.named_parameters():
        assert param.requires_grad == name.startswith(("layer3", "layer4")), name
    assert all(p.requires_grad for p in model.backbone.fpn.parameters())
    with pytest.raises(ConfigError, match="trainable_layers"):
        build_detector("retinanet", trainable_layers=6, **TINY)


def test_group_norm_heads_and_anchor_sizes() -> None:
    model = build_detector(
        "retinanet", head_norm="group", anchor_sizes=[8, 16, 32, 64, 128], **TINY
    )
    assert any(isinstance(m, nn.GroupNorm) for m in model.head.modules())
    assert model.anchor_generator.sizes[0] == (8, 10, 12)
    plain = build_detector("retinanet", **TINY)
    assert not any(isinstance(m, nn.GroupNorm) for m in plain.head.modules())
    rcnn = build_detector("mask_rcnn", head_norm="group", anchor_sizes=[8, 16, 32, 64, 128], **TINY)
    assert any(isinstance(m, nn.GroupNorm) for m in rcnn.roi_heads.box_head.modules())
    assert any(isinstance(m, nn.GroupNorm) for m in rcnn.roi_heads.mask_head.modules())
    assert rcnn.rpn.anchor_generator.sizes == ((8,), (16,), (32,), (64,), (128,))
    # the GroupNorm mask head is as wide as the FPN, and its predictor takes that width
    widths = {
        m.out_channels for m in rcnn.roi_heads.mask_head.modules() if isinstance(m, nn.Conv2d)
    }
    assert widths == {TINY["fpn_channels"]}
    mask = torch.zeros(1, 64, 64, dtype=torch.uint8)
    mask[:, 8:40, 8:40] = 1
    target = {"boxes": torch.tensor([[8.0, 8.0, 40.0, 40.0]]), "labels": torch.tensor([1])}
    losses = rcnn([torch.rand(3, 64, 64)], [{**target, "masks": mask}])
    assert torch.isfinite(losses["loss_mask"])
    fcos = build_detector("fcos", **{**TINY, "fpn_channels": 48})  # 48 is no multiple of 32
    norms = [m for m in fcos.head.modules() if isinstance(m, nn.GroupNorm)]
    assert norms and all(48 % m.num_groups == 0 for m in norms)


def test_other_backbones() -> None:
    mobile = build_detector("retinanet", **{**TINY, "backbone": "mobilenet_v3_large"})
    assert mobile.backbone.out_channels == 32
    resnext = build_detector("faster_rcnn", **{**TINY, "backbone": "resnext50_32x4d"})
    lateral = resnext.backbone.fpn.inner_blocks
    assert [b[0].in_channels for b in lateral] == [256, 512, 1024, 2048]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"arch": "yolo"}, "unknown detector arch 'yolo'"),
        ({"backbone": "vgg16"}, "unknown backbone 'vgg16'"),
        ({"num_classes": 1}, "num_classes"),
        ({"head_norm": "batch"}, "head_norm"),
        ({"arch": "fcos", "anchor_sizes": [8, 16, 32, 64, 128]}, "anchor_sizes"),
        ({"anchor_sizes": [8, 16]}, "5"),
        # torchvision would hand a misspelt keyword to its transform, which ignores it
        ({"scor_thresh": 0.1}, r"retinanet: unknown option\(s\) 'scor_thresh'.*score_thresh"),
        ({"arch": "reppoints", "point_scale": 1}, "unknown option.*'point_scale'"),
        ({"arch": "mask_rcnn", "rpn_head": None}, "unknown option.*'rpn_head'"),
    ],
)
def test_bad_options(kwargs: dict[str, Any], match: str) -> None:
    args = {"arch": "retinanet", **TINY, **kwargs}
    with pytest.raises(ConfigError, match=match):
        build_detector(**args)


def test_detector_options_reach_the_detector() -> None:
    fcos = build_detector("fcos", **TINY, score_thresh=0.3, size_divisible=16)
    assert fcos.score_thresh == 0.3 and fcos.transform.size_divisible == 16
    rcnn = build_detector("faster_rcnn", **TINY, box_detections_per_img=7)
    assert rcnn.roi_heads.detections_per_img == 7
    # RepPoints hands the transform's options on too
    reppoints = build_detector("reppoints", **TINY, size_divisible=16, fixed_size=(64, 64))
    assert reppoints.transform.size_divisible == 16


def test_a_stored_spec_with_an_option_nobody_took_still_rebuilds(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # written before options were checked: torchvision had ignored it, so the model lacks it
    spec = {"arch": "retinanet", **TINY, "fpn_channels": 32, "scor_thresh": 0.2}
    source = build_detector("retinanet", **{**TINY, "fpn_channels": 32})
    torch.save(source.state_dict(), tmp_path / "model.pt")
    save_model_spec(spec, tmp_path / "model.yaml")
    with caplog.at_level("WARNING"):
        model = load_detector(tmp_path / "model.pt")
    assert model.score_thresh == 0.05
    assert not model.training
    assert "leaving out ['scor_thresh'], which retinanet does not take" in caplog.text


def test_load_detector_uses_the_fallback_spec_only_without_one(tmp_path: Path) -> None:
    source = build_detector("fcos", **TINY)
    path = tmp_path / "weights.pt"
    torch.save(source.state_dict(), path)
    with pytest.raises(CheckpointError, match="cannot tell which detector"):
        load_detector(path)
    model = load_detector(path, fallback_spec={"arch": "fcos", **TINY})
    assert model_spec(model) == model_spec(source)


def test_reppoints_missing_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "fgdistill.models.reppoints", None)
    with pytest.raises(ConfigError, match="reppoints not available"):
        build_detector("reppoints", **TINY)


def test_checkpoint_round_trip_and_spec_rebuild(tmp_path: Path) -> None:
    torch.manual_seed(1)
    source = build_detector("fcos", **TINY)
    plain, wrapped = tmp_path / "plain.pt", tmp_path / "wrapped.pt"
    torch.save(source.state_dict(), plain)
    torch.save({"model": source.state_dict(), "epoch": 3}, wrapped)
    spec = model_spec(source)
    assert spec is not None
    for path in (plain, wrapped):
        rebuilt = build_detector(**{**spec, "weights": path})
        for (name, a), b in zip(
            source.state_dict().items(), rebuilt.state_dict().values(), strict=True
        ):
            assert torch.equal(a, b), name
    # the spec does not remember the weights: rebuilding from it never loads anything again
    assert "weights" not in (model_spec(rebuilt) or {})


def test_backbone_weights_from_a_path(tmp_path: Path) -> None:
    torch.manual_seed(2)
    net = resnet18()
    path = tmp_path / "r18.pth"
    torch.save(net.state_dict(), path)
    model = build_detector("retinanet", weights_backbone=str(path), **TINY)
    body = model.backbone.body
    assert torch.equal(body.layer3[0].conv1.weight, net.layer3[0].conv1.weight)
    assert torch.equal(body.bn1.running_var, net.bn1.running_var)
    # pretrained backbone: frozen BatchNorm and three trainable stages by default
    assert isinstance(body.bn1, FrozenBatchNorm2d)
    assert (
        not body.layer1[0].conv1.weight.requires_grad and body.layer2[0].conv1.weight.requires_grad
    )


def test_bad_checkpoint_files(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        build_detector("retinanet", weights=tmp_path / "nope.pt", **TINY)
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"\x00garbage" * 100)
    with pytest.raises(CheckpointError, match="corrupt"):
        build_detector("retinanet", weights=corrupt, **TINY)


def test_mismatched_checkpoint_names_every_bad_key(tmp_path: Path) -> None:
    other = build_detector("retinanet", **{**TINY, "num_classes": 5})
    state = other.state_dict()
    del state["backbone.fpn.layer_blocks.0.0.weight"]
    state["head.extra.weight"] = torch.zeros(2)
    path = tmp_path / "other.pt"
    torch.save(state, path)
    with pytest.raises(CheckpointError) as info:
        build_detector("retinanet", weights=path, **TINY)
    message = str(info.value)
    assert str(path) in message
    assert "1 missing key(s): backbone.fpn.layer_blocks.0.0.weight" in message
    assert "1 unexpected key(s): head.extra.weight" in message
    assert (
        "head.classification_head.cls_logits.weight (checkpoint [45, 32, 3, 3] vs model" in message
    )
    assert "head.classification_head.cls_logits.bias" in message

    model = build_detector("retinanet", **TINY)
    report = load_state_dict_checked(model, state, source="x", strict=False)
    assert report.missing == ["backbone.fpn.layer_blocks.0.0.weight"]
    assert report.unexpected == ["head.extra.weight"]
    assert set(report.wrong_shape) == {
        "head.classification_head.cls_logits.weight",
        "head.classification_head.cls_logits.bias",
    }
    # what fitted was loaded; what did not was left alone
    assert torch.equal(model.backbone.body.conv1.weight, other.backbone.body.conv1.weight)
    assert model.head.classification_head.cls_logits.weight.shape[0] == 27


def test_torchvision_weights_fail_offline_with_a_clear_message(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls: list[str] = []

    def offline(url: str, *args: Any, **kwargs: Any) -> Any:
        calls.append(url)
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr("torchvision.models._api.load_state_dict_from_url", offline)
    with pytest.raises(CheckpointError, match="network") as info:
        build_detector("retinanet", weights_backbone="ResNet18_Weights.IMAGENET1K_V1", **TINY)
    assert "ResNet18_Weights.IMAGENET1K_V1" in str(info.value) and len(calls) == 1
    with pytest.raises(CheckpointError, match=r"RetinaNet_ResNet50_FPN_Weights\.COCO_V1"):
        build_detector("retinanet", weights="RetinaNet_ResNet50_FPN_Weights.COCO_V1", **TINY)
    with pytest.raises(ConfigError, match="unknown torchvision weights name"):
        build_detector("retinanet", weights="Nope_Weights.V1", **TINY)
    # nothing is downloaded unless a weights name is given
    build_detector("retinanet", **TINY)
    assert len(calls) == 2


def test_group_norm_heads_take_one_image_on_a_1x1_map() -> None:
    # fpn_channels=32: GroupNorm(32, 32), one channel per group; at 64 px p7 is 1x1
    torch.manual_seed(0)
    model = build_detector(
        arch="retinanet",
        backbone="resnet18",
        num_classes=3,
        fpn_channels=32,
        min_size=64,
        max_size=64,
        head_norm="group",
        anchor_sizes=[8, 16, 32, 64, 128],
    ).eval()
    images = [torch.rand(3, 64, 64), torch.rand(3, 64, 64)]
    with torch.no_grad():
        alone = model(images[:1])[0]  # raised "Expected more than 1 value per channel"
        batched = model(images)[0]
    for key in ("boxes", "scores", "labels"):
        assert torch.allclose(alone[key].float(), batched[key].float(), atol=1e-5), key
    # the same parameters as nn.GroupNorm: checkpoints load either way
    norms = [m for m in model.modules() if isinstance(m, nn.GroupNorm)]
    assert norms and all(set(dict(m.named_parameters())) == {"weight", "bias"} for m in norms)


def test_a_state_dict_of_another_arch_is_a_checkpoint_error_with_shapes() -> None:
    kwargs: dict[str, Any] = {
        "backbone": "resnet18",
        "num_classes": 3,
        "fpn_channels": 32,
        "min_size": 64,
        "max_size": 64,
    }
    retina = build_detector(arch="retinanet", **kwargs)
    fcos = build_detector(arch="fcos", **kwargs)
    with pytest.raises(CheckpointError) as info:
        load_state_dict_checked(retina, fcos.state_dict(), source="fcos.pt")
    message = str(info.value)
    assert message.startswith("weights from fcos.pt do not fit RetinaNet:")
    assert "wrong shape" in message and "[32, 32, 3, 3]" in message
    assert "size mismatch" not in message  # not torch's raw dump
