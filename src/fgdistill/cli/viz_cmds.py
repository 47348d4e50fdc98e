"""Picture commands: ``fgdistill visualize attention`` and ``fgdistill plot``.

``visualize attention`` draws, for each image, the teacher's and the student's attention per FPN
level with FGD's masks (see :mod:`fgdistill.viz.attention`); ``plot`` draws the training curves
of one or several work dirs (see :mod:`fgdistill.viz.curves`).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import torch
import yaml

from fgdistill.errors import DataError

__all__ = ["register"]

logger = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``visualize`` (with ``attention``) and ``plot`` to the top-level parser."""
    vis = subparsers.add_parser(
        "visualize",
        help="draw what FGD distils (attention maps and masks)",
        description="Draw pictures of what FGD distils.",
    )
    vis_sub = vis.add_subparsers(dest="visualize_command", metavar="WHAT")
    vis.set_defaults(func=lambda args: _missing_subcommand(vis))

    att = vis_sub.add_parser(
        "attention",
        help="teacher vs student spatial/channel attention and FGD masks, per FPN level",
        description=(
            "For each IMAGE write OUT/attention_<name>.png: one row per FPN level with the image, "
            "the teacher's and the student's spatial attention, their absolute difference, the "
            "FGD foreground and background masks (with --ann) and the channel attention of "
            "teacher, student and baseline. The student's transform resizes and pads the image "
            "once; every backbone sees that same batch, as in distillation."
        ),
    )
    att.add_argument("images", nargs="+", metavar="IMAGE", help="image files (any PIL format)")
    att.add_argument("--teacher", required=True, metavar="CKPT", help="teacher checkpoint")
    att.add_argument(
        "--student", required=True, metavar="CKPT", help="student checkpoint (e.g. student.pt)"
    )
    att.add_argument(
        "--baseline",
        metavar="CKPT",
        help="optional second student, e.g. trained without FGD, to compare with",
    )
    att.add_argument("--out", required=True, metavar="DIR", help="output directory")
    att.add_argument(
        "--ann",
        metavar="ANN_FILE",
        help="COCO annotation JSON; boxes of the image with the same file name give the masks",
    )
    att.add_argument(
        "--levels",
        nargs="+",
        metavar="LEVEL",
        help="FPN levels to draw, e.g. p3 p4 (default: the levels FGD distils for the student's "
        "detector family)",
    )
    att.add_argument(
        "--temperature",
        type=float,
        help="FGD temperature t (default: the one the student was distilled with, from the "
        "config.yaml beside it, else the paper's for its family: 0.5, FCOS 0.8)",
    )
    att.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    att.add_argument(
        "--dpi", type=int, default=100, help="resolution; a panel is 2.6 inches (default: 100)"
    )
    att.set_defaults(func=_cmd_attention)

    plot = subparsers.add_parser(
        "plot",
        help="plot training loss terms and AP of one or several runs",
        description=(
            "Read WORK_DIR/log.jsonl of each run and draw its loss terms and AP per epoch, all "
            "runs side by side, labelled by work dir name."
        ),
    )
    plot.add_argument("work_dirs", nargs="+", metavar="WORK_DIR", help="run directories")
    plot.add_argument(
        "--out", metavar="FILE", help="PNG to write (default: FIRST_WORK_DIR/curves.png)"
    )
    plot.add_argument("--labels", nargs="+", metavar="LABEL", help="legend labels, one per run")
    plot.add_argument(
        "--dpi",
        type=int,
        default=100,
        help="resolution; a panel is 4.2 x 3.2 inches (default: 100)",
    )
    plot.set_defaults(func=_cmd_plot)


def _check_dpi(dpi: int) -> None:
    if not 10 <= dpi <= 600:
        raise DataError(f"--dpi must be between 10 and 600, got {dpi}")


def _missing_subcommand(parser: argparse.ArgumentParser) -> int:
    parser.print_help()
    return 2


def _trained_temperature(checkpoint: Path) -> float | None:
    """The temperature the student was distilled with, from the config.yaml beside it."""
    from fgdistill.models.presets import PRESETS

    config = checkpoint.parent / "config.yaml"
    try:
        data = yaml.safe_load(config.read_text(encoding="utf-8")) if config.is_file() else None
    except (OSError, yaml.YAMLError):
        return None
    distill = data.get("distill") if isinstance(data, dict) else None
    if not isinstance(distill, dict):
        return None
    hparams = distill.get("hparams")
    value = hparams.get("temperature") if isinstance(hparams, dict) else None
    if isinstance(value, int | float) and not isinstance(value, bool) and value > 0:
        return float(value)
    preset = distill.get("preset")
    return PRESETS[preset].temperature if isinstance(preset, str) and preset in PRESETS else None


