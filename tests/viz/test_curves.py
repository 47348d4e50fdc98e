"""Training curves read from hand-written logs in the engine's format."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fgdistill.errors import DataError
from fgdistill.viz.curves import plot_curves, read_log

ITERS_PER_EPOCH = 10


def _write_run(
    work_dir: Path, *, fgd: bool, epochs: int = 3, interval: int = 5, ap0: float = 10.0
) -> Path:
    """A log like the engine's LoggerHook: 1-based epochs, global iteration counts."""
    work_dir.mkdir(parents=True)
    lines = []
    for it in range(interval, epochs * ITERS_PER_EPOCH + 1, interval):
        epoch = (it - 1) // ITERS_PER_EPOCH + 1
        losses = {"classification": 1.0 / it, "bbox_regression": 0.5}
        if fgd:
            losses.update({"fgd/p3/fg": 0.1, "fgd/p4/fg": 0.2, "fgd/p3/bg": 0.05})
        record = {"type": "train", "iter": it, "epoch": epoch, "lr": 0.01, "time": it * 0.1}
        record |= {"loss": sum(losses.values()), "losses": losses}
        lines.append(json.dumps(record))
        if it % ITERS_PER_EPOCH == 0:
            metrics = {"bbox": {"AP": ap0 + epoch, "AP50": 2 * ap0 + epoch}}
            lines.append(
                json.dumps({"type": "eval", "iter": it, "epoch": epoch, "metrics": metrics})
            )
    (work_dir / "log.jsonl").write_text("\n".join(lines) + "\n")
    return work_dir


def test_two_runs_side_by_side(tmp_path: Path) -> None:
    baseline = _write_run(tmp_path / "baseline", fgd=False)
    student = _write_run(tmp_path / "student", fgd=True, ap0=12.0)
    fig = plot_curves([baseline, student], tmp_path / "out" / "curves.png", dpi=50)

    assert fig.runs == ["baseline", "student"]
    assert fig.panels == [
        "box AP (%)",
        "total loss",
        "detection loss",
        "bbox_regression",
        "classification",
        "fgd/bg",
        "fgd/fg",
    ]
    with Image.open(fig.path) as img:
        assert img.size == fig.size == (round(4 * 4.2 * 50), round((2 * 3.2 + 0.5) * 50))

    x, y = fig.data["student"]["fgd/fg"]  # fgd/{level}/fg summed over levels
    np.testing.assert_allclose(y, 0.3)
    np.testing.assert_allclose(x, np.arange(5, 31, 5) / ITERS_PER_EPOCH)  # epochs completed
    assert "fgd/fg" not in fig.data["baseline"]
    _, detection = fig.data["student"]["detection loss"]  # comparable with the baseline's
    _, total = fig.data["baseline"]["total loss"]
    np.testing.assert_allclose(detection, total)
    x, y = fig.data["student"]["bbox/AP"]
    np.testing.assert_allclose(x, [1, 2, 3])  # evaluated at the end of each epoch
    np.testing.assert_allclose(y, [13, 14, 15])
    assert fig.xlabel == "epoch"


def test_many_records_and_no_eval(tmp_path: Path) -> None:
    run = _write_run(tmp_path / "long", fgd=False, epochs=4, interval=1)
    log = run / "log.jsonl"
    log.write_text(
        "".join(line + "\n" for line in log.read_text().splitlines() if "eval" not in line)
    )
    fig = plot_curves([run], tmp_path / "c.png", labels=["my run"], dpi=40)
    assert fig.runs == ["my run"]
    assert fig.panels == ["box AP (%)", "total loss", "bbox_regression", "classification"]
    assert "bbox/AP" not in fig.data["my run"]
    assert len(fig.data["my run"]["total loss"][0]) == 40


def test_same_directory_names_get_parents(tmp_path: Path) -> None:
    a = _write_run(tmp_path / "exp_a" / "student", fgd=True)
    b = _write_run(tmp_path / "exp_b" / "student", fgd=True)
    fig = plot_curves([a, b], tmp_path / "c.png", dpi=40)
    assert fig.runs == ["exp_a/student", "exp_b/student"]


def test_missing_or_bad_logs_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        read_log(tmp_path / "nowhere")
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(DataError, match=r"no training log in .*empty_dir.*log.jsonl is missing"):
        plot_curves([tmp_path / "empty_dir"], tmp_path / "c.png")
    _write_run(tmp_path / "demo" / "teacher", fgd=False)
    _write_run(tmp_path / "demo" / "fgd", fgd=True)
    with pytest.raises(DataError, match="sub-directories fgd, teacher have logs"):
        read_log(tmp_path / "demo")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "log.jsonl").write_text('{"type": "train", "iter": 1}\nnot json\n{"type": "eval"}\n')
    with pytest.raises(DataError, match="line 2: not valid JSON"):
        read_log(bad)
    (bad / "log.jsonl").write_text('{"type": "other"}\n')
    with pytest.raises(DataError, match="no train or eval records"):
        read_log(bad)
    with pytest.raises(DataError, match="2 labels for 1 work dirs"):
        plot_curves([_write_run(tmp_path / "ok", fgd=False)], tmp_path / "c.png", labels=["a", "b"])
    assert not (tmp_path / "c.png").exists()


def test_truncated_last_line_of_a_running_job_is_skipped(tmp_path: Path) -> None:
    run = _write_run(tmp_path / "running", fgd=False)
    with (run / "log.jsonl").open("a") as fh:
        fh.write('{"type": "train", "iter": 35, "ep')
    log = read_log(run)
    assert len(log.train) == 6 and len(log.eval) == 3
