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
    "families.retinanet.teacher.model.backbone=resnet18",
    "families.retinanet.teacher.optim.epochs=1",
    "families.retinanet.teacher.optim.milestones=[]",
    "families.retinanet.student.optim.epochs=1",
    "families.retinanet.student.optim.milestones=[]",
    "families.retinanet.distill.fgd_warmup_iters=1",
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
    assert "| row | model | seeds | AP | AP50 | AP75 | APs | APm | APl | gain AP |" in out
    assert "| teacher (retinanet) | retinanet resnet18 | 1 |" in out
    assert "| fgd | retinanet resnet18 | 1 |" in out
    assert "retinanet: teacher " in out and "retinanet fgd: " in out and "over baseline" in out
    assert f"outputs in {work}/: results.json, results.md, report.html" in out
    results = json.loads((work / "results.json").read_text())
    assert [r["name"] for r in results["rows"]] == ["baseline", "fgd"]
    assert (work / "seed0/fgd/student.pt").is_file()
    assert (work / "teacher_retinanet/model.pt").is_file()
    # the report: table, conclusions, curves and one attention picture per image shown
    report = (work / "report.html").read_text()
    assert "retinanet fgd: " in report and (work / "curves.png").is_file()
    assert len(list(work.glob("attention_*.png"))) == 2
    assert report.count("<img") == 3

    # a second run, and a run in a copied work dir, reuse everything
    mtime = (work / "teacher_retinanet/model.pt").stat().st_mtime_ns
    assert main([*args, "--no-report"]) == 0
    assert capsys.readouterr().out.count("reusing") == 4  # data, teacher, baseline, fgd
    moved = tmp_path / "moved"
    shutil.copytree(work, moved)
    assert main([a if a != str(work) else str(moved) for a in args] + ["--no-report"]) == 0
    assert capsys.readouterr().out.count("reusing") == 4
    # changing the distillation reruns that student only
    assert (
        main([*args, "--no-report", "--set", "families.retinanet.distill.fgd_weight_scale=0.2"])
        == 0
    )
    assert capsys.readouterr().out.count("reusing") == 3
    assert (work / "teacher_retinanet/model.pt").stat().st_mtime_ns == mtime


def test_demo_rejects_unknown_sections(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "demo.yaml"
    cfg.write_text("synth: {}\nfamilys: {}\n")
    assert main(["demo", "--config", str(cfg), "--work-dir", str(tmp_path / "w")]) == 2
    assert "unknown key 'familys'; did you mean 'families'?" in capsys.readouterr().err
    cfg.write_text("families: {retinanet: {}}\nrows: [{name: a}]\n")
    args = ["demo", "--config", str(cfg), "--work-dir", str(tmp_path / "w")]
    assert main([*args, "--set", "optim.epochs=1"]) == 2
    assert "--set: top level: unknown key 'optim'" in capsys.readouterr().err
