"""A benchmark's ``report.html``: its table and conclusions beside pictures of what was distilled.

Drawn for ``fgdistill demo`` and ``fgdistill bench quality`` once their runs are done: the
training curves of the chosen runs and, for the first validation images, the teacher's and the
FGD student's attention (with the baseline student's for comparison), by the same functions as
``fgdistill plot`` and ``fgdistill visualize attention``. It takes detectors, not checkpoints:
the caller loads them.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

from torch import nn

from fgdistill.viz.report import Figure, Table, write_report

__all__ = ["write_bench_report"]


def write_bench_report(
    work_dir: str | Path,
    *,
    rows: Sequence[Mapping[str, object]],
    notes: Sequence[str],
    teacher: nn.Module,
    student: nn.Module,
    baseline: nn.Module | None,
    data_dir: str | Path,
    curve_runs: Sequence[str | Path],
    levels: Sequence[str] | None = None,
    num_images: int = 2,
    temperature: float = 0.5,
    title: str = "fgdistill: teacher, baseline student and FGD student",
    table_title: str = "COCO box metrics on the validation split (percent)",
) -> Path:
    """Write ``work_dir/report.html``.

    Args:
        rows: the results table, one dict per run (column name -> value).
        notes: sentences shown above the table (the conclusions).
        teacher, student, baseline: the detectors whose attention is drawn.
        data_dir: a COCO-format set with ``annotations/instances_val.json`` and ``val/``.
        curve_runs: run folders (holding ``log.jsonl``) whose training curves are drawn.
        levels: FPN levels to draw (default: every level the student has).
        num_images: how many validation images get an attention picture.
        temperature: the FGD temperature of the attention maps.

    Returns:
        The path of ``report.html``.
    """
    from fgdistill.data.images import read_image
    from fgdistill.viz.attention import extract_features, load_gt_boxes, plot_attention
    from fgdistill.viz.curves import plot_curves

    work = Path(work_dir)
    figures: list[Figure | str | Path] = []
    curves = [Path(r) for r in curve_runs if (Path(r) / "log.jsonl").is_file()]
    if curves:
        plot_curves(curves, work / "curves.png")
        figures.append("curves.png")
    ann = Path(data_dir) / "annotations" / "instances_val.json"
    images = json.loads(ann.read_text(encoding="utf-8"))["images"][:num_images]
    names = [str(img["file_name"]) for img in images]
    gt = load_gt_boxes(ann, names)
    for name in names:
        image = read_image(Path(data_dir) / "val" / name)
        feats = extract_features(student, teacher, image, boxes=gt.get(name), baseline=baseline)
        out = work / f"attention_{Path(name).stem}.png"
        plot_attention(
            feats.image,
            feats.teacher,
            feats.student,
            out,
            boxes=feats.boxes,
            batch_shape=feats.batch_shape,
            temperature=temperature,
            baseline=feats.baseline,
            levels=[lv for lv in levels if lv in feats.student] if levels else None,
            title=f"validation image {name}: teacher vs FGD student (baseline for comparison)",
        )
        figures.append(out.name)
    return write_report(
        work,
        title=title,
        notes=list(notes),
        tables=[Table(table_title, list(rows))],
        images=figures,
    )
