"""Score the quality benchmark's trained models on a held-out synthetic set nobody tuned on.

``fgdistill bench quality`` reports AP on its validation split (200 images), the split its
options were chosen on. This script evaluates the stages the benchmark already trained (the
teacher and every finished row of every seed, in one or more work dirs) on a second synthetic
set drawn with another seed, and prints, per row: AP and AP50 on the held-out set (mean ±
sample standard deviation over seeds), the row's validation AP over the same seeds, and its
gain over the baseline and share of the teacher-baseline gap on the held-out set, paired by
seed. Nothing is trained.

Run (after the benchmark has trained its rows)::

    python benchmarks/heldout_eval.py --work-dir work_dirs/bench_quality \\
        --out work_dirs/heldout_eval --teacher teacher_reppoints \\
        --baseline reppoints_baseline_8ep --rows-like 'reppoints_*8ep'

The held-out set is written to ``OUT/data`` on the first run (``--num-val`` images of the
benchmark's size and difficulty, ``--data-seed`` 7; the benchmark draws its data with seed 0,
and every image's generator is seeded by (seed, split, index), so the two sets share no image).
Each evaluation is cached as ``OUT/seedS/ROW/eval_metrics.json`` (``OUT/TEACHER/`` for the
teacher) and reused; ``--force`` redoes them. With several work dirs, the first holding a
(seed, row) stage is used.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import math
import statistics
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from fgdistill.data.synth import generate_synthetic
from fgdistill.engine.config import load_config
from fgdistill.engine.runner import evaluate_checkpoint
from fgdistill.engine.stages import machine_line


def _checkpoint(stage: Path) -> Path | None:
    """The finished stage's weights (``student.pt`` of a distilled row, else ``model.pt``)."""
    try:
        done = json.loads((stage / "stage.json").read_text()).get("complete", False)
    except (OSError, ValueError):
        return None
    if not done:
        return None
    for name in ("student.pt", "model.pt"):
        if (stage / name).is_file():
            return stage / name
    return None


def _metrics(path: Path) -> dict[str, float]:
    return dict(json.loads(path.read_text())["metrics"]["bbox"])


def _evaluate(stage: Path, ckpt: Path, data: Path, out: Path, force: bool) -> dict[str, float]:
    """Held-out box metrics of one stage, from the cache or measured now."""
    cached = out / "eval_metrics.json"
    if cached.is_file() and not force:
        return _metrics(cached)
    cfg = load_config(stage / "config.yaml", [f"data.root={data}", f"work_dir={out}"])
    print(f"evaluating {ckpt} on {data}", flush=True)
    return dict(evaluate_checkpoint(cfg, ckpt, progress=False)["bbox"])


