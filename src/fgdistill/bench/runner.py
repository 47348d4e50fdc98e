"""Running a benchmark's stages: the data, the teachers, then every row with every seed.

A stage is one folder of the work dir and its own record: ``stage.json`` holds the fingerprint
of its resolved settings and of the stages it depends on, whether it finished, its metrics on
the validation split and, where the plan has a held-out set, its metrics there (scored once, as
an extra evaluation of the same run). A finished stage with the same fingerprint is reused, an
interrupted one resumes from its ``last.pt``, a changed one runs again from scratch. A finished
stage keeps its model (``model.pt`` or ``student.pt``) and logs, not its training checkpoints.

Each stage is trained under a lock of its own (``.<name>.lock`` beside its folder), so several
processes, the ``--jobs`` workers or two invocations sharing a work dir, split the stages
between them instead of training one twice. Paths are left out of fingerprints, so a moved work
dir is still reused.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import hashlib
import json
import shutil
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from fgdistill.bench.plan import BenchPlan, SynthSettings
from fgdistill.engine.config import TrainConfig, config_to_dict
from fgdistill.io import write_json

__all__ = [
    "Stage",
    "StageRecord",
    "plan_stages",
    "prepare_data",
    "run_bench",
    "run_stage",
]

Say = Callable[[str], None]


@dataclass
class Stage:
    """One training run of a plan: a teacher (``seed`` None) or a row with one seed."""

    label: str
    family: str
    config: TrainConfig
    fingerprint: str
    row: str | None = None
    seed: int | None = None


@dataclass
class StageRecord:
    """A finished stage, as its ``stage.json`` records it.

    ``metrics``: COCO box metrics in percent (``AP``, ``AP50``, ...), and for a detector scored
    on masks the mask metrics beside them, prefixed ``mask_`` (``mask_AP``, ...).
    """

    fingerprint: str
    model: str
    metrics: dict[str, float]
    wall_time_s: float
    iterations: int
    heldout: dict[str, Any] = field(default_factory=dict)
    complete: bool = True

    @property
    def heldout_metrics(self) -> dict[str, float]:
        """The metrics on the held-out set, as ``metrics``; empty where it was not scored."""
        return dict(self.heldout.get("metrics") or {})


@dataclass
class DataSet:
    """A prepared synthetic set: its folder and fingerprint."""

    folder: Path
    fingerprint: str


def fingerprint(*parts: Any) -> str:
    """A short stable hash of JSON-serialisable ``parts``."""
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def mmss(seconds: float) -> str:
    """``seconds`` as ``"12m05s"``; ``"n/a"`` for NaN."""
    if seconds != seconds:
        return "n/a"
    total = round(max(0.0, seconds))
    return f"{total // 60}m{total % 60:02d}s"


def read_record(folder: Path) -> StageRecord | None:
    """``folder/stage.json``; ``None`` when it is missing, unreadable or not finished."""
    try:
        data = json.loads((folder / "stage.json").read_text(encoding="utf-8"))
        record = StageRecord(**data)
        # a metric COCO could not compute (e.g. APl without large objects) is written as null
        record.metrics = _floats(record.metrics)
        if record.heldout:
            record.heldout["metrics"] = _floats(record.heldout["metrics"])
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        return None
    return record if record.complete else None


def _floats(metrics: dict[str, Any]) -> dict[str, float]:
    return {str(k): float("nan") if v is None else float(v) for k, v in metrics.items()}


@contextlib.contextmanager
def stage_lock(folder: Path, *, wait: bool) -> Iterator[bool]:
    """Hold an exclusive lock on ``folder``'s stage; yields ``False`` if busy and not ``wait``.

    The lock is an ``flock`` on ``.<name>.lock`` beside the folder, released when the process
    ends however it ends. Where locks are not available (not POSIX), it always yields ``True``.
    """
    try:
        import fcntl
    except ImportError:
        yield True
        return
    folder.parent.mkdir(parents=True, exist_ok=True)
    with open(folder.parent / f".{folder.name}.lock", "a+", encoding="utf-8") as fh:
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        yield True


def prepare_data(folder: Path, synth: SynthSettings, *, say: Say, label: str) -> DataSet:
    """Generate the synthetic data in ``folder``, or reuse it when its settings match."""
    from fgdistill.data.synth import generate_synthetic

    data_fp = fingerprint(asdict(synth))
    with stage_lock(folder, wait=True):
        stage = _read_json(folder / "stage.json")
        if stage.get("fingerprint") == data_fp and stage.get("complete"):
            say(f"{label}: reusing {folder}")
            return DataSet(folder, data_fp)
        say(f"{label}: {synth.num_train} + {synth.num_val} images of {synth.image_size} px")
        shutil.rmtree(folder, ignore_errors=True)
        t0 = time.perf_counter()
        generate_synthetic(
            folder,
            num_train=synth.num_train,
            num_val=synth.num_val,
            image_size=synth.image_size,
            seed=synth.seed,
            difficulty=synth.difficulty,
        )
        wall = round(time.perf_counter() - t0, 2)
        write_json(
            folder / "stage.json", {"fingerprint": data_fp, "complete": True, "wall_time_s": wall}
        )
    return DataSet(folder, data_fp)


def point_at_data(cfg: TrainConfig, data: Path) -> None:
    """Set ``cfg.data`` to the train and val splits of a synthetic set in ``data``."""
    cfg.data.root = str(data)
    cfg.data.train_ann = "annotations/instances_train.json"
    cfg.data.train_images = "train"
    cfg.data.val_ann = "annotations/instances_val.json"
    cfg.data.val_images = "val"


def stage_fingerprint(cfg: TrainConfig, upstream: Sequence[str]) -> str:
    """``cfg`` less its paths (work dir, data root, teacher checkpoint), and ``upstream``."""
    plain = config_to_dict(cfg)
    plain.pop("work_dir")
    plain["data"].pop("root")
    if plain.get("distill"):
        plain["distill"].pop("teacher_checkpoint")
    return fingerprint(plain, list(upstream))


def plan_stages(plan: BenchPlan, work: Path, data: DataSet) -> list[Stage]:
    """The plan's stages in running order: one teacher per family, then seed by seed, the rows."""
    families = list(dict.fromkeys(plan.teacher_family(r.family) for r in plan.rows))
    stages: list[Stage] = []
    teacher_fp: dict[str, str] = {}
    for fam in families:
        cfg = copy.deepcopy(plan.teachers[fam])
        cfg.name = f"teacher_{fam}"
        cfg.work_dir = str(work / cfg.name)
        point_at_data(cfg, data.folder)
        teacher_fp[fam] = stage_fingerprint(cfg, [data.fingerprint])
        stages.append(Stage(f"teacher {fam}", fam, cfg, teacher_fp[fam]))
    total = len(plan.seeds) * len(plan.rows)
    for seed in plan.seeds:
        for row in plan.rows:
            cfg = copy.deepcopy(row.config)
            cfg.name, cfg.seed = row.name, seed
            cfg.work_dir = str(work / f"seed{seed}" / row.name)
            point_at_data(cfg, data.folder)
            upstream = [data.fingerprint]
            if cfg.distill is not None:
                owner = plan.teacher_family(row.family)
                cfg.distill.teacher = copy.deepcopy(plan.teachers[owner].model)
                cfg.distill.teacher_checkpoint = str(work / f"teacher_{owner}" / "model.pt")
                upstream.append(teacher_fp[owner])
            label = f"[{len(stages) - len(families) + 1}/{total}] seed {seed} {row.name}"
            fp = stage_fingerprint(cfg, upstream)
            stages.append(Stage(label, row.family, cfg, fp, row.name, seed))
    return stages


