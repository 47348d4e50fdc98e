"""Data commands: ``fgdistill synth``, ``fgdistill data check`` and ``fgdistill score``."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

from fgdistill.data.check import check_dataset
from fgdistill.data.synth import generate_synthetic, usable_cores
from fgdistill.evaluation.coco_eval import IOU_TYPES, score_results_file


def register(subparsers: Any) -> None:
    """Add ``synth``, ``data check`` and ``score`` to the top-level sub-parsers."""
    synth = subparsers.add_parser(
        "synth",
        help="write the synthetic COCO-format detection benchmark",
        description=(
            "Write OUT_DIR/train/, OUT_DIR/val/ and "
            "OUT_DIR/annotations/instances_{train,val}.json: "
            "8 categories (4 shapes x 2 textures, random colours), distractors, occlusion, "
            "cluttered backgrounds. The same arguments give byte-identical output."
        ),
    )
    synth.add_argument("out_dir", metavar="OUT_DIR", type=Path, help="output folder")
    synth.add_argument("--train", type=int, default=512, metavar="N", help="training images")
    synth.add_argument("--val", type=int, default=128, metavar="M", help="validation images")
    synth.add_argument(
        "--image-size", type=int, default=128, metavar="S", help="image side in pixels"
    )
    synth.add_argument("--seed", type=int, default=0, metavar="K", help="random seed")
    synth.add_argument(
        "--difficulty",
        type=float,
        default=0.5,
        metavar="D",
        help="0 (clean, few objects) .. 1 (crowded, noisy, low contrast); default 0.5",
    )
    synth.add_argument(
        "--workers",
        type=int,
        default=None,
        metavar="W",
        help=(
            "render and write images in W processes (>= 1; 1: in this one; default: the usable "
            f"cores, here {usable_cores()}); the output does not depend on W"
        ),
    )
    synth.set_defaults(func=_synth)

    data = subparsers.add_parser("data", help="inspect COCO-format datasets")
    data_sub = data.add_subparsers(dest="data_command", metavar="DATA_COMMAND")
    check = data_sub.add_parser(
        "check",
        help="validate a dataset and summarise it",
        description=(
            "Validate an instances JSON and its images; print the number of images, instances "
            "per category, COCO size ranges and every problem. Exit code 1 when there are errors."
        ),
    )
    check.add_argument("ann_file", metavar="ANN_FILE", type=Path, help="COCO instances JSON")
    check.add_argument("image_dir", metavar="IMAGE_DIR", type=Path, help="image folder")
    check.add_argument(
        "--skip-images", action="store_true", help="check the JSON only, do not decode images"
    )
    check.set_defaults(func=_check)
    data.set_defaults(func=lambda args: _print_help(data))

    score = subparsers.add_parser(
        "score",
        help="score a COCO results file with COCO metrics",
        description="Score any COCO results JSON against ground truth. Metrics are in percent.",
    )
    score.add_argument("ann_file", metavar="ANN_FILE", type=Path, help="ground-truth JSON")
    score.add_argument("results", metavar="RESULTS_JSON", type=Path, help="COCO results JSON")
    score.add_argument("--iou-type", choices=IOU_TYPES, default="bbox", help="default: bbox")
    score.add_argument("--out", type=Path, metavar="FILE", help="also write the metrics as JSON")
    score.set_defaults(func=_score)


def _print_help(parser: argparse.ArgumentParser) -> int:
    parser.print_help()
    return 2


def _synth(args: argparse.Namespace) -> int:
    summary = generate_synthetic(
        args.out_dir,
        num_train=args.train,
        num_val=args.val,
        image_size=args.image_size,
        seed=args.seed,
        difficulty=args.difficulty,
        workers=usable_cores() if args.workers is None else args.workers,
    )
    print(
        f"wrote {summary.total_images} images ({args.image_size}x{args.image_size}) to "
        f"{summary.out_dir} in {summary.seconds:.2f} s ({summary.images_per_second:.0f} images/s)"
    )
    for split in summary.num_images:
        sizes = summary.size_counts[split]
        print(
            f"  {split}: {summary.num_images[split]} images, {summary.num_instances[split]} "
            f"instances (small {sizes['small']}, medium {sizes['medium']}, large {sizes['large']}; "
            f"{summary.num_occluded[split]} occluded)"
        )
        print(f"    images:      {summary.image_dirs[split]}")
        print(f"    annotations: {summary.ann_files[split]}")
    return 0


def _check(args: argparse.Namespace) -> int:
    report = check_dataset(args.ann_file, args.image_dir, check_images=not args.skip_images)
    print(f"annotations: {report.ann_file}")
    print(f"images:      {report.num_images} in {report.image_dir}", end="")
    print(f" ({report.images_checked} decoded)" if not args.skip_images else " (not decoded)")
    print(
        f"instances:   {report.num_annotations} ({report.num_crowd} crowd, "
        f"{report.num_degenerate} degenerate, "
        f"{report.images_without_annotations} image(s) without usable annotations)"
    )
    if report.categories:
        print("per category:")
        width = max(len(c.name) for c in report.categories)
        for cat in report.categories:
            print(f"  {cat.id:>5}  {cat.name:<{width}}  {cat.count}")
    sizes = report.size_counts
    total = sum(sizes.values())
    print("sizes (COCO area ranges):")
    for key, label in (("small", "< 32^2"), ("medium", "32^2..96^2"), ("large", ">= 96^2")):
        share = f"{100 * sizes[key] / total:.1f}%" if total else "-"
        print(f"  {key:<6} {label:<11} {sizes[key]:>7}  {share}")
    errors, warnings = report.errors, report.warnings
    if report.problems:
        print(f"problems: {len(errors)} error(s), {len(warnings)} warning(s)")
        for problem in report.problems:
            print(f"  {problem}")
    print("OK" if report.ok else "FAILED")
    return 0 if report.ok else 1


def _format(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{value:.2f}"


def _score(args: argparse.Namespace) -> int:
    metrics = score_results_file(args.ann_file, args.results, iou_type=args.iou_type)
    print(f"{args.iou_type} metrics for {args.results} (percent):")
    for name, value in metrics.items():
        print(f"  {name:<6} {_format(value):>7}")
    if args.out is not None:
        payload = {
            "ann_file": str(args.ann_file),
            "results": str(args.results),
            "iou_type": args.iou_type,
            "scale": "percent",
            "metrics": {k: (None if math.isnan(v) else v) for k, v in metrics.items()},
        }
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
        print(f"wrote {args.out}")
    return 0
