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
