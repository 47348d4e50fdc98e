"""Speed of the FGD loss at COCO scale: forward plus backward, against two yardsticks.

Inputs: a batch of 2 images of 800x1216 pixels, FPN levels P3-P7 (strides 8 to 128) with 256
channels for student and teacher, 30 random boxes per image. Timed, forward plus backward of the
sum over levels:

* ``mse``: a plain summed ``F.mse_loss`` per level, the floor for any feature-imitation loss;
* ``fgd``: :class:`fgdistill.losses.MultiLevelFGD` in eager mode;
* ``loop``: :func:`loop_fgd_terms`, a straightforward port of the authors' released
  ``FeatureLoss`` (Python loops over boxes, plain autograd), with the same parameters;
* ``fgd compiled``: the same module under ``torch.compile`` (unless ``--no-compile``).

Methods are timed round-robin, ``--repeats`` times each after warm-up, and the median is reported,
so the ratios are measured under the same load. Peak memory is the growth of the process's peak
resident set over the inputs (CPU; one fresh subprocess per method) or
``torch.cuda.max_memory_allocated`` over the inputs (CUDA).

Run: ``python benchmarks/loss_speed.py [--device cpu|cuda] [--repeats 10] [--no-compile]``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from fgdistill.losses import FGDLoss, MultiLevelFGD
from fgdistill.models.presets import PRESETS

LEVELS = ("p3", "p4", "p5", "p6", "p7")
BATCH_SHAPE = (800, 1216)
CHANNELS = 256
BOXES_PER_IMAGE = 30
EAGER_VS_LOOP_TARGET = 3.0  # eager must be at least this many times faster than the loop
COMPILED_VS_MSE_TARGET = 4.0  # compiled must take at most this many times the plain MSE


# --------------------------------------------------------------------------------------------
# The box-by-box reference: a direct port of the released FeatureLoss (mmdetection-based).
# --------------------------------------------------------------------------------------------
def _loop_attention(x: Tensor, temperature: float) -> tuple[Tensor, Tensor]:
    n, c, h, w = x.shape
    value = torch.abs(x)
    fea_map = value.mean(dim=1, keepdim=True)
    s_att = (h * w * F.softmax((fea_map / temperature).view(n, -1), dim=1)).view(n, h, w)
    channel_map = value.mean(dim=2, keepdim=False).mean(dim=2, keepdim=False)
    c_att = c * F.softmax(channel_map / temperature, dim=1)
    return s_att, c_att


def _loop_spatial_pool(x: Tensor, mask_conv: torch.nn.Module) -> Tensor:
    n, c, h, w = x.shape
    input_x = x.view(n, c, h * w).unsqueeze(1)
    context_mask = mask_conv(x).view(n, 1, h * w)
    context_mask = F.softmax(context_mask, dim=2).unsqueeze(-1)
    return torch.matmul(input_x, context_mask).view(n, c, 1, 1)


def loop_fgd_masks(
    boxes: Sequence[Tensor], feature_hw: tuple[int, int], batch_shape: tuple[int, int]
) -> tuple[Tensor, Tensor]:
    """Masks box by box, as the released code builds them (scaled by the batch shape)."""
    h, w = feature_hw
    in_h, in_w = batch_shape
    n = len(boxes)
    dtype = boxes[0].dtype if n and boxes[0].is_floating_point() else torch.float32
    mask_fg = torch.zeros(n, h, w, dtype=dtype)
    mask_bg = torch.ones(n, h, w, dtype=dtype)
    for i in range(n):
        b = boxes[i].detach().cpu()
        wmin = torch.floor(b[:, 0] / in_w * w).int()
        wmax = torch.ceil(b[:, 2] / in_w * w).int()
        hmin = torch.floor(b[:, 1] / in_h * h).int()
        hmax = torch.ceil(b[:, 3] / in_h * h).int()
        area = 1.0 / (hmax + 1 - hmin) / (wmax + 1 - wmin)
        for j in range(len(b)):
            r0, r1 = max(int(hmin[j]), 0), int(hmax[j]) + 1
            c0, c1 = max(int(wmin[j]), 0), int(wmax[j]) + 1
            if r1 <= r0 or c1 <= c0:
                continue
            mask_fg[i, r0:r1, c0:c1] = torch.maximum(mask_fg[i, r0:r1, c0:c1], area[j].to(dtype))
        mask_bg[i] = torch.where(mask_fg[i] > 0, 0.0, 1.0).to(dtype)
        if torch.sum(mask_bg[i]):
            mask_bg[i] /= torch.sum(mask_bg[i])
    return mask_fg, mask_bg


def loop_fgd_terms(
    loss: FGDLoss,
    student: Tensor,
    teacher: Tensor,
    boxes: Sequence[Tensor],
    batch_shape: tuple[int, int],
) -> dict[str, Tensor]:
    """Weighted FGD terms, computed the way the released code does, with ``loss``'s parameters."""
    preds_s = loss.align(student) if loss.align is not None else student
    preds_t = teacher.detach()
    n, _, h, w = preds_s.shape
    t = loss.temperature
    s_att_t, c_att_t = _loop_attention(preds_t, t)
    s_att_s, c_att_s = _loop_attention(preds_s, t)
    mask_fg, mask_bg = loop_fgd_masks(boxes, (h, w), batch_shape)
    mask_fg = mask_fg.to(preds_s)
    mask_bg = mask_bg.to(preds_s)

    # Focal terms: the released code multiplies both maps by square roots of the weights.
    m_fg = mask_fg.unsqueeze(1)
    m_bg = mask_bg.unsqueeze(1)
    c_t = c_att_t.unsqueeze(-1).unsqueeze(-1)
    s_t = s_att_t.unsqueeze(1)
    fea_t = preds_t * torch.sqrt(s_t) * torch.sqrt(c_t)
    fea_s = preds_s * torch.sqrt(s_t) * torch.sqrt(c_t)
    fg = F.mse_loss(fea_s * torch.sqrt(m_fg), fea_t * torch.sqrt(m_fg), reduction="sum") / n
    bg = F.mse_loss(fea_s * torch.sqrt(m_bg), fea_t * torch.sqrt(m_bg), reduction="sum") / n

    attention = (
        torch.sum(torch.abs(c_att_s - c_att_t)) / n + torch.sum(torch.abs(s_att_s - s_att_t)) / n
    )

    context_s = _loop_spatial_pool(preds_s, loss.student_context.mask)
    context_t = _loop_spatial_pool(preds_t, loss.teacher_context.mask)
    out_s = preds_s + loss.student_context.transform(context_s)
    out_t = preds_t + loss.teacher_context.transform(context_t)
    rela = F.mse_loss(out_s, out_t, reduction="sum") / n
    return {
        "fg": loss.alpha * fg,
        "bg": loss.beta * bg,
        "attention": loss.gamma * attention,
        "global": loss.lambda_ * rela,
    }


