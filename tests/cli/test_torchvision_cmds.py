"""A torchvision COCO detector, converted, as teacher, and scored in COCO's label space."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from torchvision.models import detection

from fgdistill.cli.main import main
from fgdistill.engine.inference import label_mapping, remap_labels
from fgdistill.errors import ConfigError
from fgdistill.models import coco_categories, load_detector
from fgdistill.models.checkpoint import load_checkpoint

# what main's end-to-end tests use: a RetinaNet-R18 student small enough for seconds on a CPU
STUDENT = {
    "arch": "retinanet",
    "backbone": "resnet18",
    "fpn_channels": 256,
    "min_size": 96,
    "max_size": 96,
    "anchor_sizes": [8, 16, 32, 64, 128],
}
DATA = {
    "train_ann": "annotations/instances_train.json",
    "train_images": "train",
    "val_ann": "annotations/instances_val.json",
    "val_images": "val",
    "batch_size": 2,
    "eval_batch_size": 2,
    "num_workers": 0,
}
OPTIM = {"lr": 0.01, "base_batch_size": 2, "warmup_iters": 1, "epochs": 1, "milestones": []}


@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``fgdistill convert torchvision retinanet_resnet50_fpn`` of a random weights file."""
    work = tmp_path_factory.mktemp("tv")
    torch.manual_seed(0)
    tv = detection.retinanet_resnet50_fpn(weights=None, weights_backbone=None, num_classes=91)
    weights = work / "retinanet_resnet50_fpn_coco.pth"
    torch.save(tv.state_dict(), weights)
    out = work / "converted"
    args = ["convert", "torchvision", "retinanet_resnet50_fpn", str(weights), "--out", str(out)]
    assert main(args) == 0
    return out


def test_convert_writes_what_every_command_takes(converted: Path) -> None:
    assert {p.name for p in converted.iterdir()} >= {"model.pt", "model.yaml", "categories.json"}
    spec = yaml.safe_load((converted / "model.yaml").read_text())
    assert (spec["arch"], spec["num_classes"], spec["frozen_bn_eps"]) == ("retinanet", 91, 0.0)
    assert json.loads((converted / "categories.json").read_text()) == coco_categories()
    model = load_detector(converted / "model.pt")
    assert set(model.state_dict()) == set(torch.load(converted / "model.pt", weights_only=True))


