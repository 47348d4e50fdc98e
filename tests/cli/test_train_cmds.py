"""End-to-end tests of ``fgdistill train / distill / eval / predict`` on tiny synthetic data."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

from fgdistill.cli.main import main
from fgdistill.models import load_detector
from fgdistill.models.checkpoint import load_checkpoint

# A detector small enough to train a few steps in seconds on a CPU.
TINY = {
    "model": {
        "arch": "retinanet",
        "backbone": "resnet18",
        "fpn_channels": 32,
        "min_size": 96,
        "max_size": 96,
        "anchor_sizes": [8, 16, 32, 64, 128],
    },
    "data": {
        "train_ann": "annotations/instances_train.json",
        "train_images": "train",
        "val_ann": "annotations/instances_val.json",
        "val_images": "val",
        "batch_size": 4,
        "eval_batch_size": 4,
        "num_workers": 0,
    },
    "optim": {
        "optimizer": "sgd",
        "lr": 0.01,
        "base_batch_size": 4,
        "warmup_iters": 2,
        "epochs": 2,
        "milestones": [1],
    },
    "device": "cpu",
    "log_interval": 1,
}


def write_config(path: Path, root: Path, **sections: dict) -> Path:
    data = json.loads(json.dumps(TINY))
    data["data"]["root"] = str(root)
    for key, value in sections.items():
        data[key] = value if not isinstance(value, dict) else {**data.get(key, {}), **value}
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture(scope="module")
def trained(synth_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny detector trained for 2 epochs (4 iterations) with ``fgdistill train``."""
    work = tmp_path_factory.mktemp("train")
    cfg = write_config(work / "tiny.yaml", synth_dataset)
    assert main(["train", str(cfg), "--work-dir", str(work / "run"), "--no-progress"]) == 0
    return work / "run"


