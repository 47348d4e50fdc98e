"""CocoDetection, CategoryMap and the annotation validator."""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from fgdistill.data.coco import (
    CategoryMap,
    CocoDetection,
    decode_rle_counts,
    read_annotations,
)
from fgdistill.errors import DataError

W, H = 20, 16


def _base() -> dict[str, Any]:
    """Three images (RGB, grey, RGBA), two categories with non-contiguous ids."""
    return {
        "images": [
            {"id": 1, "file_name": "a.png", "width": W, "height": H},
            {"id": 2, "file_name": "b.png", "width": W, "height": H},
            {"id": 7, "file_name": "c.png", "width": W, "height": H},
        ],
        "categories": [{"id": 10, "name": "cat"}, {"id": 3, "name": "dog"}],
        "annotations": [
            # image 1: a polygon square and a crowd box
            {
                "id": 1,
                "image_id": 1,
                "category_id": 10,
                "bbox": [2, 3, 4, 5],
                "area": 20.0,
                "iscrowd": 0,
                "segmentation": [[2, 3, 6, 3, 6, 8, 2, 8]],
            },
            {
                "id": 2,
                "image_id": 1,
                "category_id": 3,
                "bbox": [10, 2, 6, 6],
                "area": 36.0,
                "iscrowd": 1,
                "segmentation": {"size": [H, W], "counts": [H * W - 5, 5]},
            },
            # image 2: only a crowd box -> empty for training
            {
                "id": 3,
                "image_id": 2,
                "category_id": 3,
                "bbox": [1, 1, 5, 5],
                "area": 25.0,
                "iscrowd": 1,
                "segmentation": [[1, 1, 6, 1, 6, 6, 1, 6]],
            },
            # image 7: one normal box reaching past the right edge, one degenerate box
            {
                "id": 4,
                "image_id": 7,
                "category_id": 3,
                "bbox": [15, 4, 5.5, 6],
                "area": 30.0,
                "iscrowd": 0,
                "segmentation": [[15, 4, 20, 4, 20, 10, 15, 10]],
            },
            {
                "id": 5,
                "image_id": 7,
                "category_id": 10,
                "bbox": [3, 3, 0.5, 4],
                "area": 2.0,
                "iscrowd": 0,
                "segmentation": [[3, 3, 3.5, 3, 3.5, 7, 3, 7]],
            },
        ],
    }


def _write(root: Path, data: Any, *, images: bool = True) -> tuple[Path, Path]:
    ann = root / "instances.json"
    ann.write_text(json.dumps(data))
    img_dir = root / "images"
    img_dir.mkdir(exist_ok=True)
    if images:
        rng = np.random.default_rng(0)
        Image.fromarray(rng.integers(0, 255, (H, W, 3), dtype=np.uint8)).save(img_dir / "a.png")
        Image.fromarray(rng.integers(0, 255, (H, W), dtype=np.uint8), "L").save(img_dir / "b.png")
        rgba = rng.integers(0, 255, (H, W, 4), dtype=np.uint8)
        Image.fromarray(rgba, "RGBA").save(img_dir / "c.png")
    return ann, img_dir


@pytest.fixture
def tiny(tmp_path: Path) -> tuple[Path, Path]:
    return _write(tmp_path, _base())


# --------------------------------------------------------------------------- category map


def test_category_map_is_contiguous_and_invertible() -> None:
    cmap = CategoryMap(
        [{"id": 10, "name": "cat"}, {"id": 3, "name": "dog"}, {"id": 5, "name": "x"}]
    )
    assert cmap.num_classes == 3
    assert cmap.cat_ids == [3, 5, 10]
    assert [cmap.label_of(c) for c in (3, 5, 10)] == [1, 2, 3]
    assert [cmap.cat_id_of(label) for label in (1, 2, 3)] == [3, 5, 10]
    assert cmap.name_of(3) == "cat"
    with pytest.raises(DataError, match="unknown category id 4"):
        cmap.label_of(4)
    with pytest.raises(DataError, match=r"outside 1\.\.3"):
        cmap.cat_id_of(0)


# --------------------------------------------------------------------------- items