# --------------------------------------------------------------------------------------------
# Inputs and timing
# --------------------------------------------------------------------------------------------
def level_sizes() -> dict[str, tuple[int, int]]:
    """Feature sizes of P3-P7 for the batch, as torchvision's FPN produces them."""
    sizes: dict[str, tuple[int, int]] = {}
    h, w = BATCH_SHAPE[0] // 8, BATCH_SHAPE[1] // 8
    for k, lv in enumerate(LEVELS):
        if k > 0:
            h, w = (h - 1) // 2 + 1, (w - 1) // 2 + 1
        sizes[lv] = (h, w)
    return sizes


def make_inputs(
    device: torch.device, seed: int = 0
) -> tuple[dict[str, Tensor], dict[str, Tensor], list[Tensor]]:
    """Student (leaf, requires grad) and teacher maps per level, and 30 random boxes per image."""
    gen = torch.Generator().manual_seed(seed)
    student: dict[str, Tensor] = {}
    teacher: dict[str, Tensor] = {}
    for lv, (h, w) in level_sizes().items():
        student[lv] = torch.randn(2, CHANNELS, h, w, generator=gen).to(device).requires_grad_()
        teacher[lv] = torch.randn(2, CHANNELS, h, w, generator=gen).to(device)
    boxes = []
    in_h, in_w = BATCH_SHAPE
    for _ in range(2):
        xy = torch.rand(BOXES_PER_IMAGE, 2, generator=gen) * torch.tensor([in_w, in_h])
        wh = (torch.rand(BOXES_PER_IMAGE, 2, generator=gen) ** 2) * torch.tensor([in_w, in_h]) / 2
        x2y2 = torch.minimum(xy + wh + 1, torch.tensor([in_w, in_h], dtype=torch.float32))
        boxes.append(torch.cat([xy, x2y2], dim=1).to(device))
    return student, teacher, boxes


