"""ONNX and TorchScript export: the files compute what the models compute (CPU, tiny models)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from torchvision.models.detection.transform import GeneralizedRCNNTransform

from fgdistill.errors import ExportError
from fgdistill.export import (
    ExportCheck,
    compare_detections,
    default_input_size,
    export_detector,
    load_exported,
    output_names,
    prepare_for_export,
    sample_image,
    verify_export,
)
from fgdistill.models.build import ARCHS, build_detector

# A size other than the traced one (64 x 86, default_input_size of the tiny models), so that the
# ONNX files' dynamic H and W are exercised.
CHECK_SIZE = (90, 70)


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_detector(arch: str) -> nn.Module:
    """A small random detector whose scores are spread out, so that it detects many things.

    The classification biases (a prior of 0.01 at initialisation) are set to 0, and FCOS's box
    regression bias to 1, so its boxes are not empty. FCOS gets 64 FPN channels: its GroupNorm
    of 32 groups cannot normalise a 1x1 P7 map of 32 channels (one value per group).
    """
    torch.manual_seed(0)
    # Mask R-CNN pastes a mask per detection, slowly: 20 are plenty to compare the top 10.
    extra = {"box_detections_per_img": 20} if arch == "mask_rcnn" else {}
    model = build_detector(
        arch,
        backbone="resnet18",
        num_classes=4,
        fpn_channels=64 if arch == "fcos" else 32,
        min_size=64,
        max_size=96,
        **extra,
    ).eval()
    head = getattr(model, "head", None)
    with torch.no_grad():
        if arch in ("retinanet", "fcos"):
            head.classification_head.cls_logits.bias.zero_()  # type: ignore[union-attr]
        if arch == "fcos":
            head.regression_head.bbox_reg.bias.fill_(1.0)  # type: ignore[union-attr]
        if arch == "reppoints":
            head.cls_out.bias.zero_()  # type: ignore[union-attr]
    return model


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
@pytest.mark.parametrize("arch", ARCHS)
def test_exported_file_matches_the_model(arch: str, fmt: str, tmp_path: Path) -> None:
    model = tiny_detector(arch)
    assert default_input_size(model) == (64, 86)
    path = export_detector(model, fmt, tmp_path / "sub" / f"{arch}.{fmt}")
    assert path.is_file()
    # the caller's model is untouched
    assert type(model.transform) is GeneralizedRCNNTransform

    check = verify_export(model, path, sample_image(*CHECK_SIZE, seed=3))
    print(f"{arch} {fmt} at {CHECK_SIZE}: {check.describe()}")
    assert check.compared == 10, check.describe()
    assert check.ok, check.describe()
    assert check.min_iou > 0.99 and check.max_score_diff <= 1e-4
    if arch == "mask_rcnn":
        assert check.max_mask_diff is not None and check.max_mask_diff < 1e-3

    out = load_exported(path)(sample_image(*CHECK_SIZE, seed=3)[None])  # [1, 3, H, W] too
    assert list(out)[:3] == ["boxes", "scores", "labels"]
    assert ("masks" in out) == (arch == "mask_rcnn")
    assert out["boxes"].shape[1:] == (4,) and out["labels"].dtype == torch.int64
    assert (out["boxes"][:, 2] <= CHECK_SIZE[1] + 1e-3).all()  # in the input image's pixels
    if fmt == "onnx":
        import onnx

        graph = onnx.load(str(path)).graph
        assert [o.name for o in graph.output] == output_names(model)
        dims = graph.input[0].type.tensor_type.shape.dim
        assert [d.dim_value or d.dim_param for d in dims] == [3, "height", "width"]


@pytest.mark.slow
def test_onnx_fixed_input_size_and_score_thresh(tmp_path: Path) -> None:
    import onnx

    model = tiny_detector("faster_rcnn")
    path = export_detector(
        model, "onnx", tmp_path / "f.onnx", input_size=(60, 80), score_thresh=0.3
    )
    dims = onnx.load(str(path)).graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_value for d in dims] == [3, 60, 80]
    image = sample_image(60, 80, seed=2)
    check = verify_export(model, path, image, score_thresh=0.3)
    assert check.ok, check.describe()
    assert (load_exported(path)(image)["scores"] > 0.3).all()
    assert model.roi_heads.score_thresh == 0.05  # type: ignore[union-attr]


def test_prepare_sets_the_detectors_own_threshold() -> None:
    rcnn = tiny_detector("faster_rcnn")
    assert prepare_for_export(rcnn, 0.5).roi_heads.score_thresh == 0.5  # type: ignore[union-attr]
    retina = tiny_detector("retinanet")
    assert prepare_for_export(retina, 0.25).score_thresh == 0.25
    with pytest.raises(ExportError, match="score threshold"):
        prepare_for_export(retina, 1.5)


def test_sample_image_is_an_image_in_0_1() -> None:
    image = sample_image(40, 50)
    assert image.shape == (3, 40, 50) and image.min() >= 0 and image.max() <= 1
    assert torch.equal(image, sample_image(40, 50)) and not torch.equal(
        image, sample_image(40, 50, seed=1)
    )


def _dets(boxes: list[list[float]], scores: list[float], labels: list[int]) -> dict:
    return {
        "boxes": torch.tensor(boxes).reshape(-1, 4),
        "scores": torch.tensor(scores),
        "labels": torch.tensor(labels, dtype=torch.int64),
    }


def test_compare_detections_matches_by_label_and_iou() -> None:
    ref = _dets([[0, 0, 10, 10], [20, 20, 30, 40]], [0.9, 0.5], [1, 2])
    same = _dets([[20, 20, 30, 40], [0, 0, 10, 10]], [0.5, 0.9], [2, 1])  # another order
    check = compare_detections(ref, same, image_size=(50, 50))
    assert check.ok and check.compared == 2 and check.min_iou == 1.0
    assert check.max_score_diff == 0.0

    moved = _dets([[0, 0, 10, 10], [21, 20, 31, 40]], [0.9, 0.5], [1, 2])
    check = compare_detections(ref, moved, image_size=(50, 50))
    assert check.mismatch and check.matched == 1 and check.min_iou < 0.99

    relabelled = _dets([[0, 0, 10, 10], [20, 20, 30, 40]], [0.9, 0.5], [1, 3])
    assert compare_detections(ref, relabelled, image_size=(50, 50)).matched == 1

    rescored = _dets([[0, 0, 10, 10], [20, 20, 30, 40]], [0.9, 0.501], [1, 2])
    assert compare_detections(ref, rescored, image_size=(50, 50)).matched == 1

    none = _dets([], [], [])
    check = compare_detections(ref, none, image_size=(50, 50))
    assert check.mismatch and check.min_iou == 0.0
    nothing = compare_detections(none, none, image_size=(50, 50))
    assert not nothing.ok and not nothing.mismatch and "nothing to compare" in nothing.describe()


def test_compare_detections_takes_the_top_k() -> None:
    ref = _dets([[0, 0, 10, 10], [20, 20, 30, 40]], [0.2, 0.9], [1, 2])
    only_best = _dets([[20, 20, 30, 40]], [0.9], [2])
    check = compare_detections(ref, only_best, image_size=(50, 50), top_k=1)
    assert check.ok and check.compared == 1 and check.reference == 2
    assert isinstance(check, ExportCheck) and "top 1: 1 match" in check.describe()


def test_unknown_format_and_folder_output_are_named(tmp_path: Path) -> None:
    model = nn.Identity()
    with pytest.raises(ExportError, match="unknown export format 'tflite'"):
        export_detector(model, "tflite", tmp_path / "m.tflite")
    with pytest.raises(ExportError, match=f"{tmp_path} is a folder"):
        export_detector(model, "onnx", tmp_path)


def test_half_is_refused_where_it_does_not_work(tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="not supported for ONNX"):
        export_detector(nn.Identity(), "onnx", tmp_path / "m.onnx", half=True)
    if not torch.cuda.is_available():
        with pytest.raises(ExportError, match="needs a CUDA device"):
            export_detector(nn.Identity(), "torchscript", tmp_path / "m.pt", half=True)


def test_missing_onnx_package_is_one_clear_message(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "onnx", None)  # import onnx raises ImportError
    with pytest.raises(ExportError, match=r"needs the onnx package.*fgdistill\[export\]"):
        export_detector(nn.Identity(), "onnx", tmp_path / "m.onnx")
    (tmp_path / "m.onnx").write_bytes(b"\x08\x07")
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(ExportError, match="needs the onnxruntime package"):
        load_exported(tmp_path / "m.onnx")


def test_load_exported_names_a_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ExportError, match=r"m\.pt: exported file not found"):
        load_exported(tmp_path / "m.pt")
