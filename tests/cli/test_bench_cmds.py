"""``fgdistill demo`` on a tiny budget: every stage runs, the table is printed, re-runs reuse."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from fgdistill.cli.main import main


@pytest.mark.slow
def test_demo_runs_every_stage_and_reuses_them(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], tiny_plan: Callable[[str], list[str]]
) -> None:
    work = tmp_path / "demo"
    args = ["demo", "--work-dir", str(work), "--no-progress"]
    for item in tiny_plan("reppoints"):
        args += ["--set", item]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "| row | model | seeds | AP | AP50 | AP75 | APs | APm | APl | gain AP |" in out
    assert "| teacher (reppoints) | reppoints resnet18 | 1 |" in out
    assert "| fgd | reppoints resnet18 | 1 |" in out
    assert "reppoints: teacher " in out and "reppoints fgd: " in out and "over baseline" in out
    assert f"outputs in {work}/: results.json, results.md, report.html" in out
    results = json.loads((work / "results.json").read_text())
    assert [r["name"] for r in results["rows"]] == ["baseline", "fgd"]
    assert (work / "seed0/fgd/student.pt").is_file()
    assert (work / "teacher_reppoints/model.pt").is_file()
    # the report: table, conclusions, curves and one attention picture per image shown
    report = (work / "report.html").read_text()
    assert "reppoints fgd: " in report and (work / "curves.png").is_file()
    assert len(list(work.glob("attention_*.png"))) == 2
    assert report.count("<img") == 3

    # a second run, and a run in a copied work dir, reuse everything
    mtime = (work / "teacher_reppoints/model.pt").stat().st_mtime_ns
    assert main([*args, "--no-report"]) == 0
    assert capsys.readouterr().out.count("reusing") == 4  # data, teacher, baseline, fgd
    moved = tmp_path / "moved"
    shutil.copytree(work, moved)
    assert main([a if a != str(work) else str(moved) for a in args] + ["--no-report"]) == 0
    assert capsys.readouterr().out.count("reusing") == 4
    # changing the distillation reruns that student only
    assert (
        main([*args, "--no-report", "--set", "families.reppoints.distill.fgd_weight_scale=0.2"])
        == 0
    )
    assert capsys.readouterr().out.count("reusing") == 3
    assert (work / "teacher_reppoints/model.pt").stat().st_mtime_ns == mtime


def test_demo_rejects_unknown_sections(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "demo.yaml"
    cfg.write_text("synth: {}\nfamilys: {}\n")
    assert main(["demo", "--config", str(cfg), "--work-dir", str(tmp_path / "w")]) == 2
    assert "unknown key 'familys'; did you mean 'families'?" in capsys.readouterr().err
    cfg.write_text("families: {retinanet: {}}\nrows: [{name: a}]\n")
    args = ["demo", "--config", str(cfg), "--work-dir", str(tmp_path / "w")]
    assert main([*args, "--set", "optim.epochs=1"]) == 2
    assert "--set: top level: unknown key 'optim'" in capsys.readouterr().err
