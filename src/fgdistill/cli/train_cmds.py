"""Commands ``train``, ``distill``, ``eval`` and ``predict``.

Each parses its arguments, loads and validates the config, calls :mod:`fgdistill.engine`, and
prints where the outputs went. ``CONFIG`` is a YAML file or the name of a config shipped with
the package (``coco/fgd_retinanet_r101_r50``, ``synth/retinanet_r50_teacher``; see
``fgdistill train --list-configs``).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

from fgdistill.engine.distributed import barrier, cleanup
from fgdistill.errors import ConfigError

__all__ = ["packaged_configs", "register", "resolve_config_path"]

_CONFIG_ROOT = Path(__file__).resolve().parent.parent / "configs"


def packaged_configs() -> list[str]:
    """Names of the configs shipped with the package (``folder/name`` without ``.yaml``)."""
    return sorted(
        str(p.relative_to(_CONFIG_ROOT).with_suffix("")) for p in _CONFIG_ROOT.rglob("*.yaml")
    )


def resolve_config_path(name: str) -> Path:
    """A config file path: ``name`` itself if it exists, else a packaged config of that name."""
    path = Path(name)
    if path.is_file():
        return path
    stem = name[:-5] if name.endswith(".yaml") else name
    packaged = _CONFIG_ROOT / f"{stem}.yaml"
    if packaged.is_file():
        return packaged
    raise ConfigError(
        f"{name}: config file not found (and no packaged config of that name; packaged: "
        f"{', '.join(packaged_configs())})"
    )


def _rank0() -> bool:
    """True in the process that prints (rank 0 under torchrun, or a single process)."""
    return int(os.environ.get("RANK", "0")) == 0


def add_common_options(
    parser: argparse.ArgumentParser, *, work_dir_help: str, set_example: str = "optim.lr=0.02"
) -> None:
    """``--work-dir``, ``--set KEY=VALUE`` (repeatable), ``--no-progress`` and ``--threads``."""
    parser.add_argument("--work-dir", type=Path, default=None, help=work_dir_help)
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help=f"override a config value, e.g. --set {set_example} (repeatable; YAML values)",
    )
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        metavar="N",
        help="CPU threads (default: the cores no other process keeps busy at the start, unless "
        "OMP_NUM_THREADS is set)",
    )


def register(subparsers: Any) -> None:
    """Add the training commands to the top-level parser."""
    for name, helptext in (
        ("train", "train one detector (a teacher or a baseline student)"),
        ("distill", "train a student with FGD from a trained teacher"),
    ):
        p = subparsers.add_parser(name, help=helptext, description=helptext)
        p.add_argument("config", nargs="?", help="YAML config file or packaged config name")
        p.add_argument(
            "--resume", action="store_true", help="continue from WORK_DIR/last.pt if present"
        )
        p.add_argument(
            "--list-configs", action="store_true", help="list the packaged configs and exit"
        )
        p.add_argument(
            "--overwrite",
            action="store_true",
            help="start afresh even if WORK_DIR holds an earlier run (its checkpoints and "
            "weights are deleted)",
        )
        p.add_argument(
            "--allow-config-change",
            action="store_true",
            help="with --resume: continue even though the config changes the run (model, "
            "data, optimizer, schedule, seed)",
        )
        if name == "distill":
            p.add_argument("--teacher", default=None, help="teacher checkpoint (overrides config)")
        add_common_options(p, work_dir_help="output folder (default: the config's work_dir)")
        p.set_defaults(func=_cmd_train if name == "train" else _cmd_distill)

    p = subparsers.add_parser(
        "eval", help="evaluate a checkpoint with COCO metrics", description="evaluate a checkpoint"
    )
    p.add_argument("config", help="YAML config file or packaged config name (for the data)")
    p.add_argument("--checkpoint", required=True, help="checkpoint (.pt) to evaluate")
    add_common_options(
        p, work_dir_help="where eval_metrics.json goes (default: beside the checkpoint)"
    )
    p.set_defaults(func=_cmd_eval)

    p = subparsers.add_parser(
        "predict",
        help="detect objects in images; write COCO results and drawn images",
        description="detect objects in images; write COCO results and drawn images",
    )
    p.add_argument("images", nargs="+", type=Path, metavar="IMAGE")
    p.add_argument("--checkpoint", required=True, help="checkpoint (.pt) of a trained detector")
    p.add_argument("--out", type=Path, default=None, help="output folder (same as --work-dir)")
    p.add_argument(
        "--score-threshold", type=float, default=0.3, help="draw detections at or above this"
    )
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    add_common_options(p, work_dir_help="output folder (default: predictions)")
    p.set_defaults(func=_cmd_predict)


def _load(args: argparse.Namespace, *, default_work: str | None = None) -> Any:
    from fgdistill.engine.config import load_config, read_yaml

    if args.config is None:
        raise ConfigError("CONFIG is required (a YAML file or a packaged config name)")
    path = resolve_config_path(args.config)
    overrides = list(args.overrides)
    cfg = load_config(path, overrides)
    if args.work_dir is not None:
        cfg.work_dir = str(args.work_dir)
    elif "work_dir" not in read_yaml(path) and not any(
        o.startswith("work_dir=") for o in overrides
    ):
        cfg.work_dir = str(Path("work_dirs") / (default_work or path.stem))
    if not cfg.name:
        cfg.name = path.stem
    return cfg


def _print_outputs(result: Any) -> None:
    ap = result.metrics.get("bbox", {}).get("AP")
    print(
        f"done: {result.iterations} iterations ({result.epochs:.2f} epochs) in "
        f"{result.wall_time:.0f}s, {result.images_per_s:.1f} images/s"
    )
    if ap is not None:
        print(f"bbox AP {ap:.2f} (best {result.best_metric:.2f})")
    print(f"outputs in {result.work_dir}/:")
    for key, path in result.files.items():
        if Path(path).exists():
            print(f"  {key:12s} {path}")


def _list_configs() -> int:
    for name in packaged_configs():
        print(name)
    return 0


def _train(cfg: Any, args: argparse.Namespace) -> Any:
    """Run ``train`` or ``distill`` with the command's options; release the process group."""
    from fgdistill.engine.runner import train

    try:
        result = train(
            cfg,
            resume=args.resume,
            progress=not args.no_progress,
            overwrite=args.overwrite,
            allow_config_change=args.allow_config_change,
        )
        # no rank tears the process group down while another still talks to it (gloo aborts)
        barrier()
        return result
    finally:
        cleanup()


