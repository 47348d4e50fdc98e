"""``fgdistill demo``: the whole story on synthetic data, on a CPU, in minutes.

Stages, each in its own folder of the work dir:

1. ``data/``: the synthetic benchmark (:func:`fgdistill.data.synth.generate_synthetic`);
2. ``teacher/``: a larger detector, trained longer (a teacher is trained once);
3. ``baseline/``: the student trained alone;
4. ``fgd/``: the same student, same schedule and seed, distilled from the teacher with FGD;
5. each run ends with a COCO evaluation of its final weights on the validation split;
6. a table (``results.json`` and ``results.md``) and a plain statement of whether FGD beat
   the baseline in this run.

The recipe lives in the packaged YAML ``configs/demo/demo.yaml``: a ``synth`` section (the data),
a ``common`` section (a training config shared by every run) and ``teacher``, ``baseline`` and
``fgd`` sections merged over ``common``. ``--set teacher.optim.epochs=30`` or
``--set synth.num_train=500`` change it.

Re-running reuses finished stages: each stage writes ``stage.json`` with a fingerprint of its
resolved settings (and of the stages it depends on). A stage whose fingerprint matches and is
marked complete is skipped; one that was interrupted resumes from its ``last.pt``; one whose
settings changed is run again from scratch.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import platform
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from fgdistill.engine.config import (
    TrainConfig,
    apply_overrides,
    config_from_dict,
    config_to_dict,
    from_mapping,
    read_yaml,
)
from fgdistill.errors import ConfigError

__all__ = ["DemoSummary", "StageResult", "SynthSettings", "run_demo"]

logger = logging.getLogger(__name__)

STAGES: tuple[str, ...] = ("teacher", "baseline", "fgd")
METRICS: tuple[str, ...] = ("AP", "AP50", "AP75", "APs", "APm", "APl")


@dataclass
class SynthSettings:
    """The demo's synthetic data (arguments of ``generate_synthetic``)."""

    num_train: int = 1000
    num_val: int = 200
    image_size: int = 96
    difficulty: float = 0.5
    seed: int = 0


@dataclass
class StageResult:
    """One row of the demo table."""

    name: str
    model: str
    metrics: dict[str, float]
    wall_time_s: float
    iterations: int
    reused: bool
    work_dir: str


@dataclass
class DemoSummary:
    """Everything the demo measured; :meth:`table` renders it."""

    work_dir: Path
    rows: list[StageResult]
    data_time_s: float
    total_time_s: float
    results_file: Path
    settings: dict[str, Any] = field(default_factory=dict)

    def row(self, name: str) -> StageResult:
        """The row of stage ``name``."""
        return next(r for r in self.rows if r.name == name)

    def table(self) -> str:
        """A Markdown table: AP, AP50, AP75, APs, APm, APl and wall time per stage."""
        head = "| run | model | " + " | ".join(METRICS) + " | wall time |"
        sep = "|---|---|" + "---:|" * (len(METRICS) + 1)
        lines = [head, sep]
        for r in self.rows:
            cells = [f"{r.metrics.get(m, float('nan')):.2f}" for m in METRICS]
            reused = " (reused)" if r.reused else ""
            lines.append(
                f"| {r.name} | {r.model} | " + " | ".join(cells) + f" | {_mmss(r.wall_time_s)}"
                f"{reused} |"
            )
        lines.append(
            "| data | synthetic | " + " | ".join("" for _ in METRICS) + f" | "
            f"{_mmss(self.data_time_s)} |"
        )
        return "\n".join(lines)

    def conclusions(self) -> list[str]:
        """Plain sentences: the teacher-baseline gap and whether FGD beat the baseline."""
        t = self.row("teacher").metrics.get("AP", float("nan"))
        b = self.row("baseline").metrics.get("AP", float("nan"))
        f = self.row("fgd").metrics.get("AP", float("nan"))
        gap = t - b
        out = [f"teacher vs baseline student: {t:.2f} vs {b:.2f} AP (gap {gap:+.2f})."]
        if f > b:
            share = f" and closed {100 * (f - b) / gap:.0f}% of the gap" if gap > 0 else ""
            out.append(
                f"FGD beat the baseline in this run: {f:.2f} vs {b:.2f} AP ({f - b:+.2f}){share}."
            )
        else:
            out.append(
                f"FGD did NOT beat the baseline in this run: {f:.2f} vs {b:.2f} AP ({f - b:+.2f})."
            )
        out.append(f"total wall time {_mmss(self.total_time_s)}.")
        return out