def test_eval_item_shapes_and_values(tiny: tuple[Path, Path]) -> None:
    ann, img_dir = tiny
    ds = CocoDetection(ann, img_dir, masks=True)
    assert len(ds) == 3 and ds.image_ids == [1, 2, 7]
    assert ds.num_classes == 2
    image, target = ds[0]
    assert image.shape == (3, H, W) and image.dtype == torch.float32
    assert image.min() >= 0.0 and image.max() <= 1.0
    # eval keeps the crowd box; labels follow sorted category ids (3 -> 1, 10 -> 2)
    assert target["image_id"] == 1
    assert target["labels"].tolist() == [2, 1]
    assert target["iscrowd"].tolist() == [0, 1]
    assert target["boxes"].dtype == torch.float32
    assert target["boxes"][0].tolist() == [2, 3, 6, 8]
    assert target["area"].tolist() == [20.0, 36.0]
    masks = target["masks"]
    assert masks.shape == (2, H, W) and masks.dtype == torch.uint8
    # the polygon square covers x 2..6, y 3..8
    assert masks[0, 4, 3] == 1 and masks[0, 0, 0] == 0 and masks[0, 4, 10] == 0
    # the uncompressed RLE (column-major) ends with 5 foreground pixels: bottom of last column
    assert masks[1].sum() == 5 and masks[1][-5:, -1].tolist() == [1] * 5


def test_grey_and_rgba_images_become_rgb(tiny: tuple[Path, Path]) -> None:
    ann, img_dir = tiny
    ds = CocoDetection(ann, img_dir)
    grey, _ = ds[1]
    assert grey.shape == (3, H, W)
    assert torch.equal(grey[0], grey[1]) and torch.equal(grey[1], grey[2])
    rgba, _ = ds[2]
    assert rgba.shape == (3, H, W)


def test_train_drops_crowd_filters_empty_and_clips(tiny: tuple[Path, Path]) -> None:
    ann, img_dir = tiny
    ds = CocoDetection(ann, img_dir, train=True)
    assert ds.image_ids == [1, 7]  # image 2 holds only a crowd box
    _, t1 = ds[0]
    assert t1["iscrowd"].tolist() == [0] and t1["labels"].tolist() == [2]
    _, t7 = ds[1]
    assert t7["boxes"].tolist() == [[15, 4, 20, 10]]  # clipped to the 20 px width
    kept = CocoDetection(ann, img_dir, train=True, filter_empty=False)
    assert kept.image_ids == [1, 2, 7]
    _, t2 = kept[1]
    assert t2["boxes"].shape == (0, 4) and t2["labels"].shape == (0,)


def test_empty_image_has_empty_masks(tiny: tuple[Path, Path]) -> None:
    ann, img_dir = tiny
    ds = CocoDetection(ann, img_dir, train=True, filter_empty=False, masks=True)
    _, target = ds[1]
    assert target["masks"].shape == (0, H, W)


def test_degenerate_boxes_dropped_with_one_counted_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    data = _base()
    extra = copy.deepcopy(data["annotations"][4])
    extra["id"] = 6
    extra["bbox"] = [8, 8, 3, 0.2]
    data["annotations"].append(extra)
    ann, img_dir = _write(tmp_path, data)
    with caplog.at_level(logging.WARNING, logger="fgdistill.data.coco"):
        ds = CocoDetection(ann, img_dir)
    degenerate = [r for r in caplog.records if "degenerate" in r.getMessage()]
    assert len(degenerate) == 1
    assert "dropped 2 degenerate" in degenerate[0].getMessage()
    assert ds.num_degenerate == 2
    _, target = ds[2]
    assert target["boxes"].shape == (1, 4)


def test_transforms_are_applied(tiny: tuple[Path, Path]) -> None:
    ann, img_dir = tiny
    calls = []

    def mark(image: torch.Tensor, target: dict[str, Any]) -> tuple[torch.Tensor, dict[str, Any]]:
        calls.append(target["image_id"])
        return image * 0, target

    ds = CocoDetection(ann, img_dir, transforms=mark)
    image, _ = ds[0]
    assert calls == [1] and image.abs().sum() == 0


def test_coco_api_is_built_quietly(tiny: tuple[Path, Path], capsys: pytest.CaptureFixture) -> None:
    ann, img_dir = tiny
    coco = CocoDetection(ann, img_dir).coco
    assert sorted(coco.getImgIds()) == [1, 2, 7]
    assert capsys.readouterr().out == ""


# --------------------------------------------------------------------------- errors


def _error_for(tmp_path: Path, data: Any, **kwargs: Any) -> str:
    ann, img_dir = _write(tmp_path, data)
    with pytest.raises(DataError) as info:
        CocoDetection(ann, img_dir, **kwargs)
    message = str(info.value)
    assert "instances.json" in message
    return message


def test_missing_annotation_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"nope\.json: annotation file not found"):
        CocoDetection(tmp_path / "nope.json", tmp_path)


def test_annotation_path_is_a_directory(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="is a directory"):
        CocoDetection(tmp_path, tmp_path)


