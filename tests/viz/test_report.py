"""The HTML report: tables in three forms, embedded or linked pictures, escaping, errors."""

from __future__ import annotations

import base64
import re
from html.parser import HTMLParser
from pathlib import Path

import pytest
from PIL import Image

from fgdistill.errors import DataError
from fgdistill.viz.report import Figure, Table, default_caption, write_report


class _Collect(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[str] = []
        self.img_src: list[str] = []
        self.text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)
        if tag == "img":
            self.img_src.append(dict(attrs)["src"] or "")

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def _parse(path: Path) -> _Collect:
    parser = _Collect()
    parser.feed(path.read_text(encoding="utf-8"))
    return parser


def _png(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (7, 5), (200, 10, 10)).save(path)
    return path


def test_tables_pictures_and_notes(tmp_path: Path) -> None:
    png = _png(tmp_path / "pics" / "attention_cat.png")
    out = write_report(
        tmp_path,
        title="Demo <run>",
        tables=[
            Table("AP", [{"model": "teacher", "AP": 31.25}, {"model": "student", "AP50": 0.5}]),
            [["model", "AP"], ["baseline", 20]],
            ["| model | AP |", "|---|---:|", "| fgd | 22.5 |"],
        ],
        images=[Figure("pics/attention_cat.png", title="Attention"), png],
        notes=["FGD beat the baseline by 2.5 AP.", "Second paragraph."],
    )
    assert out == tmp_path / "report.html"
    parsed = _parse(out)
    text = " ".join(t.strip() for t in parsed.text if t.strip())
    assert "Demo <run>" in text  # escaped in the file, the same text in the browser
    assert "<run>" not in out.read_text()
    assert parsed.tags.count("table") == 3
    assert parsed.tags.count("th") == 3 + 2 + 2  # the dict table's columns: model, AP, AP50
    for expected in ("31.25", "teacher", "baseline", "20", "fgd", "22.5", "Table 2", "Table 3"):
        assert expected in text
    assert "FGD beat the baseline by 2.5 AP." in text
    # the embedded picture decodes to the file's bytes; both get the attention caption
    assert len(parsed.img_src) == 2
    prefix = "data:image/png;base64,"
    assert parsed.img_src[0].startswith(prefix)
    assert base64.b64decode(parsed.img_src[0][len(prefix) :]) == png.read_bytes()
    assert text.count("One row per FPN level") == 2
    assert default_caption("attention_cat.png") and not default_caption("other.png")


def test_linked_pictures_are_relative(tmp_path: Path) -> None:
    _png(tmp_path / "pics" / "curves.png")
    out = write_report(
        tmp_path,
        title="t",
        images=[Figure("pics/curves.png", "My caption")],
        notes="one note",
        embed_images=False,
        filename="other.html",
    )
    parsed = _parse(out)
    assert out.name == "other.html"
    assert parsed.img_src == ["pics/curves.png"]
    assert "My caption" in " ".join(parsed.text)
    assert re.search(r"<h1>t</h1>", out.read_text())


def test_bad_inputs_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"missing\.png does not exist"):
        write_report(tmp_path, title="t", images=["missing.png"])
    (tmp_path / "x.gif").write_bytes(b"GIF89a")
    with pytest.raises(DataError, match=r"unsupported type '\.gif'"):
        write_report(tmp_path, title="t", images=["x.gif"])
    with pytest.raises(DataError, match="row 1 has 1 cells but the header has 2"):
        write_report(tmp_path, title="t", tables=[[["a", "b"], ["only"]]])
    with pytest.raises(DataError, match="rows must be all dicts"):
        write_report(tmp_path, title="t", tables=[[{"a": 1}, "| b |"]])
    assert not (tmp_path / "report.html").exists()
