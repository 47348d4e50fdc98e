"""A self-contained HTML report: headings, tables and captioned pictures in one file.

:func:`write_report` writes ``WORK_DIR/report.html``. The pictures are embedded as base64 PNG
data by default, so the file opens in any browser, with no server, and can be moved or mailed
on its own; ``embed_images=False`` links them by their path relative to the work dir instead
(a smaller file that must stay beside its pictures).

Example::

    from fgdistill.viz.report import Figure, Table, write_report

    write_report(
        "work_dirs/demo",
        title="FGD on the synthetic benchmark",
        tables=[Table("COCO box AP", [{"model": "teacher", "AP": 31.2},
                                      {"model": "student", "AP": 24.0}])],
        images=[Figure("curves.png", "Training loss terms and AP per epoch.")],
        notes=["FGD beat the baseline by 1.3 AP in this run."],
    )
"""

from __future__ import annotations

import base64
import html
import logging
import math
import numbers
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TypeAlias

from fgdistill.errors import DataError
from fgdistill.io import atomic_write_text

__all__ = ["Figure", "Rows", "Table", "default_caption", "write_report"]

logger = logging.getLogger(__name__)

Rows: TypeAlias = Sequence[Mapping[str, object]] | Sequence[Sequence[object]] | Sequence[str]
"""Rows of a table, in one of three forms:

- dicts, one per row; the columns are the keys in first-seen order, a missing key is a blank cell;
- sequences, the first being the header;
- markdown-like lines, ``"| model | AP |"``, with optional ``"|---|---|"`` separator lines; the
  first line is the header.
"""

_IMAGE_TYPES = {
    ".png": "image/png",
    ".jpg": "image/jpeg",
    ".jpeg": "image/jpeg",
    ".svg": "image/svg+xml",
}


@dataclass(frozen=True)
class Table:
    """A table for :func:`write_report`.

    Args:
        caption: heading shown above the table.
        rows: the cells, see :data:`Rows`.
        note: optional sentence under the table (how to read it, what the units are).
    """

    caption: str
    rows: Rows
    note: str = ""


@dataclass(frozen=True)
class Figure:
    """A picture for :func:`write_report`.

    Args:
        path: the image file, relative to the work dir (or absolute).
        caption: what the picture shows and how to read it; empty for :func:`default_caption`.
        title: short heading above the picture; empty for a standard one (by file name).
    """

    path: str | Path
    caption: str = ""
    title: str = ""


def _known_pictures() -> tuple[tuple[str, str, str], ...]:
    """``(file-name prefix, title, caption)`` of the pictures fgdistill itself writes."""
    from fgdistill.viz.attention import ATTENTION_CAPTION
    from fgdistill.viz.curves import CURVES_CAPTION

    return (
        ("attention", "Teacher vs student attention", ATTENTION_CAPTION),
        ("curves", "Training curves", CURVES_CAPTION),
    )


def default_caption(path: str | Path) -> str:
    """The standard caption for a picture fgdistill writes (by file-name prefix), else ``""``.

    ``attention*.png`` (from :func:`fgdistill.viz.attention.plot_attention`) and
    ``curves*.png`` (from :func:`fgdistill.viz.curves.plot_curves`) are recognised.
    """
    name = Path(path).name.lower()
    for prefix, _, caption in _known_pictures():
        if name.startswith(prefix):
            return caption
    return ""


def _default_title(path: Path) -> str:
    name = path.name.lower()
    for prefix, title, _ in _known_pictures():
        if name.startswith(prefix):
            rest = path.stem[len(prefix) :].strip("_- ")
            return f"{title}: {rest}" if rest else title
    return path.stem.replace("_", " ")