def _mean_sd(values: list[float]) -> str:
    if not values:
        return "n/a"
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def main(argv: list[str] | None = None) -> int:
    """Evaluate, print the table, optionally write it as JSON; returns the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work-dir", action="append", required=True, type=Path)
    parser.add_argument("--out", required=True, type=Path, help="held-out data and caches")
    parser.add_argument("--teacher", default="teacher_reppoints", help="teacher stage folder")
    parser.add_argument("--baseline", default="reppoints_baseline_8ep", help="baseline row")
    parser.add_argument("--rows-like", default="*", help="glob of the row names to score")
    parser.add_argument("--num-val", type=int, default=1000)
    parser.add_argument("--data-seed", type=int, default=7)
    parser.add_argument("--image-size", type=int, default=96)
    parser.add_argument("--difficulty", type=float, default=0.0)
    parser.add_argument("--json", type=Path, help="also write the table here")
    parser.add_argument("--force", action="store_true", help="re-evaluate cached stages")
    args = parser.parse_args(argv)

    data = args.out.resolve() / "data"
    if not (data / "annotations" / "instances_val.json").is_file():
        generate_synthetic(
            data,
            num_train=0,
            num_val=args.num_val,
            image_size=args.image_size,
            seed=args.data_seed,
            difficulty=args.difficulty,
        )
    found = [(w / args.teacher, _checkpoint(w / args.teacher)) for w in args.work_dir]
    teacher_stage, teacher_ckpt = next(((s, c) for s, c in found if c), (None, None))
    if teacher_stage is None or teacher_ckpt is None:
        print(f"error: no finished {args.teacher} in {[str(w) for w in args.work_dir]}")
        return 2
    teacher = _evaluate(teacher_stage, teacher_ckpt, data, args.out / args.teacher, args.force)

    # (row, seed) -> (held-out metrics, validation AP)
    scores: dict[str, dict[int, tuple[dict[str, float], float]]] = {}
    for work_dir in args.work_dir:
        for stage in sorted(work_dir.glob("seed*/*")):
            row, seed = stage.name, int(stage.parent.name.removeprefix("seed"))
            if not fnmatch.fnmatch(row, args.rows_like) or seed in scores.get(row, {}):
                continue
            ckpt = _checkpoint(stage)
            if ckpt is None:
                continue
            held = _evaluate(stage, ckpt, data, args.out / f"seed{seed}" / row, args.force)
            val_file = stage / "metrics.json"
            val = _metrics(val_file)["AP"] if val_file.is_file() else math.nan
            scores.setdefault(row, {})[seed] = (held, val)
    base = scores.get(args.baseline, {})
    if not base:
        print(f"error: no finished {args.baseline} row in the work dirs")
        return 2

    t_ap = teacher["AP"]
    print(f"\nheld-out set: {data} ({args.num_val} images, seed {args.data_seed})")
    print(f"machine: {machine_line()}, torch {torch.__version__}")
    print(f"date: {datetime.now(UTC).isoformat(timespec='seconds')}")
    print(f"command: python {' '.join(sys.argv)}\n")
    print("| row | seeds | held-out AP | held-out AP50 | val AP | gain AP | gap closed |")
    print("|---|---|---:|---:|---:|---:|---:|")
    print(f"| teacher | 1 | {t_ap:.2f} | {teacher['AP50']:.2f} | | | |")
    table: list[dict[str, Any]] = []
    for row in sorted(scores, key=lambda r: (r != args.baseline, r)):
        by_seed = scores[row]
        seeds = sorted(by_seed)
        paired = [s for s in seeds if s in base]
        gains = [by_seed[s][0]["AP"] - base[s][0]["AP"] for s in paired]
        gaps = [t_ap - base[s][0]["AP"] for s in paired]
        gain = statistics.mean(gains) if gains else math.nan
        share = gain / statistics.mean(gaps) if gains else math.nan
        entry: dict[str, Any] = {
            "row": row,
            "seeds": seeds,
            "paired_seeds": paired,
            "heldout_AP": [by_seed[s][0]["AP"] for s in seeds],
            "heldout_AP50": [by_seed[s][0]["AP50"] for s in seeds],
            "val_AP": [by_seed[s][1] for s in seeds],
            "gain_AP": gain,
            "gap_closed": share,
        }
        table.append(entry)
        gain_text = "" if row == args.baseline or not gains else f"{gain:+.2f}"
        share_text = "" if row == args.baseline or not gains else f"{100 * share:.0f}%"
        print(
            f"| {row} | {','.join(map(str, seeds))} | {_mean_sd(entry['heldout_AP'])} | "
            f"{_mean_sd(entry['heldout_AP50'])} | {_mean_sd(entry['val_AP'])} | "
            f"{gain_text} | {share_text} |"
        )
    print(
        "\ngain and gap closed: over the baseline on the seeds both have (paired), "
        f"against the teacher's held-out AP {t_ap:.2f}"
    )
    if args.json:
        args.json.write_text(
            json.dumps({"teacher": teacher, "data": str(data), "rows": table}, indent=2) + "\n"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
