"""from_torchvision: torchvision's COCO detectors as ours, with the same features and detections."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch
from torchvision.ops import FrozenBatchNorm2d

from fgdistill.errors import CheckpointError, ConfigError
from fgdistill.models import (
    TORCHVISION_MODELS,
    build_detector,
    coco_categories,
    from_torchvision,
    model_spec,
    torchvision_spec,
)

from ._tv_helpers import fast_settings, torchvision_reference

TOL = 1e-4


def _images() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return [torch.rand(3, 120, 150, generator=g), torch.rand(3, 140, 110, generator=g)]


@pytest.mark.slow
@pytest.mark.parametrize("name", list(TORCHVISION_MODELS))
def test_same_features_and_detections_as_torchvision(name: str, tmp_path: Path) -> None:
    start = time.perf_counter()
    settings = fast_settings(name)
    reference = torchvision_reference(name, **settings)
    path = tmp_path / f"{name}_coco.pth"
    torch.save(reference.state_dict(), path)  # what a downloaded file holds

    ours = from_torchvision(name, path, **settings)
    assert not ours.training
    rebuilt = build_detector(**model_spec(ours))  # type: ignore[arg-type]
    assert rebuilt.state_dict().keys() == ours.state_dict().keys()
    eps_ref = {m.eps for m in reference.modules() if isinstance(m, FrozenBatchNorm2d)}
    eps_ours = {m.eps for m in ours.modules() if isinstance(m, FrozenBatchNorm2d)}
    assert eps_ours == eps_ref

    images = _images()
    with torch.no_grad():
        batch_ref, _ = reference.transform(images)
        batch_ours, _ = ours.transform(images)
        feats_ref = reference.backbone(batch_ref.tensors)
        feats_ours = ours.backbone(batch_ours.tensors)
        out_ref = reference(images)
        out_ours = ours(images)
    assert list(feats_ref) == list(feats_ours)
    feat_diff = max((feats_ref[k] - feats_ours[k]).abs().max().item() for k in feats_ref)
    assert feat_diff <= TOL, feat_diff
    det_diff = 0.0
    for a, b in zip(out_ref, out_ours, strict=True):
        assert len(a["boxes"]) > 0
        assert torch.equal(a["labels"], b["labels"])
        for key in ("boxes", "scores", "masks"):
            if key in a:
                det_diff = max(det_diff, (a[key] - b[key]).abs().max().item())
    assert det_diff <= TOL, det_diff
    print(
        f"{name}: features {feat_diff:.3g}, detections {det_diff:.3g}, "
        f"{time.perf_counter() - start:.1f}s"
    )


def test_wrong_epsilon_would_be_seen(tmp_path: Path) -> None:
    """The reference's BatchNorm statistics make eps 0 vs 1e-5 visible in the features."""
    name = "fasterrcnn_mobilenet_v3_large_fpn"
    settings = fast_settings(name)
    reference = torchvision_reference(name, **settings)
    state = reference.state_dict()
    right = from_torchvision(name, state, **settings)
    wrong = from_torchvision(name, state, **settings, frozen_bn_eps=1e-3)
    images = _images()
    with torch.no_grad():
        batch, _ = right.transform(images)
        a = right.backbone(batch.tensors)["0"]
        b = wrong.backbone(batch.tensors)["0"]
        r = reference.backbone(batch.tensors)["0"]
    assert (a - r).abs().max() <= TOL
    assert (b - r).abs().max() > 100 * TOL


def test_spec_of_each_family() -> None:
    assert torchvision_spec("retinanet_resnet50_fpn")["frozen_bn_eps"] == 0.0
    assert "frozen_bn_eps" not in torchvision_spec("fcos_resnet50_fpn")
    v2 = torchvision_spec("retinanet_resnet50_fpn_v2", min_size=512)
    assert (v2["p6_from"], v2["head_norm"], v2["frozen_bn"], v2["min_size"]) == (
        "c5",
        "group",
        False,
        512,
    )
    assert torchvision_spec("maskrcnn_resnet50_fpn_v2")["fpn_norm"] == "batch"
    with pytest.raises(ConfigError, match="unknown torchvision detector"):
        torchvision_spec("ssd300_vgg16")


def test_coco_categories_are_category_ids() -> None:
    cats = coco_categories()
    assert len(cats) == 90
    assert cats[0] == {"id": 1, "name": "person"}
    assert [c["id"] for c in cats] == list(range(1, 91))
    assert sum(c["name"] == "N/A" for c in cats) == 10


def test_weights_that_do_not_fit_are_named(tmp_path: Path) -> None:
    model = build_detector("retinanet", backbone="resnet18", num_classes=3, fpn_channels=32)
    path = tmp_path / "x.pth"
    torch.save(model.state_dict(), path)
    with pytest.raises(CheckpointError, match="missing key"):
        from_torchvision("retinanet_resnet50_fpn", path)


def test_never_unpickles_code(tmp_path: Path) -> None:
    path = tmp_path / "evil.pth"
    torch.save({"x": torch.zeros(1), "f": Path("x")}, path)
    with pytest.raises(CheckpointError, match="weights-only"):
        from_torchvision("retinanet_resnet50_fpn", path)


@pytest.mark.parametrize("backbone", ["resnet18", "mobilenet_v3_large"])
def test_weights_backbone_takes_an_imagenet_file(backbone: str, tmp_path: Path) -> None:
    import torchvision

    torch.manual_seed(0)
    net = getattr(torchvision.models, backbone)(weights=None)
    path = tmp_path / f"{backbone}-0123abcd.pth"
    torch.save(net.state_dict(), path)  # an ImageNet file, classifier included
    model = build_detector(
        "retinanet", backbone=backbone, num_classes=3, fpn_channels=32, weights_backbone=str(path)
    )
    ours = model.state_dict()
    theirs = net.state_dict()
    prefix = "backbone.body."
    body_keys = [k for k in ours if k.startswith(prefix) and "num_batches" not in k]
    assert body_keys
    inner = "features." if backbone.startswith("mobilenet") else ""
    for key in body_keys:
        assert torch.equal(ours[key], theirs[inner + key[len(prefix) :]]), key
    assert model_spec(model)["frozen_bn"] is True  # type: ignore[index]
