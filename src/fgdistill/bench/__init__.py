"""Experiments beside the library: benchmarks that train and compare detectors.

A benchmark is a YAML plan (:mod:`~fgdistill.bench.plan`), a loop that runs its stages, each a
folder that is its own record (:mod:`~fgdistill.bench.runner`), and an aggregate that writes
the table from those folders (:mod:`~fgdistill.bench.aggregate`). ``fgdistill demo`` and
``fgdistill bench quality`` are two plans on this code.
"""

from __future__ import annotations

import shlex
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from fgdistill.bench.aggregate import render_markdown, write_results
from fgdistill.bench.plan import BenchPlan, load_plan
from fgdistill.bench.report import write_report

__all__ = ["BenchPlan", "load_plan", "render_markdown", "run_benchmark"]


def run_benchmark(
    config: str | Path,
    work_dir: str | Path,
    *,
    overrides: Sequence[str] = (),
    quick: bool = False,
    seeds: Sequence[int] | None = None,
    rows: Sequence[str] | None = None,
    diagnostics: bool = False,
    jobs: int = 1,
    report_only: bool = False,
    report: bool = True,
    progress: bool = True,
    train_fn: Callable[..., Any] | None = None,
    say: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Run (or reuse) every stage of a benchmark config and write its results in ``work_dir``.

    Writes ``results.json``, ``results.md`` and, with ``report``, ``report.html``. With
    ``report_only`` nothing trains: the table covers the stages finished so far, diagnostic rows
    included. Returns the contents of ``results.json``.
    """
    from fgdistill.bench.runner import run_bench

    start = time.perf_counter()
    plan = load_plan(
        config,
        overrides,
        quick=quick,
        seeds=seeds,
        rows=rows,
        diagnostics=diagnostics or report_only,
    )
    if rows is not None:
        added = [r.name for r in plan.rows if r.name not in set(rows)]
        if added:
            say(f"also running {', '.join(added)}: the baseline(s) of the chosen rows")
    work = Path(work_dir)
    records = run_bench(
        plan,
        work,
        train_fn=train_fn,
        jobs=jobs,
        progress=progress,
        say=say,
        report_only=report_only,
    )
    command = " ".join(shlex.quote(a) for a in ["fgdistill", *sys.argv[1:]])
    data = write_results(plan, records, work, command=command, wall_s=time.perf_counter() - start)
    if report:
        data["report"] = str(write_report(plan, data, work) or "")
    return data