def run_stage(
    stage: Stage,
    *,
    train_fn: Callable[..., Any],
    heldout: DataSet | None,
    progress: bool,
    say: Say,
    reuse_only: bool = False,
    wait: bool = True,
) -> StageRecord | None:
    """Train ``stage``, or reuse or resume it; score it on ``heldout`` once it is finished.

    Returns ``None`` for a stage another process holds (with ``wait`` False) or, with
    ``reuse_only``, one that is not finished.
    """
    cfg = stage.config
    folder = Path(cfg.work_dir)
    with stage_lock(folder, wait=wait) as free:
        if not free:
            return None
        record = read_record(folder)
        if record is not None and record.fingerprint == stage.fingerprint:
            say(f"{stage.label}: reusing {folder}")
        elif reuse_only:
            return None
        else:
            record = _train(stage, train_fn=train_fn, progress=progress, say=say)
        if heldout is not None and record.heldout.get("data") != heldout.fingerprint:
            metrics = _score(cfg, heldout.folder, progress=progress)
            record.heldout = {"data": heldout.fingerprint, "metrics": metrics}
            say(f"{stage.label}: held-out {_aps(metrics)}")
            _write_record(folder, record)
    return record


def _train(stage: Stage, *, train_fn: Callable[..., Any], progress: bool, say: Say) -> StageRecord:
    cfg = stage.config
    folder = Path(cfg.work_dir)
    old = _read_json(folder / "stage.json")
    resume = old.get("fingerprint") == stage.fingerprint and (folder / "last.pt").is_file()
    if not resume:
        shutil.rmtree(folder, ignore_errors=True)
    model = f"{cfg.model.arch} {cfg.model.backbone}"
    say(f"{stage.label} ({model}): {'resuming' if resume else 'training'} in {folder}")
    record = StageRecord(stage.fingerprint, model, {}, 0.0, 0, complete=False)
    _write_record(folder, record)
    t0 = time.perf_counter()
    # train() fills in e.g. num_classes; keep the config the fingerprint was taken from. The
    # fingerprint vouches for a resumed stage's config; only its paths may have moved.
    out = train_fn(copy.deepcopy(cfg), resume=resume, progress=progress, allow_config_change=True)
    wall = time.perf_counter() - t0
    if resume:  # the trainer's clock also counts the earlier attempts' training
        wall = max(wall, float(getattr(out, "wall_time", 0.0)))
    metrics = _flat_metrics(out.metrics)
    record = replace(record, metrics=metrics, wall_time_s=round(wall, 2), complete=True)
    record.iterations = int(out.iterations)
    _write_record(folder, record)
    for name in ("last.pt", "best.pt"):
        (folder / name).unlink(missing_ok=True)
    say(f"      {cfg.name}: bbox {_aps(metrics)} after {mmss(wall)}")
    return record


