"""Commands ``demo`` and ``bench quality``: benchmark plans run on synthetic data."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from fgdistill.cli.train_cmds import add_common_options, resolve_config_path

__all__ = ["register"]


def _common(p: argparse.ArgumentParser, config: str, work_dir: str) -> None:
    p.add_argument(
        "--config", default=config, help=f"YAML file or packaged name (default: {config})"
    )
    add_common_options(
        p,
        work_dir_help=f"default: {work_dir}",
        set_example="families.retinanet.teacher.optim.epochs=24",
    )
    p.add_argument("--no-report", action="store_true", help="skip report.html and its pictures")


def register(subparsers: Any) -> None:
    """Add ``demo`` and ``bench`` (with its sub-command ``quality``) to the top-level parser."""
    demo = subparsers.add_parser(
        "demo",
        help="the whole story on synthetic data: teacher, baseline, FGD student, table",
        description=(
            "Generate synthetic data, train a teacher, a baseline student and the same student "
            "distilled with FGD, evaluate each and print the table. Re-runs reuse finished runs."
        ),
    )
    _common(demo, "demo/demo", "work_dirs/demo")
    demo.set_defaults(func=_cmd_demo)

    bench = subparsers.add_parser(
        "bench", help="benchmarks", description="Benchmarks that train and measure detectors."
    )
    sub = bench.add_subparsers(dest="bench_command", metavar="BENCHMARK")
    q = sub.add_parser(
        "quality",
        help="teacher, baseline, feature imitation and FGD ablations on synthetic data",
        description=(
            "Train a teacher per family once, then the same student as every row of the config "
            "for each seed; write a table of COCO metrics (mean and spread over seeds) on the "
            "validation split and a held-out set, and report.html. Re-runs reuse finished stages."
        ),
    )
    _common(q, "bench/quality", "work_dirs/bench_quality (bench_quality_quick with --quick)")
    q.add_argument("--quick", action="store_true", help="the config's small smoke-sized run")
    q.add_argument("--seeds", type=int, nargs="+", default=None, help="student seeds")
    q.add_argument(
        "--rows",
        nargs="+",
        default=None,
        help="run only these rows (from the table or the diagnostics), with their baselines",
    )
    q.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="train up to this many students at once, in worker processes sharing the threads",
    )
    q.add_argument(
        "--diagnostics", action="store_true", help="also run the config's diagnostic rows"
    )
    q.add_argument(
        "--report-only",
        action="store_true",
        help="train nothing: write the table of the stages already finished in the work dir",
    )
    q.set_defaults(func=_cmd_quality)

    sp = sub.add_parser(
        "speed",
        help="parameters, GFLOPs and latency of a config's teacher and student",
        description=(
            "Build the teacher (distill.teacher) and the student (model) of a distillation "
            "config with random weights, export each to TorchScript and ONNX, and print their "
            "parameters, GFLOPs and median latency per image in each runtime on this machine."
        ),
    )
    sp.add_argument("config", help="a distillation config (YAML file or packaged name)")
    sp.add_argument(
        "--size",
        dest="sizes",
        type=int,
        nargs=2,
        action="append",
        metavar=("MIN", "MAX"),
        help="min_size and max_size of the image (repeatable; default: the config's and 96 96)",
    )
    sp.add_argument("--repeats", type=int, default=5, help="timed rounds, median reported (5)")
    sp.add_argument(
        "--runtimes",
        nargs="+",
        default=["eager", "torchscript", "onnxruntime"],
        choices=["eager", "torchscript", "onnxruntime"],
        help="what to time (default: all three)",
    )
    sp.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. --set model.backbone=resnet18",
    )
    sp.set_defaults(func=_cmd_speed)
    bench.set_defaults(func=lambda args: _missing(bench))


def _missing(parser: argparse.ArgumentParser) -> int:
    parser.print_help()
    return 2


def _run(args: argparse.Namespace, work: Path, **options: Any) -> int:
    from fgdistill.bench import render_markdown, run_benchmark

    data = run_benchmark(
        resolve_config_path(args.config),
        work,
        overrides=args.overrides,
        report=not args.no_report,
        progress=not args.no_progress,
        say=lambda line: print(line, flush=True),
        **options,
    )
    print()
    print(render_markdown(data).split("\nRows:")[0].rstrip())
    files = ["results.json", "results.md"] + (["report.html"] if data.get("report") else [])
    print(f"\noutputs in {work}/: {', '.join(files)}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    return _run(args, args.work_dir or Path("work_dirs/demo"))


def _cmd_quality(args: argparse.Namespace) -> int:
    default = "work_dirs/bench_quality_quick" if args.quick else "work_dirs/bench_quality"
    return _run(
        args,
        Path(args.work_dir or default),
        quick=args.quick,
        seeds=args.seeds,
        rows=args.rows,
        diagnostics=args.diagnostics,
        jobs=args.jobs,
        report_only=args.report_only,
    )


def _cmd_speed(args: argparse.Namespace) -> int:
    import datetime

    import torch

    from fgdistill.bench.aggregate import machine_line
    from fgdistill.bench.speed import measure_speed, render_speed
    from fgdistill.engine.config import load_config
    from fgdistill.errors import ConfigError

    cfg = load_config(resolve_config_path(args.config), args.overrides)
    if cfg.distill is None:
        raise ConfigError(f"{args.config}: bench speed needs a distillation config")
    if args.repeats < 1:
        raise ConfigError(f"--repeats: need at least 1, got {args.repeats}")
    sizes = [tuple(s) for s in args.sizes or [(cfg.model.min_size, cfg.model.max_size), (96, 96)]]
    rows = measure_speed(cfg, sizes, repeats=args.repeats, runtimes=args.runtimes)
    print(
        f"{args.config}, {datetime.date.today().isoformat()}, {machine_line()}, torch "
        f"{torch.__version__}; random weights, 91 classes, one image, median of "
        f"{args.repeats} rounds"
    )
    print(render_speed(rows))
    return 0
