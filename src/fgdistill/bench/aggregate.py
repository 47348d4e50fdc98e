"""The benchmark's table, computed from its finished stages and written as JSON and Markdown.

Nothing here trains or edits by hand: :func:`write_results` reads the stage records
(:mod:`fgdistill.bench.runner`) and writes ``results.json`` and ``results.md`` from them, on the
validation split and, where the plan has one, on the held-out set, with one renderer for both.
"""

from __future__ import annotations

import math
import os
import platform
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from fgdistill.bench.plan import BenchPlan, Row
from fgdistill.bench.runner import StageRecord, mmss
from fgdistill.evaluation import METRIC_NAMES
from fgdistill.io import atomic_write_text, read_jsonl, write_json

__all__ = ["MASK_METRIC", "METRICS", "conclusions", "machine_line", "render_markdown", "summarise"]

#: The box metrics of the tables.
METRICS: tuple[str, ...] = METRIC_NAMES[:6]
#: The mask metric of the tables, for the rows of detectors scored on masks (Mask R-CNN).
MASK_METRIC = "mask_AP"
Records = Mapping[tuple[str, int | None], StageRecord]


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    vals = [v for v in values if not math.isnan(v)]
    if not vals:
        return math.nan, math.nan
    mean = sum(vals) / len(vals)
    if len(vals) < 2:
        return mean, math.nan
    return mean, math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1))


def _budget(row: Row) -> tuple[int, int, int | None]:
    """Epochs, batch size and iteration cap: rows on other budgets get no share of the gap."""
    cfg = row.config
    return cfg.optim.epochs, cfg.data.batch_size, cfg.max_iters


def summarise(plan: BenchPlan, records: Records, *, heldout: bool = False) -> dict[str, Any]:
    """Per-row mean and spread over seeds, and the gain over the row's baseline.

    The gain and the share of the teacher-baseline gap it closes are paired by seed: taken over
    the seeds the row and its baseline both have. A row on another budget than its baseline
    gets its gain but no share. Rows scored on masks get the same for mask AP
    (``gain_mask_AP``, ``gap_mask_AP``, ``gap_share_mask``; NaN for the others). ``heldout``
    takes the held-out metrics instead of the validation split's.
    """

    def metrics(record: StageRecord) -> dict[str, float]:
        return record.heldout_metrics if heldout else record.metrics

    teachers = {
        fam: {"model": r.model, "metrics": metrics(r), "wall_time_s": r.wall_time_s}
        for (fam, seed), r in records.items()
        if seed is None and metrics(r)
    }
    per_row = {
        row.name: {
            s: metrics(r)
            for s in plan.seeds
            if (r := records.get((row.name, s))) is not None and metrics(r)
        }
        for row in plan.rows
    }
    out_rows: list[dict[str, Any]] = []
    for row in plan.rows:
        per_seed = per_row[row.name]
        if row.diagnostic and not per_seed:
            continue
        walls = [records[(row.name, s)].wall_time_s for s in per_seed]
        entry: dict[str, Any] = {
            "name": row.name,
            "family": row.family,
            "description": row.description,
            "diagnostic": row.diagnostic,
            "model": f"{row.config.model.arch} {row.config.model.backbone}",
            "baseline": row.baseline,
            "teacher": plan.teacher_family(row.family),
            "seeds": sorted(per_seed),
            "per_seed": {str(s): m for s, m in sorted(per_seed.items())},
            "metrics": {
                m: dict(
                    zip(
                        ("mean", "std"),
                        _mean_std([v.get(m, math.nan) for v in per_seed.values()]),
                        strict=True,
                    )
                )
                for m in (*METRICS, MASK_METRIC)
            },
            "wall_time_s": sum(walls) / len(walls) if walls else math.nan,
        }
        paired, gain, gap, share = _gain(plan, row, per_row, teachers, "AP")
        entry.update({"paired_seeds": paired, "gain_AP": gain, "gap_AP": gap, "gap_share": share})
        _, gain, gap, share = _gain(plan, row, per_row, teachers, MASK_METRIC)
        entry.update({"gain_mask_AP": gain, "gap_mask_AP": gap, "gap_share_mask": share})
        out_rows.append(entry)
    return {"teachers": teachers, "rows": out_rows, "compare": plan.compare}