def build_methods(
    device: torch.device, compile_fgd: bool
) -> tuple[dict[str, Callable[[], Tensor]], dict[str, Tensor], MultiLevelFGD]:
    student, teacher, boxes = make_inputs(device)
    fgd = MultiLevelFGD(LEVELS, CHANNELS, CHANNELS, PRESETS["retinanet"]).to(device)

    def run_mse() -> Tensor:
        return torch.stack(
            [F.mse_loss(student[lv], teacher[lv], reduction="sum") for lv in LEVELS]
        ).sum()

    def run_fgd() -> Tensor:
        return fgd(student, teacher, boxes, BATCH_SHAPE)[1]

    def run_loop() -> Tensor:
        total = student[LEVELS[0]].new_zeros(())
        for lv in LEVELS:
            loss = fgd.losses[lv]
            assert isinstance(loss, FGDLoss)
            terms = loop_fgd_terms(loss, student[lv], teacher[lv], boxes, BATCH_SHAPE)
            total = total + sum(terms.values())
        return total

    methods: dict[str, Callable[[], Tensor]] = {
        "mse": run_mse,
        "fgd": run_fgd,
        "loop": run_loop,
    }
    if compile_fgd:
        compiled = torch.compile(fgd)

        def run_compiled() -> Tensor:
            return compiled(student, teacher, boxes, BATCH_SHAPE)[1]

        methods["fgd compiled"] = run_compiled
    return methods, student, fgd


def check_compiled(
    methods: dict[str, Callable[[], Tensor]], student: dict[str, Tensor], fgd: MultiLevelFGD
) -> float:
    """Largest relative difference of the compiled loss and student gradients from eager."""
    results = []
    for name in ("fgd", "fgd compiled"):
        for x in student.values():
            x.grad = None
        loss = methods[name]()
        loss.backward()
        grads = [x.grad.detach().clone() for x in student.values() if x.grad is not None]
        results.append((loss.detach(), grads))
    (l0, g0), (l1, g1) = results
    diffs = [((l1 - l0).abs() / l0.abs().clamp_min(1e-30)).item()]
    for a, b in zip(g0, g1, strict=True):
        diffs.append(((b - a).abs().max() / a.abs().max().clamp_min(1e-30)).item())
    return max(diffs)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _step(fn: Callable[[], Tensor], student: dict[str, Tensor], fgd: MultiLevelFGD) -> None:
    for x in student.values():
        x.grad = None
    fgd.zero_grad(set_to_none=True)
    fn().backward()


