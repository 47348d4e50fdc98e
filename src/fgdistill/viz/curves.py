"""Training curves from one or several runs' ``log.jsonl``, side by side.

A work dir written by ``fgdistill train`` or ``fgdistill distill`` holds ``log.jsonl``, one JSON
object per line: ``{"type": "train", "iter", "epoch", "lr", "time", "loss", "losses": {name:
value}}`` every few iterations and ``{"type": "eval", "iter", "epoch", "metrics": {"bbox": {"AP",
"AP50", ...}}}`` after each evaluation. :func:`plot_curves` draws one panel per loss term (the
total first; the per-level FGD terms ``fgd/{level}/{term}`` summed over levels into
``fgd/{term}``) and one per AP metric family, every run as one coloured line labelled by its work
dir's name. The x axis counts epochs completed: ``iter`` divided by the iterations per epoch, which
the log tells (see :func:`_iters_per_epoch`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.axes import Axes

from fgdistill.errors import DataError
from fgdistill.io import read_jsonl

__all__ = ["CURVES_CAPTION", "CurvesFigure", "RunLog", "plot_curves", "read_log"]

logger = logging.getLogger(__name__)

LOG_NAME = "log.jsonl"
TOTAL = "total loss"
DETECTION = "detection loss"

CURVES_CAPTION = (
    "Training curves read from each run's log.jsonl, one colour per run (labelled by its work "
    "dir). Loss panels: the total loss, the detection loss alone (without FGD's terms, comparable "
    "between distilled and baseline runs) and each loss term against the epoch (faint: every "
    "logged iteration; solid: running mean); the FGD terms are summed over FPN levels. AP "
    "panels: COCO AP (solid) and AP50 (dashed), in percent, at each evaluation."
)


@dataclass
class RunLog:
    """The records of one run's ``log.jsonl``.

    Attributes:
        work_dir: the run's directory.
        name: its label in plots (the directory's name, made unique by the caller).
        train: the ``"type": "train"`` records, in file order.
        eval: the ``"type": "eval"`` records, in file order.
    """

    work_dir: Path
    name: str
    train: list[dict[str, Any]] = field(default_factory=list)
    eval: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class CurvesFigure:
    """What :func:`plot_curves` drew.

    Attributes:
        path: the PNG written.
        size: ``(width, height)`` of the PNG in pixels.
        panels: the panels in reading order: AP panels (``"box AP (%)"``, ``"mask AP (%)"``)
            first, then the loss series by name.
        runs: the run labels, in legend order.
        data: ``{run: {series: (x, y)}}``, the raw points drawn: loss series by term name
            (``"total loss"``, ``"classification"``, ``"fgd/fg"``, ...) and AP series as
            ``"bbox/AP"``, ``"bbox/AP50"``; ``x`` in epochs (or iterations, see ``xlabel``).
        xlabel: ``"epoch"``, or ``"iteration"`` when a log carries no epochs.
        caption: how to read the picture (for reports).
    """

    path: Path
    size: tuple[int, int]
    panels: list[str]
    runs: list[str]
    data: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]] = field(default_factory=dict)
    xlabel: str = "epoch"
    caption: str = CURVES_CAPTION


def read_log(work_dir: str | Path) -> RunLog:
    """Read ``work_dir/log.jsonl`` into a :class:`RunLog`.

    A truncated last line (a run still writing) is skipped with a warning; any other bad line is
    an error.

    Raises:
        DataError: the directory or its log is missing, a line is not a JSON object, or the log
            holds no train or eval record.
    """
    root = Path(work_dir)
    if not root.exists():
        raise DataError(f"work dir {root} does not exist")
    if not root.is_dir():
        raise DataError(f"{root} is not a directory (expected a work dir holding {LOG_NAME})")
    path = root / LOG_NAME
    if not path.is_file():
        runs = sorted(p.parent.name for p in root.glob(f"*/{LOG_NAME}"))
        hint = (
            f"; its sub-directories {', '.join(runs)} have logs: pass those"
            if runs
            else " (is this a work dir written by 'fgdistill train' or 'fgdistill distill'?)"
        )
        raise DataError(f"no training log in {root}: {path} is missing{hint}")
    run = RunLog(work_dir=root, name=root.resolve().name or str(root))
    for record in read_jsonl(path):
        kind = record.get("type")
        if kind == "train":
            run.train.append(record)
        elif kind == "eval":
            run.eval.append(record)
    if not run.train and not run.eval:
        raise DataError(f"{path} holds no train or eval records")
    return run


def _unique_names(runs: Sequence[RunLog]) -> None:
    """Give runs with equal directory names their parent's name as a prefix."""
    names = [r.name for r in runs]
    for run in runs:
        if names.count(run.name) > 1:
            parent = run.work_dir.resolve().parent.name
            run.name = f"{parent}/{run.name}" if parent else run.name
    seen: dict[str, int] = {}
    for run in runs:
        if run.name in seen:
            seen[run.name] += 1
            run.name = f"{run.name} ({seen[run.name]})"
        else:
            seen[run.name] = 1


def _iters_per_epoch(run: RunLog) -> float | None:
    """Iterations per epoch, estimated from the log; ``None`` if it cannot be told.

    Train records carry the global count of completed iterations ``iter`` and the 1-based epoch
    the iteration belongs to, so ``iter / epoch`` never exceeds the epoch length and equals it at
    an epoch's last iteration. An evaluation at an epoch end gives it exactly (``iter / epoch``
    with ``epoch`` counting completed epochs); a final evaluation stopped mid-epoch gives more,
    so the smallest such ratio not below the train records' bound is taken.
    """
    ratios = []
    for rec in run.train:
        if not _is_number(rec.get("iter")) or not _is_number(rec.get("epoch")):
            return None
        it, ep = float(rec["iter"]), float(rec["epoch"])
        if ep > 0:
            ratios.append(it / ep)
    if not ratios:
        return None
    lower = max(ratios)
    exact = [
        float(r["iter"]) / float(r["epoch"])
        for r in run.eval
        if _is_number(r.get("iter")) and _is_number(r.get("epoch")) and float(r["epoch"]) > 0
    ]
    exact = [v for v in exact if v >= lower - 1e-9]
    per_epoch = min(exact) if exact else lower
    return per_epoch if per_epoch > 0 else None


def _to_x(iters: np.ndarray, per_epoch: float | None) -> np.ndarray:
    return iters if per_epoch is None else iters / per_epoch


def _is_number(v: object) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def _loss_series(train: Sequence[dict[str, Any]]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per-term ``(iterations, values)``; FGD terms ``fgd/{level}/{term}`` summed per record."""
    series: dict[str, tuple[list[float], list[float]]] = {}

    def add(name: str, it: float, value: float) -> None:
        xs, ys = series.setdefault(name, ([], []))
        xs.append(it)
        ys.append(value)

    for index, rec in enumerate(train):
        it = float(rec["iter"]) if _is_number(rec.get("iter")) else float(index)
        if _is_number(rec.get("loss")):
            add("total loss", it, float(rec["loss"]))
        grouped: dict[str, float] = {}
        detection = 0.0
        losses = rec.get("losses")
        if isinstance(losses, dict):
            for name, value in losses.items():
                if not _is_number(value):
                    continue
                parts = str(name).split("/")
                key = f"{parts[0]}/{parts[-1]}" if len(parts) == 3 else str(name)
                grouped[key] = grouped.get(key, 0.0) + float(value)
                if not key.startswith("fgd/"):
                    detection += float(value)
            add(DETECTION, it, detection)
        for key in sorted(grouped, key=lambda k: (k.startswith("fgd/"), k)):
            add(key, it, grouped[key])
    return {k: (np.asarray(v[0]), np.asarray(v[1])) for k, v in series.items()}


def _ap_series(
    evals: Sequence[dict[str, Any]],
) -> dict[str, dict[str, tuple[np.ndarray, np.ndarray]]]:
    """``{task: {metric: (iterations, values)}}`` for the AP and AP50 of each task."""
    out: dict[str, dict[str, tuple[list[float], list[float]]]] = {}
    for index, rec in enumerate(evals):
        it = float(rec["iter"]) if _is_number(rec.get("iter")) else float(index)
        metrics = rec.get("metrics")
        if not isinstance(metrics, dict):
            continue
        for task, values in metrics.items():
            if not isinstance(values, dict):
                continue
            for metric in ("AP", "AP50"):
                if _is_number(values.get(metric)):
                    xs, ys = out.setdefault(str(task), {}).setdefault(metric, ([], []))
                    xs.append(it)
                    ys.append(float(values[metric]))
    return {
        t: {m: (np.asarray(v[0]), np.asarray(v[1])) for m, v in ms.items()} for t, ms in out.items()
    }


def _running_mean(y: np.ndarray) -> np.ndarray:
    window = max(1, len(y) // 20)
    if window == 1:
        return y
    kernel = np.ones(window) / window
    padded = np.concatenate([np.full(window - 1, y[0]), y])
    return np.convolve(padded, kernel, mode="valid")


_TASK_TITLES = {"bbox": "box AP (%)", "segm": "mask AP (%)"}


def _loss_title(name: str) -> str:
    if name == DETECTION:
        return "detection loss (all terms but FGD's)"
    if name.startswith("fgd/"):
        return f"{name} (sum over FPN levels)"
    return name


def plot_curves(
    work_dirs: Sequence[str | Path],
    out: str | Path,
    *,
    labels: Sequence[str] | None = None,
    dpi: int = 100,
) -> CurvesFigure:
    """Plot the loss terms and AP of one or several runs side by side into a PNG.

    Args:
        work_dirs: run directories, each holding ``log.jsonl``.
        out: the PNG to write (parent directories are created).
        labels: legend labels, one per work dir; default: the directories' names (with the
            parent's name added where two are equal).
        dpi: resolution; every panel is 4.2 x 3.2 inches.

    Returns:
        A :class:`CurvesFigure` with the path, pixel size and panel titles.

    Raises:
        DataError: no work dir given, a work dir or its log is missing or unreadable, or
            ``labels`` has the wrong length.
    """
    runs = _read_runs(work_dirs, labels)
    per_epoch = [_iters_per_epoch(r) for r in runs]
    losses = [_loss_series(r.train) for r in runs]
    aps = [_ap_series(r.eval) for r in runs]
    loss_names = _loss_panels(losses)
    tasks = _ap_tasks(aps)

    # AP first (the result), then the losses.
    titles = [_TASK_TITLES.get(t, f"{t} AP (%)") for t in tasks] + loss_names
    n = len(titles)
    fig, all_axes = _panel_grid(n, dpi)
    ap_axes, loss_axes = all_axes[: len(tasks)], all_axes[len(tasks) : n]
    xlabel = "epoch" if all(p is not None for p in per_epoch) else "iteration"
    per_epoch_used = per_epoch if xlabel == "epoch" else [None] * len(runs)

    drawn: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]] = {}
    for ax, name in zip(loss_axes, loss_names, strict=True):
        _draw_loss(ax, name, runs, losses, per_epoch_used, xlabel, drawn)
    for ax, task in zip(ap_axes, tasks, strict=True):
        _draw_ap(ax, task, runs, aps, per_epoch_used, xlabel, drawn)
    for ax in all_axes[n:]:
        ax.set_axis_off()
    if loss_axes:
        handles, names = loss_axes[0].get_legend_handles_labels()
        if handles:
            loss_axes[0].legend(handles, names, fontsize=7)
    fig.suptitle("Training curves: " + ", ".join(r.name for r in runs), fontsize=12)

    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    width, height = (round(float(v)) for v in fig.get_size_inches() * dpi)
    plt.close(fig)
    logger.debug("wrote training curves %s", path)
    return CurvesFigure(
        path=path,
        size=(width, height),
        panels=titles,
        runs=[r.name for r in runs],
        data=drawn,
        xlabel=xlabel,
    )


def _read_runs(work_dirs: Sequence[str | Path], labels: Sequence[str] | None) -> list[RunLog]:
    """Each work dir's log, named by ``labels`` or by unique directory names."""
    if not work_dirs:
        raise DataError("plot_curves needs at least one work dir")
    runs = [read_log(d) for d in work_dirs]
    if labels is not None:
        if len(labels) != len(runs):
            raise DataError(f"got {len(labels)} labels for {len(runs)} work dirs")
        for run, label in zip(runs, labels, strict=True):
            run.name = str(label)
    else:
        _unique_names(runs)
    return runs


def _loss_panels(losses: Sequence[dict[str, Any]]) -> list[str]:
    """The loss terms to draw, one panel each: total, detection (with FGD), then the rest."""
    loss_names: list[str] = []
    for series in losses:
        loss_names.extend(k for k in series if k not in loss_names)
    if not any(k.startswith("fgd/") for k in loss_names) and DETECTION in loss_names:
        loss_names.remove(DETECTION)  # without FGD terms it is the total loss again
    order = {TOTAL: 0, DETECTION: 1}
    loss_names.sort(key=lambda k: (order.get(k, 2), k.startswith("fgd/"), k))
    return loss_names


def _ap_tasks(aps: Sequence[dict[str, Any]]) -> list[str]:
    """The evaluated tasks (``bbox``, ``segm``), one AP panel each; ``bbox`` when none."""
    tasks: list[str] = []
    for ap_series in aps:
        tasks.extend(t for t in ap_series if t not in tasks)
    return tasks or ["bbox"]  # an empty AP panel that says there were no evaluations


def _panel_grid(n: int, dpi: int) -> tuple[Any, list[Axes]]:
    """A figure with a fixed grid of at least ``n`` panels of 4.2 x 3.2 inches, and its axes."""
    ncols = min(4, n) if n <= 8 else 5
    nrows = math.ceil(n / ncols)
    panel_w, panel_h = 4.2, 3.2
    width_in, height_in = panel_w * ncols, panel_h * nrows + 0.5
    fig, axes_grid = plt.subplots(
        nrows,
        ncols,
        figsize=(width_in, height_in),
        dpi=dpi,
        squeeze=False,
        gridspec_kw={  # a fixed grid: the same pixel size every time, and fast
            "left": 0.55 / width_in,
            "right": 1 - 0.15 / width_in,
            "top": 1 - 0.75 / height_in,
            "bottom": 0.5 / height_in,
            "wspace": 0.25,
            "hspace": 0.5,
        },
    )
    return fig, list(axes_grid.ravel())


def _colour(r: int) -> Any:
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    return colours[r % len(colours)]


def _draw_loss(
    ax: Axes,
    name: str,
    runs: Sequence[RunLog],
    losses: Sequence[dict[str, Any]],
    per_epoch: Sequence[float | None],
    xlabel: str,
    drawn: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]],
) -> None:
    """One loss term of every run in one panel (raw and running mean); log scale if it spans
    more than a factor 50. What is drawn goes into ``drawn[run][name]``."""
    positive = True
    spread: list[float] = []
    for r, (run, series) in enumerate(zip(runs, losses, strict=True)):
        if name not in series:
            continue
        its, ys = series[name]
        x = _to_x(its, per_epoch[r])
        drawn.setdefault(run.name, {})[name] = (x, ys)
        colour = _colour(r)
        if len(ys) >= 10:
            ax.plot(x, ys, color=colour, alpha=0.25, linewidth=0.8)
            ax.plot(x, _running_mean(ys), color=colour, linewidth=1.6, label=run.name)
        else:
            ax.plot(x, ys, color=colour, linewidth=1.6, marker="o", ms=3, label=run.name)
        positive = positive and bool(np.all(ys > 0))
        spread.extend([float(ys.min()), float(ys.max())])
    if positive and spread and max(spread) / min(spread) > 50:
        ax.set_yscale("log")
        name_shown = f"{_loss_title(name)} (log scale)"
    else:
        name_shown = _loss_title(name)
    ax.set_title(name_shown, fontsize=10)
    ax.set_xlabel(xlabel)
    ax.grid(alpha=0.3)