def _gain(
    plan: BenchPlan,
    row: Row,
    per_row: Mapping[str, Mapping[int, Mapping[str, float]]],
    teachers: Mapping[str, Mapping[str, Any]],
    metric: str,
) -> tuple[list[int], float, float, float]:
    """A row's paired seeds, gain in ``metric`` over its baseline, the teacher-baseline gap and
    the share of it closed, over the seeds both have."""
    base = row.baseline
    mine = per_row[row.name]
    theirs = per_row.get(base, {}) if base else {}
    paired = sorted(set(mine) & set(theirs))
    ap = _mean_std([mine[s].get(metric, math.nan) for s in paired])[0]
    base_ap = _mean_std([theirs[s].get(metric, math.nan) for s in paired])[0]
    teacher = teachers.get(plan.teacher_family(row.family), {}).get("metrics", {})
    gap = teacher.get(metric, math.nan) - base_ap
    in_plan = {r.name: r for r in plan.rows}
    same_budget = base not in in_plan or _budget(in_plan[base]) == _budget(row)
    share = (ap - base_ap) / gap if gap > 0 and same_budget else math.nan
    return paired, ap - base_ap, gap, share


def conclusions(summary: Mapping[str, Any]) -> list[str]:
    """Plain sentences computed from a summary: each gap, each gain, each compared group; for
    rows scored on masks, their mask AP too."""
    rows = {r["name"]: r for r in summary["rows"] if r["seeds"]}
    out: list[str] = []

    def stat(name: str, metric: str = "AP") -> tuple[float, float]:
        value = rows[name]["metrics"].get(metric, {"mean": math.nan, "std": math.nan})
        return value["mean"], value["std"]

    def has_masks(name: str) -> bool:
        return not math.isnan(stat(name, MASK_METRIC)[0])

    for fam, teacher in summary["teachers"].items():
        bases = dict.fromkeys(r["baseline"] for r in rows.values() if r["family"] == fam)
        for base in (b for b in bases if b in rows):
            for metric, label in (("AP", "AP"), (MASK_METRIC, "mask AP")):
                if metric == MASK_METRIC and not has_masks(base):
                    continue
                t_ap, b_ap = teacher["metrics"].get(metric, math.nan), stat(base, metric)[0]
                out.append(
                    f"{fam}: teacher {t_ap:.2f} vs {base} {b_ap:.2f} {label} "
                    f"(gap {t_ap - b_ap:+.2f})."
                )
    for row in rows.values():
        base = row["baseline"]
        if base is None or base not in rows:
            continue
        if not row["paired_seeds"]:
            out.append(f"{row['family']} {row['name']}: no seed in common with {base}.")
            continue
        measures = [("AP", "AP", "gain_AP", "gap_share")]
        if has_masks(row["name"]):
            measures.append((MASK_METRIC, "mask AP", "gain_mask_AP", "gap_share_mask"))
        for metric, label, gain_key, share_key in measures:
            spread = (stat(base, metric)[1], stat(row["name"], metric)[1])
            noise = max((s for s in spread if not math.isnan(s)), default=0.0)
            gain = row[gain_key]
            beyond = (
                "one seed, spread unknown"
                if not noise
                else "beyond twice the seed spread"
                if abs(gain) > 2 * noise
                else "within twice the seed spread"
            )
            share = row[share_key]
            share_text = "" if math.isnan(share) else f", {100 * share:.1f}% of the gap"
            out.append(
                f"{row['family']} {row['name']}: {stat(row['name'], metric)[0]:.2f} {label}, "
                f"{gain:+.2f} over {base} on seeds {row['paired_seeds']}{share_text} ({beyond})."
            )
    for group, names in (summary.get("compare") or {}).items():
        if all(n in rows for n in names):
            seeds = {tuple(rows[n]["seeds"]) for n in names}
            note = "" if len(seeds) == 1 else " (means over different seeds)"
            metrics = [("AP", "")] + ([(MASK_METRIC, " (mask AP)")] if has_masks(names[0]) else [])
            for metric, label in metrics:
                means = {n: stat(n, metric)[0] for n in names}
                order = sorted(names, key=means.__getitem__, reverse=True)
                text = " > ".join(f"{n} {means[n]:.2f}" for n in order)
                out.append(f"{group}{label}: {text}{note}.")
    return out


