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

Re-running reuses finished stages (:mod:`fgdistill.engine.stages`): a finished stage with the
same settings is skipped, an interrupted one resumes, a changed one runs again.
"""

from __future__ import annotations

import copy
import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from fgdistill.engine.config import (
    TrainConfig,
    apply_overrides,
    config_from_dict,
    from_mapping,
    read_yaml,
)
from fgdistill.engine.stages import (
    StageResult,
    SynthSettings,
    machine_line,
    merge,
    mmss,
    point_at_data,
    prepare_data,
    run_stage,
)
from fgdistill.errors import ConfigError

__all__ = ["METRICS", "DemoSummary", "StageResult", "SynthSettings", "run_demo"]

logger = logging.getLogger(__name__)

STAGES: tuple[str, ...] = ("teacher", "baseline", "fgd")
METRICS: tuple[str, ...] = ("AP", "AP50", "AP75", "APs", "APm", "APl")


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
                f"| {r.name} | {r.model} | " + " | ".join(cells) + f" | {mmss(r.wall_time_s)}"
                f"{reused} |"
            )
        lines.append(
            "| data | synthetic | " + " | ".join("" for _ in METRICS) + f" | "
            f"{mmss(self.data_time_s)} |"
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
        out.append(f"total wall time {mmss(self.total_time_s)}.")
        return out


def load_demo_config(
    path: str | Path, overrides: Sequence[str] = ()
) -> tuple[SynthSettings, dict[str, TrainConfig]]:
    """Read the demo YAML, apply ``--set`` overrides, and validate every section.

    Returns the data settings and one :class:`TrainConfig` per stage (``common`` merged under
    each stage's section). Data paths are filled in by :func:`run_demo`.
    """
    raw = read_yaml(path)
    in_file = set(raw)
    raw = apply_overrides(raw, overrides)
    sections = ("synth", "common", *STAGES)
    for key in raw:  # after the overrides: a --set of an unknown section is an error too
        if key not in sections:
            import difflib

            close = difflib.get_close_matches(str(key), sections, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            where = path if key in in_file else "--set"
            raise ConfigError(f"{where}: {key}: unknown demo section{hint}")
    try:
        synth = from_mapping(SynthSettings, raw.get("synth") or {}, "synth")
        configs = {}
        for stage in STAGES:
            merged = merge(raw.get("common") or {}, raw.get(stage) or {})
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
    from fgdistill.engine.runner import train

    train_fn = train_fn or train
    start = time.perf_counter()
    work = Path(work_dir)
    synth, configs = load_demo_config(config, overrides)
    work.mkdir(parents=True, exist_ok=True)

    def tell(message: str) -> None:
        _say(say, message)

    data_dir = work / "data"
    data_fp, data_time, _ = prepare_data(
        data_dir, synth, progress=progress, say=tell, label="[1/5] data"
    )
    rows: list[StageResult] = []
    fingerprints: dict[str, str] = {}
    for number, name in enumerate(STAGES, start=2):
        cfg = configs[name]
        cfg.name = name
        cfg.work_dir = str(work / name)
        point_at_data(cfg, data_dir)
        upstream = [data_fp]
        if name == "fgd":
            if cfg.distill is None:
                raise ConfigError(f"{config}: fgd: needs a 'distill' section")
            cfg.distill.teacher = copy.deepcopy(configs["teacher"].model)
            cfg.distill.teacher_checkpoint = str(work / "teacher" / "model.pt")
            upstream.append(fingerprints["teacher"])
        result, fingerprints[name] = run_stage(
            cfg,
            upstream=upstream,
            train_fn=train_fn,
            progress=progress,
            say=tell,
            label=f"[{number}/5] {name}",
        )
        assert result is not None  # only reuse_only runs leave a stage out
        rows.append(result)

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


def _write_results(summary: DemoSummary) -> None:
    work = summary.work_dir
    data = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine_line(),
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
