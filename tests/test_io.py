import json
import math

import pytest

from fgdistill.errors import DataError
from fgdistill.io import atomic_write, atomic_write_text, read_jsonl, write_json


def test_atomic_write_replaces_and_leaves_no_temp(tmp_path):
    path = tmp_path / "sub" / "a.txt"
    atomic_write_text(path, "one")
    atomic_write_text(path, "two")
    assert path.read_text() == "two"
    assert [p.name for p in path.parent.iterdir()] == ["a.txt"]


def test_atomic_write_failure_keeps_old_file(tmp_path):
    path = tmp_path / "a.bin"
    atomic_write(path, lambda fh: fh.write(b"old"), fsync=True)

    def broken(fh):
        fh.write(b"half")
        raise RuntimeError("disk gone")

    with pytest.raises(RuntimeError):
        atomic_write(path, broken)
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["a.bin"]


def test_write_json_writes_null_for_nan(tmp_path):
    path = write_json(tmp_path / "r.json", {"a": math.nan, "b": [1.5, math.inf], "c": "x"})
    assert json.loads(path.read_text()) == {"a": None, "b": [1.5, None], "c": "x"}
    assert "NaN" not in path.read_text()


def test_read_jsonl_skips_truncated_last_line_only(tmp_path):
    path = tmp_path / "log.jsonl"
    path.write_text('{"iter": 1}\n\n{"iter": 2}\n{"iter": 3')
    assert read_jsonl(path) == [{"iter": 1}, {"iter": 2}]
    path.write_text('{"iter": 1}\nnot json\n{"iter": 2}\n')
    with pytest.raises(DataError, match=r"log.jsonl, line 2"):
        read_jsonl(path)
    path.write_text('[1, 2]\n{"iter": 2}\n')
    with pytest.raises(DataError, match="line 1: expected a JSON object"):
        read_jsonl(path)
    with pytest.raises(DataError, match="cannot read"):
        read_jsonl(tmp_path / "missing.jsonl")


def test_a_full_disk_is_a_storage_error_naming_the_file(tmp_path):
    import errno

    from fgdistill.errors import StorageError

    def full(fh):
        fh.write(b"part")
        raise OSError(errno.ENOSPC, "No space left on device")

    path = tmp_path / "last.pt"
    with pytest.raises(
        StorageError, match=r"last\.pt: No space left on device \(writing last\.pt\)"
    ):
        atomic_write(path, full, fsync=True)
    assert list(tmp_path.iterdir()) == []  # no partial temporary file left


def test_torch_save_on_a_full_disk_is_recognised():
    import torch

    from fgdistill.io import is_disk_full

    try:
        with open("/dev/full", "wb") as fh:
            torch.save({"a": torch.zeros(10000)}, fh)
    except (OSError, RuntimeError) as exc:
        assert is_disk_full(exc)
    else:  # pragma: no cover - no /dev/full here
        pytest.skip("/dev/full accepted the write")


def test_remove_temporaries_removes_only_atomic_leftovers(tmp_path):
    from fgdistill.io import remove_temporaries

    (tmp_path / ".last.pt.abc123.tmp").write_bytes(b"x" * 10)
    (tmp_path / ".metrics.json.x.tmp").write_text("{")
    (tmp_path / "last.pt").write_text("keep")
    (tmp_path / "notes.tmp").write_text("keep: not hidden, not ours")
    removed = remove_temporaries(tmp_path)
    assert sorted(p.name for p in removed) == [".last.pt.abc123.tmp", ".metrics.json.x.tmp"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt", "notes.tmp"]
