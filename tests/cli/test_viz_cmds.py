"""``fgdistill visualize attention`` and ``fgdistill plot`` from the command line."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fgdistill.cli.main import main
from fgdistill.models.build import build_detector, model_spec
from fgdistill.models.checkpoint import save_model_spec

TINY = dict(backbone="resnet18", num_classes=3, min_size=64, max_size=64)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny random RetinaNets: a teacher with its spec inside, students as plain state dicts."""
    root = tmp_path_factory.mktemp("ckpts")
    torch.manual_seed(0)
    teacher = build_detector("retinanet", fpn_channels=48, **TINY)
    torch.save({"model_spec": model_spec(teacher), "model": teacher.state_dict()}, root / "t.pt")
    out = {"teacher": root / "t.pt"}
    for name in ("student", "baseline"):
        model = build_detector("retinanet", fpn_channels=32, **TINY)
        folder = root / name
        folder.mkdir()
        torch.save(model.state_dict(), folder / "student.pt")
        save_model_spec(model_spec(model) or {}, folder / "model.yaml")
        out[name] = folder / "student.pt"
    return out


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A grey-scale odd-sized image, an RGBA one, and a COCO file knowing only the first."""
    root = tmp_path_factory.mktemp("imgs")
    rng = np.random.default_rng(0)
    grey = root / "grey.png"
    Image.fromarray(rng.integers(0, 255, (37, 53), dtype=np.uint8), mode="L").save(grey)
    rgba = root / "rgba.png"
    Image.fromarray(rng.integers(0, 255, (40, 33, 4), dtype=np.uint8), mode="RGBA").save(rgba)
    ann = root / "ann.json"
    coco = {
        "images": [{"id": 7, "file_name": "sub/grey.png", "width": 53, "height": 37}],
        "annotations": [
            {"id": 1, "image_id": 7, "bbox": [3, 4, 20, 15], "category_id": 1, "iscrowd": 0},
            {"id": 2, "image_id": 7, "bbox": [0, 0, 53, 37], "category_id": 1, "iscrowd": 1},
        ],
        "categories": [{"id": 1, "name": "thing"}],
    }
    ann.write_text(json.dumps(coco))
    return {"grey": grey, "rgba": rgba, "ann": ann}


def _size(path: Path) -> tuple[int, int]:
    with Image.open(path) as img:
        return img.size


def test_visualize_attention_grey_rgba_with_gt(checkpoints, images, tmp_path, capsys) -> None:
    out = tmp_path / "out"
    rc = main(
        [
            "visualize",
            "attention",
            "--teacher",
            str(checkpoints["teacher"]),
            "--student",
            str(checkpoints["student"]),
            "--baseline",
            str(checkpoints["baseline"]),
            str(images["grey"]),
            str(images["rgba"]),
            "--ann",
            str(images["ann"]),
            "--levels",
            "p3",
            "p4",
            "--out",
            str(out),
            "--dpi",
            "50",
        ]
    )
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    # grey.png is in the annotation file: 8 panels per row (image, T, S, |T-S|, |T-B|, fg, bg,
    # channels); rgba.png is not: a warning and no mask panels (6 per row). Two levels.
    assert _size(out / "attention_grey.png") == (8 * 130, 2 * 130 + 30)
    assert _size(out / "attention_rgba.png") == (6 * 130, 2 * 130 + 30)
    assert "rgba.png is not in" in captured.err
    assert "wrote" in captured.out and "attention_grey.png" in captured.out
    report = (out / "attention_report.html").read_text()
    assert report.count("<img src='attention_") == 2 and "One row per FPN level" in report
    assert report.count("<tr>") == 1 + 2 * 2  # header + (2 images x 2 levels)
    assert "spatial L1, baseline" in report
    assert "p3: attention L1 to the teacher" in captured.out


def test_visualize_defaults_to_the_distilled_levels(checkpoints, images, tmp_path) -> None:
    rc = main(
        [
            "visualize",
            "attention",
            "--teacher",
            str(checkpoints["teacher"]),
            "--student",
            str(checkpoints["student"]),
            str(images["rgba"]),
            "--out",
            str(tmp_path),
            "--temperature",
            "0.8",
            "--dpi",
            "20",
        ]
    )
    assert rc == 0
    # RetinaNet distils P3-P7: five rows of 5 panels
    assert _size(tmp_path / "attention_rgba.png") == (5 * 52, 5 * 52 + 12)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"--ann": "missing.json"}, "annotation file .*missing.json not found"),
        ({"image": "nothere.png"}, "image .*nothere.png not found"),
        ({"--student": "absent.pt"}, "--student checkpoint .*absent.pt not found"),
        ({"--levels": "p9"}, "level.* p9 not available"),
        ({"--temperature": "0"}, "--temperature must be > 0"),
        ({"--dpi": "1"}, "--dpi must be between 10 and 600"),
    ],
)
def test_visualize_bad_inputs_are_one_line_errors(
    checkpoints, images, tmp_path, capsys, change: dict[str, str], message: str
) -> None:
    args = {
        "--teacher": str(checkpoints["teacher"]),
        "--student": str(checkpoints["student"]),
        "--out": str(tmp_path),
        "--ann": str(images["ann"]),
    }
    image = str(images["grey"])
    for key, value in change.items():
        if key == "image":
            image = str(tmp_path / value)
        elif key == "--ann" or key == "--student":
            args[key] = str(tmp_path / value)
        else:
            args[key] = value
    argv = ["visualize", "attention", image]
    for key, value in args.items():
        argv += [key, value]
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 2
    assert err.startswith("error: ") and "Traceback" not in err
    assert re.search(message, err), err


def test_not_an_image_is_a_clear_error(checkpoints, tmp_path, capsys) -> None:
    bad = tmp_path / "fake.jpg"
    bad.write_text("hello")
    rc = main(
        [
            "visualize",
            "attention",
            "--teacher",
            str(checkpoints["teacher"]),
            "--student",
            str(checkpoints["student"]),
            str(bad),
            "--out",
            str(tmp_path),
        ]
    )
    assert rc == 2
    assert "image does not decode" in capsys.readouterr().err


def test_temperature_comes_from_the_distillation_config(tmp_path) -> None:
    from fgdistill.cli.viz_cmds import _trained_temperature

    ckpt = tmp_path / "student.pt"
    assert _trained_temperature(ckpt) is None  # no config.yaml
    (tmp_path / "config.yaml").write_text("distill:\n  preset: fcos\n")
    assert _trained_temperature(ckpt) == 0.8
    (tmp_path / "config.yaml").write_text(
        "distill:\n  preset: fcos\n  hparams: {temperature: 0.3}\n"
    )
    assert _trained_temperature(ckpt) == 0.3
    (tmp_path / "config.yaml").write_text("model: {arch: retinanet}\n")  # a baseline run
    assert _trained_temperature(ckpt) is None


def _log(work_dir: Path) -> Path:
    work_dir.mkdir(parents=True)
    records = [
        {"type": "train", "iter": 2, "epoch": 1, "loss": 1.5, "losses": {"classification": 1.5}},
        {"type": "train", "iter": 4, "epoch": 1, "loss": 1.2, "losses": {"classification": 1.2}},
        {"type": "eval", "iter": 4, "epoch": 1, "metrics": {"bbox": {"AP": 3.0, "AP50": 6.0}}},
    ]
    (work_dir / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return work_dir


def test_plot_runs_and_missing_log(tmp_path, capsys) -> None:
    a, b = _log(tmp_path / "baseline"), _log(tmp_path / "student")
    assert main(["plot", str(a), str(b), "--out", str(tmp_path / "c.png")]) == 0
    assert _size(tmp_path / "c.png") == (3 * 420, 370)  # AP, total loss, classification
    assert main(["plot", str(a), "--dpi", "30"]) == 0  # default: curves.png in the first dir
    assert (a / "curves.png").is_file()
    capsys.readouterr()

    (tmp_path / "empty").mkdir()
    assert main(["plot", str(a), str(tmp_path / "empty"), "--out", str(tmp_path / "d.png")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: no training log in") and "log.jsonl is missing" in err
    assert main(["plot", str(tmp_path / "nowhere")]) == 2
    assert "does not exist" in capsys.readouterr().err
