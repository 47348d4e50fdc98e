"""Inference speed of a teacher and its student: PyTorch eager, TorchScript and ONNX Runtime.

Builds a RetinaNet teacher and student with :func:`fgdistill.models.build_detector` (random
weights; speed does not depend on them), exports each with :func:`fgdistill.export.export_detector`
to TorchScript and ONNX, and times one image of ``--size`` pixels (``min_size`` of the models;
default 96, the synthetic benchmark's) through each runtime. Runtimes and models are timed
round-robin, ``--repeats`` times after a warm-up, so that they share the machine's load; the
median latency per image is reported with the parameter count, the student/teacher latency
ratio, the machine (CPU model, torch threads) and the date.

Run: ``python benchmarks/export_speed.py [--size 96 | --size 800 --max-size 1333]
[--teacher resnet101] [--student resnet18] [--repeats 10] [--threads N]``.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from fgdistill.export import export_detector, load_exported, sample_image
from fgdistill.models.build import build_detector

RUNTIMES = ("eager", "torchscript", "onnxruntime")


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo, else what :mod:`platform` says."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def runners(model: nn.Module, folder: Path, name: str) -> dict[str, Callable[[Tensor], object]]:
    """One function per runtime, each detecting objects in one image ``FloatTensor[3, H, W]``."""

    def eager(image: Tensor) -> object:
        with torch.no_grad():
            return model([image])

    return {
        "eager": eager,
        "torchscript": load_exported(export_detector(model, "torchscript", folder / f"{name}.pt")),
        "onnxruntime": load_exported(export_detector(model, "onnx", folder / f"{name}.onnx")),
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--size", type=int, default=96, help="image height = min_size (96)")
    parser.add_argument("--max-size", type=int, default=None, help="max_size (default --size)")
    parser.add_argument("--teacher", default="resnet101", help="teacher backbone (resnet101)")
    parser.add_argument("--student", default="resnet18", help="student backbone (resnet18)")
    parser.add_argument("--repeats", type=int, default=10, help="timed rounds (10)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default all)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    max_size = args.max_size or args.size
    width = min(max_size, round(args.size * 4 / 3))
    image = sample_image(args.size, width)

    print(
        f"{datetime.date.today().isoformat()}, {cpu_name()}, torch {torch.__version__} with "
        f"{torch.get_num_threads()} threads; RetinaNet, 91 classes, one {args.size}x{width} "
        f"image (min_size {args.size}, max_size {max_size}), median of {args.repeats} rounds"
    )
    models: dict[str, nn.Module] = {}
    for role, backbone in (("teacher", args.teacher), ("student", args.student)):
        torch.manual_seed(0)
        models[f"{role} {backbone}"] = build_detector(
            "retinanet", backbone=backbone, num_classes=91, min_size=args.size, max_size=max_size
        ).eval()

    times: dict[tuple[str, str], list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        runs = {
            name: runners(model, Path(tmp), name.replace(" ", "_"))
            for name, model in models.items()
        }
        for name, by_runtime in runs.items():  # warm-up
            for runtime in RUNTIMES:
                by_runtime[runtime](image)
                times[(name, runtime)] = []
        for _ in range(args.repeats):
            for name, by_runtime in runs.items():
                for runtime in RUNTIMES:
                    start = time.perf_counter()
                    by_runtime[runtime](image)
                    times[(name, runtime)].append(time.perf_counter() - start)

    medians = {key: statistics.median(values) * 1000 for key, values in times.items()}
    print(f"\n| model | parameters | {' | '.join(f'{r} ms' for r in RUNTIMES)} |")
    print(f"| --- | --- | {' | '.join('---' for _ in RUNTIMES)} |")
    for name, model in models.items():
        params = sum(p.numel() for p in model.parameters()) / 1e6
        cells = " | ".join(f"{medians[(name, r)]:.1f}" for r in RUNTIMES)
        print(f"| {name} | {params:.1f} M | {cells} |")
    teacher, student = list(models)
    ratios = " | ".join(f"{medians[(student, r)] / medians[(teacher, r)]:.2f}" for r in RUNTIMES)
    print(f"| student / teacher | | {ratios} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
