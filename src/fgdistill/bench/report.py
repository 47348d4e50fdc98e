"""``report.html`` of a benchmark work dir: the table beside pictures of one distilled row.

The pictured row is the first row of the first ``compare`` group that is distilled, else the
plan's first distilled row; it is drawn for the first seed on which it and its baseline both
finished, against its family's teacher.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fgdistill.bench.aggregate import MASK_METRIC, METRICS
from fgdistill.bench.plan import BenchPlan

__all__ = ["write_report"]


def _pictured(plan: BenchPlan, data: Mapping[str, Any]) -> tuple[str, int] | None:
    """The row to picture and its seed, or ``None`` when no distilled row can be drawn."""
    seeds = {r["name"]: set(r["seeds"]) for r in data["rows"]}
    grouped = [n for names in plan.compare.values() for n in names]
    candidates = [*grouped, *(r.name for r in plan.rows)]
    for name in candidates:
        row = plan.row(name) if name in seeds else None
        teacher = plan.teacher_family(row.family) if row else ""
        if row is None or row.config.distill is None or teacher not in data["teachers"]:
            continue
        common = sorted(seeds[name] & seeds.get(row.baseline or "", set()))
        if common:
            return name, common[0]
    return None


def _table(data: Mapping[str, Any]) -> list[dict[str, object]]:
    def cell(stat: Mapping[str, float]) -> str:
        mean, std = stat["mean"], stat["std"]
        if math.isnan(mean):
            return "n/a"
        return f"{mean:.2f}" if math.isnan(std) else f"{mean:.2f} ± {std:.2f}"

    # Mask R-CNN rows add their mask AP
    shown = list(METRICS)
    if any(not math.isnan(r["metrics"][MASK_METRIC]["mean"]) for r in data["rows"] if r["seeds"]):
        shown.append(MASK_METRIC)
    table: list[dict[str, object]] = []
    for fam, t in data["teachers"].items():
        values = {m: cell({"mean": t["metrics"].get(m, math.nan), "std": math.nan}) for m in shown}
        table.append({"run": f"teacher ({fam})", "model": t["model"], **values, "gain AP": ""})
    for r in data["rows"]:
        if r["seeds"]:
            gain = "" if r["baseline"] is None else f"{r['gain_AP']:+.2f}"
            values = {m: cell(r["metrics"][m]) for m in shown}
            table.append({"run": r["name"], "model": r["model"], **values, "gain AP": gain})
    return table


def write_report(plan: BenchPlan, data: Mapping[str, Any], work: Path) -> Path | None:
    """Draw ``work/report.html`` from a finished benchmark; ``None`` when nothing distilled
    finished beside its baseline."""
    from fgdistill.models import load_detector
    from fgdistill.viz.bench_report import write_bench_report

    picked = _pictured(plan, data)
    if picked is None:
        return None
    name, seed = picked
    row = plan.row(name)
    assert row.baseline is not None and row.config.distill is not None
    group = next((g for g in plan.compare.values() if name in g), [name])
    seed_dir = work / f"seed{seed}"
    return write_bench_report(
        work,
        rows=_table(data),
        notes=data["conclusions"],
        teacher=load_detector(work / f"teacher_{plan.teacher_family(row.family)}" / "model.pt"),
        student=load_detector(seed_dir / name / "student.pt"),
        baseline=load_detector(seed_dir / row.baseline / "model.pt"),
        data_dir=work / "data",
        curve_runs=[seed_dir / n for n in dict.fromkeys([row.baseline, *group[:3], name])],
        levels=row.config.distill.levels,
        title=f"fgdistill: {row.baseline}, {name} and the teacher on synthetic data",
        table_title="COCO box metrics on the validation split, mean ± spread over seeds (percent)",
    )