def write_report(
    work_dir: str | Path,
    *,
    title: str,
    tables: Sequence[Table | Rows] = (),
    images: Sequence[Figure | str | Path] = (),
    notes: str | Sequence[str] = (),
    embed_images: bool = True,
    filename: str = "report.html",
) -> Path:
    """Write ``work_dir/filename`` (``report.html``), an HTML page that needs no server.

    The page shows, in order: ``title`` as its heading, the ``notes`` as paragraphs, the tables,
    then each picture under its own heading with its caption.

    Args:
        work_dir: directory the report goes to; created if missing. Relative image paths are
            resolved against it.
        title: page heading and browser title.
        tables: :class:`Table` objects, or bare :data:`Rows` (dicts, header + rows, or markdown
            lines), which get the captions "Table 1", "Table 2", ...
        images: :class:`Figure` objects, or bare paths; a picture without a caption gets
            :func:`default_caption` for the pictures fgdistill writes (``attention*.png``,
            ``curves*.png``).
        notes: a paragraph or a list of paragraphs of plain text (HTML is escaped), shown under
            the title: say what was run and what the result means.
        embed_images: embed the pictures as base64 data (default; the file stands alone) or
            link them relative to ``work_dir``.
        filename: name of the HTML file inside ``work_dir``.

    Returns:
        The path of the written HTML file.

    Raises:
        DataError: a picture does not exist, is not a PNG/JPEG/SVG file, or a table's rows
            are malformed.
    """
    root = Path(work_dir)
    root.mkdir(parents=True, exist_ok=True)
    out = root / filename
    paragraphs = [notes] if isinstance(notes, str) else list(notes)

    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{_esc(title)}</title>",
        f"<style>{_CSS}</style>",
        "</head><body><main>",
        f"<h1>{_esc(title)}</h1>",
    ]
    parts.extend(f"<p class='note'>{_esc(p)}</p>" for p in paragraphs if p)

    if tables:
        parts.append("<h2>Results</h2>")
    for i, table in enumerate(tables, start=1):
        if not isinstance(table, Table):
            table = Table(f"Table {i}", table)
        parts.append(_table_html(table, i))

    if images:
        parts.append("<h2>Pictures</h2>")
        parts.append("<p class='hint'>Click a picture to open it at full size.</p>")
    for i, image in enumerate(images, start=1):
        figure = image if isinstance(image, Figure) else Figure(image)
        parts.append(_figure_html(figure, i, root, embed_images))

    stamp = datetime.now().strftime("%Y-%m-%d %H:%M")
    parts.append(f"<footer>Written by fgdistill on {stamp}.</footer>")
    parts.append("</main></body></html>")

    atomic_write_text(out, "\n".join(parts) + "\n")
    logger.debug("wrote report %s", out)
    return out


def _esc(text: object) -> str:
    return html.escape(str(text), quote=True)


def _format_cell(value: object) -> tuple[str, bool]:
    """Cell text and whether it is numeric (numbers are right-aligned)."""
    if value is None:
        return "", False
    if isinstance(value, bool):
        return str(value), False
    if isinstance(value, numbers.Integral):
        return str(int(value)), True
    if isinstance(value, numbers.Real):
        x = float(value)
        if math.isnan(x):
            return "n/a", True
        if x != 0 and (abs(x) >= 1e5 or abs(x) < 1e-3):
            return f"{x:.3g}", True
        return f"{x:.3f}".rstrip("0").rstrip(".") if abs(x) < 1 else f"{x:.2f}", True
    text = str(value)
    return text, bool(re.fullmatch(r"[+-]?\d+(\.\d+)?%?", text.strip()))


def _normalise_rows(rows: Rows, caption: str) -> tuple[list[str], list[list[object]]]:
    """Header and body rows from any of the accepted row forms."""
    items = list(rows)
    if not items:
        return [], []
    if all(isinstance(r, Mapping) for r in items):
        header: list[str] = []
        for r in items:
            assert isinstance(r, Mapping)
            header.extend(str(k) for k in r if str(k) not in header)
        body = [[r.get(h) for h in header] for r in items if isinstance(r, Mapping)]
        return header, body
    if all(isinstance(r, str) for r in items):
        lines = [str(r).strip() for r in items if str(r).strip()]
        cells = [
            [c.strip() for c in line.strip("|").split("|")]
            for line in lines
            if not re.fullmatch(r"\|?[\s:|-]+\|?", line)
        ]
        if not cells:
            return [], []
        return cells[0], [list(c) for c in cells[1:]]
    if all(isinstance(r, Sequence) and not isinstance(r, str) for r in items):
        seqs = [list(r) for r in items if isinstance(r, Sequence)]
        return [str(h) for h in seqs[0]], seqs[1:]
    raise DataError(
        f"table {caption!r}: rows must be all dicts, all sequences (header first) or all "
        "markdown-like strings"
    )


