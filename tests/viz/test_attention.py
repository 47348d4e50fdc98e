"""The attention figure draws exactly what the FGD loss computes, in the promised layout."""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch
from PIL import Image

from fgdistill.errors import CompatibilityError, DataError
from fgdistill.losses import attention as loss_attention
from fgdistill.losses.masks import fgd_masks
from fgdistill.viz.attention import extract_features, load_gt_boxes, plot_attention

DPI = 40
PANEL_PX = 2.6 * DPI


def _features(seed: int, channels: int = 8) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "p3": torch.randn(1, channels, 8, 12, generator=g),
        "p4": torch.randn(1, channels, 4, 6, generator=g),
    }


def _png_size(path: Path) -> tuple[int, int]:
    with Image.open(path) as img:
        return img.size


def test_maps_drawn_are_the_loss_functions(tmp_path: Path) -> None:
    teacher, student, baseline = _features(0), _features(1), _features(2)
    image = torch.rand(3, 50, 90)
    boxes = torch.tensor([[4.0, 6.0, 40.0, 30.0], [60.0, 10.0, 70.0, 20.0]])
    fig = plot_attention(
        image,
        teacher,
        student,
        tmp_path / "a.png",
        boxes=boxes,
        batch_shape=(64, 96),
        temperature=0.7,
        baseline=baseline,
        dpi=DPI,
    )
    assert fig.levels == ["p3", "p4"]
    for level in fig.levels:
        drawn = fig.spatial[level]
        for role, feats in (("teacher", teacher), ("student", student), ("baseline", baseline)):
            expected = loss_attention.spatial_attention(feats[level], 0.7)[0].numpy()
            np.testing.assert_array_equal(drawn[role], expected)
            expected_c = loss_attention.channel_attention(feats[level], 0.7)[0].numpy()
            np.testing.assert_array_equal(fig.channel[level][role], expected_c)
        np.testing.assert_array_equal(
            drawn["|teacher-student|"], np.abs(drawn["teacher"] - drawn["student"])
        )
        np.testing.assert_array_equal(
            drawn["|teacher-baseline|"], np.abs(drawn["teacher"] - drawn["baseline"])
        )
        fg, bg = fgd_masks([boxes], tuple(teacher[level].shape[-2:]), (64, 96))
        np.testing.assert_array_equal(drawn["fg mask"], fg[0].numpy())
        np.testing.assert_array_equal(drawn["bg mask"], bg[0].numpy())
        assert drawn["fg mask"].max() > 0 and drawn["bg mask"].sum() == pytest.approx(1.0)


def test_a_student_near_the_teacher_shows_smaller_distances(tmp_path: Path) -> None:
    teacher = _features(0)
    g = torch.Generator().manual_seed(5)
    near = {k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in teacher.items()}
    fig = plot_attention(
        torch.rand(3, 64, 96), teacher, near, tmp_path / "a.png", baseline=_features(3), dpi=DPI
    )
    for level in fig.levels:
        d = fig.distance[level]
        assert d["student"]["spatial"] < d["baseline"]["spatial"]
        assert d["student"]["channel"] < d["baseline"]["channel"]
        expected = np.abs(fig.channel[level]["teacher"] - fig.channel[level]["student"]).sum()
        assert d["student"]["channel"] == pytest.approx(expected)
        assert d["student"]["spatial"] == pytest.approx(
            fig.spatial[level]["|teacher-student|"].sum()
        )


def test_calls_the_shared_attention_function(tmp_path: Path, monkeypatch) -> None:
    calls: list[tuple[int, ...]] = []
    original = loss_attention.spatial_attention

    def spy(feat: torch.Tensor, temperature: float) -> torch.Tensor:
        calls.append(tuple(feat.shape))
        return original(feat, temperature)

    monkeypatch.setattr(loss_attention, "spatial_attention", spy)
    plot_attention(torch.rand(3, 64, 96), _features(0), _features(1), tmp_path / "a.png", dpi=DPI)
    assert sorted(calls) == sorted([(1, 8, 8, 12)] * 2 + [(1, 8, 4, 6)] * 2)


@pytest.mark.parametrize(
    ("with_boxes", "with_baseline", "columns"),
    [(False, False, 5), (True, False, 7), (True, True, 8)],
)
def test_layout_and_pixel_size(
    tmp_path: Path, with_boxes: bool, with_baseline: bool, columns: int
) -> None:
    out = tmp_path / "sub" / "fig.png"
    fig = plot_attention(
        torch.rand(3, 64, 96),
        _features(0),
        _features(1),
        out,
        boxes=torch.zeros(0, 4) if with_boxes else None,
        baseline=_features(2) if with_baseline else None,
        levels=["p4"],
        dpi=DPI,
    )
    assert fig.path == out and out.is_file()
    assert len(fig.columns) == columns
    assert fig.columns[0] == "image" and fig.columns[-1] == "channel attention"
    assert fig.levels == ["p4"]
    width, height = _png_size(out)
    assert (width, height) == fig.size
    assert width == round(PANEL_PX * columns)
    assert height == round(PANEL_PX * 1 + 0.6 * DPI)
    if with_boxes:  # no boxes at all: empty foreground, uniform background
        assert fig.spatial["p4"]["fg mask"].sum() == 0
        np.testing.assert_allclose(fig.spatial["p4"]["bg mask"], 1 / 24)


