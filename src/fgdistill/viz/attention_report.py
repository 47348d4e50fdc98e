"""An HTML report of teacher vs student attention on a few images.

:func:`write_attention_report` takes detectors and image tensors (loading checkpoints and files
is the caller's job: :func:`fgdistill.models.load_detector`, :func:`fgdistill.data.read_image`),
draws one :func:`~fgdistill.viz.attention.plot_attention` picture per image and writes
``attention_report.html`` beside them, with a table of each student's attention distance to the
teacher.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from torch import Tensor, nn

from fgdistill.models import model_spec
from fgdistill.models.presets import DEFAULT_LEVELS
from fgdistill.viz.attention import AttentionFigure, extract_features, plot_attention
from fgdistill.viz.draw import unique_png_names
from fgdistill.viz.report import Figure, Table, write_report

__all__ = ["AttentionImage", "AttentionReport", "write_attention_report"]

logger = logging.getLogger(__name__)

_DISTANCE_NOTE = (
    "L1 distances sum |A^teacher - A^student| over positions (spatial) and over channels "
    "(channel): the two halves of FGD's unweighted attention loss for this image. Smaller is "
    "closer to the teacher; a student distilled with FGD should be below the baseline."
)


@dataclass
class AttentionImage:
    """One input picture.

    Attributes:
        name: its file name, for titles, the table and ``attention_<stem>.png``.
        image: ``FloatTensor[3, H, W]`` in ``[0, 1]``.
        boxes: ground-truth boxes ``FloatTensor[K, 4]`` (xyxy, pixels of ``image``), or
            ``None`` (no FGD masks drawn).
    """

    name: str
    image: Tensor
    boxes: Tensor | None = None


@dataclass
class AttentionReport:
    """What :func:`write_attention_report` wrote."""

    path: Path
    """The HTML report."""
    figures: list[AttentionFigure] = field(default_factory=list)
    """One picture per image, in input order."""
    rows: list[dict[str, object]] = field(default_factory=list)
    """The distance table: one row per image and level."""


def write_attention_report(
    teacher: nn.Module,
    student: nn.Module,
    images: Sequence[AttentionImage],
    out_dir: str | Path,
    *,
    temperature: float,
    baseline: nn.Module | None = None,
    levels: Sequence[str] | None = None,
    dpi: int = 100,
    subtitle: str = "teacher vs student",
    notes: Sequence[str] = (),
) -> AttentionReport:
    """Draw the attention of ``teacher``, ``student`` (and ``baseline``) on each image; report.

    Args:
        teacher, student: detectors (in eval mode, on one device) with FPN backbones.
        images: the pictures, ``FloatTensor[3, H, W]`` each, with optional boxes.
        out_dir: where ``attention_<stem>.png`` and ``attention_report.html`` go.
        temperature: FGD's attention temperature.
        baseline: a student trained without FGD, drawn for comparison.
        levels: FPN levels to draw; default: those the student's family distils.
        dpi: resolution of the pictures.
        subtitle: each picture's title after the image name.
        notes: paragraphs at the top of the report.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    arch = (model_spec(student) or {}).get("arch")
    names = unique_png_names([f"attention_{Path(item.name).stem}" for item in images])
    result = AttentionReport(path=out / "attention_report.html")
    for item, out_name in zip(images, names, strict=True):
        feats = extract_features(student, teacher, item.image, boxes=item.boxes, baseline=baseline)
        chosen = levels
        if chosen is None and arch in DEFAULT_LEVELS:
            chosen = [lvl for lvl in DEFAULT_LEVELS[arch] if lvl in feats.student] or None
        figure = plot_attention(
            feats.image,
            feats.teacher,
            feats.student,
            out / out_name,
            boxes=feats.boxes,
            batch_shape=feats.batch_shape,
            temperature=temperature,
            baseline=feats.baseline,
            levels=chosen,
            dpi=dpi,
            title=f"{item.name}: {subtitle}",
        )
        logger.debug("wrote %s", figure.path)
        result.figures.append(figure)
        result.rows += _distance_rows(item.name, figure)
    write_report(
        out,
        title="What FGD distils: teacher vs student attention",
        images=[
            Figure(fig.path.name, title=f"Attention on {item.name}")
            for fig, item in zip(result.figures, images, strict=True)
        ],
        notes=list(notes),
        tables=[
            Table(
                "How far each student's attention is from the teacher's",
                result.rows,
                note=_DISTANCE_NOTE,
            )
        ],
        embed_images=False,
        filename=result.path.name,
    )
    return result


def _distance_rows(image: str, figure: AttentionFigure) -> list[dict[str, object]]:
    """The table rows of one picture: per level, each model's spatial and channel distance."""
    rows: list[dict[str, object]] = []
    for level, by_role in figure.distance.items():
        row: dict[str, object] = {"image": image, "level": level}
        for kind in ("spatial", "channel"):
            for role, values in by_role.items():
                row[f"{kind} L1, {role}"] = values[kind]
        rows.append(row)
    return rows