def machine_line() -> str:
    """CPU model, torch's CPU kernels, cores and threads: CPU training repeats to the last digit
    on one kind of CPU only, so results say which."""
    import torch

    cpu = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text(errors="replace").splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and value.strip():
                cpu = value.strip()
                break
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return (
        f"{platform.machine()}, {cpu} (torch CPU kernels "
        f"{torch.backends.cpu.get_cpu_capability()}), {cores or 1} CPU(s), "
        f"torch threads {torch.get_num_threads()}"
    )


def _loss_magnitudes(plan: BenchPlan, work: Path) -> dict[str, Any]:
    """First and last logged losses of each distilled row's first seed: detection terms summed,
    distillation terms per level."""
    out: dict[str, Any] = {}
    for row in plan.rows:
        log = work / f"seed{plan.seeds[0]}" / row.name / "log.jsonl"
        if row.config.distill is None or not log.is_file():
            continue
        train = [r for r in read_jsonl(log) if r.get("type") == "train" and "losses" in r]
        if not train:
            continue
        out[row.name] = {}
        for label, rec in (("first", train[0]), ("last", train[-1])):
            levels: dict[str, float] = {}
            detection = 0.0
            for key, value in rec["losses"].items():
                if key.startswith("fgd/"):
                    level = key.split("/")[1]
                    levels[level] = levels.get(level, 0.0) + float(value)
                else:
                    detection += float(value)
            out[row.name][label] = {
                "iter": rec.get("iter"),
                "detection": detection,
                "distill": levels,
            }
    return out


def write_results(
    plan: BenchPlan, records: Records, work: Path, *, command: str, wall_s: float
) -> dict[str, Any]:
    """Write ``work/results.json`` and ``work/results.md`` from the finished stages."""
    counted = [
        r for r in plan.rows if not r.diagnostic or any((r.name, s) in records for s in plan.seeds)
    ]
    complete = all((plan.teacher_family(r.family), None) in records for r in counted) and all(
        (r.name, s) in records for r in counted for s in plan.seeds
    )
    data = summarise(plan, records)
    data["conclusions"] = conclusions(data)
    data.update(
        {
            "command": command,
            "machine": machine_line(),
            "date": datetime.now(UTC).isoformat(timespec="seconds"),
            "seeds": plan.seeds,
            "status": "complete" if complete else "partial",
            "wall_time_s": wall_s,
            "synth": asdict(plan.synth),
            "loss_magnitudes": _loss_magnitudes(plan, work),
        }
    )
    if plan.heldout.images > 0:
        held = summarise(plan, records, heldout=True)
        held["conclusions"] = conclusions(held)
        data["heldout"] = {**asdict(plan.heldout), **held}
    write_json(work / "results.json", data)
    atomic_write_text(work / "results.md", render_markdown(data))
    return data


def _cell(stat: Mapping[str, float]) -> str:
    mean, std = stat["mean"], stat["std"]
    if math.isnan(mean):
        return "n/a"
    return f"{mean:.2f}" if math.isnan(std) else f"{mean:.2f} ± {std:.2f}"


def _share(value: float) -> str:
    return "" if math.isnan(value) else f"{100 * value:.0f}%"