def _cmd_train(args: argparse.Namespace) -> int:
    if args.list_configs:
        return _list_configs()
    cfg = _load(args)
    if cfg.distill is not None:
        raise ConfigError(
            f"{args.config}: has a 'distill' section; run it with `fgdistill distill`"
        )
    result = _train(cfg, args)
    if _rank0():
        _print_outputs(result)
    return 0


def _cmd_distill(args: argparse.Namespace) -> int:
    if args.list_configs:
        return _list_configs()
    cfg = _load(args)
    if cfg.distill is None:
        raise ConfigError(
            f"{args.config}: no 'distill' section; add one (teacher, teacher_checkpoint) or "
            f"train a single detector with `fgdistill train`"
        )
    if args.teacher:
        cfg.distill.teacher_checkpoint = args.teacher
    result = _train(cfg, args)
    if _rank0():
        _print_outputs(result)
        print(f"  {'student':12s} {result.model_path} (plain detector state dict)")
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from fgdistill.engine.inference import evaluate_checkpoint

    cfg = _load(args)
    cfg.work_dir = str(args.work_dir or Path(args.checkpoint).parent)
    try:
        metrics = evaluate_checkpoint(cfg, args.checkpoint, progress=not args.no_progress)
        barrier()
    finally:
        cleanup()
    if not _rank0():
        return 0
    for task, values in metrics.items():
        print(f"{task}: " + ", ".join(f"{k} {v:.2f}" for k, v in values.items()))
    print(f"metrics written to {Path(cfg.work_dir) / 'eval_metrics.json'}")
    return 0


def _cmd_predict(args: argparse.Namespace) -> int:
    from fgdistill.engine.inference import predict

    out = args.out or args.work_dir or Path("predictions")
    if Path(out).exists() and not Path(out).is_dir():
        flag = "--out" if args.out else "--work-dir"
        raise ConfigError(f"{flag} {out}: is a file, not a folder; name a folder for the outputs")
    extra: dict[str, Any] = {}
    from fgdistill.engine.config import parse_override

    for text in args.overrides:
        keys, value = parse_override(text)
        if keys[0] == "score_threshold" and len(keys) == 1:
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ConfigError(f"--set score_threshold: expected a number, got {value!r}")
            args.score_threshold = float(value)
        else:
            raise ConfigError(
                f"--set {'.'.join(keys)}: predict takes only score_threshold "
                f"(use --score-threshold)"
            )
    result = predict(
        args.checkpoint,
        args.images,
        out,
        score_threshold=args.score_threshold,
        device=args.device,
        progress=not args.no_progress,
        **extra,
    )
    settings = {
        "checkpoint": str(args.checkpoint),
        "images": [str(p) for p in args.images],
        "score_threshold": args.score_threshold,
        "device": args.device,
    }
    (Path(out) / "predict.json").write_text(json.dumps(settings, indent=2) + "\n")
    print(f"{result.num_detections} detections on {len(args.images)} image(s)")
    print(f"outputs in {out}/:")
    print(f"  results      {result.results_file} (COCO results format)")
    print(f"  images       {result.images_file} (image ids and files)")
    print(f"  drawings     {len(result.drawings)} PNG(s), e.g. {result.drawings[0]}")
    return 0