def _flat_metrics(measured: Mapping[str, Mapping[str, Any]]) -> dict[str, float]:
    """``{"bbox": {...}, "segm": {...}}`` as one record: box metrics as they are, mask metrics
    prefixed ``mask_``."""
    out = {str(k): float(v) for k, v in measured.get("bbox", {}).items()}
    out.update({f"mask_{k}": float(v) for k, v in measured.get("segm", {}).items()})
    return out


def _aps(metrics: Mapping[str, float]) -> str:
    """``"AP 1.23"``, and ``", mask AP 0.98"`` after it where masks were scored."""
    mask = f", mask AP {metrics['mask_AP']:.2f}" if "mask_AP" in metrics else ""
    return f"AP {metrics.get('AP', float('nan')):.2f}{mask}"


def _score(cfg: TrainConfig, data: Path, *, progress: bool) -> dict[str, float]:
    """Box (and mask) metrics of a finished stage's model on the set in ``data``."""
    from fgdistill.engine.inference import evaluate_checkpoint
    from fgdistill.engine.runner import weights_name

    eval_cfg = copy.deepcopy(cfg)
    point_at_data(eval_cfg, data)
    eval_cfg.work_dir = str(Path(cfg.work_dir) / "heldout")
    measured = evaluate_checkpoint(
        eval_cfg, Path(cfg.work_dir) / weights_name(cfg), progress=progress
    )
    return _flat_metrics(measured)