def _table(summary: Mapping[str, Any], diagnostic: bool) -> list[str]:
    rows = [r for r in summary["rows"] if r["diagnostic"] == diagnostic]
    masks = any(not math.isnan(r["metrics"][MASK_METRIC]["mean"]) for r in rows)
    mask_head = " mask AP | mask gain | mask gap closed |" if masks else ""
    lines = [
        "| row | model | seeds | " + " | ".join(METRICS) + " | gain AP | gap closed |"
        f"{mask_head} wall/seed |",
        "|---|---|---|" + "---:|" * (len(METRICS) + 3 + 3 * masks),
    ]
    if not diagnostic:
        for fam, t in summary["teachers"].items():
            known = {
                m: _cell({"mean": t["metrics"].get(m, math.nan), "std": math.nan})
                for m in (*METRICS, MASK_METRIC)
            }
            lines.append(
                f"| teacher ({fam}) | {t['model']} | 1 | "
                + " | ".join(known[m] for m in METRICS)
                + " | | |"
                + (f" {known[MASK_METRIC]} | | |" if masks else "")
                + f" {mmss(t['wall_time_s'])} |"
            )
    for row in rows:
        cells = [_cell(row["metrics"][m]) for m in METRICS]
        no_base = row["baseline"] is None
        gain = "" if no_base else _cell({"mean": row["gain_AP"], "std": math.nan})
        mask = ""
        if masks:
            mask_gain = "" if no_base else _cell({"mean": row["gain_mask_AP"], "std": math.nan})
            mask = (
                f" {_cell(row['metrics'][MASK_METRIC])} | {mask_gain} | "
                f"{_share(row['gap_share_mask'])} |"
            )
        lines.append(
            f"| {row['name']} | {row['model']} | {len(row['seeds'])} | "
            + " | ".join(cells)
            + f" | {gain} | {_share(row['gap_share'])} |{mask} "
            + f"{mmss(row['wall_time_s']) if row['seeds'] else 'not run'} |"
        )
    return lines


def _section(summary: Mapping[str, Any], title: str) -> list[str]:
    lines = [f"## {title}", "", *_table(summary, diagnostic=False)]
    if any(r["diagnostic"] for r in summary["rows"]):
        lines += ["", "Diagnostic rows:", "", *_table(summary, diagnostic=True)]
    return [*lines, "", "Conclusions:", "", *(f"- {c}" for c in summary["conclusions"]), ""]


def render_markdown(data: Mapping[str, Any]) -> str:
    """The results page of a work dir: how it was made, the tables, conclusions, loss terms."""
    synth = data["synth"]
    lines = [
        "# Quality benchmark: FGD ablations on synthetic data",
        "",
        "Generated by `fgdistill bench` from the stage folders of its work dir. COCO box metrics",
        "in percent, mean ± sample standard deviation over seeds; gains and shares of the",
        "teacher-baseline gap are paired by seed.",
        "",
        f"- command: `{data['command']}`",
        f"- machine: {data['machine']}",
        f"- date: {data['date']}",
        f"- seeds: {data['seeds']}; status: {data['status']}",
        f"- wall time of this invocation: {mmss(data['wall_time_s'])} (reused stages count their"
        " own time in the table)",
        "",
        *_section(data, f"Validation split ({synth['num_val']} images, seed {synth['seed']})"),
    ]
    if data.get("heldout"):
        held = data["heldout"]
        lines += _section(held, f"Held-out set ({held['images']} images, seed {held['seed']})")
    lines += ["Rows:", ""]
    lines += [f"- `{r['name']}` ({r['family']}): {r['description']}" for r in data["rows"]]
    mags = data.get("loss_magnitudes") or {}
    if mags:
        lines += [
            "",
            "## Loss magnitudes (first seed; weighted terms as trained, first and last log)",
            "",
            "| row | iter | detection | distillation terms summed per level |",
            "|---|---:|---:|---|",
        ]
        for name, mag in mags.items():
            for rec in (mag["first"], mag["last"]):
                text = ", ".join(f"{lv} {v:.3g}" for lv, v in rec["distill"].items())
                lines.append(f"| {name} | {rec['iter']} | {rec['detection']:.3f} | {text} |")
    return "\n".join(lines) + "\n"