def _cmd_attention(args: argparse.Namespace) -> int:
    from fgdistill.data.images import read_image
    from fgdistill.models import load_detector, model_spec
    from fgdistill.models.presets import PRESETS
    from fgdistill.viz.attention import load_gt_boxes
    from fgdistill.viz.attention_report import AttentionImage, write_attention_report

    # Check every input before the (slow) model loading.
    paths = [Path(p) for p in args.images]
    for image in paths:
        if not image.is_file():
            raise DataError(f"image {image} not found")
    for flag in ("teacher", "student", "baseline"):
        value = getattr(args, flag)
        if value is not None and not Path(value).is_file():
            raise DataError(f"--{flag} checkpoint {value} not found")
    _check_dpi(args.dpi)
    if args.temperature is not None and not args.temperature > 0:
        raise DataError(f"--temperature must be > 0, got {args.temperature}")
    gt: dict[str, torch.Tensor] | None = None
    if args.ann is not None:
        gt = load_gt_boxes(args.ann, [p.name for p in paths])
        for image in paths:
            if image.name not in gt:
                print(
                    f"warning: {image.name} is not in {args.ann}; drawing it without masks",
                    file=sys.stderr,
                )
    try:
        device = torch.device(args.device)
    except RuntimeError as exc:
        raise DataError(f"--device {args.device!r}: {exc}") from None

    teacher = load_detector(args.teacher, map_location=device)
    student = load_detector(args.student, map_location=device)
    baseline = load_detector(args.baseline, map_location=device) if args.baseline else None
    temperature = args.temperature
    if temperature is None:
        temperature = _trained_temperature(Path(args.student))
    if temperature is None:
        arch = (model_spec(student) or {}).get("arch")
        temperature = PRESETS[arch].temperature if arch in PRESETS else 0.5

    names = {flag: Path(getattr(args, flag)).name for flag in ("teacher", "student")}
    subtitle = f"teacher {names['teacher']} vs student {names['student']}" + (
        f" (baseline {Path(args.baseline).name})" if args.baseline else ""
    )
    notes = [
        f"Teacher: {args.teacher}. Student: {args.student}."
        + (f" Baseline student: {args.baseline}." if args.baseline else ""),
        f"FGD temperature t = {temperature:g}. "
        + (
            f"Ground-truth boxes (and so the FGD masks) from {args.ann}."
            if args.ann
            else "No ground truth given (--ann), so no FGD masks are drawn."
        ),
    ]
    result = write_attention_report(
        teacher,
        student,
        [
            AttentionImage(p.name, read_image(p), gt.get(p.name) if gt is not None else None)
            for p in paths
        ],
        args.out,
        temperature=temperature,
        baseline=baseline,
        levels=args.levels,
        dpi=args.dpi,
        subtitle=subtitle,
        notes=notes,
    )
    for figure in result.figures:
        width, height = figure.size
        print(f"wrote {figure.path} ({len(figure.levels)} levels, {width}x{height} px)")
        for level, by_role in figure.distance.items():
            print(
                f"  {level}: attention L1 to the teacher (spatial / channel): "
                + "; ".join(
                    f"{role} {v['spatial']:.3g} / {v['channel']:.3g}" for role, v in by_role.items()
                )
            )
    print(f"wrote {result.path} (open it in a browser: every picture with how to read it)")
    return 0


def _cmd_plot(args: argparse.Namespace) -> int:
    from fgdistill.viz.curves import plot_curves

    out = Path(args.out) if args.out else Path(args.work_dirs[0]) / "curves.png"
    if args.out is None and not Path(args.work_dirs[0]).is_dir():
        raise DataError(f"work dir {args.work_dirs[0]} does not exist")
    _check_dpi(args.dpi)
    figure = plot_curves(args.work_dirs, out, labels=args.labels, dpi=args.dpi)
    print(f"wrote {figure.path} ({len(figure.runs)} runs, {len(figure.panels)} panels)")
    return 0