def test_unreadable_annotation_file(tmp_path: Path) -> None:
    ann = tmp_path / "bin.json"
    ann.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(DataError, match=r"bin\.json: not UTF-8"):
        read_annotations(ann)


def test_invalid_json(tmp_path: Path) -> None:
    ann = tmp_path / "instances.json"
    ann.write_text('{"images": [}')
    with pytest.raises(DataError, match=r"instances\.json: invalid JSON: .* line 1 column"):
        read_annotations(ann)


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (lambda d: [], "top level must be a JSON object"),
        (lambda d: {k: v for k, v in d.items() if k != "categories"}, "missing top-level key"),
        (lambda d: {**d, "images": {}}, "'images' must be a list"),
        (lambda d: {**d, "categories": []}, "'categories' is empty"),
    ],
)
def test_bad_top_level(tmp_path: Path, mutate: Any, expected: str) -> None:
    assert expected in _error_for(tmp_path, mutate(_base()))


def _set(path: tuple[Any, ...], value: Any) -> Any:
    def mutate(d: dict[str, Any]) -> dict[str, Any]:
        node: Any = d
        for key in path[:-1]:
            node = node[key]
        if value is _DELETE:
            del node[path[-1]]
        else:
            node[path[-1]] = value
        return d

    return mutate


_DELETE = object()


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (_set(("images", 1, "file_name"), _DELETE), "images[1] (id 2): missing key(s) 'file_name'"),
        (_set(("images", 0, "width"), 0), "images[0] (id 1): width must be a positive integer"),
        (_set(("images", 2, "id"), 1), "images[2] (id 1): duplicate image id 1"),
        (_set(("images", 0), "a.png"), "images[0]: must be an object"),
        (_set(("categories", 1, "name"), _DELETE), "categories[1] (id 3): missing key 'name'"),
        (_set(("categories", 0, "id"), "10"), "categories[0] (id '10'): id must be an integer"),
        (_set(("annotations", 2, "bbox"), _DELETE), "annotations[2] (id 3): missing key(s) 'bbox'"),
        (
            _set(("annotations", 3, "bbox"), [1, 2, 3]),
            "annotations[3] (id 4): bbox must be 4 finite numbers, got [1, 2, 3]",
        ),
        (
            _set(("annotations", 3, "bbox"), [1, 2, "3", 4]),
            "annotations[3] (id 4): bbox must be 4 finite numbers",
        ),
        (
            _set(("annotations", 0, "bbox"), [1, 2, float("nan"), 4]),
            "annotations[0] (id 1): bbox must be 4 finite numbers",
        ),
        (
            _set(("annotations", 1, "bbox"), [1, 2, 3, -4]),
            "annotations[1] (id 2): bbox has a negative size (width 3, height -4)",
        ),
        (
            _set(("annotations", 4, "image_id"), 99),
            "annotations[4] (id 5): image_id 99 is not in 'images'",
        ),
        (
            _set(("annotations", 4, "category_id"), 4),
            "annotations[4] (id 5): category_id 4 is not in 'categories'",
        ),
        (_set(("annotations", 4, "id"), 1), "annotations[4] (id 1): duplicate annotation id 1"),
        (_set(("annotations", 0, "iscrowd"), 2), "annotations[0] (id 1): iscrowd must be 0 or 1"),
        (
            _set(("annotations", 0, "area"), -1),
            "annotations[0] (id 1): area must be a finite non-negative number",
        ),
        (
            _set(("annotations", 0, "segmentation"), [[1, 2, 3]]),
            "annotations[0] (id 1): segmentation[0] must hold an even number",
        ),
        (
            _set(("annotations", 1, "segmentation"), {"size": [4, 4], "counts": [16]}),
            "annotations[1] (id 2): RLE segmentation size [4, 4] does not match",
        ),
        (
            _set(("annotations", 1, "segmentation"), {"size": [H, W], "counts": [1, 2]}),
            "uncompressed RLE counts sum to 3",
        ),
        (_set(("annotations", 0, "segmentation"), 5), "segmentation must be a list of polygons"),
        # pycocotools would decode these into garbage, not refuse them
        (
            _set(("annotations", 1, "segmentation"), {"size": [H, W], "counts": "zzzz"}),
            "annotations[1] (id 2): compressed RLE counts are not a valid COCO RLE string",
        ),
        (
            _set(("annotations", 1, "segmentation"), {"size": [H, W], "counts": "52"}),
            f"compressed RLE counts decode to 7 pixels, expected height * width = {H * W}",
        ),
    ],
)
def test_bad_entries_name_file_and_entry(tmp_path: Path, mutate: Any, expected: str) -> None:
    message = _error_for(tmp_path, mutate(_base()))
    assert expected in message


