"""``fgdistill demo`` on a tiny budget: every stage runs, the table is printed, re-runs reuse."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from fgdistill.cli.main import main

TINY = [
    "synth.num_train=8",
    "synth.num_val=4",
    "common.model.fpn_channels=32",
    "common.model.head_norm=null",
    "common.data.batch_size=4",
    "common.log_interval=1",
    "common.optim.warmup_iters=1",
    "teacher.model.backbone=resnet18",
    "teacher.optim.epochs=1",
    "teacher.optim.milestones=[]",
    "baseline.optim.epochs=1",
    "baseline.optim.milestones=[]",
    "fgd.optim.epochs=1",
    "fgd.optim.milestones=[]",
    "fgd.distill.fgd_warmup_iters=1",
]


@pytest.mark.slow
def test_demo_runs_every_stage_and_reuses_them(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    work = tmp_path / "demo"
    args = ["demo", "--work-dir", str(work), "--no-progress"]
    for item in TINY:
        args += ["--set", item]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "| run | model | AP | AP50 | AP75 | APs | APm | APl | wall time |" in out
    for name in ("teacher", "baseline", "fgd"):
        assert f"| {name} | retinanet resnet18 |" in out
        assert (work / name / "metrics.json").is_file()
    assert "FGD beat the baseline" in out or "FGD did NOT beat the baseline" in out
    assert str(work) in out
    results = json.loads((work / "results.json").read_text())
    assert [r["name"] for r in results["rows"]] == ["teacher", "baseline", "fgd"]
    assert isinstance(results["fgd_beat_baseline"], bool)
    assert (work / "student.pt").exists() is False  # each run keeps its own folder
    assert (work / "fgd" / "student.pt").is_file() and (work / "teacher" / "model.pt").is_file()
    # The report: table, conclusions, curves and one attention picture per validation image shown.
    report = (work / "report.html").read_text()
    assert "FGD beat the baseline" in report or "FGD did NOT beat the baseline" in report
    assert (work / "curves.png").is_file()
    assert len(list(work.glob("attention_*.png"))) == 2
    assert report.count("<img") == 3

    # A second run reuses everything.
    mtime = (work / "teacher" / "model.pt").stat().st_mtime_ns
    assert main(args) == 0
    again = capsys.readouterr().out
    assert again.count("(reused)") == 3
    assert (work / "teacher" / "model.pt").stat().st_mtime_ns == mtime

    # A copied (or moved) work dir is reused as well.
    moved = tmp_path / "moved"
    shutil.copytree(work, moved)
    moved_args = [a if a != str(work) else str(moved) for a in args]
    assert main(moved_args) == 0
    assert capsys.readouterr().out.count("(reused)") == 3

    # Changing the students' schedule reruns the students, not the data or the teacher.
    assert main([*args, "--set", "fgd.distill.fgd_weight_scale=0.2"]) == 0
    third = capsys.readouterr().out
    assert "| teacher | retinanet resnet18 |" in third
    assert third.count("(reused)") == 2  # teacher and baseline
    assert (work / "teacher" / "model.pt").stat().st_mtime_ns == mtime


def test_demo_rejects_unknown_sections(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "demo.yaml"
    cfg.write_text("synth: {}\nteachr: {}\n")
    assert main(["demo", "--config", str(cfg), "--work-dir", str(tmp_path / "w")]) == 2
    assert "teachr: unknown demo section; did you mean 'teacher'?" in capsys.readouterr().err
    # An override that names no section (common. left out) would otherwise change nothing.
    cfg.write_text("synth: {}\n")
    args = ["demo", "--config", str(cfg), "--work-dir", str(tmp_path / "w")]
    assert main([*args, "--set", "optim.epochs=1"]) == 2
    assert "--set: optim: unknown demo section" in capsys.readouterr().err
