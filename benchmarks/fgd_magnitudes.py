"""Why the paper's FGD weights swamp the detection loss on from-scratch features: measured.

Runs one training-mode forward of a :class:`fgdistill.models.Distiller` with the paper's weights
(``fgd_weight_scale`` 1) on a batch of the synthetic benchmark and prints, per FPN level: the
map size, the mean square of the teacher's and the student's features, each FGD term, and the
student's detection loss. It does this for a teacher with random weights and for trained
teachers (checkpoints), so the effect of the teacher's training on the feature scale, and of
each level, can be read off. The student is always a fresh random initialisation, as at the
start of a distillation run without inheriting. Each table is printed for the released code's
raw features and for ``normalize="teacher_rms"`` (each level's maps divided by the teacher's root
mean square), with the peak of the teacher's spatial attention (the largest softmax share of one
position, averaged over the batch; 1.0 is one-hot).

Run (after ``fgdistill bench quality`` has cached its teacher)::

    python benchmarks/fgd_magnitudes.py --data work_dirs/bench_quality/data \\
        --teacher work_dirs/bench_quality/teacher_retinanet/model.pt

A trained teacher is loaded with :func:`fgdistill.models.load_detector`; the random
one and the student are built like the quality benchmark's models (96 px RetinaNet, FPN 128,
GroupNorm heads).
"""

from __future__ import annotations

import argparse
import platform
from datetime import UTC, datetime
from pathlib import Path

import torch

from fgdistill.data.coco import CocoDetection
from fgdistill.losses import NORMALIZE_MODES, spatial_attention
from fgdistill.models import Distiller, build_detector, load_detector
from fgdistill.models.presets import PRESETS

LEVELS = ("p3", "p4", "p5", "p6", "p7")


def _model(backbone: str, num_classes: int) -> torch.nn.Module:
    return build_detector(
        "retinanet",
        backbone=backbone,
        num_classes=num_classes,
        fpn_channels=128,
        min_size=96,
        max_size=96,
        head_norm="group",
        anchor_sizes=[8, 16, 32, 64, 128],
    )


def measure(
    teacher: torch.nn.Module, images: list, targets: list, num_classes: int, normalize: str
) -> None:
    """Print one table: per level, feature scales and the unscaled FGD terms."""
    torch.manual_seed(0)
    student = _model("resnet18", num_classes).train()
    hparams = PRESETS["retinanet"]
    distiller = Distiller(student, teacher, levels=LEVELS, hparams=hparams, normalize=normalize)
    distiller.train()
    with torch.no_grad():
        batch = distiller.forward_features(images, targets)
        terms, _ = distiller.fgd(
            batch.student_features, batch.teacher_features, batch.boxes, batch.batch_shape
        )
    det = sum(float(v) for v in batch.losses.values())
    print(f"  normalize={normalize!r}; student detection loss (all terms): {det:.3f}")
    print(
        "  | level | map | teacher mean sq | student mean sq | attention peak "
        "| fg | bg | attention | global |"
    )
    print("  |---|---|---:|---:|---:|---:|---:|---:|---:|")
    for lv in LEVELS:
        t = batch.teacher_features[lv]
        s = batch.student_features[lv]
        scaled = t / t.pow(2).mean().sqrt() if normalize == "teacher_rms" else t
        att = spatial_attention(scaled, hparams.temperature)
        peak = float((att.flatten(1).amax(dim=1) / att[0].numel()).mean())
        names = ("fg", "bg", "attention", "global")
        cells = [f"{float(terms[f'fgd/{lv}/{k}']):.4g}" for k in names]
        print(
            f"  | {lv} | {t.shape[-2]}x{t.shape[-1]} | {float(t.pow(2).mean()):.4g} | "
            f"{float(s.pow(2).mean()):.4g} | {peak:.3f} | " + " | ".join(cells) + " |"
        )
    total = sum(float(v) for v in terms.values())
    print(f"  FGD total {total:.4g} = {total / det:.3g} x the detection loss")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, required=True, help="a synthetic benchmark folder")
    parser.add_argument("--teacher", type=Path, nargs="*", default=[], help="trained teachers")
    parser.add_argument("--batch", type=int, default=8)
    args = parser.parse_args()
    torch.set_num_threads(1)
    ds = CocoDetection(
        args.data / "annotations" / "instances_train.json", args.data / "train", train=True
    )
    items = [ds[i] for i in range(args.batch)]
    images = [img for img, _ in items]
    targets = [tgt for _, tgt in items]
    boxes = sum(int(t["boxes"].shape[0]) for t in targets)
    num_classes = ds.category_map.num_classes + 1
    print(
        f"# FGD term magnitudes, paper's RetinaNet weights (scale 1), batch of {args.batch} "
        f"training images with {boxes} boxes; {platform.node()}, "
        f"{datetime.now(UTC).isoformat(timespec='seconds')}"
    )
    torch.manual_seed(1)
    teachers = [("ResNet-50 RetinaNet with random weights", _model("resnet50", num_classes))]
    teachers += [(str(path), load_detector(path)) for path in args.teacher]
    for name, teacher in teachers:
        for normalize in NORMALIZE_MODES:
            print(f"\nteacher: {name}")
            measure(teacher.eval(), images, targets, num_classes, normalize)


if __name__ == "__main__":
    main()
