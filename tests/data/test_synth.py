"""The synthetic benchmark generator."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from fgdistill.data.coco import CocoDetection, read_annotations
from fgdistill.data.synth import (
    CATEGORY_SHAPES,
    CATEGORY_TEXTURES,
    SynthConfig,
    generate_synthetic,
    synthetic_categories,
    write_png,
)

# pycocotools' decode trips a numpy 2 deprecation warning; harmless.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


def _files(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def test_same_arguments_give_identical_bytes(tmp_path: Path) -> None:
    kwargs = {"num_train": 5, "num_val": 2, "image_size": 64, "seed": 3}
    generate_synthetic(tmp_path / "a", **kwargs)
    generate_synthetic(tmp_path / "b", **kwargs)
    a, b = _files(tmp_path / "a"), _files(tmp_path / "b")
    assert sorted(a) == sorted(b)
    assert len(a) == 5 + 2 + 2
    assert a == b  # JSON and every PNG
    generate_synthetic(tmp_path / "c", **{**kwargs, "seed": 4})
    c = _files(tmp_path / "c")
    assert c["annotations/instances_train.json"] != a["annotations/instances_train.json"]
    assert c["train/000000.png"] != a["train/000000.png"]


def test_images_do_not_depend_on_count_or_workers(tmp_path: Path) -> None:
    small = generate_synthetic(tmp_path / "small", num_train=2, num_val=1, image_size=64)
    big = generate_synthetic(tmp_path / "big", num_train=4, num_val=1, image_size=64, num_workers=2)
    assert small.num_images == {"train": 2, "val": 1}
    for name in ("train/000000.png", "train/000001.png", "val/000000.png"):
        assert (tmp_path / "small" / name).read_bytes() == (tmp_path / "big" / name).read_bytes()
    one = generate_synthetic(tmp_path / "one", num_train=4, num_val=1, image_size=64)
    assert _files(tmp_path / "one") == _files(tmp_path / "big")
    assert one.num_instances == big.num_instances


def test_categories_pair_every_shape_with_every_texture() -> None:
    cats = synthetic_categories()
    assert len(cats) >= 6
    assert [c["id"] for c in cats] == list(range(1, len(cats) + 1))
    pairs = {tuple(c["name"].split("_")) for c in cats}
    assert pairs == {(t, s) for t in CATEGORY_TEXTURES for s in CATEGORY_SHAPES}


def test_generated_annotations_are_valid_coco(synth_dataset: Path) -> None:
    for split, count in (("train", 8), ("val", 4)):
        ann_file = synth_dataset / "annotations" / f"instances_{split}.json"
        problems: list = []
        index = read_annotations(ann_file, problems=problems)
        assert problems == [] and index is not None
        assert len(index.images) == count
        data = json.loads(ann_file.read_text())
        assert {"info", "images", "annotations", "categories"} <= set(data)
        masks_by_image: dict[int, list[np.ndarray]] = {}
        for ann in data["annotations"]:
            assert ann["iscrowd"] == 0
            rle = {**ann["segmentation"], "counts": ann["segmentation"]["counts"].encode()}
            assert float(mask_utils.area(rle)) == ann["area"] > 0
            assert [float(v) for v in mask_utils.toBbox(rle)] == ann["bbox"]
            masks_by_image.setdefault(ann["image_id"], []).append(mask_utils.decode(rle))
        # several objects per image; visible parts never overlap
        assert np.mean([len(m) for m in masks_by_image.values()]) >= 2
        for masks in masks_by_image.values():
            assert np.stack(masks).sum(axis=0).max() <= 1
        for img in data["images"]:
            with Image.open(synth_dataset / split / img["file_name"]) as pil:
                assert pil.size == (96, 96) and pil.mode == "RGB"


def test_sizes_span_coco_ranges_and_objects_occlude(tmp_path: Path) -> None:
    summary = generate_synthetic(tmp_path, num_train=40, num_val=0, image_size=192)
    sizes = summary.size_counts["train"]
    assert sizes["small"] > 0 and sizes["medium"] > 0 and sizes["large"] > 0
    assert summary.num_occluded["train"] > 0
    assert summary.num_instances["train"] >= 2 * 40
    # small images keep objects detectable: nothing under ~8 px across before occlusion
    small = generate_synthetic(tmp_path / "s", num_train=10, num_val=0, image_size=64)
    data = json.loads(small.ann_files["train"].read_text())
    widest = [max(a["bbox"][2], a["bbox"][3]) for a in data["annotations"]]
    assert np.median(widest) >= 8


def test_colour_is_not_a_class_cue(synth_dataset: Path) -> None:
    ds = CocoDetection(
        synth_dataset / "annotations" / "instances_train.json", synth_dataset / "train", masks=True
    )
    means: dict[int, list[np.ndarray]] = {}
    for image, target in ds:
        for label, mask in zip(target["labels"].tolist(), target["masks"], strict=True):
            pixels = image[:, mask.bool()]
            means.setdefault(label, []).append(pixels.mean(dim=1).numpy())
    # the same category shows up in clearly different colours
    spreads = [np.ptp(np.stack(v), axis=0).max() for v in means.values() if len(v) >= 2]
    assert spreads and min(spreads) > 0.1


def test_difficulty_presets() -> None:
    easy, hard = SynthConfig.from_difficulty(0.0), SynthConfig.from_difficulty(1.0)
    assert easy.objects_per_image[1] < hard.objects_per_image[1]
    assert easy.noise_std[1] < hard.noise_std[1]
    assert easy.max_occlusion < hard.max_occlusion
    with pytest.raises(ValueError, match="difficulty"):
        SynthConfig.from_difficulty(1.5)
    with pytest.raises(ValueError, match="image_size"):
        generate_synthetic("unused", image_size=16)


def test_explicit_config(tmp_path: Path) -> None:
    cfg = SynthConfig(objects_per_image=(1, 1), distractors_per_image=(0, 0))
    summary = generate_synthetic(tmp_path, num_train=6, num_val=0, image_size=96, config=cfg)
    assert summary.num_instances["train"] == 6
    assert summary.num_occluded["train"] == 0
    assert summary.images_per_second > 0


def test_write_png_round_trips(tmp_path: Path) -> None:
    pixels = np.random.default_rng(0).integers(0, 256, (7, 5, 3), dtype=np.uint8)
    write_png(tmp_path / "x.png", pixels)
    with Image.open(tmp_path / "x.png") as img:
        assert img.mode == "RGB"
        assert np.array_equal(np.asarray(img), pixels)