def _draw_ap(
    ax: Axes,
    task: str,
    runs: Sequence[RunLog],
    aps: Sequence[dict[str, Any]],
    per_epoch: Sequence[float | None],
    xlabel: str,
    drawn: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]],
) -> None:
    """AP (solid) and AP50 (dashed) of one task for every run in one panel; a note when no run
    was evaluated. What is drawn goes into ``drawn[run]["task/metric"]``."""
    drew = False
    for r, (run, run_aps) in enumerate(zip(runs, aps, strict=True)):
        colour = _colour(r)
        for metric, style in (("AP", "-"), ("AP50", "--")):
            if metric not in run_aps.get(task, {}):
                continue
            its, ys = run_aps[task][metric]
            x = _to_x(its, per_epoch[r])
            drawn.setdefault(run.name, {})[f"{task}/{metric}"] = (x, ys)
            ax.plot(
                x,
                ys,
                style,
                color=colour,
                marker="o",
                ms=3,
                linewidth=1.6,
                label=run.name if metric == "AP" else None,
            )
            drew = True
    if not drew:
        ax.text(
            0.5,
            0.5,
            "no evaluation records",
            ha="center",
            va="center",
            color="grey",
            transform=ax.transAxes,
        )
    ax.set_title(_TASK_TITLES.get(task, f"{task} AP (%)") + ": AP solid, AP50 dashed", fontsize=10)
    ax.set_xlabel(xlabel)
    ax.grid(alpha=0.3)
    if drew:
        ax.legend(fontsize=7)