def time_methods(
    methods: dict[str, Callable[[], Tensor]],
    student: dict[str, Tensor],
    fgd: MultiLevelFGD,
    device: torch.device,
    repeats: int,
) -> tuple[dict[str, float], dict[str, float]]:
    """Median wall and CPU seconds of forward plus backward per method, timed round-robin.

    CPU time is the process's (all threads, spinning included); on a shared machine it is the
    steadier of the two, wall time is what a training step waits for.
    """
    usable = dict(methods)
    for name, fn in list(usable.items()):
        try:
            start = time.perf_counter()
            for _ in range(2):  # warm-up (and compilation)
                _step(fn, student, fgd)
            _sync(device)
            print(f"  warm-up {name}: {time.perf_counter() - start:.1f} s", flush=True)
        except Exception as err:  # report a compile failure, do not die
            print(f"  {name} FAILED: {type(err).__name__}: {err}", flush=True)
            del usable[name]
    times: dict[str, list[float]] = {name: [] for name in usable}
    cpu: dict[str, list[float]] = {name: [] for name in usable}
    for _ in range(repeats):
        for name, fn in usable.items():
            _sync(device)
            start, start_cpu = time.perf_counter(), time.process_time()
            _step(fn, student, fgd)
            _sync(device)
            times[name].append(time.perf_counter() - start)
            cpu[name].append(time.process_time() - start_cpu)
    return (
        {name: statistics.median(ts) for name, ts in times.items()},
        {name: statistics.median(ts) for name, ts in cpu.items()},
    )


