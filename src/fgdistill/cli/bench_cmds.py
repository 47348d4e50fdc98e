"""Command ``bench quality``: the FGD ablation table on synthetic data."""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any

from fgdistill.cli.train_cmds import resolve_config_path

__all__ = ["register"]


def register(subparsers: Any) -> None:
    """Add ``bench`` and its sub-commands to the top-level parser."""
    bench = subparsers.add_parser(
        "bench", help="benchmarks", description="Benchmarks that train and measure detectors."
    )
    sub = bench.add_subparsers(dest="bench_command", metavar="BENCHMARK")
    q = sub.add_parser(
        "quality",
        help="teacher, baseline, feature imitation and FGD ablations on synthetic data",
        description=(
            "Train a teacher once (cached), then the same student as baseline, with plain "
            "feature imitation and with FGD's ablations, for each seed; write a table of COCO "
            "metrics (mean and spread over seeds) and report.html. Re-runs reuse finished rows."
        ),
    )
    q.add_argument(
        "--config",
        default="bench/quality",
        help="benchmark YAML or packaged config name (default: bench/quality)",
    )
    q.add_argument("--quick", action="store_true", help="the config's small smoke-sized run")
    q.add_argument("--seeds", type=int, nargs="+", default=None, help="student seeds")
    q.add_argument(
        "--rows",
        nargs="+",
        default=None,
        help=(
            "run only these rows (names, from the table or the diagnostics), with the baseline "
            "each one's gain is measured against"
        ),
    )
    q.add_argument(
        "--jobs",
        type=int,
        default=1,
        help=(
            "train up to this many student runs at once, each in its own process with the "
            "threads divided between them (default 1)"
        ),
    )
    q.add_argument(
        "--diagnostics",
        action="store_true",
        help="also run the config's diagnostic rows (off: only the table's rows)",
    )
    q.add_argument(
        "--results",
        type=Path,
        default=None,
        help="also write the Markdown table here (and a .json beside it), e.g. docs/results.md; "
        "text below the notes marker of an existing file is kept",
    )
    q.add_argument("--no-report", action="store_true", help="skip report.html and its pictures")
    q.add_argument(
        "--report-only",
        action="store_true",
        help=(
            "train nothing: write the results of the runs already finished in the work dir "
            "(and score them on the config's held-out set, where they are not scored yet)"
        ),
    )
    q.add_argument(
        "--merge",
        dest="merge_from",
        type=Path,
        action="append",
        default=[],
        metavar="RESULTS_JSON",
        help=(
            "fill in the results this work dir lacks from an earlier results JSON of this "
            "benchmark (e.g. docs/results.json, whose work dir is on another machine): taken "
            "where its fingerprints match and, for distilled rows, its teacher's metrics equal "
            "the teacher they are measured against; in files without fingerprints by the "
            "teacher's metrics alone; repeatable"
        ),
    )
    q.add_argument(
        "--work-dir",
        type=Path,
        default=None,
        help="default: work_dirs/bench_quality (work_dirs/bench_quality_quick with --quick)",
    )
    q.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. --set families.retinanet.teacher.optim.epochs=24",
    )
    q.add_argument("--no-progress", action="store_true", help="hide progress bars")
    q.set_defaults(func=_cmd_quality)
    bench.set_defaults(func=lambda args: _missing(bench))


def _missing(parser: argparse.ArgumentParser) -> int:
    parser.print_help()
    return 2


def _cmd_quality(args: argparse.Namespace) -> int:
    from fgdistill.engine.bench import METRICS, run_quality_bench

    default = "work_dirs/bench_quality_quick" if args.quick else "work_dirs/bench_quality"
    work = Path(args.work_dir or default)
    data = run_quality_bench(
        work,
        config=resolve_config_path(args.config),
        overrides=args.overrides,
        quick=args.quick,
        seeds=args.seeds,
        rows=args.rows,
        results_file=args.results,
        progress=not args.no_progress,
        say=lambda line: print(line, flush=True),
        report_only=args.report_only,
        diagnostics=args.diagnostics,
        jobs=args.jobs,
        merge_from=args.merge_from,
    )
    from fgdistill.engine.bench import render_markdown

    print()
    print(render_markdown(data).split("\n## Loss magnitudes")[0])
    report = None
    if not args.no_report:
        report = _report(work, data, METRICS)
    print(f"outputs in {work}/: results.json, results.md" + (f", {report.name}" if report else ""))
    if args.results:
        print(f"results also written to {args.results} and {args.results.with_suffix('.json')}")
    return 0


def _two(value: float, *, sign: bool = False) -> str:
    """``value`` with two decimals (``n/a`` for NaN), e.g. ``+0.66`` with ``sign``."""
    if math.isnan(value):
        return "n/a"
    return f"{value:+.2f}" if sign else f"{value:.2f}"


def _report(work: Path, data: dict[str, Any], metrics: tuple[str, ...]) -> Path | None:
    from fgdistill.viz.demo_report import write_demo_report

    rows = {r["name"]: r for r in data["rows"] if r["seeds"]}
    compare = data.get("compare") or {}
    # The pictures follow the first full-FGD row of the config's comparisons that has results.
    picked = [
        (full, list(imitations))
        for full, imitations in compare.get("full_fgd", [])
        if full in rows
        and rows[full]["baseline"] in rows
        and rows[full]["family"] in data["teachers"]
    ]
    if not picked:
        return None
    full, imitations = picked[0]
    family, base = rows[full]["family"], rows[full]["baseline"]
    split = [t[3] for t in compare.get("table1", []) if rows.get(t[3], {}).get("baseline") == base]
    # The pictures need the models on disk: a seed trained in this work dir, not imported.
    local = [
        s
        for s in rows[full]["seeds"]
        if s in rows[base]["seeds"]
        and str(s) not in (rows[full].get("imported") or {})
        and str(s) not in (rows[base].get("imported") or {})
    ]
    if not local or data["teachers"][family].get("imported_from"):
        print("report.html skipped: its runs were imported, their models are not in this work dir")
        return None
    seed = local[0]
    table: list[dict[str, object]] = []
    for fam, t in data["teachers"].items():
        values = {m: _two(t["metrics"].get(m, math.nan)) for m in metrics}
        table.append({"run": f"teacher ({fam})", "model": t["model"], **values, "gain AP": ""})
    for r in data["rows"]:
        if not r["seeds"]:
            continue
        cells: dict[str, object] = {"run": r["name"], "model": r["model"]}
        for m in metrics:
            mean, std = r["metrics"][m]["mean"], r["metrics"][m]["std"]
            cells[m] = (
                "n/a"
                if math.isnan(mean)
                else f"{mean:.2f}"
                if math.isnan(std)
                else f"{mean:.2f} ± {std:.2f}"
            )
        # "*": over the seeds the row shares with its baseline only (results.md says which)
        cells["gain AP"] = _two(r["gain_AP"], sign=True) + (" *" if r.get("unpaired") else "")
        table.append(cells)
    seed_dir = work / f"seed{seed}"
    curve_runs = [seed_dir / n for n in (base, *imitations[:1], *split[:1], full)]
    return write_demo_report(
        work,
        rows=table,
        notes=data["conclusions"],
        runs={
            "teacher": work / f"teacher_{family}",
            "baseline": seed_dir / base,
            "fgd": seed_dir / full,
        },
        curve_runs=[r for r in curve_runs if r.is_dir()],
        title="fgdistill quality benchmark: FGD ablations on synthetic data",
        table_title="COCO box metrics, mean ± spread over seeds (percent)",
    )
