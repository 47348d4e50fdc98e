"""Benchmark stages on a tiny budget: each stage its own record, reused, locked and resumable."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import pytest

from fgdistill.bench.plan import load_plan
from fgdistill.bench.runner import read_record, run_bench, stage_lock
from fgdistill.cli.main import main
from fgdistill.engine.config import TrainConfig

QUALITY = Path(__file__).resolve().parents[2] / "src/fgdistill/configs/bench/quality.yaml"

Args = Callable[..., list[str]]


@pytest.fixture
def tiny(tiny_plan: Callable[[str], list[str]]) -> list[str]:
    return tiny_plan("retinanet")


@pytest.fixture(name="_args")
def _args_fixture(tiny: list[str]) -> Args:
    def make(work: Path, *rows: str, seeds: str = "0") -> list[str]:
        args = ["bench", "quality", "--work-dir", str(work), "--no-progress", "--rows", *rows]
        args += ["--seeds", *seeds.split()]
        for item in tiny:
            args += ["--set", item]
        return args

    return make


@pytest.mark.slow
def test_bench_trains_scores_and_reuses_every_stage(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], _args: Args
) -> None:
    work = tmp_path / "bench"
    args = [*_args(work, "fg_bg_joint", "fgd", seeds="0 1"), "--set", "heldout.images=6"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "also running baseline: the baseline(s) of the chosen rows" in out
    assert "| teacher (retinanet) | retinanet resnet18 | 1 |" in out
    assert "| fgd | retinanet resnet18 | 2 |" in out
    assert "## Held-out set (6 images, seed 7)" in out
    for seed in (0, 1):
        for row in ("baseline", "fg_bg_joint", "fgd"):
            folder = work / f"seed{seed}" / row
            record = read_record(folder)
            assert record is not None and record.metrics and record.heldout_metrics
            # a finished stage keeps its model, not its training checkpoints
            assert (folder / ("model.pt" if row == "baseline" else "student.pt")).is_file()
            assert not (folder / "last.pt").exists() and not (folder / "best.pt").exists()
    data = json.loads((work / "results.json").read_text())
    assert data["status"] == "complete" and data["seeds"] == [0, 1]
    fgd = next(r for r in data["rows"] if r["name"] == "fgd")
    assert fgd["seeds"] == [0, 1] and set(fgd["per_seed"]) == {"0", "1"}
    # seeds really differ: two runs of one row are not the same run
    logs = [(work / f"seed{s}/fgd/log.jsonl").read_text().splitlines()[0] for s in (0, 1)]
    assert logs[0] != logs[1]
    held = next(r for r in data["heldout"]["rows"] if r["name"] == "fgd")
    record = read_record(work / "seed0/fgd")
    assert record is not None and held["per_seed"]["0"]["AP"] == record.heldout_metrics["AP"]
    # six held-out images, none of them the validation split's
    held_ann = json.loads((work / "heldout_data/annotations/instances_val.json").read_text())
    first = held_ann["images"][0]["file_name"]
    assert len(held_ann["images"]) == 6
    assert (work / "heldout_data/val" / first).read_bytes() != (
        work / "data/val" / first
    ).read_bytes()
    # the joint row saw no boxes: its foreground term is exactly zero throughout
    log = (work / "seed0/fg_bg_joint/log.jsonl").read_text().splitlines()
    train = [json.loads(line) for line in log if '"train"' in line]
    assert train and all(rec["losses"]["fgd/p3/fg"] == 0 for rec in train)
    assert "fgd" in data["loss_magnitudes"] and "baseline" not in data["loss_magnitudes"]
    assert (work / "report.html").is_file() and (work / "curves.png").is_file()

    mtime = (work / "teacher_retinanet" / "model.pt").stat().st_mtime_ns
    assert main(args) == 0
    again = capsys.readouterr().out
    assert again.count("reusing") == 1 + 1 + 1 + 6  # data, held-out data, teacher, 3 rows x 2
    assert "held-out AP" not in again  # scored once
    assert (work / "teacher_retinanet" / "model.pt").stat().st_mtime_ns == mtime

    # --report-only trains nothing: a row never run is listed and counted as missing
    assert main([*_args(work, "fgd", "fgd_norm", seeds="0 1"), "--report-only", "--no-report"]) == 0
    partial = capsys.readouterr().out
    assert "left out: 2 stage(s): seed 0 fgd_norm, seed 1 fgd_norm" in partial
    assert "| fgd_norm | retinanet resnet18 | 0 |" in partial
    assert json.loads((work / "results.json").read_text())["status"] == "partial"
    assert not (work / "seed0" / "fgd_norm").exists()


@pytest.mark.slow
def test_workers_train_the_stages_a_serial_run_reuses(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], _args: Args
) -> None:
    work = tmp_path / "bench"
    args = [*_args(work, "fgd"), "--no-report"]
    assert main([*args, "--jobs", "2"]) == 0
    assert "training 2 stages, 2 workers" in capsys.readouterr().out
    data = json.loads((work / "results.json").read_text())
    assert data["status"] == "complete"
    assert [(r["name"], r["seeds"]) for r in data["rows"]] == [("baseline", [0]), ("fgd", [0])]
    assert main(args) == 0
    assert capsys.readouterr().out.count("reusing") == 1 + 1 + 2  # data, teacher, 2 rows
    assert main([*args, "--jobs", "0"]) == 2
    assert "--jobs: need at least 1, got 0" in capsys.readouterr().err


def _fake_train(cfg: TrainConfig, *, resume: bool, progress: bool, **_: object) -> SimpleNamespace:
    folder = Path(cfg.work_dir)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "last.pt").write_text("checkpoint")
    return SimpleNamespace(metrics={"bbox": {"AP": float(cfg.seed)}}, iterations=3, wall_time=0.0)


def test_a_stage_held_by_another_process_is_left_to_it(tmp_path: Path, tiny: list[str]) -> None:
    plan = load_plan(QUALITY, tiny, rows=["baseline"], seeds=[0, 1])
    lines: list[str] = []
    with stage_lock(tmp_path / "seed1" / "baseline", wait=False) as free:
        assert free
        records = run_bench(plan, tmp_path, train_fn=_fake_train, say=lines.append)
    assert set(records) == {("retinanet", None), ("baseline", 0)}
    assert "left out: 1 stage(s): seed 1 baseline" in lines[-1]
    assert not (tmp_path / "seed0/baseline/last.pt").exists()  # finished: checkpoint deleted
    # an unchanged stage is reused; a changed setting retrains the teacher and the students
    lines.clear()
    run_bench(plan, tmp_path, train_fn=_fake_train, say=lines.append)
    assert any("seed 0 baseline: reusing" in line for line in lines)
    assert any("seed 1 baseline (retinanet resnet18): training" in line for line in lines)
    lines.clear()
    changed = load_plan(QUALITY, [*tiny, "common.optim.lr=0.5"], rows=["baseline"], seeds=[0])
    records = run_bench(changed, tmp_path, train_fn=_fake_train, say=lines.append)
    assert not any("reusing" in line for line in lines if "data" not in line)
    assert records[("baseline", 0)].metrics == {"AP": 0.0}


@pytest.mark.slow
def test_mask_rcnn_rows_are_scored_on_masks_too(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], tiny_plan: Callable[[str], list[str]]
) -> None:
    work = tmp_path / "bench"
    args = ["bench", "quality", "--work-dir", str(work), "--no-progress", "--no-report"]
    args += ["--rows", "mask_rcnn_fgd_norm", "--seeds", "0"]
    for item in [*tiny_plan("mask_rcnn"), "heldout.images=4"]:
        args += ["--set", item]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "mask_rcnn_fgd_norm: held-out AP 0.00, mask AP 0.00" in out
    assert "| mask AP | mask gain | mask gap closed |" in out
    for folder in (work / "teacher_mask_rcnn", work / "seed0/mask_rcnn_fgd_norm"):
        record = read_record(folder)
        assert record is not None
        for metrics in (record.metrics, record.heldout_metrics):
            assert {"AP", "mask_AP", "mask_AP50"} <= set(metrics)
    data = json.loads((work / "results.json").read_text())
    fgd = next(r for r in data["heldout"]["rows"] if r["name"] == "mask_rcnn_fgd_norm")
    assert "gain_mask_AP" in fgd and fgd["paired_seeds"] == [0]
    # the family distils the two-stage levels with the released two-stage weights
    config = (work / "seed0/mask_rcnn_fgd_norm/config.yaml").read_text()
    assert "levels: [p2, p3, p4, p5]" in config and "preset: mask_rcnn" in config