def _table_html(table: Table, index: int) -> str:
    header, body = _normalise_rows(table.rows, table.caption)
    width = len(header)
    for r, row in enumerate(body, start=1):
        if len(row) != width:
            raise DataError(
                f"table {table.caption!r}: row {r} has {len(row)} cells but the header has {width}"
            )
    out = [f"<figure class='table'><figcaption><b>Table {index}.</b> {_esc(table.caption)}"]
    out.append("</figcaption><table><thead><tr>")
    out.extend(f"<th>{_esc(h)}</th>" for h in header)
    out.append("</tr></thead><tbody>")
    for row in body:
        out.append("<tr>")
        for value in row:
            text, numeric = _format_cell(value)
            cls = " class='num'" if numeric else ""
            out.append(f"<td{cls}>{_esc(text)}</td>")
        out.append("</tr>")
    out.append("</tbody></table>")
    if table.note:
        out.append(f"<p class='tnote'>{_esc(table.note)}</p>")
    out.append("</figure>")
    return "".join(out)


def _figure_html(figure: Figure, index: int, root: Path, embed: bool) -> str:
    path = Path(figure.path)
    full = path if path.is_absolute() else root / path
    if not full.is_file():
        raise DataError(f"report picture {full} does not exist")
    mime = _IMAGE_TYPES.get(full.suffix.lower())
    if mime is None:
        raise DataError(
            f"report picture {full}: unsupported type {full.suffix!r} "
            f"(use one of {', '.join(sorted(_IMAGE_TYPES))})"
        )
    if embed:
        data = base64.b64encode(full.read_bytes()).decode("ascii")
        src = f"data:{mime};base64,{data}"
    else:
        try:
            src = full.resolve().relative_to(root.resolve()).as_posix()
        except ValueError:
            src = full.resolve().as_uri()
    heading = figure.title or _default_title(path)
    caption = figure.caption or default_caption(path) or path.name
    return (
        f"<figure class='pic'><h3>Figure {index}. {_esc(heading)}</h3>"
        f"<a href='{_esc(src)}' title='open full size'>"
        f"<img src='{_esc(src)}' alt='{_esc(heading)}'></a>"
        f"<figcaption>{_esc(caption)}</figcaption></figure>"
    )


_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: #222;
       background: #fafafa; margin: 0; line-height: 1.45; }
main { max-width: 1700px; margin: 0 auto; padding: 1.5em 2em 3em; background: #fff; }
h1 { font-size: 1.7em; margin: 0.2em 0 0.6em; border-bottom: 2px solid #3b6ea5;
     padding-bottom: .3em; }
h2 { font-size: 1.3em; margin-top: 1.8em; color: #3b6ea5; }
h3 { font-size: 1.05em; margin: 0 0 .5em; }
p.note { margin: .4em 0; max-width: 60em; }
p.hint { font-size: .9em; color: #666; margin: -.4em 0 .6em; }
figure { margin: 1.2em 0; }
figure.table figcaption { margin-bottom: .4em; }
table { border-collapse: collapse; font-size: .95em; }
th, td { border: 1px solid #ccc; padding: .3em .8em; text-align: left; }
th { background: #eef3f9; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
tbody tr:nth-child(even) { background: #f7f7f7; }
p.tnote { font-size: .9em; color: #555; margin: .4em 0 0; max-width: 60em; }
figure.pic { border: 1px solid #ddd; padding: 1em; border-radius: 4px; }
figure.pic img { max-width: 100%; height: auto; display: block; margin: 0 auto; }
figure.pic figcaption { font-size: .95em; color: #333; margin-top: .6em; max-width: 75em; }
footer { margin-top: 3em; font-size: .8em; color: #888; }
"""
