"""``fgdistill synth``, ``fgdistill data check`` and ``fgdistill score``, run in-process."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from fgdistill.cli.main import main

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


def test_synth_writes_dataset_and_reports_speed(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "synth"
    args = ["synth", str(out), "--train", "3", "--val", "2", "--image-size", "64", "--seed", "1"]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "wrote 5 images (64x64)" in text and "images/s" in text
    assert str(out / "annotations" / "instances_train.json") in text
    assert len(list((out / "train").glob("*.png"))) == 3
    assert len(list((out / "val").glob("*.png"))) == 2
    first = (out / "annotations" / "instances_val.json").read_bytes()
    assert main(args) == 0
    assert (out / "annotations" / "instances_val.json").read_bytes() == first


def test_data_check_clean(synth_dataset: Path, capsys: pytest.CaptureFixture) -> None:
    code = main(
        [
            "data",
            "check",
            str(synth_dataset / "annotations" / "instances_val.json"),
            str(synth_dataset / "val"),
        ]
    )
    text = capsys.readouterr().out
    assert code == 0
    assert "images:      4" in text and "(4 decoded)" in text
    assert "striped_disc" in text and "checked_cross" in text
    for key in ("small", "medium", "large"):
        assert key in text
    assert text.rstrip().endswith("OK")


def test_data_check_lists_every_problem_and_fails(
    synth_dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    image_dir = tmp_path / "val"
    shutil.copytree(synth_dataset / "val", image_dir)
    (image_dir / "000003.png").unlink()
    data = json.loads((synth_dataset / "annotations" / "instances_val.json").read_text())
    data["annotations"][0]["bbox"] = [0, 0, -1, 5]
    ann = tmp_path / "bad.json"
    ann.write_text(json.dumps(data))
    assert main(["data", "check", str(ann), str(image_dir)]) == 1
    text = capsys.readouterr().out
    assert "problems: 2 error(s)" in text
    assert "bad.json: annotations[0] (id 1): bbox has a negative size" in text
    assert "000003.png: image file not found" in text
    assert text.rstrip().endswith("FAILED")


def test_data_check_unusable_file_exits_1(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["data", "check", str(tmp_path / "none.json"), str(tmp_path)]) == 1
    assert "none.json: annotation file not found" in capsys.readouterr().out


def test_score_prints_and_writes_metrics(
    synth_dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    ann_file = synth_dataset / "annotations" / "instances_val.json"
    gt = json.loads(ann_file.read_text())
    results = [
        {
            "image_id": a["image_id"],
            "category_id": a["category_id"],
            "bbox": a["bbox"],
            "score": 0.9,
        }
        for a in gt["annotations"]
    ]
    results_file = tmp_path / "results.json"
    results_file.write_text(json.dumps(results))
    out = tmp_path / "metrics" / "bbox.json"
    assert main(["score", str(ann_file), str(results_file), "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "AP50" in text and "100.00" in text
    saved = json.loads(out.read_text())
    assert saved["scale"] == "percent" and saved["iou_type"] == "bbox"
    assert saved["metrics"]["AP"] == pytest.approx(100.0)
    assert saved["metrics"]["APl"] is None  # undefined: no large objects at 96 px


def test_score_segm(synth_dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    ann_file = synth_dataset / "annotations" / "instances_val.json"
    gt = json.loads(ann_file.read_text())
    results = [
        {
            "image_id": a["image_id"],
            "category_id": a["category_id"],
            "segmentation": a["segmentation"],
            "score": 1.0,
        }
        for a in gt["annotations"]
    ]
    results_file = tmp_path / "segm.json"
    results_file.write_text(json.dumps(results))
    assert main(["score", str(ann_file), str(results_file), "--iou-type", "segm"]) == 0
    assert "segm metrics" in capsys.readouterr().out


def test_bad_input_is_one_line_error(
    synth_dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    ann_file = synth_dataset / "annotations" / "instances_val.json"
    bad = tmp_path / "results.json"
    bad.write_text('[{"image_id": 1}]')
    assert main(["score", str(ann_file), str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
    assert "results.json: [0]: missing key(s)" in err
    assert main(["score", str(tmp_path / "gt.json"), str(bad)]) == 2
    assert "gt.json: annotation file not found" in capsys.readouterr().err
    assert main(["synth", str(tmp_path / "x"), "--image-size", "8"]) == 2
    assert "image_size" in capsys.readouterr().err
    assert main(["synth", str(tmp_path / "x"), "--workers", "0"]) == 2
    assert capsys.readouterr().err == "error: workers must be >= 1, got 0\n"


def test_synth_workers_option(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        main(["synth", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "--workers W" in help_text and "1: in this one" in help_text
    args = ["--train", "2", "--val", "1", "--image-size", "48"]
    assert main(["synth", str(tmp_path / "one"), *args, "--workers", "1"]) == 0
    assert main(["synth", str(tmp_path / "two"), *args, "--workers", "2"]) == 0
    for path in sorted((tmp_path / "one").rglob("*.*")):
        twin = tmp_path / "two" / path.relative_to(tmp_path / "one")
        assert twin.read_bytes() == path.read_bytes()