def run_bench(
    plan: BenchPlan,
    work: Path,
    *,
    train_fn: Callable[..., Any] | None = None,
    jobs: int = 1,
    progress: bool = True,
    say: Say = print,
    report_only: bool = False,
) -> dict[tuple[str, int | None], StageRecord]:
    """Prepare the data, train the teachers, then the rows; return every finished stage.

    The teachers train one at a time in this process; with ``jobs`` above 1 the rows are
    trained by that many worker processes, the torch threads divided between them. With
    ``report_only`` nothing trains: finished stages are read (and scored on the held-out set
    where they are not yet).

    Returns:
        ``{(family or row, seed): record}``: teachers under ``(family, None)``.
    """
    from fgdistill.engine.runner import train

    if jobs < 1:
        from fgdistill.errors import ConfigError

        raise ConfigError(f"--jobs: need at least 1, got {jobs}")
    train_fn = train_fn or train
    data = prepare_data(work / "data", plan.synth, say=say, label="data")
    heldout = None
    if plan.heldout.images > 0:
        held = replace(plan.synth, num_train=0, num_val=plan.heldout.images, seed=plan.heldout.seed)
        heldout = prepare_data(work / "heldout_data", held, say=say, label="held-out data")
    stages = plan_stages(plan, work, data)
    teachers = [s for s in stages if s.seed is None]
    students = [s for s in stages if s.seed is not None]
    run = functools.partial(
        run_stage, train_fn=train_fn, heldout=heldout, progress=progress, say=say
    )
    for stage in teachers:
        run(stage, reuse_only=report_only)
    # what is finished is reused (and scored) here; the rest is trained, by workers or here
    pending = [s for s in students if run(s, reuse_only=True, wait=False) is None]
    if pending and not report_only:
        if jobs > 1:
            custom = train_fn if train_fn is not train else None
            _run_in_workers(pending, jobs, custom, heldout, say)
        else:
            for stage in pending:
                run(stage, wait=False)
    out: dict[tuple[str, int | None], StageRecord] = {}
    for stage in stages:
        record = read_record(Path(stage.config.work_dir))
        if record is not None and record.fingerprint == stage.fingerprint:
            out[(stage.row or stage.family, stage.seed)] = record
    missing = [s.label.split("] ")[-1] for s in stages if (s.row or s.family, s.seed) not in out]
    if missing:
        shown = ", ".join(missing[:3]) + (
            f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        )
        say(f"not finished in {work}, so left out: {len(missing)} stage(s): {shown}")
    return out


def _run_in_workers(
    stages: Sequence[Stage],
    jobs: int,
    train_fn: Callable[..., Any] | None,
    heldout: DataSet | None,
    say: Say,
) -> None:
    """Train ``stages`` in ``jobs`` worker processes, each taking the next free stage."""
    import multiprocessing

    import torch

    threads = max(1, torch.get_num_threads() // jobs)
    say(f"training {len(stages)} stages, {jobs} workers with {threads} thread(s) each")
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=jobs, mp_context=context) as pool:
        futures = [
            pool.submit(_work_through, list(stages), threads, train_fn, heldout)
            for _ in range(jobs)
        ]
        for future in futures:
            future.result()  # re-raises a worker's error


def _work_through(
    stages: Sequence[Stage],
    threads: int,
    train_fn: Callable[..., Any] | None,
    heldout: DataSet | None,
) -> None:
    """A worker: run every stage no other process holds, in order."""
    import torch

    from fgdistill.engine.runner import train

    torch.set_num_threads(threads)
    for stage in stages:
        run_stage(
            stage,
            train_fn=train_fn or train,
            heldout=heldout,
            progress=False,
            say=lambda line: print(line, flush=True),
            wait=False,
        )


def _write_record(folder: Path, record: StageRecord) -> None:
    write_json(folder / "stage.json", asdict(record))


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}