@pytest.mark.parametrize("empty", [_DELETE, []])
def test_masks_without_segmentation(tmp_path: Path, empty: Any) -> None:
    # an empty polygon list would train on an empty mask, then fail the segm evaluation
    data = _set(("annotations", 0, "segmentation"), empty)(_base())
    message = _error_for(tmp_path, data, masks=True)
    assert "annotations[0] (id 1): masks were asked for" in message
    ann, img_dir = _write(tmp_path, data)
    CocoDetection(ann, img_dir)  # fine without masks


def test_missing_image_folder(tmp_path: Path) -> None:
    ann, _ = _write(tmp_path, _base())
    with pytest.raises(DataError, match="nowhere: image folder not found"):
        CocoDetection(ann, tmp_path / "nowhere")


def test_missing_image_file_named_at_load(tiny: tuple[Path, Path]) -> None:
    ann, img_dir = tiny
    (img_dir / "b.png").unlink()
    ds = CocoDetection(ann, img_dir)
    ds[0]
    with pytest.raises(DataError, match=r"b\.png: image file not found"):
        ds[1]


def test_undecodable_image_named_at_load(tiny: tuple[Path, Path]) -> None:
    ann, img_dir = tiny
    (img_dir / "c.png").write_bytes(b"\x89PNG\r\n\x1a\nthis is not a png")
    ds = CocoDetection(ann, img_dir)
    with pytest.raises(DataError, match=r"c\.png: image does not decode"):
        ds[2]


def test_truncated_image_named_at_load(tiny: tuple[Path, Path]) -> None:
    ann, img_dir = tiny
    data = (img_dir / "a.png").read_bytes()
    (img_dir / "a.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=r"a\.png: image does not decode"):
        CocoDetection(ann, img_dir)[0]


def test_image_size_mismatch(tiny: tuple[Path, Path]) -> None:
    ann, img_dir = tiny
    Image.new("RGB", (W + 1, H)).save(img_dir / "a.png")
    with pytest.raises(DataError, match=r"a\.png: image is 21x16 but the annotations say 20x16"):
        CocoDetection(ann, img_dir)[0]


def test_collect_mode_reports_every_problem_and_keeps_good_entries(tmp_path: Path) -> None:
    data = _base()
    data["annotations"][0]["bbox"] = [1, 2, 3]
    data["annotations"][3]["image_id"] = 99
    data["images"][1]["height"] = -2
    ann, _ = _write(tmp_path, data, images=False)
    problems: list = []
    index = read_annotations(ann, problems=problems)
    assert index is not None
    messages = [p.message for p in problems if p.severity == "error"]
    assert len(messages) == 4, messages
    assert any("annotations[0] (id 1): bbox" in m for m in messages)
    assert any("annotations[3] (id 4): image_id 99" in m for m in messages)
    assert any("images[1] (id 2): height" in m for m in messages)
    # annotation 3 points at the dropped image 2, so it is reported too
    assert any("annotations[2] (id 3): image_id 2" in m for m in messages)
    assert [img.id for img in index.images] == [1, 7]
    assert sorted(a.id for a in index.annotations) == [2, 5]
    assert {img["id"] for img in index.data["images"]} == {1, 7}


def test_compressed_rle_counts_decode_as_pycocotools_encodes() -> None:
    from pycocotools import mask as mask_utils

    gen = np.random.default_rng(0)
    for trial in range(50):
        h, w = (int(v) for v in gen.integers(1, 40, 2))
        mask = (gen.random((h, w)) < gen.random()).astype(np.uint8)
        if trial == 0:
            mask[:] = 1  # starts with an empty run of background
        counts = mask_utils.encode(np.asfortranarray(mask))["counts"].decode()
        runs = decode_rle_counts(counts)
        assert runs is not None and runs.sum() == h * w
        column_major = mask.flatten(order="F")
        values = np.repeat(np.arange(len(runs)) % 2, runs)  # runs alternate 0, 1, 0, ...
        assert np.array_equal(values, column_major)
    empty = decode_rle_counts("")
    assert empty is not None and len(empty) == 0
    assert decode_rle_counts("a") is None  # continuation bit set, nothing follows
    assert decode_rle_counts("é") is None and decode_rle_counts("zz") is None
    # pycocotools writes runs 5, 2, 7, 1 as "527O": "O" is -1 (sign bit set), added to run 2
    encoded = mask_utils.frPyObjects({"size": [3, 5], "counts": [5, 2, 7, 1]}, 3, 5)["counts"]
    assert encoded == b"527O"
    got = decode_rle_counts("527O")
    assert got is not None and got.tolist() == [5, 2, 7, 1]
