"""The demo's ``report.html``: its table and conclusions beside the pictures of what was distilled.

Called by ``fgdistill demo`` once its three runs are done. It draws the training curves of the
three runs and, for the first validation images, the teacher's and the FGD student's attention
(with the baseline student's for comparison), using the same functions as ``fgdistill plot``
and ``fgdistill visualize attention``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

from fgdistill.viz.report import Figure, Table, write_report

__all__ = ["write_demo_report"]

logger = logging.getLogger(__name__)


def write_demo_report(
    work_dir: str | Path,
    *,
    rows: Sequence[Mapping[str, object]],
    notes: Sequence[str],
    num_images: int = 2,
    temperature: float = 0.5,
    runs: Mapping[str, str | Path] | None = None,
    curve_runs: Sequence[str | Path] | None = None,
    title: str = "fgdistill demo: teacher, baseline student and FGD student",
    table_title: str = "COCO box metrics on the validation split (percent)",
) -> Path:
    """Write ``work_dir/report.html`` for a finished demo (or quality benchmark).

    Args:
        work_dir: the work dir, holding ``data/`` and, by default, ``teacher/``, ``baseline/``
            and ``fgd/``.
        rows: the results table, one dict per run (column name -> value).
        notes: sentences shown above the table (the conclusions).
        num_images: how many validation images get an attention picture.
        temperature: the FGD temperature used for the attention maps.
        runs: the run folders of ``teacher``, ``baseline`` and ``fgd`` (default: those names
            under ``work_dir``).
        curve_runs: run folders whose training curves are drawn (default: the three runs).
        title: the page's title.
        table_title: the caption of the table.

    Returns:
        The path of ``report.html``.
    """
    from fgdistill.engine.checkpoint import load_detector
    from fgdistill.losses.multilevel import DEFAULT_LEVELS
    from fgdistill.models.build import model_spec
    from fgdistill.viz.attention import (
        extract_features,
        load_gt_boxes,
        load_image,
        plot_attention,
    )
    from fgdistill.viz.curves import plot_curves

    work = Path(work_dir)
    figures: list[Figure | str | Path] = []
    folders = {name: work / name for name in ("teacher", "baseline", "fgd")}
    folders.update({name: Path(path) for name, path in (runs or {}).items()})
    curves = [Path(r) for r in curve_runs] if curve_runs is not None else list(folders.values())
    plot_curves([r for r in curves if (r / "log.jsonl").is_file()], work / "curves.png")
    figures.append("curves.png")

    teacher = load_detector(folders["teacher"] / "model.pt")
    student = load_detector(folders["fgd"] / "student.pt")
    baseline = load_detector(folders["baseline"] / "model.pt")
    arch = (model_spec(student) or {}).get("arch")
    ann = work / "data" / "annotations" / "instances_val.json"
    names = [
        str(img["file_name"])
        for img in json.loads(ann.read_text(encoding="utf-8"))["images"][:num_images]
    ]
    gt = load_gt_boxes(ann, names)
    for name in names:
        feats = extract_features(
            student,
            teacher,
            load_image(work / "data" / "val" / name),
            boxes=gt.get(name),
            baseline=baseline,
        )
        levels = [lvl for lvl in DEFAULT_LEVELS.get(str(arch), ()) if lvl in feats.student]
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
            levels=levels or None,
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
