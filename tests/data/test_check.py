"""Whole-dataset validation reports."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from PIL import Image

from fgdistill.data.check import check_dataset, check_image_files


def test_clean_dataset_report(synth_dataset: Path) -> None:
    report = check_dataset(
        synth_dataset / "annotations" / "instances_train.json", synth_dataset / "train"
    )
    assert report.ok and report.problems == []
    assert report.num_images == 8 and report.images_checked == 8
    data = json.loads((synth_dataset / "annotations" / "instances_train.json").read_text())
    assert report.num_annotations == len(data["annotations"])
    assert sum(c.count for c in report.categories) == report.num_annotations
    assert sum(report.size_counts.values()) == report.num_annotations
    assert len(report.categories) == 8


def _broken_copy(synth_dataset: Path, tmp_path: Path) -> tuple[Path, Path]:
    image_dir = tmp_path / "val"
    shutil.copytree(synth_dataset / "val", image_dir)
    data = json.loads((synth_dataset / "annotations" / "instances_val.json").read_text())
    data["annotations"][0]["bbox"] = [1, 2, "x", 4]
    data["annotations"][1]["category_id"] = 99
    data["annotations"][2]["bbox"][3] = 0.5  # degenerate: a warning
    Image.new("RGB", (95, 96)).save(image_dir / data["images"][0]["file_name"])  # wrong size
    (image_dir / data["images"][1]["file_name"]).unlink()
    (image_dir / data["images"][2]["file_name"]).write_bytes(b"not an image")
    ann = tmp_path / "broken.json"
    ann.write_text(json.dumps(data))
    return ann, image_dir


def test_every_problem_is_collected(synth_dataset: Path, tmp_path: Path) -> None:
    ann, image_dir = _broken_copy(synth_dataset, tmp_path)
    report = check_dataset(ann, image_dir)
    assert not report.ok
    errors = [p.message for p in report.errors]
    assert len(errors) == 5, errors
    assert any("broken.json: annotations[0]" in m and "bbox must be 4 finite" in m for m in errors)
    assert any("annotations[1]" in m and "category_id 99" in m for m in errors)
    assert any("000000.png: image is 95x96 but the annotations say 96x96" in m for m in errors)
    assert any("000001.png: image file not found" in m for m in errors)
    assert any("000002.png: image does not decode" in m for m in errors)
    warnings = [p.message for p in report.warnings]
    assert any("1 degenerate box(es)" in m and "annotations[2]" in m for m in warnings)
    assert report.num_degenerate == 1


def test_json_only_check(synth_dataset: Path, tmp_path: Path) -> None:
    ann, image_dir = _broken_copy(synth_dataset, tmp_path)
    report = check_dataset(ann, image_dir, check_images=False)
    assert report.images_checked == 0
    assert len(report.errors) == 2


def test_unusable_file_is_one_error(tmp_path: Path) -> None:
    report = check_dataset(tmp_path / "missing.json", tmp_path)
    assert not report.ok
    assert [p.message for p in report.errors] == [
        f"{tmp_path / 'missing.json'}: annotation file not found"
    ]
    bad = tmp_path / "bad.json"
    bad.write_text("[1, 2")
    assert "invalid JSON" in check_dataset(bad, tmp_path).errors[0].message


def test_missing_image_folder(synth_dataset: Path, tmp_path: Path) -> None:
    report = check_dataset(synth_dataset / "annotations" / "instances_val.json", tmp_path / "nope")
    assert [p.message for p in report.errors] == [f"{tmp_path / 'nope'}: image folder not found"]


def test_the_report_counts_what_the_dataset_keeps(synth_dataset: Path, tmp_path: Path) -> None:
    from fgdistill.data.coco import CocoDetection

    data = json.loads((synth_dataset / "annotations" / "instances_val.json").read_text())
    first = data["images"][0]["id"]
    mine = [a for a in data["annotations"] if a["image_id"] == first]
    # 10 px wide, but 0.5 px of it inside the image: dropped by the dataset
    mine[0]["bbox"] = [-9.5, 2.0, 10.0, 5.0]
    for ann in mine[1:]:
        ann["bbox"] = [3.0, 3.0, 0.0, 4.0]  # zero width
    ann_file = tmp_path / "val.json"
    ann_file.write_text(json.dumps(data))
    report = check_dataset(ann_file, synth_dataset / "val", check_images=False)
    dataset = CocoDetection(ann_file, synth_dataset / "val", train=True)
    kept = sum(len(dataset.index.anns_by_image[i.id]) for i in dataset.index.images) - len(mine)
    assert report.num_degenerate == len(mine)
    assert sum(c.count for c in report.categories) == kept
    assert sum(report.size_counts.values()) == kept
    # the image kept no box: the training set leaves it out, and the report counts it
    assert report.images_without_annotations == 1 == report.num_images - len(dataset)


def test_every_unreadable_image_is_listed_whatever_the_decoder_raises(
    synth_dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    image_dir = tmp_path / "val"
    shutil.copytree(synth_dataset / "val", image_dir)
    ann = synth_dataset / "annotations" / "instances_val.json"
    names = sorted(p.name for p in image_dir.iterdir())
    (image_dir / names[0]).write_bytes(b"")  # zero bytes
    data = (image_dir / names[1]).read_bytes()
    (image_dir / names[1]).write_bytes(data[: len(data) // 2])  # truncated
    report = check_dataset(ann, image_dir)
    errors = [p.message for p in report.errors]
    assert len(errors) == 2, errors
    assert f"{names[0]}: image file is empty (0 bytes)" in errors[0]
    assert f"{names[1]}: image does not decode" in errors[1]
    # a decoder error that is not an OSError (here PIL's DecompressionBombError) stops nothing
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10)
    errors = [p.message for p in check_dataset(ann, image_dir).errors]
    assert len(errors) == len(names), errors
    assert sum("DecompressionBombError" in m for m in errors) == len(names) - 1  # not the empty one


def test_check_image_files_lists_every_bad_file_at_once(
    synth_dataset: Path, tmp_path: Path
) -> None:
    from fgdistill.data.coco import CocoDetection
    from fgdistill.errors import DataError

    image_dir = tmp_path / "val"
    shutil.copytree(synth_dataset / "val", image_dir)
    ann = synth_dataset / "annotations" / "instances_val.json"
    dataset = CocoDetection(ann, image_dir, train=False)
    check_image_files(dataset, split="validation")  # all fine
    names = sorted(p.name for p in image_dir.iterdir())
    (image_dir / names[0]).write_bytes(b"")
    (image_dir / names[1]).unlink()
    (image_dir / names[2]).write_bytes(b"not an image")
    Image.new("RGB", (95, 96)).save(image_dir / names[3])
    with pytest.raises(DataError) as info:
        check_image_files(dataset, split="validation")
    message = str(info.value)
    assert message.startswith("4 bad image file(s) in the validation set")
    assert f"{names[0]}: image file is empty (0 bytes)" in message
    assert f"{names[1]}: image file not found" in message
    assert f"{names[2]}: image does not decode" in message
    assert f"{names[3]}: image is 95x96 but the annotations say 96x96" in message