def peak_memory_cuda(
    methods: dict[str, Callable[[], Tensor]],
    student: dict[str, Tensor],
    fgd: MultiLevelFGD,
    device: torch.device,
) -> dict[str, float]:
    """Peak CUDA memory over what is allocated before the call, in MiB."""
    out: dict[str, float] = {}
    for name, fn in methods.items():
        for x in student.values():
            x.grad = None
        _sync(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        try:
            _step(fn, student, fgd)
        except Exception:
            continue
        _sync(device)
        out[name] = (torch.cuda.max_memory_allocated(device) - base) / 2**20
    return out


def _peak_rss_kib() -> float:
    """Peak resident set of this process in KiB: VmHWM (Linux), else ru_maxrss.

    ru_maxrss survives exec, so a child started by a large parent would inherit its peak;
    VmHWM belongs to the new address space and can be reset through /proc/self/clear_refs.
    """
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return float(line.split()[1])
    except OSError:
        pass
    scale = 1 / 1024 if sys.platform == "darwin" else 1  # bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def _reset_peak_rss() -> None:
    try:
        with open("/proc/self/clear_refs", "w") as clear:
            clear.write("5")  # reset VmHWM to the current RSS
    except OSError:
        pass


def _measure_rss_child(name: str) -> None:
    methods, student, fgd = build_methods(torch.device("cpu"), compile_fgd=False)
    _reset_peak_rss()
    base = _peak_rss_kib()
    _step(methods[name], student, fgd)
    print(json.dumps({"name": name, "mib": (_peak_rss_kib() - base) / 1024}))


def peak_memory_cpu(names: Sequence[str], threads: int) -> dict[str, float]:
    """Growth of peak RSS over the inputs, in MiB, each method in a fresh subprocess."""
    out: dict[str, float] = {}
    for name in names:
        proc = subprocess.run(
            [sys.executable, __file__, "--threads", str(threads), "--_rss-child", name],
            capture_output=True,
            text=True,
            check=False,
        )
        try:
            out[name] = float(json.loads(proc.stdout.strip().splitlines()[-1])["mib"])
        except (IndexError, ValueError, KeyError):
            print(f"  memory of {name} not measured: {proc.stderr.strip()[-300:]}")
    return out


def choose_threads(setting: str) -> int:
    """Threads for torch on CPU: an explicit number, or torch's default capped at idle cores."""
    if setting != "auto":
        try:
            threads = int(setting)
        except ValueError:
            raise SystemExit(f"--threads must be a number or 'auto', got {setting!r}") from None
        if threads < 1:
            raise SystemExit(f"--threads must be at least 1, got {threads}")
        return threads
    cores = os.cpu_count() or 1
    idle = max(1, round(cores - os.getloadavg()[0]))
    return max(1, min(torch.get_num_threads(), idle))


def speedup_cpu(cpu_medians: dict[str, float]) -> float:
    return cpu_medians["loop"] / cpu_medians["fgd"]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    parser.add_argument("--repeats", type=int, default=10, help="timed runs per method")
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile")
    parser.add_argument(
        "--threads",
        default="auto",
        help="torch CPU threads: a number, or 'auto' (default): torch's choice capped at the "
        "number of idle cores (cores minus the 1-minute load average, at least 1), because "
        "oversubscribed OpenMP threads spin and slow every operation down",
    )
    parser.add_argument("--_rss-child", dest="rss_child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    torch.set_num_threads(choose_threads(args.threads))
    if args.rss_child:
        _measure_rss_child(args.rss_child)
        return 0
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("CUDA is not available")
        return 2

    sizes = level_sizes()
    n_elems = sum(2 * CHANNELS * h * w for h, w in sizes.values())
    print(
        f"FGD loss speed: batch 2x3x{BATCH_SHAPE[0]}x{BATCH_SHAPE[1]}, levels "
        + ", ".join(f"{lv} {h}x{w}" for lv, (h, w) in sizes.items())
        + f", {CHANNELS} channels ({n_elems / 1e6:.1f}M elements per map), "
        f"{BOXES_PER_IMAGE} boxes per image"
    )
    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
    print(
        f"device {device} ({dev_name or platform.machine()}), torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads (--threads {args.threads}, {os.cpu_count()} cores), "
        f"repeats {args.repeats} (median)"
    )
    print("load average at start: " + " ".join(f"{x:.2f}" for x in os.getloadavg()))
    methods, student, fgd = build_methods(device, compile_fgd=not args.no_compile)
    medians, cpu_medians = time_methods(methods, student, fgd, device, args.repeats)
    if device.type == "cuda":
        memory = peak_memory_cuda(
            {k: v for k, v in methods.items() if k in medians}, student, fgd, device
        )
        mem_label = "peak CUDA memory over inputs"
    else:
        memory = peak_memory_cpu(
            [k for k in ("mse", "fgd", "loop") if k in medians], torch.get_num_threads()
        )
        mem_label = "peak RSS growth over inputs (fresh process)"

    print("load average at end: " + " ".join(f"{x:.2f}" for x in os.getloadavg()))
    mse = medians["mse"]
    cpu_mse = cpu_medians["mse"]
    print(f"\n{'method':<14}{'wall ms':>10}{'x mse':>8}{'CPU ms':>10}{'x mse':>8}{'peak MiB':>10}")
    for name, sec in medians.items():
        mib = f"{memory[name]:.0f}" if name in memory else "n/a"
        cpu_sec = cpu_medians[name]
        print(
            f"{name:<14}{sec * 1e3:>10.1f}{sec / mse:>8.2f}"
            f"{cpu_sec * 1e3:>10.1f}{cpu_sec / cpu_mse:>8.2f}{mib:>10}"
        )
    print(f"(times: median forward+backward; CPU: process time, all threads; MiB: {mem_label})")

    ok = True
    speedup = medians["loop"] / medians["fgd"]
    met = speedup >= EAGER_VS_LOOP_TARGET
    ok &= met
    print(
        f"\neager FGD is {speedup:.1f}x faster than the box-by-box loop "
        f"(target >= {EAGER_VS_LOOP_TARGET:g}x): {'MET' if met else 'NOT MET'}"
    )
    print(
        f"eager FGD takes {medians['fgd'] / mse:.2f}x the plain MSE "
        f"(CPU time: {speedup_cpu(cpu_medians):.1f}x faster than the loop)"
    )
    if "fgd compiled" in medians:
        print(
            "compiled vs eager, largest relative difference of loss and student gradients: "
            f"{check_compiled(methods, student, fgd):.1e}"
        )
        ratio = medians["fgd compiled"] / mse
        met = ratio <= COMPILED_VS_MSE_TARGET
        ok &= met
        print(
            f"compiled FGD takes {ratio:.2f}x the plain MSE "
            f"(target <= {COMPILED_VS_MSE_TARGET:g}x): {'MET' if met else 'NOT MET'}"
        )
    elif not args.no_compile:
        ok = False
        print("compiled FGD: FAILED (see above)")
    else:
        print("compiled FGD: skipped (--no-compile)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