def test_train_writes_every_output(trained: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for name in (
        "config.yaml",
        "log.jsonl",
        "last.pt",
        "best.pt",
        "model.pt",
        "model.yaml",
        "metrics.json",
        "categories.json",
    ):
        assert (trained / name).is_file(), name
    assert (trained / "tb").is_dir()
    records = [json.loads(x) for x in (trained / "log.jsonl").read_text().splitlines()]
    train_records = [r for r in records if r["type"] == "train"]
    eval_records = [r for r in records if r["type"] == "eval"]
    assert [r["iter"] for r in train_records] == [1, 2, 3, 4]
    assert {"classification", "bbox_regression"} <= set(train_records[0]["losses"])
    assert [r["epoch"] for r in eval_records] == [1, 2]
    assert "AP" in eval_records[-1]["metrics"]["bbox"]
    metrics = json.loads((trained / "metrics.json").read_text())
    assert metrics["iterations"] == 4
    assert set(metrics["metrics"]["bbox"]) >= {"AP", "AP50", "AP75", "APs", "APm", "APl"}
    resolved = yaml.safe_load((trained / "config.yaml").read_text())
    assert resolved["model"]["num_classes"] == 9  # 8 synthetic categories + background
    ckpt = load_checkpoint(trained / "last.pt")
    assert ckpt["iter"] == 4 and ckpt["epoch"] == 2
    assert ckpt["model_spec"]["arch"] == "retinanet"


def test_load_detector_from_plain_state_dict_and_checkpoint(trained: Path) -> None:
    a = load_detector(trained / "model.pt")
    b = load_detector(trained / "last.pt")
    assert not a.training
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(va, vb), k


def test_eval_command(
    trained: Path, synth_dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = write_config(tmp_path / "tiny.yaml", synth_dataset)
    out = tmp_path / "eval"
    code = main(
        [
            "eval",
            str(cfg),
            "--checkpoint",
            str(trained / "model.pt"),
            "--work-dir",
            str(out),
            "--no-progress",
        ]
    )
    assert code == 0
    text = capsys.readouterr().out
    assert "bbox: AP" in text and "eval_metrics.json" in text
    written = json.loads((out / "eval_metrics.json").read_text())
    final = json.loads((trained / "metrics.json").read_text())["metrics"]["bbox"]
    assert written["metrics"]["bbox"]["AP"] == pytest.approx(final["AP"], nan_ok=True)
    assert (out / "eval_config.yaml").is_file()
    # Beside the checkpoint (the default), the training run's config.yaml stays as it was.
    training_config = (trained / "config.yaml").read_bytes()
    args = ["eval", str(cfg), "--checkpoint", str(trained / "model.pt"), "--no-progress"]
    assert main(args) == 0
    assert (trained / "config.yaml").read_bytes() == training_config
    assert (trained / "eval_config.yaml").is_file()


def test_predict_command(
    trained: Path, synth_dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    images = sorted((synth_dataset / "val").glob("*.png"))[:2]
    grey = tmp_path / "grey.png"
    Image.open(images[0]).convert("L").resize((70, 50)).save(grey)
    out = tmp_path / "pred"
    code = main(
        [
            "predict",
            "--checkpoint",
            str(trained / "model.pt"),
            *map(str, images),
            str(grey),
            "--out",
            str(out),
            "--score-threshold",
            "0.0",
            "--no-progress",
        ]
    )
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    entries = json.loads((out / "images.json").read_text())
    assert [e["id"] for e in entries["images"]] == [1, 2, 3]
    assert (entries["images"][2]["width"], entries["images"][2]["height"]) == (70, 50)
    cat_ids = {c["id"] for c in entries["categories"]}
    for r in results:
        assert set(r) == {"image_id", "category_id", "bbox", "score"}
        assert r["category_id"] in cat_ids and r["image_id"] in (1, 2, 3)
    drawn = sorted(p.name for p in out.glob("*.png"))
    assert len(drawn) == 3
    assert Image.open(out / "grey.png").size == (70, 50)
    assert "outputs in" in capsys.readouterr().out


def test_train_and_eval_refuse_a_val_set_with_other_categories(
    trained: Path, synth_dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    val = json.loads((synth_dataset / "annotations" / "instances_val.json").read_text())
    dropped = val["categories"][0]["id"]
    val["categories"] = val["categories"][1:]
    val["annotations"] = [a for a in val["annotations"] if a["category_id"] != dropped]
    other = tmp_path / "val_fewer.json"
    other.write_text(json.dumps(val))
    cfg = write_config(tmp_path / "tiny.yaml", synth_dataset, data={"val_ann": str(other)})
    assert main(["train", str(cfg), "--work-dir", str(tmp_path / "w"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert f"the categories of {other} differ from those of" in err and "only in" in err
    # a trained model's labels are its training set's categories: scored against a set with
    # some of them, each label is read as its category id (the others are dropped) ...
    args = ["eval", str(cfg), "--checkpoint", str(trained / "model.pt")]
    assert main([*args, "--work-dir", str(tmp_path / "e"), "--no-progress"]) == 0
    # ... and a set with a category the model does not know is refused
    val["categories"][0]["name"] = "renamed"
    other.write_text(json.dumps(val))
    assert main([*args, "--work-dir", str(tmp_path / "e"), "--no-progress"]) == 2
    assert "(its label space)" in capsys.readouterr().err


def test_predict_refuses_a_threshold_that_is_not_a_number(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["predict", "--checkpoint", str(tmp_path / "m.pt"), "x.png", "--set"]
    assert main([*args, "score_threshold=abc"]) == 2
    err = capsys.readouterr().err
    assert "--set score_threshold: expected a number, got 'abc'" in err and "Traceback" not in err


def test_bad_config_unknown_key(
    synth_dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = write_config(tmp_path / "bad.yaml", synth_dataset, optim={"lrr": 0.1})
    assert main(["train", str(cfg), "--work-dir", str(tmp_path / "w")]) == 2
    err = capsys.readouterr().err
    assert "bad.yaml: optim.lrr: unknown key; did you mean 'lr'?" in err
    assert "Traceback" not in err


def test_bad_override_wrong_type(
    synth_dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = write_config(tmp_path / "ok.yaml", synth_dataset)
    code = main(
        ["train", str(cfg), "--set", "data.batch_size=two", "--work-dir", str(tmp_path / "w")]
    )
    assert code == 2
    assert "data.batch_size: expected int, got str 'two'" in capsys.readouterr().err


def test_missing_and_corrupt_checkpoints(
    synth_dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = write_config(tmp_path / "ok.yaml", synth_dataset)
    missing = tmp_path / "nope.pt"
    assert main(["eval", str(cfg), "--checkpoint", str(missing), "--no-progress"]) == 2
    assert "nope.pt: checkpoint not found" in capsys.readouterr().err
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"PK\x03\x04 definitely not a checkpoint")
    image = sorted((synth_dataset / "val").glob("*.png"))[0]
    assert (
        main(["predict", "--checkpoint", str(corrupt), str(image), "--out", str(tmp_path / "p")])
        == 2
    )
    assert "corrupt.pt: cannot read checkpoint" in capsys.readouterr().err


def test_distill_without_distill_section_is_refused(
    synth_dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = write_config(tmp_path / "plain.yaml", synth_dataset)
    assert main(["distill", str(cfg)]) == 2
    assert "no 'distill' section" in capsys.readouterr().err


def test_list_configs(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", "--list-configs"]) == 0
    names = capsys.readouterr().out.split()
    assert "coco/fgd_retinanet_x101_64x4d_r50" in names
    assert "demo/demo" in names


def test_distill_end_to_end(
    trained: Path, synth_dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    teacher = dict(TINY["model"], backbone="resnet18")
    cfg = write_config(
        tmp_path / "fgd.yaml",
        synth_dataset,
        distill={
            "teacher": teacher,
            "teacher_checkpoint": str(trained / "model.pt"),
            "fgd_weight_scale": 0.5,
            "fgd_warmup_iters": 2,
        },
    )
    out = tmp_path / "fgd"
    code = main(
        ["distill", str(cfg), "--work-dir", str(out), "--set", "optim.epochs=1", "--no-progress"]
    )
    assert code == 0
    assert "student.pt" in capsys.readouterr().out
    records = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    losses = records[0]["losses"]
    levels = {k.split("/")[1] for k in losses if k.startswith("fgd/")}
    assert levels == {"p3", "p4", "p5", "p6", "p7"}
    assert {"fgd/p3/fg", "fgd/p3/bg", "fgd/p3/attention", "fgd/p3/global"} <= set(losses)
    assert "classification" in losses
    # student.pt is a plain detector state dict that rebuilds with model.yaml; the teacher
    # is not in it, and the training checkpoint holds the FGD modules for resuming.
    student = load_detector(out / "student.pt")
    sd = torch.load(out / "student.pt", weights_only=True)
    assert set(sd) == set(student.state_dict())
    ckpt = load_checkpoint(out / "last.pt")
    assert any(k.startswith("fgd.") for k in ckpt["trainable"])
    assert set(ckpt["model"]) == set(sd)
    # The teacher's weights are untouched by distillation.
    teacher_sd = torch.load(trained / "model.pt", weights_only=True)
    assert torch.equal(
        teacher_sd["head.classification_head.cls_logits.weight"],
        load_detector(trained / "model.pt").state_dict()[
            "head.classification_head.cls_logits.weight"
        ],
    )


def test_a_fresh_start_leaves_nothing_of_an_earlier_run_to_resume(
    trained: Path, synth_dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fgdistill.engine import trainer as trainer_module

    cfg = write_config(tmp_path / "tiny.yaml", synth_dataset)
    work = tmp_path / "run"
    work.mkdir()
    for name in ("last.pt", "best.pt", "model.pt", "metrics.json", "notes.txt"):
        (work / name).write_text("an earlier run's")

    def crash(self: object) -> None:
        raise KeyboardInterrupt  # stopped before its first checkpoint

    monkeypatch.setattr(trainer_module.Trainer, "train", crash)
    # refused without --overwrite, naming the files and the flag; nothing is touched
    assert main(["train", str(cfg), "--work-dir", str(work), "--no-progress"]) == 2
    assert (work / "last.pt").read_text() == "an earlier run's"
    assert not (work / "config.yaml").exists()
    assert main(["train", str(cfg), "--work-dir", str(work), "--no-progress", "--overwrite"]) == 130
    # --resume now starts fresh instead of continuing the earlier run
    assert sorted(p.name for p in work.iterdir() if p.suffix in (".pt", ".json", ".txt")) == [
        "categories.json",
        "notes.txt",
    ]
    # ... but what the run itself reads stays, e.g. weights to start from in the same folder
    shutil.copy(trained / "model.pt", work / "best.pt")
    (work / "last.pt").write_text("an earlier run's")
    args = ["train", str(cfg), "--work-dir", str(work), "--no-progress", "--overwrite"]
    assert main([*args, "--set", f"model.weights={work / 'best.pt'}"]) == 130
    assert (work / "best.pt").is_file() and not (work / "last.pt").exists()


@pytest.mark.parametrize("stop_at", [3])  # mid-epoch: 2 iterations per epoch
def test_resume_matches_uninterrupted_run(
    trained: Path, synth_dataset: Path, tmp_path: Path, stop_at: int
) -> None:
    cfg = write_config(tmp_path / "tiny.yaml", synth_dataset)
    work = tmp_path / "run"
    base = ["train", str(cfg), "--work-dir", str(work), "--no-progress"]
    assert main([*base, "--set", f"max_iters={stop_at}"]) == 0
    assert load_checkpoint(work / "last.pt")["iter"] == stop_at
    assert main([*base, "--resume"]) == 0
    straight = torch.load(trained / "model.pt", weights_only=True)
    resumed = torch.load(work / "model.pt", weights_only=True)
    assert set(straight) == set(resumed)
    for key, value in straight.items():
        assert torch.equal(value, resumed[key]), key
    iters = [
        json.loads(x)["iter"]
        for x in (work / "log.jsonl").read_text().splitlines()
        if json.loads(x)["type"] == "train"
    ]
    assert iters == [1, 2, 3, 4]


@pytest.mark.parametrize(
    ("method", "hparams"),
    [("pkd", {"loss_weight": 2.0}), ("cwd", {"tau": 2.0}), ("mgd", {}), ("mse", {})],
)
def test_distill_runs_every_method_end_to_end(
    trained: Path, synth_dataset: Path, tmp_path: Path, method: str, hparams: dict
) -> None:
    cfg = write_config(
        tmp_path / f"{method}.yaml",
        synth_dataset,
        distill={
            "teacher": dict(TINY["model"], backbone="resnet18"),
            "teacher_checkpoint": str(trained / "model.pt"),
            "method": method,
            "hparams": hparams,
            "inherit_teacher": True,
        },
    )
    out = tmp_path / method
    args = ["distill", str(cfg), "--work-dir", str(out), "--no-progress"]
    assert main([*args, "--set", "optim.epochs=1"]) == 0
    records = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    terms = {k for k in records[0]["losses"] if k.startswith("fgd/")}
    levels = ["p3", "p4", "p5", "p6"] if method == "pkd" else ["p3", "p4", "p5", "p6", "p7"]
    assert terms == {f"fgd/{lv}/{method}" for lv in levels}  # the preset's levels
    assert all(math.isfinite(v) for v in records[0]["losses"].values())
    # the method's own modules (MGD's generation block) train but are not in the student
    sd = torch.load(out / "student.pt", weights_only=True)
    assert set(sd) == set(load_detector(out / "student.pt").state_dict())
    trainable = load_checkpoint(out / "last.pt")["trainable"]
    assert any(".generation." in k for k in trainable) == (method == "mgd")


def test_a_misspelt_method_key_is_named(
    trained: Path, synth_dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = write_config(
        tmp_path / "pkd.yaml",
        synth_dataset,
        distill={
            "teacher": dict(TINY["model"], backbone="resnet18"),
            "teacher_checkpoint": str(trained / "model.pt"),
            "method": "pkd",
            "hparams": {"loss_wieght": 2.0},
        },
    )
    assert main(["distill", str(cfg), "--work-dir", str(tmp_path / "w"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "distill.hparams: unknown key 'loss_wieght' for method 'pkd'" in err
    assert "did you mean 'loss_weight'?" in err
    assert main(["distill", str(cfg), "--set", "distill.method=kd"]) == 2
    assert "distill.method" in capsys.readouterr().err


# -- what survives what ---------------------------------------------------------------------------


@pytest.fixture
def short_run(synth_dataset: Path, tmp_path: Path) -> tuple[list[str], Path]:
    """A finished one-iteration run; returns its command line and work dir."""
    cfg = write_config(tmp_path / "tiny.yaml", synth_dataset)
    work = tmp_path / "run"
    base = ["train", str(cfg), "--work-dir", str(work), "--no-progress", "--set", "max_iters=1"]
    assert main(base) == 0
    return base, work


def _evals(work: Path) -> list[int]:
    records = [json.loads(x) for x in (work / "log.jsonl").read_text().splitlines()]
    return [r["iter"] for r in records if r["type"] == "eval"]


def test_a_finished_run_survives_failed_starts_and_resumes(
    short_run: tuple[list[str], Path], capsys: pytest.CaptureFixture[str]
) -> None:
    from fgdistill.engine.workdir import lock_work_dir

    base, work = short_run
    config = (work / "config.yaml").read_bytes()
    weights = (work / "model.pt").read_bytes()
    capsys.readouterr()
    # a fresh start over it
    assert main(base) == 2
    err = capsys.readouterr().err
    assert "holds an earlier run (last.pt, best.pt, model.pt)" in err and "--overwrite" in err
    # a failed start: a bad backbone, a bad teacher
    assert main([*base, "--set", "model.backbone=resnet7", "--overwrite"]) == 2
    assert "resnet7" in capsys.readouterr().err
    # a resume with a changed config
    assert main([*base, "--resume", "--set", "optim.lr=0.02", "--set", "seed=3"]) == 2
    err = capsys.readouterr().err
    assert "optim.lr: 0.01 -> 0.02; seed: 0 -> 3" in err and "--allow-config-change" in err
    # another process holding the work dir
    with lock_work_dir(work, "train"):
        assert main([*base, "--resume"]) == 2
    assert "in use by another fgdistill process" in capsys.readouterr().err
    assert (work / "config.yaml").read_bytes() == config
    assert (work / "model.pt").read_bytes() == weights
    # what does not alter the run is accepted; resuming a finished run evaluates nothing again
    (work / ".last.pt.k1ll3d.tmp").write_bytes(b"half a checkpoint")
    for _ in range(2):
        assert main([*base, "--resume", "--set", "log_interval=7"]) == 0
    assert _evals(work) == [1]
    assert not list(work.glob(".*.tmp"))
    assert (work / "model.pt").read_bytes() == weights
    # allowed on request, and the optimizer may change too
    allow = ["--resume", "--allow-config-change", "--set", "max_iters=2"]
    assert main([*base, *allow, "--set", "optim.optimizer=adamw"]) == 0
    assert load_checkpoint(work / "last.pt")["iter"] == 2


def test_a_failing_evaluation_keeps_the_trained_model(
    synth_dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fgdistill.engine import runner

    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("Expected more than 1 value per channel when training")

    cfg = write_config(tmp_path / "tiny.yaml", synth_dataset)
    work = tmp_path / "run"
    base = ["train", str(cfg), "--work-dir", str(work), "--no-progress", "--set", "max_iters=1"]
    monkeypatch.setattr(runner, "evaluate_model", broken)
    assert main(base) == 1
    assert load_checkpoint(work / "last.pt")["iter"] == 1
    trained_weights = torch.load(work / "model.pt", weights_only=True)
    assert (work / "model.yaml").is_file() and (work / "config.yaml").is_file()
    monkeypatch.undo()
    assert main([*base, "--resume"]) == 0  # evaluates what was trained, trains nothing more
    assert _evals(work) == [1]
    after = torch.load(work / "model.pt", weights_only=True)
    assert all(torch.equal(v, after[k]) for k, v in trained_weights.items())


def test_bad_images_are_found_before_training_all_at_once(
    synth_dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "data"
    shutil.copytree(synth_dataset, root)
    bad_val = sorted((root / "val").glob("*.png"))[0]
    bad_val.write_bytes(b"")
    bad_train = sorted((root / "train").glob("*.png"))[1]
    bad_train.write_bytes(b"GIF89a but no more")
    cfg = write_config(tmp_path / "tiny.yaml", root)
    work = tmp_path / "run"
    assert main(["train", str(cfg), "--work-dir", str(work), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert f"{bad_train}: image does not decode" in err
    assert "1 bad image file(s) in the training set" in err
    assert not (work / "config.yaml").exists() and not (work / "last.pt").exists()
    bad_train.write_bytes((root / "train" / "000000.png").read_bytes())
    assert main(["train", str(cfg), "--work-dir", str(work), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert f"{bad_val}: image file is empty (0 bytes)" in err and "validation set" in err


def test_an_infinite_learning_rate_is_refused(
    synth_dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = write_config(tmp_path / "tiny.yaml", synth_dataset)
    for value, expected in (
        (".inf", "--set optim.lr: must be a finite number, got inf"),
        ("1e39", "--set optim.lr: 1e+39 is beyond the float32 range"),
    ):
        args = ["train", str(cfg), "--work-dir", str(tmp_path / "w"), "--set", f"optim.lr={value}"]
        assert main(args) == 2
        assert expected in capsys.readouterr().err


def test_predict_refuses_an_out_file_and_a_too_thin_image(
    trained: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    image = tmp_path / "thin.png"
    Image.new("RGB", (5000, 1), "white").save(image)
    out_file = tmp_path / "out.txt"
    out_file.write_text("not a folder")
    ckpt = str(trained / "model.pt")
    assert main(["predict", "--checkpoint", ckpt, str(image), "--out", str(out_file)]) == 2
    assert "--out " + str(out_file) + ": is a file, not a folder" in capsys.readouterr().err
    args = ["predict", "--checkpoint", ckpt, str(image), "--out", str(tmp_path / "p")]
    assert main([*args, "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "thin.png: image is 5000x1" in err and "under 1 px" in err
