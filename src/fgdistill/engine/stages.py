"""Cached stages of multi-run jobs (``fgdistill demo``, ``fgdistill bench quality``).

A stage is one folder of a work dir: the synthetic data, or one training run. It writes
``stage.json`` with a fingerprint of its resolved settings and of the stages it depends on. A
stage whose fingerprint matches and is marked complete is reused; one that was interrupted
resumes from its ``last.pt``; one whose settings changed is run again from scratch. A finished
training stage keeps its trained model (``model.pt`` or ``student.pt``), metrics and logs; its
training checkpoints (``last.pt``, ``best.pt``: weights with the optimizer's state, about 140 MB
each for a ResNet-18 RetinaNet) are deleted, since nothing resumes a finished stage. Paths inside
the work dir are left out of fingerprints (the upstream fingerprints stand for them), so a moved
or copied work dir is still reused.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import math
import os
import platform
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from fgdistill.engine.config import TrainConfig, config_to_dict

#: Checkpoints a finished stage no longer needs (its model is in model.pt / student.pt).
TRAINING_CHECKPOINTS: tuple[str, ...] = ("last.pt", "best.pt")

__all__ = [
    "StageResult",
    "SynthSettings",
    "atomic_write_text",
    "cpu_name",
    "fingerprint",
    "inherit_revision",
    "machine_line",
    "merge",
    "mmss",
    "point_at_data",
    "prepare_data",
    "read_stage",
    "run_stage",
    "stage_fingerprint",
    "write_stage",
]


@dataclass
class SynthSettings:
    """Synthetic data of a job (arguments of ``generate_synthetic``)."""

    num_train: int = 1000
    num_val: int = 200
    image_size: int = 96
    difficulty: float = 0.5
    seed: int = 0


@dataclass
class StageResult:
    """One finished training run: its final COCO box metrics and cost."""

    name: str
    model: str
    metrics: dict[str, float]
    wall_time_s: float
    iterations: int
    reused: bool
    work_dir: str
    #: the stage's fingerprint (empty where it is not known, e.g. an imported older result)
    fingerprint: str = ""
    #: the results file the result was read from; empty for a stage of this work dir
    imported_from: str = ""


def mmss(seconds: float) -> str:
    """``seconds`` as ``"12m05s"``; ``"n/a"`` where it is not known (NaN)."""
    if math.isnan(seconds):
        return "n/a"
    total = round(max(0.0, seconds))
    return f"{total // 60}m{total % 60:02d}s"


def merge(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    """Deep merge of two plain mappings; ``over`` wins, nested mappings are merged."""
    out = {k: (dict(v) if isinstance(v, Mapping) else v) for k, v in base.items()}
    for key, value in over.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def fingerprint(*parts: Any) -> str:
    """A short stable hash of JSON-serialisable ``parts``."""
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def read_stage(folder: Path) -> dict[str, Any]:
    """``folder/stage.json`` as a dict; empty when missing or unreadable."""
    path = folder / "stage.json"
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        return {}
    return data if isinstance(data, dict) else {}


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to a unique temporary file beside ``path``, then rename it over ``path``.

    A crash leaves the old file or the new one, never half of one; two writers never share a
    temporary file.
    """
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        # mkstemp makes the file readable by its owner only; give it the usual mode
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@functools.cache
def _umask() -> int:
    """The process's umask, read once (reading it means setting it for a moment)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_stage(folder: Path, data: Mapping[str, Any]) -> None:
    """Write ``folder/stage.json`` atomically."""
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / "stage.json.tmp"
    tmp.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    tmp.replace(folder / "stage.json")


def prepare_data(
    data_dir: Path,
    synth: SynthSettings,
    *,
    progress: bool,
    say: Callable[[str], None],
    label: str = "data",
) -> tuple[str, float, bool]:
    """Generate the synthetic data in ``data_dir``, or reuse it.

    Returns:
        ``(fingerprint, wall_time_s, reused)``.
    """
    from fgdistill.data.synth import generate_synthetic

    data_fp = fingerprint(asdict(synth))
    stage = read_stage(data_dir)
    ann_val = data_dir / "annotations" / "instances_val.json"
    if stage.get("fingerprint") == data_fp and stage.get("complete") and ann_val.is_file():
        say(f"{label}: reusing {data_dir}")
        return data_fp, float(stage.get("wall_time_s", 0.0)), True
    say(
        f"{label}: generating {synth.num_train} + {synth.num_val} synthetic images "
        f"of {synth.image_size} px in {data_dir}"
    )
    # Written beside data_dir and renamed into place, so that a second run started at the same
    # time never reads a half-written dataset.
    tmp_dir = data_dir.with_name(f".{data_dir.name}.tmp-{os.getpid()}")
    if tmp_dir.exists():
        shutil.rmtree(tmp_dir)
    t0 = time.perf_counter()
    _with_file_progress(
        lambda: generate_synthetic(
            tmp_dir,
            num_train=synth.num_train,
            num_val=synth.num_val,
            image_size=synth.image_size,
            seed=synth.seed,
            difficulty=synth.difficulty,
        ),
        folders=[tmp_dir / "train", tmp_dir / "val"],
        total=synth.num_train + synth.num_val,
        enabled=progress,
    )
    wall = time.perf_counter() - t0
    write_stage(tmp_dir, {"fingerprint": data_fp, "complete": True, "wall_time_s": round(wall, 2)})
    stage = read_stage(data_dir)
    if stage.get("fingerprint") == data_fp and stage.get("complete") and ann_val.is_file():
        shutil.rmtree(tmp_dir)  # another run finished the same data first
        return data_fp, wall, True
    if data_dir.exists():
        shutil.rmtree(data_dir)
    tmp_dir.rename(data_dir)
    return data_fp, wall, False


def point_at_data(cfg: TrainConfig, data_dir: Path) -> None:
    """Set ``cfg.data`` to the train and val splits written by :func:`prepare_data`."""
    cfg.data.root = str(data_dir)
    cfg.data.train_ann = "annotations/instances_train.json"
    cfg.data.train_images = "train"
    cfg.data.val_ann = "annotations/instances_val.json"
    cfg.data.val_images = "val"


def stage_fingerprint(cfg: TrainConfig, upstream: Sequence[str]) -> str:
    """The fingerprint of a training stage: ``cfg`` less its paths, and ``upstream``.

    ``work_dir``, ``data.root`` and ``distill.teacher_checkpoint`` are left out, so a moved or
    copied work dir keeps its fingerprints. A stage that inherits the teacher's weights also
    takes in the revision of what inheriting copies for its architecture
    (:data:`~fgdistill.models.distiller.INHERIT_REVISION`) where that is above 1, so results
    made under an older rule are neither reused nor merged, and other fingerprints stay as
    they were.
    """
    plain = config_to_dict(cfg)
    plain.pop("work_dir")
    plain["data"].pop("root")
    if plain.get("distill"):
        plain["distill"].pop("teacher_checkpoint")
        revision = inherit_revision(cfg)
        if revision > 1:
            plain["distill"]["inherit_revision"] = revision
    return fingerprint(plain, list(upstream))


def inherit_revision(cfg: TrainConfig) -> int:
    """The revision of the inheriting rule a stage trains under; 0 when it does not inherit."""
    from fgdistill.models.distiller import INHERIT_REVISION

    if cfg.distill is None or not cfg.distill.inherit_teacher:
        return 0
    return INHERIT_REVISION.get(cfg.model.arch, 1)


def run_stage(
    cfg: TrainConfig,
    *,
    upstream: Sequence[str],
    train_fn: Callable[..., Any],
    progress: bool,
    say: Callable[[str], None],
    label: str,
    reuse_only: bool = False,
) -> tuple[StageResult | None, str]:
    """Train ``cfg`` in ``cfg.work_dir``, or reuse / resume a run with the same fingerprint.

    Args:
        cfg: the resolved config; ``work_dir``, ``data.root`` and
            ``distill.teacher_checkpoint`` are left out of the fingerprint.
        upstream: fingerprints of the stages this one depends on (data, teacher).
        train_fn: :func:`fgdistill.engine.runner.train` or a stand-in with its signature.
        label: prefix of the lines passed to ``say``.
        reuse_only: never train; a stage that is not finished gives ``None``.

    Returns:
        ``(result, fingerprint)``; ``result`` is ``None`` only with ``reuse_only``.
    """
    fp = stage_fingerprint(cfg, upstream)
    folder = Path(cfg.work_dir)
    stage = read_stage(folder)
    model = f"{cfg.model.arch} {cfg.model.backbone}"
    desc = f"{label} ({model})"
    metrics_file = folder / "metrics.json"
    if stage.get("fingerprint") == fp and stage.get("complete") and metrics_file.is_file():
        say(f"{desc}: reusing {folder}")
        metrics = json.loads(metrics_file.read_text(encoding="utf-8"))
        result = StageResult(
            name=cfg.name,
            model=model,
            metrics=dict(metrics.get("metrics", {}).get("bbox", {})),
            wall_time_s=float(stage.get("wall_time_s", 0.0)),
            iterations=int(metrics.get("iterations", 0)),
            reused=True,
            work_dir=str(folder),
            fingerprint=fp,
        )
        return result, fp
    if reuse_only:
        say(f"{desc}: not finished in {folder}; left out")
        return None, fp
    resume = stage.get("fingerprint") == fp and (folder / "last.pt").is_file()
    if not resume and folder.exists():
        shutil.rmtree(folder)
    say(f"{desc}: {'resuming' if resume else 'training'} in {folder}")
    write_stage(folder, {"fingerprint": fp, "complete": False, "wall_time_s": 0.0})
    t0 = time.perf_counter()
    # train() fills in e.g. num_classes; keep the config the fingerprint was taken from.
    out = train_fn(copy.deepcopy(cfg), resume=resume, progress=progress)
    wall = time.perf_counter() - t0
    if resume:
        # the trainer's clock counts the earlier attempts' training up to their last
        # checkpoint and this attempt's training and final evaluation; what it leaves out
        # (each attempt's set-up) is small, so the larger of the two clocks is kept
        wall = max(wall, float(getattr(out, "wall_time", 0.0)))
    write_stage(folder, {"fingerprint": fp, "complete": True, "wall_time_s": round(wall, 2)})
    for name in TRAINING_CHECKPOINTS:
        (folder / name).unlink(missing_ok=True)
    result = StageResult(
        name=cfg.name,
        model=model,
        metrics=dict(out.metrics.get("bbox", {})),
        wall_time_s=wall,
        iterations=int(out.iterations),
        reused=False,
        work_dir=str(folder),
        fingerprint=fp,
    )
    ap = result.metrics.get("AP", float("nan"))
    say(f"      {cfg.name}: bbox AP {ap:.2f} after {mmss(wall)}")
    return result, fp


def _with_file_progress(
    fn: Callable[[], Any], *, folders: Sequence[Path], total: int, enabled: bool
) -> Any:
    """Run ``fn`` in a thread while a tqdm bar counts the PNG files appearing in ``folders``."""
    if not enabled:
        return fn()
    import threading

    from tqdm.auto import tqdm

    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["result"] = fn()
        except BaseException as exc:  # re-raised in the caller's thread
            box["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    with tqdm(total=total, desc="data", unit="img") as bar:
        while thread.is_alive():
            thread.join(timeout=0.5)
            done = sum(len(list(f.glob("*.png"))) for f in folders if f.is_dir())
            bar.update(min(done, total) - bar.n)
        bar.update(total - bar.n)
    if "error" in box:
        raise box["error"]
    return box.get("result")


def machine_line() -> str:
    """Host, architecture, CPU model and torch's CPU kernels, cores and threads, in one line.

    CPU training repeats to the last digit on one kind of CPU only, so results files say which.
    """
    import torch

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return (
        f"{platform.node()} {platform.machine()}, {cpu_name()} "
        f"(torch CPU kernels {torch.backends.cpu.get_cpu_capability()}), "
        f"{cores or 1} CPU(s), torch threads {torch.get_num_threads()}"
    )


def cpu_name(cpuinfo: str | Path = "/proc/cpuinfo") -> str:
    """The first ``model name`` of ``cpuinfo`` (Linux), else :func:`platform.processor`."""
    try:
        for line in Path(cpuinfo).read_text(errors="replace").splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and value.strip():
                return value.strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"
