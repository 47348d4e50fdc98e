"""The command line's last line of defence: every error ends in one message, not a traceback."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import NoReturn

import pytest
from torch._utils import ExceptionWrapper

from fgdistill.cli import data_cmds
from fgdistill.cli.main import main, user_message
from fgdistill.errors import DataError


def _from_worker(exc: Exception) -> Exception:
    """``exc`` as PyTorch's DataLoader re-raises it in the main process."""
    try:
        raise exc
    except Exception:
        wrapper = ExceptionWrapper(where="in DataLoader worker process 0")
    try:
        wrapper.reraise()
    except Exception as again:
        return again
    raise AssertionError("reraise did not raise")


@pytest.mark.parametrize(
    "exc",
    [
        DataError("instances_train.json: image 12 (000012.png): file not found"),
        FileNotFoundError("train/000012.png"),
        DataError("two lines:\nthe second"),
    ],
)
def test_a_worker_error_keeps_its_own_message(exc: Exception) -> None:
    again = _from_worker(exc)
    assert type(again) is type(exc)
    assert "Traceback" in str(again)  # what PyTorch makes of it
    assert user_message(again) == str(exc)


def test_a_plain_error_is_its_message() -> None:
    assert user_message(DataError("x.json: bad")) == "x.json: bad"


def test_an_unexpected_error_is_one_message_and_a_traceback_only_with_v(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    def broken(*args: object, **kwargs: object) -> NoReturn:
        raise RuntimeError("boom")

    monkeypatch.setattr(data_cmds, "generate_synthetic", broken)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    assert main(["synth", str(tmp_path / "s")]) == 1
    err = capsys.readouterr().err
    assert "error: unexpected RuntimeError: boom" in err and "Traceback" not in err
    # the traceback is kept, so a long run need not be repeated to see where it failed
    saved = Path(err.split("the traceback is in ")[1].split(":")[0])
    assert saved.parent == tmp_path and "raise RuntimeError" in saved.read_text()
    assert main(["-v", "synth", str(tmp_path / "s")]) == 1
    assert "Traceback" in capsys.readouterr().err


def test_a_worker_error_in_the_cli_is_one_line(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    def broken(*args: object, **kwargs: object) -> NoReturn:
        raise _from_worker(DataError("val.json: image 3: not an image"))

    monkeypatch.setattr(data_cmds, "generate_synthetic", broken)
    assert main(["synth", str(tmp_path / "s")]) == 2
    assert capsys.readouterr().err == "error: val.json: image 3: not an image\n"


def test_a_full_disk_is_one_line_not_a_bug_report(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import errno

    def full(*args: object, **kwargs: object) -> NoReturn:
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "log.jsonl"))

    monkeypatch.setattr(data_cmds, "generate_synthetic", full)
    assert main(["synth", str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: No space left on device ({tmp_path / 'log.jsonl'})")
    assert "please report" not in err

    # other system errors are still unexpected
    def other(*args: object, **kwargs: object) -> NoReturn:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(data_cmds, "generate_synthetic", other)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    assert main(["synth", str(tmp_path / "s")]) == 1
    assert "please report" in capsys.readouterr().err
