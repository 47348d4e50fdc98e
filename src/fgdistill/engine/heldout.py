"""Scoring a benchmark's finished stages on a held-out synthetic set.

The quality benchmark reports COCO metrics on its validation split, which is also the split its
recipe and loss weights were chosen on. A choice made by looking at one split flatters that
split; this module scores the same checkpoints on a second set drawn like the validation split
but with another seed (every synthetic image is seeded by (seed, split, index), so the two sets
share no image), which nothing was chosen on.

Each score is cached in the stage's folder (``heldout/heldout.json``), keyed by the stage's
fingerprint, the held-out data's fingerprint and the checkpoint's size and modification time:
a retrained stage, or another held-out set, is scored again; anything else is read back.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path

from fgdistill.engine.config import TrainConfig
from fgdistill.engine.stages import (
    StageResult,
    SynthSettings,
    atomic_write_text,
    point_at_data,
    prepare_data,
)

__all__ = ["HeldoutSettings", "heldout_synth", "score_heldout", "score_stage"]

#: Name of the cache file inside a stage's ``heldout/`` folder.
CACHE_NAME = "heldout.json"


@dataclass
class HeldoutSettings:
    """The held-out set of a benchmark (its config's ``heldout`` section).

    ``images`` images drawn like the validation split (same size and difficulty) with
    ``seed``; ``images`` 0 turns held-out scoring off.
    """

    images: int = 0
    seed: int = 7


def heldout_synth(synth: SynthSettings, settings: HeldoutSettings) -> SynthSettings:
    """The benchmark's data settings with ``settings.images`` validation images and no train."""
    return replace(synth, num_train=0, num_val=settings.images, seed=settings.seed)


def score_stage(
    cfg: TrainConfig,
    result: StageResult,
    data_dir: Path,
    data_fp: str,
    *,
    progress: bool,
    say: Callable[[str], None],
    label: str,
) -> dict[str, float] | None:
    """Box metrics (COCO, percent) of one finished stage on the held-out set in ``data_dir``.

    Read from the stage's cache where its key matches, else measured with
    :func:`fgdistill.engine.runner.evaluate_checkpoint` and cached. ``None`` (and a line to
    ``say``) where the stage's checkpoint is missing.
    """
    from fgdistill.engine.runner import evaluate_checkpoint, weights_name

    ckpt = Path(result.work_dir) / weights_name(cfg)
    if not ckpt.is_file():
        say(f"{label}: no {ckpt.name} in {result.work_dir}; not scored on the held-out set")
        return None
    folder = Path(result.work_dir) / "heldout"
    cache = folder / CACHE_NAME
    stat = ckpt.stat()
    key = {
        "stage": result.fingerprint,
        "data": data_fp,
        "checkpoint": ckpt.name,
        "checkpoint_bytes": stat.st_size,
        "checkpoint_mtime_ns": stat.st_mtime_ns,
    }
    try:
        old = json.loads(cache.read_text(encoding="utf-8"))
        if old["key"] == key:
            return {str(k): float(v) for k, v in old["metrics"].items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        pass  # no cache, or an unreadable one: measure again
    eval_cfg = copy.deepcopy(cfg)
    point_at_data(eval_cfg, data_dir)
    eval_cfg.work_dir = str(folder)
    folder.mkdir(parents=True, exist_ok=True)
    say(f"{label}: scoring {ckpt} on the held-out set")
    measured = evaluate_checkpoint(eval_cfg, ckpt, progress=progress)["bbox"]
    metrics = {str(k): float(v) for k, v in measured.items()}
    atomic_write_text(cache, json.dumps({"key": key, "metrics": metrics}, indent=2) + "\n")
    return metrics


def score_heldout(
    work: Path,
    synth: SynthSettings,
    settings: HeldoutSettings,
    teachers: Mapping[str, tuple[StageResult, TrainConfig]],
    stages: Mapping[str, Mapping[int, tuple[StageResult, TrainConfig]]],
    *,
    progress: bool,
    say: Callable[[str], None],
) -> tuple[str, dict[str, StageResult], dict[str, dict[int, StageResult]]]:
    """Score every finished stage of a work dir on its held-out set (``work/heldout_data``).

    Args:
        teachers: family -> (finished teacher stage, its config).
        stages: row -> seed -> (finished student stage, its config), of this work dir (stages
            imported from another results file have no checkpoint here).

    Returns:
        ``(data fingerprint, teachers, results)``: the same stages with their ``metrics``
        replaced by the held-out ones, in the shapes :func:`fgdistill.engine.bench.summarise`
        takes; a stage that could not be scored is left out.
    """
    data_dir = work / "heldout_data"
    data_fp, _, _ = prepare_data(
        data_dir,
        heldout_synth(synth, settings),
        progress=progress,
        say=say,
        label="held-out data",
    )
    out_teachers: dict[str, StageResult] = {}
    for fam, (result, cfg) in teachers.items():
        metrics = score_stage(
            cfg, result, data_dir, data_fp, progress=progress, say=say, label=f"teacher {fam}"
        )
        if metrics is not None:
            out_teachers[fam] = replace(result, metrics=metrics)
    out: dict[str, dict[int, StageResult]] = {}
    for row, per_seed in stages.items():
        out[row] = {}
        for seed, (result, cfg) in sorted(per_seed.items()):
            label = f"seed {seed} {row}"
            metrics = score_stage(
                cfg, result, data_dir, data_fp, progress=progress, say=say, label=label
            )
            if metrics is not None:
                out[row][seed] = replace(result, metrics=metrics)
    return data_fp, out_teachers, out