def test_unequal_channel_counts_are_drawn(tmp_path: Path) -> None:
    fig = plot_attention(
        torch.rand(3, 64, 96), _features(0, 16), _features(1, 8), tmp_path / "a.png", dpi=DPI
    )
    assert fig.channel["p3"]["teacher"].shape == (16,)
    assert fig.channel["p3"]["student"].shape == (8,)
    assert np.isnan(fig.distance["p3"]["student"]["channel"])


def test_bad_inputs_are_clear_errors(tmp_path: Path) -> None:
    image = torch.rand(3, 64, 96)
    with pytest.raises(DataError, match=r"p7.*not available.*p3, p4"):
        plot_attention(image, _features(0), _features(1), tmp_path / "a.png", levels=["p7"])
    small = {"p3": torch.randn(1, 8, 4, 6), "p4": torch.randn(1, 8, 4, 6)}
    with pytest.raises(CompatibilityError, match="same input batch"):
        plot_attention(image, _features(0), small, tmp_path / "a.png")
    with pytest.raises(DataError, match=r"\[3, H, W\]"):
        plot_attention(torch.rand(64, 96), _features(0), _features(1), tmp_path / "a.png")
    with pytest.raises(DataError, match=r"\[K, 4\]"):
        plot_attention(image, _features(0), _features(1), tmp_path / "a.png", boxes=torch.ones(4))
    with pytest.raises(DataError, match="smaller than the image"):
        plot_attention(image, _features(0), _features(1), tmp_path / "a.png", batch_shape=(32, 32))
    with pytest.raises(CompatibilityError, match="none in common"):
        plot_attention(image, {"p5": torch.randn(1, 8, 2, 3)}, _features(1), tmp_path / "a.png")
    assert not (tmp_path / "a.png").exists()
    assert plt.get_fignums() == []  # no figure left open by a failed call


@pytest.fixture(scope="module")
def detectors() -> tuple[torch.nn.Module, torch.nn.Module]:
    from fgdistill.models.build import build_detector

    torch.manual_seed(0)
    kwargs = dict(backbone="resnet18", num_classes=3, fpn_channels=32, min_size=64, max_size=64)
    return build_detector("retinanet", **kwargs), build_detector("retinanet", **kwargs)


def test_extract_features_uses_one_padded_batch(detectors, tmp_path: Path) -> None:
    student, teacher = detectors
    student.train()  # the helper must not leave its mark on the modes
    teacher.eval()
    image = torch.rand(3, 37, 53)  # odd size: resized to 64 on the long side, padded to 32s
    boxes = torch.tensor([[2.0, 3.0, 20.0, 30.0]])
    feats = extract_features(student, teacher, image, boxes=boxes)
    assert student.training and not teacher.training

    student.eval()
    batch, targets = student.transform([image], [{"boxes": boxes, "labels": torch.ones(1)}])
    assert feats.batch_shape == tuple(batch.tensors.shape[-2:]) == (64, 64)
    assert tuple(feats.image.shape) == (3, *batch.image_sizes[0])
    torch.testing.assert_close(feats.boxes, targets[0]["boxes"])
    with torch.no_grad():
        expected = teacher.backbone(batch.tensors)  # the teacher sees the student's batch
    assert sorted(feats.teacher) == ["p3", "p4", "p5", "p6", "p7"]
    torch.testing.assert_close(feats.teacher["p3"], expected["0"])
    torch.testing.assert_close(feats.teacher["p7"], expected["p7"])
    assert float(feats.image.min()) >= 0.0 and float(feats.image.max()) <= 1.0

    fig = plot_attention(
        feats.image,
        feats.teacher,
        feats.student,
        tmp_path / "real.png",
        boxes=feats.boxes,
        batch_shape=feats.batch_shape,
        levels=["p3"],
        dpi=DPI,
    )
    assert fig.spatial["p3"]["teacher"].shape == (8, 8)


def test_ground_truth_boxes_are_the_training_targets(tmp_path: Path) -> None:
    import json

    data = {
        "images": [{"id": 7, "file_name": "sub/a.png", "width": 30, "height": 20}],
        "categories": [{"id": 1, "name": "thing"}],
        "annotations": [
            {"id": 1, "image_id": 7, "category_id": 1, "bbox": [-20, 2, 25, 5]},  # clipped
            {"id": 2, "image_id": 7, "category_id": 1, "bbox": [3, 3, 0.4, 9]},  # dropped
            {"id": 3, "image_id": 7, "category_id": 1, "bbox": [1, 1, 5, 5], "iscrowd": 1},
        ],
    }
    ann = tmp_path / "ann.json"
    ann.write_text(json.dumps(data))
    got = load_gt_boxes(ann, ["a.png", "b.png"])
    assert list(got) == ["a.png"]
    torch.testing.assert_close(got["a.png"], torch.tensor([[0.0, 2.0, 5.0, 7.0]]))
    data["annotations"][0]["bbox"] = [1, 2, "3", None]
    ann.write_text(json.dumps(data))
    with pytest.raises(DataError, match=r"ann\.json: annotations\[0\] \(id 1\): bbox"):
        load_gt_boxes(ann, ["a.png"])
