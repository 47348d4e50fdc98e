"""Whole-dataset validation: every problem at once, plus a summary of what the data holds.

The checks are the ones :class:`~fgdistill.data.coco.CocoDetection` applies (the same
:func:`~fgdistill.data.coco.read_annotations` validator, in collect-all mode), plus decoding every
image.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from fgdistill.data.coco import (
    MIN_BOX_SIZE,
    Problem,
    degenerate_after_clipping,
    read_annotations,
)
from fgdistill.data.images import read_image
from fgdistill.errors import DataError

__all__ = [
    "CategoryCount",
    "DatasetReport",
    "check_dataset",
    "check_image_files",
    "image_header_problem",
]

# COCO's area ranges (pixels of the annotation's ``area``).
SMALL_MAX = 32**2
MEDIUM_MAX = 96**2


@dataclass(frozen=True)
class CategoryCount:
    """Instances (crowd annotations and degenerate boxes excluded) of one category."""

    id: int
    name: str
    count: int


@dataclass
class DatasetReport:
    """What :func:`check_dataset` found.

    ``size_counts`` counts the instances a dataset keeps (not crowd, not degenerate) by COCO's
    area ranges: ``small`` (< 32^2 px), ``medium`` (< 96^2) and ``large``.
    ``images_without_annotations`` counts images with no such instance (a training dataset
    leaves them out).
    """

    ann_file: Path
    image_dir: Path
    num_images: int = 0
    num_annotations: int = 0
    num_crowd: int = 0
    num_degenerate: int = 0
    images_without_annotations: int = 0
    images_checked: int = 0
    categories: list[CategoryCount] = field(default_factory=list)
    size_counts: dict[str, int] = field(
        default_factory=lambda: {"small": 0, "medium": 0, "large": 0}
    )
    problems: list[Problem] = field(default_factory=list)

    @property
    def errors(self) -> list[Problem]:
        """Problems of severity ``error``."""
        return [p for p in self.problems if p.severity == "error"]

    @property
    def warnings(self) -> list[Problem]:
        """Problems of severity ``warning``."""
        return [p for p in self.problems if p.severity == "warning"]

    @property
    def ok(self) -> bool:
        """True when no error was found (warnings allowed)."""
        return not self.errors


def _entries(items: list[str], limit: int = 5) -> str:
    return ", ".join(items[:limit]) + (
        f" and {len(items) - limit} more" if len(items) > limit else ""
    )


def check_dataset(
    ann_file: str | Path, image_dir: str | Path, *, check_images: bool = True
) -> DatasetReport:
    """Validate a COCO-format dataset and collect every problem (never stops at the first).

    Args:
        ann_file: COCO instances JSON.
        image_dir: folder the images' ``file_name`` entries are relative to.
        check_images: also open and fully decode every image and compare its size with the
            annotations (slower; off checks the JSON only).

    Returns:
        A :class:`DatasetReport`; ``report.ok`` is False when there are errors.
    """
    report = DatasetReport(ann_file=Path(ann_file), image_dir=Path(image_dir))
    index = read_annotations(ann_file, problems=report.problems)
    if index is None:
        return report

    report.num_images = len(index.images)
    counts = {cat["id"]: 0 for cat in index.categories}
    degenerate: list[str] = []
    for img in index.images:
        anns = index.anns_by_image[img.id]
        usable = 0
        for ann in anns:
            report.num_annotations += 1
            if ann.iscrowd:
                report.num_crowd += 1
                continue
            # the dataset's own rule: under 1 px once clipped to the image, dropped from targets
            if degenerate_after_clipping(ann, img):
                degenerate.append(f"annotations[{ann.index}] (id {ann.id})")
                continue
            usable += 1
            counts[ann.category_id] += 1
            if ann.area < SMALL_MAX:
                report.size_counts["small"] += 1
            elif ann.area < MEDIUM_MAX:
                report.size_counts["medium"] += 1
            else:
                report.size_counts["large"] += 1
        if not usable:
            report.images_without_annotations += 1
    report.num_degenerate = len(degenerate)
    if degenerate:
        report.problems.append(
            Problem(
                "warning",
                f"{ann_file}: {len(degenerate)} degenerate box(es) under {MIN_BOX_SIZE:g} px wide "
                f"or high (clipped to the image) will be dropped: {_entries(degenerate)}",
            )
        )
    report.categories = [
        CategoryCount(cat["id"], cat["name"], counts[cat["id"]]) for cat in index.categories
    ]
    empty = [f"{c.name!r} (id {c.id})" for c in report.categories if c.count == 0]
    if empty:
        report.problems.append(
            Problem(
                "warning",
                f"{ann_file}: {len(empty)} category(ies) without instances: {_entries(empty)}",
            )
        )

    root = Path(image_dir)
    if not root.is_dir():
        report.problems.append(Problem("error", f"{image_dir}: image folder not found"))
    elif check_images:
        for img in index.images:
            path = root / img.file_name
            try:
                read_image(path, expected_size=(img.width, img.height))
            except DataError as exc:
                report.problems.append(Problem("error", f"{exc} (images[{img.index}] id {img.id})"))
            except Exception as exc:  # anything a decoder raises: report it, check the rest
                report.problems.append(
                    Problem(
                        "error",
                        f"{path}: image does not decode ({type(exc).__name__}: {exc}) "
                        f"(images[{img.index}] id {img.id})",
                    )
                )
            report.images_checked += 1
    return report


def image_header_problem(path: Path, expected_size: tuple[int, int] | None = None) -> str | None:
    """What is wrong with an image file, judged cheaply (it exists, is not empty, its header
    decodes and gives the expected ``(width, height)``); ``None`` when nothing is."""
    try:
        size = path.stat().st_size
    except OSError:
        return f"{path}: image file not found"
    if not path.is_file():
        return f"{path}: not a file"
    if size == 0:
        return f"{path}: image file is empty (0 bytes)"
    try:
        with Image.open(path) as img:
            got = img.size
    except Exception as exc:  # PIL raises many types for bad headers
        return f"{path}: image does not decode ({type(exc).__name__}: {exc})"
    if expected_size is not None and got != expected_size:
        return (
            f"{path}: image is {got[0]}x{got[1]} but the annotations say "
            f"{expected_size[0]}x{expected_size[1]} (width x height)"
        )
    return None


def check_image_files(dataset: Any, *, split: str = "") -> None:
    """Check every image of a :class:`~fgdistill.data.coco.CocoDetection` cheaply (see
    :func:`image_header_problem`) before a run reads them; every bad file is listed at once.

    Raises:
        DataError: naming the split, how many files are bad and each of them (up to 20).
    """
    records = [dataset.image_info(i) for i in range(len(dataset))]
    root = Path(dataset.image_dir)
    problems = []
    for rec in records:
        problem = image_header_problem(root / rec.file_name, (rec.width, rec.height))
        if problem is not None:
            problems.append(f"{problem} (images[{rec.index}] id {rec.id})")
    if problems:
        label = f"{split} " if split else ""
        shown = "; ".join(problems[:20])
        more = f"; and {len(problems) - 20} more" if len(problems) > 20 else ""
        raise DataError(
            f"{len(problems)} bad image file(s) in the {label}set {dataset.ann_file}: {shown}{more}"
        )
