"""Work-dir guards: the lock, the fresh-start refusal and the resume config comparison."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fgdistill.engine.workdir import (
    LOCK_NAME,
    check_fresh_start,
    check_resume_config,
    config_changes,
    lock_work_dir,
)
from fgdistill.errors import WorkDirError


def test_a_second_holder_is_refused_naming_the_first(tmp_path: Path) -> None:
    with (
        lock_work_dir(tmp_path / "run", "train"),
        pytest.raises(
            WorkDirError, match=rf"in use by another fgdistill process \(pid {os.getpid()}, train"
        ),
        lock_work_dir(tmp_path / "run", "eval"),
    ):
        pass
    # released on exit: taken again, and a clean exit leaves no holder recorded
    with lock_work_dir(tmp_path / "run", "train"):
        pass
    assert (tmp_path / "run" / LOCK_NAME).read_text() == ""


def test_a_lock_left_by_a_dead_process_is_taken_over(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    work = tmp_path / "run"
    code = (
        "import os, sys; from fgdistill.engine.workdir import lock_work_dir\n"
        f"cm = lock_work_dir({str(work)!r}, 'train'); cm.__enter__(); os._exit(9)\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    assert subprocess.run([sys.executable, "-c", code], env=env).returncode == 9  # killed
    assert (work / LOCK_NAME).read_text().split()[1] == "train"
    with caplog.at_level(logging.INFO), lock_work_dir(work, "train"):
        pass
    assert "no longer running" in caplog.text


def test_the_lock_refuses_a_work_dir_that_is_a_file(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("x")
    with (
        pytest.raises(WorkDirError, match="is a file, not a folder"),
        lock_work_dir(tmp_path / "f"),
    ):
        pass


def test_fresh_start_over_an_earlier_run_names_the_files_and_the_flag(tmp_path: Path) -> None:
    check_fresh_start(tmp_path, overwrite=False)  # empty: fine
    (tmp_path / "model.pt").write_text("x")
    (tmp_path / "last.pt").write_text("x")
    with pytest.raises(
        WorkDirError, match=r"holds an earlier run \(last\.pt, model\.pt\).*--overwrite.*--resume"
    ):
        check_fresh_start(tmp_path, overwrite=False)
    check_fresh_start(tmp_path, overwrite=True)
    # this run's own input (a teacher in the folder) does not count
    (tmp_path / "last.pt").unlink()
    check_fresh_start(tmp_path, overwrite=False, keep=[(tmp_path / "model.pt").resolve()])


def test_config_changes_list_only_what_alters_the_run() -> None:
    old = {
        "optim": {"lr": 0.01, "epochs": 2},
        "data": {"batch_size": 4, "eval_batch_size": 4},
        "seed": 0,
        "log_interval": 20,
        "max_iters": 3,
    }
    new = {
        "optim": {"lr": 0.02, "epochs": 2},
        "data": {"batch_size": 8, "eval_batch_size": 16},
        "seed": 1,
        "log_interval": 5,
        "max_iters": None,
    }
    assert config_changes(old, new) == [
        ("data.batch_size", 4, 8),
        ("optim.lr", 0.01, 0.02),
        ("seed", 0, 1),
    ]
    with pytest.raises(WorkDirError, match=r"optim\.lr: 0\.01 -> 0\.02.*--allow-config-change"):
        check_resume_config(old, new, source="run/config.yaml", allow=False)
    assert len(check_resume_config(old, new, source="run/config.yaml", allow=True)) == 3
    assert check_resume_config(None, new, source="x", allow=False) == []