def _mmss(seconds: float) -> str:
    total = round(max(0.0, seconds))
    return f"{total // 60}m{total % 60:02d}s"


def _merge(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    out = {k: (dict(v) if isinstance(v, Mapping) else v) for k, v in base.items()}
    for key, value in over.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _fingerprint(*parts: Any) -> str:
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _read_stage(folder: Path) -> dict[str, Any]:
    path = folder / "stage.json"
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        return {}
    return data if isinstance(data, dict) else {}


def _write_stage(folder: Path, data: Mapping[str, Any]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / "stage.json.tmp"
    tmp.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    tmp.replace(folder / "stage.json")


def load_demo_config(
    path: str | Path, overrides: Sequence[str] = ()
) -> tuple[SynthSettings, dict[str, TrainConfig]]:
    """Read the demo YAML, apply ``--set`` overrides, and validate every section.

    Returns the data settings and one :class:`TrainConfig` per stage (``common`` merged under
    each stage's section). Data paths are filled in by :func:`run_demo`.
    """
    raw = read_yaml(path)
    sections = ("synth", "common", *STAGES)
    for key in raw:
        if key not in sections:
            import difflib

            close = difflib.get_close_matches(str(key), sections, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise ConfigError(f"{path}: {key}: unknown demo section{hint}")
    raw = apply_overrides(raw, overrides)
    try:
        synth = from_mapping(SynthSettings, raw.get("synth") or {}, "synth")
        configs = {}
        for stage in STAGES:
            merged = _merge(raw.get("common") or {}, raw.get(stage) or {})
            try:
                configs[stage] = config_from_dict(merged)
            except ConfigError as exc:
                raise ConfigError(f"{stage} (common merged with {stage}): {exc}") from None
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    return synth, configs


def run_demo(
    work_dir: str | Path,
    *,
    config: str | Path,
    overrides: Sequence[str] = (),
    progress: bool = True,
    train_fn: Callable[..., Any] | None = None,
    say: Callable[[str], None] | None = None,
) -> DemoSummary:
    """Run (or reuse) the demo's stages in ``work_dir`` and return the table's contents.

    ``say`` receives one line per stage (the CLI prints them); by default they are logged.
    """
    from fgdistill.data.synth import generate_synthetic
    from fgdistill.engine.runner import train

    train_fn = train_fn or train
    start = time.perf_counter()
    work = Path(work_dir)
    synth, configs = load_demo_config(config, overrides)
    work.mkdir(parents=True, exist_ok=True)

    # 1. data
    data_dir = work / "data"
    data_fp = _fingerprint(asdict(synth))
    stage = _read_stage(data_dir)
    ann_val = data_dir / "annotations" / "instances_val.json"
    if stage.get("fingerprint") == data_fp and stage.get("complete") and ann_val.is_file():
        data_time = float(stage.get("wall_time_s", 0.0))
        _say(say, f"[1/5] data: reusing {data_dir}")
    else:
        _say(
            say,
            f"[1/5] data: generating {synth.num_train} + {synth.num_val} synthetic images "
            f"of {synth.image_size} px in {data_dir}",
        )
        if data_dir.exists():
            shutil.rmtree(data_dir)
        t0 = time.perf_counter()
        _with_file_progress(
            lambda: generate_synthetic(
                data_dir,
                num_train=synth.num_train,
                num_val=synth.num_val,
                image_size=synth.image_size,
                seed=synth.seed,
                difficulty=synth.difficulty,
            ),
            folders=[data_dir / "train", data_dir / "val"],
            total=synth.num_train + synth.num_val,
            enabled=progress,
        )
        data_time = time.perf_counter() - t0
        _write_stage(
            data_dir,
            {"fingerprint": data_fp, "complete": True, "wall_time_s": round(data_time, 2)},
        )

    rows: list[StageResult] = []
    fingerprints: dict[str, str] = {}
    for number, name in enumerate(STAGES, start=2):
        cfg = configs[name]
        cfg.name = name
        cfg.work_dir = str(work / name)
        cfg.data.root = str(data_dir)
        cfg.data.train_ann = "annotations/instances_train.json"
        cfg.data.train_images = "train"
        cfg.data.val_ann = "annotations/instances_val.json"
        cfg.data.val_images = "val"
        upstream = [data_fp]
        if name == "fgd":
            if cfg.distill is None:
                raise ConfigError(f"{config}: fgd: needs a 'distill' section")
            cfg.distill.teacher = copy.deepcopy(configs["teacher"].model)
            cfg.distill.teacher_checkpoint = str(work / "teacher" / "model.pt")
            upstream.append(fingerprints["teacher"])
        # Paths inside the work dir are left out: the upstream fingerprints stand for them, so
        # a moved or copied work dir is still reused.
        plain = config_to_dict(cfg)
        plain.pop("work_dir")
        plain["data"].pop("root")
        if plain.get("distill"):
            plain["distill"].pop("teacher_checkpoint")
        fp = _fingerprint(plain, upstream)
        fingerprints[name] = fp
        folder = Path(cfg.work_dir)
        stage = _read_stage(folder)
        desc = f"{name} ({cfg.model.arch} {cfg.model.backbone})"
        metrics_file = folder / "metrics.json"
        if stage.get("fingerprint") == fp and stage.get("complete") and metrics_file.is_file():
            _say(say, f"[{number}/5] {desc}: reusing {folder}")
            metrics = json.loads(metrics_file.read_text(encoding="utf-8"))
            rows.append(
                StageResult(
                    name=name,
                    model=f"{cfg.model.arch} {cfg.model.backbone}",
                    metrics=dict(metrics.get("metrics", {}).get("bbox", {})),
                    wall_time_s=float(stage.get("wall_time_s", 0.0)),
                    iterations=int(metrics.get("iterations", 0)),
                    reused=True,
                    work_dir=str(folder),
                )
            )
            continue
        resume = stage.get("fingerprint") == fp and (folder / "last.pt").is_file()
        if not resume and folder.exists():
            shutil.rmtree(folder)
        action = "resuming" if resume else "training"
        _say(say, f"[{number}/5] {desc}: {action} in {folder}")
        _write_stage(
            folder,
            {"fingerprint": fp, "complete": False, "wall_time_s": stage.get("wall_time_s", 0.0)},
        )
        t0 = time.perf_counter()
        # train() fills in e.g. num_classes; keep the config the fingerprint was taken from.
        result = train_fn(copy.deepcopy(cfg), resume=resume, progress=progress)
        wall = float(stage.get("wall_time_s", 0.0)) if resume else 0.0
        wall += time.perf_counter() - t0
        _write_stage(folder, {"fingerprint": fp, "complete": True, "wall_time_s": round(wall, 2)})
        rows.append(
            StageResult(
                name=name,
                model=f"{cfg.model.arch} {cfg.model.backbone}",
                metrics=dict(result.metrics.get("bbox", {})),
                wall_time_s=wall,
                iterations=int(result.iterations),
                reused=False,
                work_dir=str(folder),
            )
        )
        ap = rows[-1].metrics.get("AP", float("nan"))
        _say(say, f"      {name}: bbox AP {ap:.2f} after {_mmss(wall)}")

    _say(say, "[5/5] evaluation: every run was evaluated on the validation split at its end")
    total = time.perf_counter() - start
    summary = DemoSummary(
        work_dir=work,
        rows=rows,
        data_time_s=data_time,
        total_time_s=total,
        results_file=work / "results.json",
        settings={"synth": asdict(synth), "config": str(config), "overrides": list(overrides)},
    )
    _write_results(summary)
    return summary


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


def _write_results(summary: DemoSummary) -> None:
    work = summary.work_dir
    data = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.node()} {platform.machine()} {platform.processor()}".strip(),
        "settings": summary.settings,
        "rows": [asdict(r) for r in summary.rows],
        "data_time_s": round(summary.data_time_s, 2),
        "total_time_s": round(summary.total_time_s, 2),
        "fgd_beat_baseline": summary.row("fgd").metrics.get("AP", float("nan"))
        > summary.row("baseline").metrics.get("AP", float("nan")),
        "conclusions": summary.conclusions(),
    }
    (work / "results.json").write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    md = summary.table() + "\n\n" + "\n".join(summary.conclusions()) + "\n"
    (work / "results.md").write_text(md, encoding="utf-8")


def _say(say: Callable[[str], None] | None, message: str) -> None:
    if say is None:
        logger.info(message)
    else:
        say(message)