def test_distill_from_a_converted_torchvision_teacher(
    converted: Path, synth_dataset: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """No teacher.num_classes override; the teacher's 91-way classifier is not inherited."""
    cfg = {
        "model": STUDENT,
        "data": {**DATA, "root": str(synth_dataset)},
        "optim": OPTIM,
        "device": "cpu",
        "log_interval": 1,
        "max_iters": 2,
        "distill": {"teacher": {"arch": "retinanet"}, "inherit_teacher": True},
    }
    path = tmp_path / "fgd.yaml"
    path.write_text(yaml.safe_dump(cfg))
    out = tmp_path / "fgd"
    args = ["distill", str(path), "--teacher", str(converted / "model.pt"), "--work-dir", str(out)]
    assert main([*args, "--no-progress"]) == 0
    assert "not inheriting the class-specific layers head.classification_head.cls_logits" in (
        caplog.text
    )
    records = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    assert any("fgd/p7/fg" in r.get("losses", {}) for r in records)
    student = load_detector(out / "student.pt")
    assert (
        student.head.classification_head.cls_logits.out_channels == 9 * 9
    )  # 9 anchors x (8 categories + background)
    teacher = torch.load(converted / "model.pt", weights_only=True)
    key = "head.regression_head.bbox_reg.weight"  # inherited, then trained two steps
    assert torch.allclose(student.state_dict()[key], teacher[key], atol=1e-2)


def _coco_named(synth: Path, tmp: Path) -> Path:
    """The synthetic set with three of COCO's categories (ids and names) for its own."""
    coco = {c["id"]: c["name"] for c in coco_categories()}
    ids = [1, 3, 18, 44, 62, 72, 88, 90]  # person, car, dog, bottle, chair, tv, teddy bear, ...
    root = tmp / "coco_named"
    (root / "annotations").mkdir(parents=True)
    for split in ("train", "val"):
        data = json.loads((synth / "annotations" / f"instances_{split}.json").read_text())
        old_to_new = {c["id"]: ids[i] for i, c in enumerate(data["categories"])}
        data["categories"] = [
            {"id": old_to_new[c["id"]], "name": coco[old_to_new[c["id"]]]}
            for c in data["categories"]
        ]
        for ann in data["annotations"]:
            ann["category_id"] = old_to_new[ann["category_id"]]
        (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(data))
        (root / split).symlink_to(synth / split)
    return root


def test_eval_and_predict_read_labels_as_coco_category_ids(
    converted: Path, synth_dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = _coco_named(synth_dataset, tmp_path)
    small = tmp_path / "small"  # the converted model at 128 px instead of 800, for speed
    shutil.copytree(converted, small)
    spec = yaml.safe_load((small / "model.yaml").read_text())
    (small / "model.yaml").write_text(yaml.safe_dump({**spec, "min_size": 128, "max_size": 128}))
    converted = small
    cfg = {"model": {"arch": "retinanet"}, "data": {**DATA, "root": str(root)}, "device": "cpu"}
    cfg_path = tmp_path / "eval.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    args = ["eval", str(cfg_path), "--checkpoint", str(converted / "model.pt")]
    assert main([*args, "--work-dir", str(tmp_path / "ev"), "--no-progress"]) == 0
    metrics = json.loads((tmp_path / "ev" / "eval_metrics.json").read_text())["metrics"]
    assert 0.0 <= metrics["bbox"]["AP"] <= 100.0

    image = sorted((synth_dataset / "val").glob("*.png"))[0]
    out = tmp_path / "pred"
    args = ["predict", str(image), "--checkpoint", str(converted / "model.pt"), "--out", str(out)]
    assert main([*args, "--score-threshold", "0.0", "--no-progress"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert all(1 <= r["category_id"] <= 90 for r in results)  # random: maybe none above 0.05
    written = json.loads((out / "images.json").read_text())["categories"]
    assert written == coco_categories()


def test_label_mapping_from_coco_ids_to_a_dataset() -> None:
    model = coco_categories()
    dataset = [{"id": 3, "name": "car"}, {"id": 90, "name": "toothbrush"}]
    mapping = label_mapping(model, "tv", dataset, "val.json")
    assert mapping is not None and mapping.shape == (91,)
    assert mapping[3] == 1 and mapping[90] == 2 and mapping[1] == 0 and mapping[12] == 0
    outputs = [
        {
            "boxes": torch.arange(12.0).reshape(3, 4),
            "scores": torch.tensor([0.9, 0.8, 0.7]),
            "labels": torch.tensor([90, 12, 3]),
        }
    ]
    (kept,) = remap_labels(outputs, mapping)
    assert kept["labels"].tolist() == [2, 1]
    assert kept["scores"].tolist() == pytest.approx([0.9, 0.7])
    assert label_mapping(dataset, "a", dataset, "b") is None
    with pytest.raises(ConfigError, match="differ"):
        label_mapping(model, "tv", [{"id": 3, "name": "automobile"}], "val.json")


def test_model_weights_skip_the_class_head_and_say_so(
    converted: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A student built in torchvision's layout starts from the COCO file with 9 classes."""
    from fgdistill.models import build_detector, torchvision_spec

    spec = torchvision_spec("retinanet_resnet50_fpn", num_classes=9, min_size=96, max_size=96)
    student = build_detector(**spec, weights=str(converted / "model.pt"))
    assert "skipped 2 tensor(s) of another shape" in caplog.text
    assert "head.classification_head.cls_logits.weight" in caplog.text
    theirs = load_checkpoint(converted / "model.pt")
    key = "backbone.fpn.layer_blocks.0.0.weight"
    assert torch.equal(student.state_dict()[key], theirs[key])
