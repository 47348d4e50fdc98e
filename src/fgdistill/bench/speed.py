"""Speed of a teacher and its student: size, compute and latency per image in each runtime.

The pair is read from a distillation config: the student is its ``model``, the teacher its
``distill.teacher``. Both are built with random weights (speed does not depend on them) and 91
classes, exported to TorchScript and ONNX (:mod:`fgdistill.export`), and one image is timed
through PyTorch eager, TorchScript and ONNX Runtime at each requested size. Models and runtimes
are timed round-robin after a warm-up, so that they share whatever load the machine has, and the
median per image is reported.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from fgdistill.engine.config import TrainConfig, detector_kwargs

__all__ = ["RUNTIMES", "SpeedRow", "measure_speed", "render_speed"]

RUNTIMES: tuple[str, ...] = ("eager", "torchscript", "onnxruntime")


@dataclass
class SpeedRow:
    """One model at one input size: parameters, GFLOPs and median latency per runtime (ms)."""

    role: str
    model: str
    size: tuple[int, int]
    params_m: float
    gflops: float
    latency_ms: dict[str, float] = field(default_factory=dict)


def _gflops(model: nn.Module, image: Tensor) -> float:
    """Floating-point operations of one eager forward, in billions, as torch counts them
    (convolutions and matrix products; not NMS or RepPoints' sampling)."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model([image])
    return counter.get_total_flops() / 1e9


def _runners(
    model: nn.Module, folder: Path, name: str, runtimes: Sequence[str]
) -> dict[str, Callable[[Tensor], object]]:
    from fgdistill.export import export_detector, load_exported

    def eager(image: Tensor) -> object:
        with torch.no_grad():
            return model([image])

    out: dict[str, Callable[[Tensor], object]] = {"eager": eager}
    if "torchscript" in runtimes:
        out["torchscript"] = load_exported(
            export_detector(model, "torchscript", folder / f"{name}.pt")
        )
    if "onnxruntime" in runtimes:
        out["onnxruntime"] = load_exported(export_detector(model, "onnx", folder / f"{name}.onnx"))
    return {r: out[r] for r in runtimes}


def measure_speed(
    cfg: TrainConfig,
    sizes: Sequence[tuple[int, int]],
    *,
    repeats: int = 5,
    runtimes: Sequence[str] = RUNTIMES,
) -> list[SpeedRow]:
    """Teacher and student of ``cfg`` at each ``(min_size, max_size)`` of ``sizes``.

    The image is ``FloatTensor[3, H, W]`` with ``H = min_size`` and a 4:3 aspect ratio capped
    by ``max_size`` (COCO's typical 800x1066 at 800/1333).
    """
    from fgdistill.export import sample_image

    if cfg.distill is None:
        raise ValueError("bench speed needs a distillation config (its distill.teacher)")
    rows: list[SpeedRow] = []
    for min_size, max_size in sizes:
        width = min(max_size, round(min_size * 4 / 3))
        image = sample_image(min_size, width)
        pair = {"teacher": cfg.distill.teacher, "student": cfg.model}
        models: dict[str, nn.Module] = {}
        for role, model_cfg in pair.items():
            kwargs = detector_kwargs(model_cfg, 91)
            kwargs.update(min_size=min_size, max_size=max_size, weights=None, weights_backbone=None)
            torch.manual_seed(0)
            from fgdistill.models import build_detector

            models[role] = build_detector(**kwargs).eval()
        with tempfile.TemporaryDirectory() as tmp:
            runs = {role: _runners(m, Path(tmp), role, runtimes) for role, m in models.items()}
            times: dict[tuple[str, str], list[float]] = {}
            for role, by_runtime in runs.items():  # warm-up
                for runtime, run in by_runtime.items():
                    run(image)
                    times[(role, runtime)] = []
            for _ in range(repeats):
                for role, by_runtime in runs.items():
                    for runtime, run in by_runtime.items():
                        start = time.perf_counter()
                        run(image)
                        times[(role, runtime)].append(time.perf_counter() - start)
        for role, model in models.items():
            model_cfg = pair[role]
            rows.append(
                SpeedRow(
                    role,
                    f"{model_cfg.arch} {model_cfg.backbone}",
                    (min_size, width),
                    sum(p.numel() for p in model.parameters()) / 1e6,
                    _gflops(model, image),
                    {r: 1000 * statistics.median(times[(role, r)]) for r in runtimes},
                )
            )
    return rows


def render_speed(rows: Sequence[SpeedRow]) -> str:
    """A Markdown table of the rows, with the student/teacher latency ratio per size."""
    runtimes = list(rows[0].latency_ms)
    lines = [
        "| model | image | parameters | GFLOPs | " + " | ".join(f"{r} ms" for r in runtimes) + " |",
        "|---|---|---:|---:|" + "---:|" * len(runtimes),
    ]
    for teacher, student in zip(rows[::2], rows[1::2], strict=True):
        for row in (teacher, student):
            cells = " | ".join(f"{row.latency_ms[r]:.1f}" for r in runtimes)
            lines.append(
                f"| {row.role}: {row.model} | {row.size[0]}x{row.size[1]} | "
                f"{row.params_m:.1f} M | {row.gflops:.1f} | {cells} |"
            )
        ratios = " | ".join(
            f"{student.latency_ms[r] / teacher.latency_ms[r]:.2f}" for r in runtimes
        )
        lines.append(f"| student / teacher | | | | {ratios} |")
    return "\n".join(lines)
