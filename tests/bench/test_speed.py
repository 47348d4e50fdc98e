"""``fgdistill bench speed``: a config's teacher and student timed in each runtime."""

from __future__ import annotations

import pytest

from fgdistill.bench.speed import measure_speed, render_speed
from fgdistill.cli.main import main
from fgdistill.engine.config import config_from_dict

PAIR = {
    "model": {"arch": "retinanet", "backbone": "resnet18", "fpn_channels": 32},
    "distill": {"teacher": {"arch": "retinanet", "backbone": "resnet34", "fpn_channels": 64}},
}


def test_teacher_and_student_are_measured_at_each_size() -> None:
    rows = measure_speed(
        config_from_dict(PAIR), [(64, 64), (96, 160)], repeats=1, runtimes=["eager"]
    )
    assert [(r.role, r.size) for r in rows] == [
        ("teacher", (64, 64)),
        ("student", (64, 64)),
        ("teacher", (96, 128)),
        ("student", (96, 128)),
    ]
    teacher, student = rows[:2]
    assert teacher.model == "retinanet resnet34" and student.model == "retinanet resnet18"
    assert teacher.params_m > student.params_m > 1
    assert teacher.gflops > student.gflops > 0 and rows[2].gflops > teacher.gflops
    assert all(r.latency_ms["eager"] > 0 for r in rows)
    table = render_speed(rows)
    assert "| teacher: retinanet resnet34 | 64x64 |" in table
    assert table.count("| student / teacher |") == 2


def test_the_command_prints_the_table_and_refuses_a_plain_config(
    capsys: pytest.CaptureFixture[str],
) -> None:
    args = ["bench", "speed", "synth/fgd_retinanet_r50_r18", "--size", "64", "64"]
    assert main([*args, "--repeats", "1", "--runtimes", "eager", "onnxruntime"]) == 0
    out = capsys.readouterr().out
    assert "| model | image | parameters | GFLOPs | eager ms | onnxruntime ms |" in out
    assert "| student: retinanet resnet18 | 64x64 |" in out and "torch threads" in out
    assert main(["bench", "speed", "synth/retinanet_r18_baseline"]) == 2
    assert "needs a distillation config" in capsys.readouterr().err
    assert main([*args, "--repeats", "0"]) == 2
