"""``fgdistill bench quality``: the paper's ablations, in miniature, on synthetic data.

One teacher per detector family is trained once and cached; then the same student is trained
with the same schedule and seeds in every row: alone (the baseline), with plain feature
imitation, with FGD's focal part on the foreground only, the background only, both as one
region, both split, with focal plus global (the full method), and the full method without
inheriting the teacher's neck and head. The recipe, the families, the rows and the groups of
rows the conclusions compare are data: the packaged YAML ``configs/bench/quality.yaml``. Its
``rows`` are the table every run trains; its ``diagnostics`` are rows run only on request
(``--rows`` or ``--diagnostics``) and reported once they have results.

Layout of the work dir: ``data/``, ``teacher_<family>/``, ``seed<k>/<row>/``, and
``results.json``, ``results.md`` and ``report.html`` (``--results`` writes the Markdown
elsewhere too, e.g. ``docs/results.md``); with the config's ``heldout`` section, also
``heldout_data/`` and a ``heldout/`` folder in each stage (:mod:`fgdistill.engine.heldout`):
every finished stage is scored on a second set that no option was chosen on. Every training run
is a cached stage (:mod:`fgdistill.engine.stages`): a re-run reuses finished rows and resumes an
interrupted one, and the results files are rewritten after every row, so a stopped benchmark
keeps what it measured.
"""

from __future__ import annotations

import contextlib
import copy
import difflib
import json
import logging
import math
import os
import shlex
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
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
from fgdistill.engine.heldout import HeldoutSettings, score_heldout
from fgdistill.engine.stages import (
    StageResult,
    SynthSettings,
    atomic_write_text,
    inherit_revision,
    machine_line,
    merge,
    mmss,
    point_at_data,
    prepare_data,
    run_stage,
    stage_fingerprint,
)
from fgdistill.errors import ConfigError

__all__ = [
    "METRICS",
    "BenchPlan",
    "BenchRow",
    "Comparisons",
    "Imported",
    "import_results",
    "is_complete",
    "load_bench_config",
    "read_results_file",
    "run_quality_bench",
    "summarise",
]

logger = logging.getLogger(__name__)

METRICS: tuple[str, ...] = ("AP", "AP50", "AP75", "APs", "APm", "APl")
_SECTIONS: tuple[str, ...] = (
    "synth",
    "seeds",
    "common",
    "families",
    "rows",
    "diagnostics",
    "skip_rows",
    "compare",
    "heldout",
    "quick",
)
_COMPARE_KEYS: tuple[str, ...] = ("full_fgd", "table1", "model_size")
_TABLE1_KEYS: tuple[str, ...] = ("fg_only", "bg_only", "joint", "split")
_FAMILY_KEYS: tuple[str, ...] = ("teacher", "student", "distill")
_ROW_KEYS: tuple[str, ...] = (
    "name",
    "family",
    "description",
    "distill",
    "train",
    "baseline",
)
#: Marker in the results Markdown: text below it is kept when the file is regenerated.
NOTES_MARKER = "<!-- notes below this line are kept when the benchmark rewrites this file -->"


@dataclass
class BenchRow:
    """One student row: its name, family and resolved training config (distill or not).

    ``baseline`` names the row its gain is measured against (e.g. a baseline on the same longer
    budget); ``None`` means the family's baseline. ``diagnostic`` rows come from the config's
    ``diagnostics`` list: run on request only.
    """

    name: str
    family: str
    description: str
    config: TrainConfig
    baseline: str | None = None
    diagnostic: bool = False


@dataclass
class Comparisons:
    """The groups of rows the conclusions compare (the config's ``compare`` section).

    ``full_fgd``: (full FGD row, the plain imitation rows it must beat); ``table1``: the paper's
    Table 1 rows (fg only, bg only, fg and bg as one region, split); ``model_size``: rows
    training the teacher's model on the students' budget, which split the gap into model size
    and training length. Every group names rows of one family, one budget and one baseline.
    """

    full_fgd: list[tuple[str, tuple[str, ...]]] = field(default_factory=list)
    table1: list[tuple[str, str, str, str]] = field(default_factory=list)
    model_size: list[str] = field(default_factory=list)


@dataclass
class BenchPlan:
    """A validated benchmark: data, seeds, one teacher config per family, and the rows."""

    synth: SynthSettings
    seeds: list[int]
    teachers: dict[str, TrainConfig]
    rows: list[BenchRow]
    raw: dict[str, Any] = field(default_factory=dict)
    compare: Comparisons = field(default_factory=Comparisons)
    #: family -> its default baseline: the first undistilled row of ``rows``, then ``diagnostics``
    baselines: dict[str, str] = field(default_factory=dict)
    #: the set every finished stage is also scored on (``images`` 0: none)
    heldout: HeldoutSettings = field(default_factory=HeldoutSettings)


def _unknown(key: str, valid: Sequence[str], where: str) -> ConfigError:
    close = difflib.get_close_matches(str(key), valid, n=1)
    hint = f"; did you mean '{close[0]}'?" if close else f"; valid: {', '.join(valid)}"
    return ConfigError(f"{where}: unknown key '{key}'{hint}")


def _baseline_of(row: BenchRow, baselines: Mapping[str, str]) -> str | None:
    """The row a row's gain is measured against: its own ``baseline``, else its family's."""
    return row.baseline or baselines.get(row.family)


def budget_of(cfg: TrainConfig) -> dict[str, int | None]:
    """A training budget: epochs, batch size and the iteration cap, if any.

    Two rows are on the same budget when all three are equal; epochs alone would call a row
    with twice the batch, or one cut short by ``max_iters``, the same length of training.
    """
    return {
        "epochs": cfg.optim.epochs,
        "batch_size": cfg.data.batch_size,
        "max_iters": cfg.max_iters,
    }


def _budget_text(budget: Mapping[str, Any], other: Mapping[str, Any]) -> str:
    """``budget`` in words: its epochs, and its batch and iteration cap where ``other``'s differ."""
    text = f"{budget.get('epochs')} epochs"
    if budget.get("batch_size") != other.get("batch_size"):
        text += f" of batch {budget.get('batch_size')}"
    cap = budget.get("max_iters")
    if cap is not None and cap != other.get("max_iters"):
        text += f" cut at {cap} iterations"
    return text


def load_bench_config(
    path: str | Path,
    overrides: Sequence[str] = (),
    *,
    quick: bool = False,
    seeds: Sequence[int] | None = None,
    rows: Sequence[str] | None = None,
    diagnostics: bool = False,
) -> BenchPlan:
    """Read and validate the benchmark YAML.

    ``quick`` merges the file's ``quick`` section over the rest; ``overrides`` (``--set``
    dotted keys) apply after that; ``seeds`` replaces the seeds. The plan runs the ``rows``
    section, plus the ``diagnostics`` section with ``diagnostics``, less ``skip_rows``; ``rows``
    (names from either section) selects instead, and brings the baseline each chosen row's
    gain is measured against.

    Raises:
        ConfigError: naming the file and the key: an unknown section or key, a row of an
            unknown family, a duplicate or unknown row name, a row's ``baseline`` that is not
            an undistilled row of its family, a ``compare`` group of unknown rows or of rows
            of different families, budgets or baselines, or an invalid training config.
    """
    raw = read_yaml(path)
    try:
        for key in list(raw):
            if str(key).startswith("x-"):  # YAML anchors only
                del raw[key]
            elif key not in _SECTIONS:
                raise _unknown(str(key), _SECTIONS, "top level")
        if quick:
            raw = merge(raw, raw.get("quick") or {})
        raw.pop("quick", None)
        raw = apply_overrides(raw, overrides)
        for key in raw:  # a --set of an unknown (or the already merged quick) section
            if key not in _SECTIONS or key == "quick":
                valid = [k for k in _SECTIONS if k != "quick"]
                raise ConfigError(f"--set {key}...: {_unknown(str(key), valid, 'top level')}")
        synth = from_mapping(SynthSettings, raw.get("synth") or {}, "synth")
        heldout = from_mapping(HeldoutSettings, raw.get("heldout") or {}, "heldout")
        if heldout.images < 0:
            raise ConfigError(f"heldout.images: need 0 (off) or more, got {heldout.images}")
        if heldout.images and heldout.seed == synth.seed:
            raise ConfigError(
                f"heldout.seed: {heldout.seed} is synth.seed too, so the held-out set would "
                "repeat the validation split's images; choose another seed"
            )
        seed_list = [int(s) for s in (seeds if seeds is not None else raw.get("seeds") or [0])]
        if not seed_list or len(set(seed_list)) != len(seed_list):
            raise ConfigError(f"seeds: need one or more distinct seeds, got {seed_list}")
        common = raw.get("common") or {}
        families = raw.get("families") or {}
        if not isinstance(families, Mapping) or not families:
            raise ConfigError("families: need at least one detector family")
        teachers: dict[str, TrainConfig] = {}
        for fam, section in families.items():
            for key in section or {}:
                if key not in _FAMILY_KEYS:
                    raise _unknown(str(key), _FAMILY_KEYS, f"families.{fam}")
            try:
                teachers[fam] = config_from_dict(merge(common, section.get("teacher") or {}))
            except ConfigError as exc:
                raise ConfigError(f"families.{fam}.teacher: {exc}") from None
        all_rows: list[BenchRow] = []
        for section_name in ("rows", "diagnostics"):
            all_rows += _parse_rows(
                raw.get(section_name) or [], section_name, families, common, all_rows
            )
        by_name = {r.name: r for r in all_rows}
        baselines: dict[str, str] = {}
        for bench_row in all_rows:
            if bench_row.config.distill is None:
                baselines.setdefault(bench_row.family, bench_row.name)
        for bench_row in all_rows:
            if bench_row.baseline is None:
                continue
            where = f"row {bench_row.name}: baseline"
            if bench_row.baseline not in by_name:
                raise _unknown(bench_row.baseline, sorted(by_name), where)
            other = by_name[bench_row.baseline]
            if other.family != bench_row.family or other.config.distill is not None:
                raise ConfigError(
                    f"{where}: '{other.name}' must be a row of family '{bench_row.family}' "
                    "without a distill section"
                )
        compare = _parse_compare(raw.get("compare") or {}, by_name, baselines)
        skip = [str(n) for n in raw.get("skip_rows") or []]
        unknown_skip = [n for n in skip if n not in by_name]
        if unknown_skip:
            raise _unknown(unknown_skip[0], sorted(by_name), "skip_rows")
        if rows is not None:
            unknown = [r for r in rows if r not in by_name]
            if unknown:
                raise _unknown(unknown[0], sorted(by_name), "--rows")
            # A chosen row's gain is measured against its baseline: that row comes too (reused
            # where it finished before), unless the config skips it.
            wanted = set(rows)
            brought = (_baseline_of(r, baselines) for r in all_rows if r.name in wanted)
            wanted |= {name for name in brought if name is not None}
            chosen = [r for r in all_rows if r.name in wanted]
        else:
            chosen = [r for r in all_rows if diagnostics or not r.diagnostic]
        plan_rows = [r for r in chosen if r.name not in skip]
        if not plan_rows:
            raise ConfigError("rows: nothing to run")
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    return BenchPlan(synth, seed_list, teachers, plan_rows, raw, compare, baselines, heldout)


def _parse_rows(
    entries: Any,
    section_name: str,
    families: Mapping[str, Any],
    common: Mapping[str, Any],
    earlier: Sequence[BenchRow],
) -> list[BenchRow]:
    """The rows of one section (``rows`` or ``diagnostics``), resolved over family and common."""
    if not isinstance(entries, list):
        raise ConfigError(f"{section_name}: expected a list of rows")
    names = {r.name for r in earlier}
    out: list[BenchRow] = []
    for index, row in enumerate(entries):
        where = f"{section_name}[{index}]"
        if not isinstance(row, Mapping) or "name" not in row:
            raise ConfigError(f"{where}: a row is a mapping with at least a 'name'")
        for key in row:
            if key not in _ROW_KEYS:
                raise _unknown(str(key), _ROW_KEYS, where)
        name = str(row["name"])
        if name in names:
            raise ConfigError(f"{where}: duplicate row name '{name}'")
        names.add(name)
        fam = str(row.get("family", next(iter(families))))
        if fam not in families:
            raise _unknown(fam, list(families), f"{where} ({name}).family")
        section = families[fam] or {}
        merged = merge(dict(common), section.get("student") or {})
        merged = merge(merged, row.get("train") or {})
        if row.get("distill") is not None:
            merged["distill"] = merge(section.get("distill") or {}, row["distill"])
        try:
            cfg = config_from_dict(merged)
        except ConfigError as exc:
            raise ConfigError(f"{where} ({name}): {exc}") from None
        base = row.get("baseline")
        out.append(
            BenchRow(
                name,
                fam,
                str(row.get("description", "")),
                cfg,
                None if base is None else str(base),
                section_name == "diagnostics",
            )
        )
    return out


def _parse_compare(
    section: Any, by_name: Mapping[str, BenchRow], baselines: Mapping[str, str]
) -> Comparisons:
    """The ``compare`` section, each group checked: known rows, one family, budget, baseline."""
    if not isinstance(section, Mapping):
        raise ConfigError("compare: expected a mapping")
    for key in section:
        if key not in _COMPARE_KEYS:
            raise _unknown(str(key), _COMPARE_KEYS, "compare")

    def check(group: Sequence[str], where: str) -> None:
        for name in group:
            if name not in by_name:
                raise _unknown(name, sorted(by_name), where)
        rows = [by_name[n] for n in group]
        base = {_baseline_of(r, baselines) for r in rows}
        if len({r.family for r in rows}) > 1 or len(base) > 1:
            raise ConfigError(f"{where}: rows {list(group)} differ in family or baseline")
        if len({tuple(budget_of(r.config).values()) for r in rows}) > 1:
            raise ConfigError(
                f"{where}: rows {list(group)} differ in their budget "
                "(epochs, data.batch_size or max_iters)"
            )

    out = Comparisons()
    for index, entry in enumerate(section.get("full_fgd") or []):
        where = f"compare.full_fgd[{index}]"
        keys = set(entry) if isinstance(entry, Mapping) else set()
        if "row" not in keys or keys - {"row", "imitation"}:
            raise ConfigError(f"{where}: expected {{row: NAME, imitation: [NAMES]}}")
        imitation = tuple(str(n) for n in entry.get("imitation") or [])
        check([str(entry["row"]), *imitation], where)
        out.full_fgd.append((str(entry["row"]), imitation))
    for index, entry in enumerate(section.get("table1") or []):
        where = f"compare.table1[{index}]"
        if not isinstance(entry, Mapping) or set(entry) != set(_TABLE1_KEYS):
            raise ConfigError(f"{where}: expected the keys {', '.join(_TABLE1_KEYS)}")
        fg, bg, joint, split = (str(entry[k]) for k in _TABLE1_KEYS)
        check([fg, bg, joint, split], where)
        out.table1.append((fg, bg, joint, split))
    for index, name in enumerate(section.get("model_size") or []):
        where = f"compare.model_size[{index}]"
        check([str(name)], where)
        if by_name[str(name)].config.distill is not None:
            raise ConfigError(f"{where}: '{name}' must be a row without a distill section")
        out.model_size.append(str(name))
    return out


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    vals = [v for v in values if not math.isnan(v)]
    if not vals:
        return float("nan"), float("nan")
    mean = sum(vals) / len(vals)
    if len(vals) < 2:
        return mean, float("nan")
    var = sum((v - mean) ** 2 for v in vals) / (len(vals) - 1)
    return mean, math.sqrt(var)


def _loss_magnitudes(log_file: Path) -> dict[str, Any]:
    """First and last logged training losses: detection terms summed, FGD terms per level."""
    if not log_file.is_file():
        return {}
    records = []
    for line in log_file.read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if rec.get("type") == "train" and isinstance(rec.get("losses"), dict):
            records.append(rec)
    if not records:
        return {}
    out: dict[str, Any] = {}
    for label, rec in (("first", records[0]), ("last", records[-1])):
        losses = rec["losses"]
        det = sum(v for k, v in losses.items() if not k.startswith("fgd/"))
        per_level: dict[str, float] = {}
        for key, value in losses.items():
            if key.startswith("fgd/"):
                per_level[key[len("fgd/") :]] = float(value)
        out[label] = {"iter": rec.get("iter"), "detection": det, "distill": per_level}
    return out


def summarise(
    plan: BenchPlan,
    teachers: Mapping[str, StageResult],
    results: Mapping[str, Mapping[int, StageResult]],
) -> dict[str, Any]:
    """Per-row mean and spread over seeds, gain over the family's baseline, share of the gap.

    ``results`` maps row name -> seed -> result (seeds still missing are left out; so are
    diagnostic rows without any result). The baseline of a family is its first row without a
    ``distill`` section; a row with its own ``baseline`` is measured against that row instead.
    A row on another budget than its baseline (:func:`budget_of`: epochs, batch size, iteration
    cap) gets its gain but no share of the gap.
    Gain and share are paired by seed: taken over the seeds the row and its baseline both have
    (``paired_seeds``), so a seed one of them lacks does not move the difference.
    """
    families = {row.family for row in plan.rows}
    baselines = {fam: name for fam, name in plan.baselines.items() if fam in families}
    for row in plan.rows:
        if row.config.distill is None:
            baselines.setdefault(row.family, row.name)
    rows_out: list[dict[str, Any]] = []
    ap_per_seed: dict[str, dict[int, float]] = {}
    for row in plan.rows:
        per_seed = results.get(row.name, {})
        if row.diagnostic and not per_seed:
            continue
        stats: dict[str, dict[str, float]] = {}
        for metric in METRICS:
            mean, std = _mean_std([r.metrics.get(metric, float("nan")) for r in per_seed.values()])
            stats[metric] = {"mean": mean, "std": std}
        ap_per_seed[row.name] = {
            s: float(r.metrics.get("AP", float("nan"))) for s, r in per_seed.items()
        }
        walls = [r.wall_time_s for r in per_seed.values() if not math.isnan(r.wall_time_s)]
        rows_out.append(
            {
                "name": row.name,
                "family": row.family,
                "description": row.description,
                "diagnostic": row.diagnostic,
                "model": f"{row.config.model.arch} {row.config.model.backbone}",
                "seeds": sorted(per_seed),
                "per_seed": {str(s): r.metrics for s, r in sorted(per_seed.items())},
                "per_seed_wall_s": {str(s): r.wall_time_s for s, r in sorted(per_seed.items())},
                "fingerprints": {
                    str(s): r.fingerprint for s, r in sorted(per_seed.items()) if r.fingerprint
                },
                "imported": {
                    str(s): r.imported_from for s, r in sorted(per_seed.items()) if r.imported_from
                },
                "metrics": stats,
                "wall_time_s": sum(walls) / len(walls) if walls else float("nan"),
                "iterations": max((r.iterations for r in per_seed.values()), default=0),
                "work_dirs": [r.work_dir for _, r in sorted(per_seed.items())],
            }
        )
    plan_by_name = {row.name: row for row in plan.rows}
    budgets = {row.name: budget_of(row.config) for row in plan.rows}
    for out in rows_out:
        base = _baseline_of(plan_by_name[out["name"]], baselines)
        teacher = teachers.get(out["family"])
        mine = ap_per_seed[out["name"]]
        theirs = ap_per_seed.get(base, {}) if base is not None else {}
        known = {s for s, v in mine.items() if not math.isnan(v)}
        paired = sorted(known & {s for s, v in theirs.items() if not math.isnan(v)})
        ap, _ = _mean_std([mine[s] for s in paired])
        base_ap, _ = _mean_std([theirs[s] for s in paired])
        t_ap = teacher.metrics.get("AP", float("nan")) if teacher else float("nan")
        gap = t_ap - base_ap
        out["baseline"] = base
        out["epochs"] = budgets[out["name"]]["epochs"]
        out["budget"] = budgets[out["name"]]
        out["paired_seeds"] = paired
        # the table's AP columns are means over each row's own seeds; say so where they differ
        same = paired == sorted(mine) == sorted(theirs)
        out["unpaired"] = bool(mine) and bool(theirs) and not same
        out["gap_AP"] = gap
        out["gain_AP"] = ap - base_ap
        # A row on another budget than its baseline differs in training length, not only in
        # distillation, so no share of the gap is claimed for it.
        same_budget = base is None or budgets.get(base, out["budget"]) == out["budget"]
        out["gap_share"] = (ap - base_ap) / gap if gap > 0 and same_budget else float("nan")
    return {
        "teachers": {
            fam: {
                "model": t.model,
                "metrics": t.metrics,
                "wall_time_s": t.wall_time_s,
                "iterations": t.iterations,
                "work_dir": t.work_dir,
                "fingerprint": t.fingerprint,
                "imported_from": t.imported_from,
            }
            for fam, t in teachers.items()
        },
        "baselines": baselines,
        "rows": rows_out,
        "compare": asdict(plan.compare),
    }


@dataclass
class Imported:
    """What :func:`import_results` took from earlier results files.

    ``teachers`` and ``results`` (row -> seed -> result) are the work dir's own, with the gaps
    filled in; ``loss_magnitudes`` are the files' records for rows whose first seed was
    imported; ``notes`` has one sentence per file: what it gave and how that was checked.
    """

    teachers: dict[str, StageResult]
    results: dict[str, dict[int, StageResult]]
    loss_magnitudes: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def _same_metrics(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
    """Whether two metric dicts hold the same keys and values (NaN equal to NaN)."""
    if set(a) != set(b):
        return False
    for key, x in a.items():
        y = b[key]
        if not isinstance(x, int | float) or not isinstance(y, int | float):
            return False
        if math.isnan(x) and math.isnan(y):
            continue
        if not math.isclose(x, y, rel_tol=1e-9, abs_tol=1e-9):
            return False
    return True


def read_results_file(path: str | Path) -> dict[str, Any]:
    """A results JSON written by this benchmark, checked for the keys the import reads.

    Raises:
        ConfigError: naming the file (and the row), when it cannot be read or is not one.
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the results file ({exc.strerror})") from None
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}: not a JSON file (line {exc.lineno}: {exc.msg})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: not a results file of `fgdistill bench quality`")
    for key, kind in (("teachers", dict), ("rows", list), ("seeds", list)):
        if not isinstance(data.get(key), kind):
            raise ConfigError(
                f"{path}: not a results file of `fgdistill bench quality` "
                f"(no '{key}' {kind.__name__})"
            )
    for i, row in enumerate(data["rows"]):
        per_seed = row.get("per_seed") if isinstance(row, dict) else None
        if not isinstance(per_seed, dict) or not isinstance(row.get("name"), str):
            raise ConfigError(f"{path}: rows[{i}]: needs a 'name' and a 'per_seed' mapping")
        for key, metrics in per_seed.items():
            if not str(key).lstrip("-").isdigit() or not isinstance(metrics, dict):
                raise ConfigError(
                    f"{path}: rows[{i}] ({row['name']}): per_seed['{key}'] must map a seed "
                    "to its metrics"
                )
    return data


def import_results(
    sources: Sequence[tuple[str | Path, Mapping[str, Any]]],
    plan: BenchPlan,
    teachers: Mapping[str, StageResult],
    results: Mapping[str, Mapping[int, StageResult]],
    *,
    teacher_fps: Mapping[str, str],
    stage_fps: Mapping[tuple[str, int], str],
    say: Callable[[str], None] = logger.info,
) -> Imported:
    """Fill in the teachers and the row results this work dir lacks from earlier results files.

    ``sources`` are ``(path, contents)`` pairs, the contents as :func:`read_results_file` gives
    them (read once: a run that rewrites such a file keeps merging what it held at the start).

    A result is taken only for a family, or a row and seed, of the plan that the work dir has
    not finished; the work dir's own results always win, then the first file that has one.
    Where a file recorded a stage's fingerprint it must equal the plan's. A distilled row is
    taken only if the file's teacher of that family has the same metrics as the teacher the
    row will be measured against (the work dir's, or one taken from an earlier file): the
    fingerprint fixes the teacher's settings, but another kind of CPU trains another teacher
    from them, and twelve COCO metrics equal to 1e-9 mean the same model in practice. A file
    written before fingerprints were recorded is checked by its teacher alone: its distilled
    rows that inherit under a rule revised since (``inherit_revision`` above 1: RepPoints)
    are never taken; its undistilled rows, and distilled rows with no teacher to check
    against, by row name and seed alone, and so is its teacher. Seeds outside the plan and
    rows the plan lacks are left out. The notes say which check each result took.
    """
    merged_teachers = dict(teachers)
    merged = {row.name: dict(results.get(row.name, {})) for row in plan.rows}
    imported = Imported(merged_teachers, merged)
    families = {row.family for row in plan.rows}
    by_name = {row.name: row for row in plan.rows}
    for file, data in sources:
        path = Path(file)
        counts = {"fingerprint": 0, "teacher": 0, "name": 0}
        skipped: list[str] = []
        by_name_only: list[str] = []
        taken_teachers: list[str] = []
        for fam, t in data["teachers"].items():
            if fam not in families or fam in merged_teachers or not isinstance(t, dict):
                continue
            fp = str(t.get("fingerprint") or "")
            if fp and fp != teacher_fps.get(fam):
                skipped.append(f"teacher {fam} (other settings: fingerprint differs)")
                continue
            if not fp:
                by_name_only.append(f"teacher {fam}")
            merged_teachers[fam] = StageResult(
                name=f"teacher_{fam}",
                model=str(t.get("model", "")),
                metrics=dict(t.get("metrics") or {}),
                wall_time_s=float(t.get("wall_time_s", float("nan"))),
                iterations=int(t.get("iterations", 0)),
                reused=True,
                work_dir=str(t.get("work_dir", "")),
                fingerprint=fp,
                imported_from=str(path),
            )
            taken_teachers.append(fam)
        first_seed = data["seeds"][0] if data["seeds"] else None
        for entry in data["rows"]:
            row = by_name.get(entry["name"])
            if row is None:
                skipped.append(f"{entry['name']} (not a row of this plan)")
                continue
            fps = entry.get("fingerprints") or {}
            walls = entry.get("per_seed_wall_s") or {}
            dirs = dict(zip(entry.get("seeds") or [], entry.get("work_dirs") or [], strict=False))
            # The teacher this row is measured against: the work dir's, or one taken from an
            # earlier file. A fingerprint fixes the teacher's settings, not its weights
            # (another kind of CPU trains another teacher from them), so a distilled row must
            # also come from a teacher with the same metrics.
            ours = merged_teachers.get(row.family)
            if ours is not None and ours.imported_from == str(path):
                ours = None  # the file's own teacher: nothing to check against
            theirs = (data["teachers"].get(row.family) or {}).get("metrics") or {}
            other_teacher = (
                row.config.distill is not None
                and ours is not None
                and not _same_metrics(theirs, ours.metrics)
            )
            for key, metrics in entry["per_seed"].items():
                seed = int(key)
                label = f"{row.name} seed {seed}"
                if seed not in plan.seeds:
                    skipped.append(f"{label} (seed not in --seeds)")
                    continue
                if seed in merged[row.name]:
                    continue
                fp = str(fps.get(key) or "")
                if fp:
                    if fp != stage_fps.get((row.name, seed)):
                        skipped.append(f"{label} (other settings: fingerprint differs)")
                        continue
                    if other_teacher:
                        skipped.append(f"{label} (distilled from another teacher)")
                        continue
                    check = "fingerprint"
                elif inherit_revision(row.config) > 1:
                    # older than fingerprints, so older than the current inheriting rule of
                    # this architecture (RepPoints: 2026-12-02): not pooled with newer seeds
                    skipped.append(f"{label} (inherited by an older rule, before fingerprints)")
                    continue
                elif row.config.distill is not None and ours is not None:
                    if other_teacher:
                        skipped.append(f"{label} (distilled from another teacher)")
                        continue
                    check = "teacher"
                else:
                    check = "name"
                counts[check] += 1
                merged[row.name][seed] = StageResult(
                    name=row.name,
                    model=str(entry.get("model", "")),
                    metrics=dict(metrics),
                    wall_time_s=float(walls.get(key, entry.get("wall_time_s", float("nan")))),
                    iterations=int(entry.get("iterations", 0)),
                    reused=True,
                    work_dir=str(dirs.get(seed, "")),
                    fingerprint=fp,
                    imported_from=str(path),
                )
                mags = (data.get("loss_magnitudes") or {}).get(row.name)
                if seed == plan.seeds[0] == first_seed and mags:
                    imported.loss_magnitudes[row.name] = mags
        for line in skipped:
            say(f"import {path}: left out {line}")
        for line in by_name_only:
            say(f"import {path}: took {line} by name only (the file records no fingerprint)")
        taken = sum(counts.values())
        note = (
            f"from {path}: {taken} row result(s) of one seed"
            + (f" and the {', '.join(taken_teachers)} teacher(s)" if taken_teachers else "")
            + f"; checked by fingerprint {counts['fingerprint']}, by the teacher's metrics "
            f"{counts['teacher']}, by row name and seed only {counts['name']}"
            + (f"; left out {len(skipped)}" if skipped else "")
            + (f"; by name only: {', '.join(by_name_only)}" if by_name_only else "")
        )
        say(f"import {note}")
        imported.notes.append(note)
    return imported


def _fmt(value: float, digits: int = 2) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{value:.{digits}f}"


def _cell(stat: Mapping[str, float]) -> str:
    mean, std = stat["mean"], stat["std"]
    if math.isnan(mean):
        return "n/a"
    return f"{mean:.2f}" if math.isnan(std) else f"{mean:.2f} ± {std:.2f}"


_TABLE_HEAD = (
    "| row | model | seeds | " + " | ".join(METRICS) + " | gain AP | gap closed | wall/seed |",
    "|---|---|---|" + "---:|" * (len(METRICS) + 3),
)


def _unpaired(row: Mapping[str, Any]) -> bool:
    """Whether the row's gain was taken over fewer seeds than it or its baseline has."""
    return bool(row.get("unpaired", False))


def _table_line(row: Mapping[str, Any]) -> str:
    cells = [_cell(row["metrics"][m]) for m in METRICS]
    share = row["gap_share"]
    n_imported = len(row.get("imported") or {})
    seeds = f"{len(row['seeds'])}" + (f" ({n_imported} imported)" if n_imported else "")
    mark = " *" if _unpaired(row) else ""
    return (
        f"| {row['name']} | {row['model']} | {seeds} | "
        + " | ".join(cells)
        + f" | {_fmt(row['gain_AP'])}{mark} | "
        + ("n/a" if math.isnan(share) else f"{100 * share:.0f}%")
        + f" | {mmss(row['wall_time_s']) if row['seeds'] else 'not run'} |"
    )


def render_markdown(data: Mapping[str, Any]) -> str:
    """The results file: settings, the table, conclusions and loss magnitudes."""
    lines = [
        "# Quality benchmark: FGD ablations on synthetic data",
        "",
        "Generated by `fgdistill bench quality`; every number below was measured by the run",
        "described here. Metrics are COCO box metrics in percent on the validation split,",
        "mean ± sample standard deviation over seeds.",
        "",
        f"- command: `{data['command']}`",
        f"- machine: {data['machine']}",
        f"- date: {data['date']}",
        f"- seeds: {data['seeds']}; status: {data['status']}",
        *([f"- students trained by this invocation: {data['lanes']}"] if data.get("lanes") else []),
        f"- wall time of this invocation: {mmss(data['wall_time_s'])} "
        "(reused stages count their original time in the table, not here)",
        *(f"- imported {note}" for note in data.get("imported") or []),
        "",
        *_TABLE_HEAD,
    ]
    for fam, t in data["teachers"].items():
        cells = [_fmt(t["metrics"].get(m, float("nan"))) for m in METRICS]
        imported = " (imported)" if t.get("imported_from") else ""
        lines.append(
            f"| teacher ({fam}) | {t['model']} | 1{imported} | "
            + " | ".join(cells)
            + f" | | | {mmss(t['wall_time_s'])} |"
        )
    main_rows = [r for r in data["rows"] if not r.get("diagnostic")]
    diagnostic_rows = [r for r in data["rows"] if r.get("diagnostic")]
    lines += [_table_line(row) for row in main_rows]
    if diagnostic_rows:
        lines += [
            "",
            "Diagnostic rows (run on request: `--rows NAME` or `--diagnostics`):",
            "",
            *_TABLE_HEAD,
            *(_table_line(row) for row in diagnostic_rows),
        ]
    unpaired = [r for r in data["rows"] if _unpaired(r)]
    if unpaired:
        lines += [
            "",
            "\\* gain and gap closed over the seeds the row shares with its baseline only: "
            + "; ".join(
                f"`{r['name']}` seeds {r['paired_seeds']}"
                if r["paired_seeds"]
                else f"`{r['name']}` no seed in common"
                for r in unpaired
            )
            + ".",
        ]
    lines += ["", "Rows:", ""]
    for row in data["rows"]:
        against = ""
        if row.get("baseline") not in (None, data["baselines"].get(row["family"])):
            against = f" (gain and gap measured against `{row['baseline']}`)"
        lines.append(f"- `{row['name']}` ({row['family']}): {row['description']}{against}")
    lines += ["", "## Conclusions (computed from the table)", ""]
    lines += [f"- {c}" for c in data["conclusions"]]
    if data.get("heldout"):
        lines += _render_heldout(data["heldout"], data["synth"])
    mags = data.get("loss_magnitudes") or {}
    if mags:
        lines += [
            "",
            "## Loss magnitudes (first seed; weighted terms as trained, first and last log)",
            "",
            "| row | iter | detection | distillation terms summed per level |",
            "|---|---:|---:|---|",
        ]
        for name, mag in mags.items():
            for label in ("first", "last"):
                rec = mag.get(label)
                if not rec:
                    continue
                levels: dict[str, float] = {}
                for key, value in rec["distill"].items():
                    lv = key.split("/")[0]
                    levels[lv] = levels.get(lv, 0.0) + value
                text = ", ".join(f"{lv} {v:.3g}" for lv, v in levels.items())
                lines.append(f"| {name} | {rec['iter']} | {rec['detection']:.3f} | {text} |")
    return "\n".join(lines) + "\n"


def _render_heldout(held: Mapping[str, Any], synth: Mapping[str, Any]) -> list[str]:
    """The results file's held-out section: a table like the main one, and its conclusions."""
    lines = [
        "",
        f"## On a held-out set ({held['images']} images, seed {held['seed']})",
        "",
        f"The finished stages of this work dir, scored on {held['images']} synthetic images "
        f"drawn like the validation split ({synth['num_val']} images, seed {synth['seed']}) "
        "with another seed, so that no image of it is one the options were chosen on. Rows "
        "imported from other results files have no checkpoint here and are not in it. Gains "
        "and gap shares are paired by seed, as above; val AP is over the same seeds.",
        "",
        "| row | seeds | AP | AP50 | AP75 | APs | APm | APl | val AP | gain AP | gap closed |",
        "|---|---|" + "---:|" * 9,
    ]
    for fam, t in held["teachers"].items():
        cells = [_fmt(t["metrics"].get(m, float("nan"))) for m in METRICS]
        lines.append(f"| teacher ({fam}) | 1 | " + " | ".join(cells) + " | | | |")
    for row in held["rows"]:
        if not row["seeds"]:
            continue
        cells = [_cell(row["metrics"][m]) for m in METRICS]
        share = row["gap_share"]
        mark = " *" if _unpaired(row) else ""
        lines.append(
            f"| {row['name']} | {','.join(map(str, row['seeds']))} | "
            + " | ".join(cells)
            + f" | {_cell(row['val_AP'])} | {_fmt(row['gain_AP'])}{mark} | "
            + ("n/a" if math.isnan(share) else f"{100 * share:.0f}%")
            + " |"
        )
    lines += ["", "Conclusions on the held-out set:", ""]
    lines += [f"- {c}" for c in held["conclusions"]]
    return lines


def _budget_or_epochs(row: Mapping[str, Any]) -> dict[str, Any]:
    """A summarised row's budget; results files written before budgets were kept give epochs."""
    budget = row.get("budget")
    return dict(budget) if isinstance(budget, Mapping) else {"epochs": row.get("epochs")}


def conclusions(data: Mapping[str, Any]) -> list[str]:
    """Plain sentences about the targets, computed from the summary."""
    rows = {r["name"]: r for r in data["rows"] if r["seeds"]}
    out: list[str] = []

    def ap(name: str) -> tuple[float, float]:
        stat = rows[name]["metrics"]["AP"]
        return stat["mean"], stat["std"]

    for fam, base in data["baselines"].items():
        teacher = data["teachers"].get(fam)
        if teacher is None or base not in rows:
            continue
        t_ap = teacher["metrics"].get("AP", float("nan"))
        own_bases = [r.get("baseline") for r in data["rows"] if r["family"] == fam]
        for name in dict.fromkeys([base, *own_bases]):
            if name is None or name not in rows:
                continue
            b_ap, _ = ap(name)
            gap = t_ap - b_ap
            verdict = "MET" if gap >= 5 else "NOT met"
            which = "baseline" if name == base else f"baseline {name}"
            out.append(
                f"{fam}: teacher {t_ap:.2f} vs {which} {b_ap:.2f} AP: gap {gap:+.2f} "
                f"(target >= 5 AP: {verdict})."
            )
        for row in data["rows"]:
            own = row.get("baseline") or base
            skip = row["family"] != fam or row["name"] in (base, own)
            if skip or row["name"] not in rows or own not in rows:
                continue
            b_ap, b_std = ap(own)
            r_ap, r_std = ap(row["name"])
            gain = row.get("gain_AP", r_ap - b_ap)
            if math.isnan(gain):
                out.append(
                    f"{fam} {row['name']}: {r_ap:.2f} AP; no seed in common with "
                    f"{'the baseline' if own == base else own}, so no gain."
                )
                continue
            noise = max(v for v in (b_std, r_std, 0.0) if not math.isnan(v))
            beyond = (
                "beyond the seed spread"
                if noise > 0 and abs(gain) > 2 * noise
                else "within twice the seed spread"
                if noise > 0
                else "one seed, spread unknown"
            )
            share = row["gap_share"]
            share_text = "" if math.isnan(share) else f", {100 * share:.0f}% of the gap"
            mine, theirs = _budget_or_epochs(row), _budget_or_epochs(rows[own])
            if mine != theirs:
                share_text = (
                    f", trained {_budget_text(mine, theirs)} against its baseline's "
                    f"{_budget_text(theirs, mine)}: training length, not distillation, so no "
                    "share of the gap"
                )
            over = "the baseline" if own == base else own
            if _unpaired(row):
                over += f" on the seeds both have, {row['paired_seeds']}"
            out.append(
                f"{fam} {row['name']}: {r_ap:.2f} AP, {gain:+.2f} over {over}"
                f"{share_text} ({beyond})."
            )
    compare = data.get("compare") or {}
    for name in compare.get("model_size", []):
        row = rows.get(name)
        teacher = data["teachers"].get(row["family"]) if row else None
        if row is None or teacher is None or row["baseline"] not in rows:
            continue
        t_ap = teacher["metrics"].get("AP", float("nan"))
        mid, _ = ap(name)
        base, _ = ap(row["baseline"])
        out.append(
            f"{row['family']}: the gap splits into model size {mid - base:+.2f} AP ({name}, the "
            f"teacher's model on the students' budget, minus {row['baseline']}) and training "
            f"length {t_ap - mid:+.2f} AP (teacher minus {name})."
        )
    for full, imitations in compare.get("full_fgd", []):
        if full not in rows:
            continue
        f_ap, _ = ap(full)
        for imitation in (name for name in imitations if name in rows):
            i_ap, _ = ap(imitation)
            word = "beat" if f_ap > i_ap else "did NOT beat"
            out.append(
                f"full FGD ({full}) {word} plain feature imitation ({imitation}): "
                f"{f_ap:.2f} vs {i_ap:.2f} AP{_seed_sets(rows, [full, imitation])}."
            )
        share = rows[full]["gap_share"]
        if not math.isnan(share):
            verdict = "MET" if share >= 0.5 else "NOT met"
            family = rows[full]["family"]
            own = rows[full].get("baseline") or data["baselines"][family]
            t_ap = data["teachers"][family]["metrics"].get("AP", float("nan"))
            gap = rows[full].get("gap_AP", t_ap - ap(own)[0])
            small = "" if gap >= 5 else "; this gap is under the 5 AP target"
            if _unpaired(rows[full]):
                small += f"; gap and gain over the seeds both have, {rows[full]['paired_seeds']}"
            out.append(
                f"full FGD ({full}) closed {_percent_against_half(share)} of the {gap:.2f} AP gap "
                f"(target >= 50%: {verdict}{small})."
            )
    for table1 in compare.get("table1", []):
        if not all(n in rows for n in table1):
            continue
        got = {n: ap(n)[0] for n in table1}
        order = " > ".join(f"{n} {got[n]:.2f}" for n in sorted(got, key=lambda n: -got[n]))
        fg_only, bg_only, joint, split = (got[n] for n in table1)
        paper = split >= fg_only >= bg_only >= joint
        verdict = "reproduced" if paper else "NOT reproduced"
        out.append(
            f"Table 1 ordering here: {order}. The paper's, for RetinaNet (split 39.4 > fg 39.3 "
            f"> bg 39.2 > joint 38.9): {verdict}{_seed_sets(rows, list(table1))}."
        )
    return out


def _percent_against_half(share: float) -> str:
    """``share`` in whole percent, or to a tenth (cut, not rounded) where whole percent would
    put it on the other side of 50% than it is (49.7% is not "50%" and not met)."""
    whole = round(100 * share)
    if (whole >= 50) != (share >= 0.5):
        return f"{math.floor(1000 * share) / 10:.1f}%"
    return f"{whole}%"


def is_complete(
    plan: BenchPlan,
    teachers: Mapping[str, StageResult],
    results: Mapping[str, Mapping[int, StageResult]],
) -> bool:
    """Whether every family has its teacher and every row every seed of the plan.

    A diagnostic row with no result at all does not count: ``--report-only`` plans every
    diagnostic row so that any finished one is reported, and most are never run.
    """
    counted = [row for row in plan.rows if results.get(row.name) or not row.diagnostic]
    return set(teachers) >= {row.family for row in counted} and all(
        len(results.get(row.name, {})) == len(plan.seeds) for row in counted
    )


def _seed_sets(rows: Mapping[str, Mapping[str, Any]], names: Sequence[str]) -> str:
    """``""`` when the rows ``names`` have the same seeds, else a note naming each row's."""
    if len({tuple(rows[n]["seeds"]) for n in names}) <= 1:
        return ""
    return (
        " (means over different seeds: "
        + ", ".join(f"{n} {list(rows[n]['seeds'])}" for n in names)
        + ")"
    )


def run_quality_bench(
    work_dir: str | Path,
    *,
    config: str | Path,
    overrides: Sequence[str] = (),
    quick: bool = False,
    seeds: Sequence[int] | None = None,
    rows: Sequence[str] | None = None,
    results_file: str | Path | None = None,
    progress: bool = True,
    train_fn: Callable[..., Any] | None = None,
    say: Callable[[str], None] | None = None,
    command: str | None = None,
    report_only: bool = False,
    diagnostics: bool = False,
    jobs: int = 1,
    merge_from: Sequence[str | Path] = (),
) -> dict[str, Any]:
    """Train (or reuse) the teachers and every row for every seed; write the results.

    ``diagnostics`` adds the config's diagnostic rows. The teachers train first, one at a time;
    with ``jobs`` > 1 the students then train that many at a time, each in a child process with
    the threads divided between them (progress bars off). With ``report_only`` nothing is trained:
    the results cover the finished runs only (e.g. of several invocations with different
    ``--seeds`` or ``--rows`` that shared the work dir), diagnostic rows included.
    ``merge_from`` names earlier results JSON files whose results fill the gaps of the work dir
    (:func:`import_results`; e.g. a published table whose work dir is on another machine).

    A run that trains holds a lock on ``work_dir`` (``.bench.lock``): a second one that would
    train in the same work dir stops with a :class:`ConfigError` instead of training the same
    teacher, or replacing the data, under the first. ``report_only`` takes no lock.

    Returns the summary written to ``work_dir/results.json``.
    """
    if jobs < 1:
        raise ConfigError(f"--jobs: need at least 1, got {jobs}")
    if results_file is not None and Path(results_file).suffix.lower() == ".json":
        raise ConfigError(
            f"--results {results_file}: name the Markdown file (e.g. docs/results.md); "
            "the JSON is written beside it with the suffix .json"
        )
    # Read once, before anything trains (a wrong file fails first) or is written (the results
    # file may be the one merged from).
    sources = [(Path(f), read_results_file(f)) for f in merge_from]
    plan = load_bench_config(
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
            (say or logger.info)(
                f"also running {', '.join(added)}: the "
                f"{'baselines' if len(added) > 1 else 'baseline'} the chosen rows' gains are "
                "measured against (reused where finished)"
            )
    with _work_dir_lock(Path(work_dir), enabled=not report_only, say=say or logger.warning):
        return _run_quality_bench(
            Path(work_dir),
            plan,
            sources,
            results_file=results_file,
            progress=progress,
            train_fn=train_fn,
            say=say,
            command=command,
            report_only=report_only,
            jobs=jobs,
        )


@contextlib.contextmanager
def _work_dir_lock(work: Path, *, enabled: bool, say: Callable[[str], None]) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``work/.bench.lock`` (POSIX) for the block.

    Where the file system cannot lock (some network mounts), ``say`` warns and the block runs
    without the lock.
    """
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock
        enabled = False
    if not enabled:
        yield
        return
    work.mkdir(parents=True, exist_ok=True)
    with open(work / ".bench.lock", "a+", encoding="utf-8") as fh:
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ConfigError(
                f"{work}: another `fgdistill bench quality` is training in this work dir "
                "(it holds .bench.lock); wait for it to end, or look at what it finished with "
                "--report-only"
            ) from None
        except OSError as exc:
            say(f"{work}: cannot lock .bench.lock ({exc}); running without the lock")
        yield


def _run_quality_bench(
    work: Path,
    plan: BenchPlan,
    sources: Sequence[tuple[Path, dict[str, Any]]],
    *,
    results_file: str | Path | None,
    progress: bool,
    train_fn: Callable[..., Any] | None,
    say: Callable[[str], None] | None,
    command: str | None,
    report_only: bool,
    jobs: int,
) -> dict[str, Any]:
    """The body of :func:`run_quality_bench`, after its checks, inside its lock."""
    from fgdistill.engine.runner import train

    custom_train_fn = train_fn
    train_fn = train_fn or train
    tell = say or logger.info
    start = time.perf_counter()
    work.mkdir(parents=True, exist_ok=True)
    command = command or " ".join(shlex.quote(a) for a in ["fgdistill", *sys.argv[1:]])
    data_dir = work / "data"
    if report_only:
        from fgdistill.engine.stages import fingerprint

        data_fp = fingerprint(asdict(plan.synth))
    else:
        data_fp, _, _ = prepare_data(data_dir, plan.synth, progress=progress, say=tell)

    teachers: dict[str, StageResult] = {}
    teacher_cfgs: dict[str, TrainConfig] = {}
    teacher_fps: dict[str, str] = {}
    families = list(dict.fromkeys(r.family for r in plan.rows))
    for fam in families:
        cfg = copy.deepcopy(plan.teachers[fam])
        cfg.name = f"teacher_{fam}"
        cfg.work_dir = str(work / cfg.name)
        point_at_data(cfg, data_dir)
        result, teacher_fps[fam] = run_stage(
            cfg,
            upstream=[data_fp],
            train_fn=train_fn,
            progress=progress,
            say=tell,
            label=f"teacher {fam}",
            reuse_only=report_only,
        )
        if result is not None:
            teachers[fam] = result
            teacher_cfgs[fam] = cfg

    results: dict[str, dict[int, StageResult]] = {r.name: {} for r in plan.rows}
    tasks: list[_Task] = []
    for seed in plan.seeds:
        for row in plan.rows:
            cfg = copy.deepcopy(row.config)
            cfg.name = row.name
            cfg.seed = seed
            cfg.work_dir = str(work / f"seed{seed}" / row.name)
            point_at_data(cfg, data_dir)
            upstream = [data_fp]
            if cfg.distill is not None:
                cfg.distill.teacher = copy.deepcopy(plan.teachers[row.family].model)
                cfg.distill.teacher_checkpoint = str(work / f"teacher_{row.family}" / "model.pt")
                upstream.append(teacher_fps[row.family])
            label = f"[{len(tasks) + 1}/{len(plan.rows) * len(plan.seeds)}] seed {seed} {row.name}"
            tasks.append(_Task(seed, row.name, cfg, upstream, label))
    stage_fps = {(t.row, t.seed): stage_fingerprint(t.config, t.upstream) for t in tasks}
    done = 0
    summary: dict[str, Any] = {}

    def write(heldout: Mapping[str, Any] | None = None) -> dict[str, Any]:
        merged = Imported(teachers, {k: dict(v) for k, v in results.items()})
        if sources:
            merged = import_results(
                sources,
                plan,
                teachers,
                results,
                teacher_fps=teacher_fps,
                stage_fps=stage_fps,
                # Said once, when the last run is recorded; the files record it every time.
                say=tell if done == len(tasks) and heldout is None else _quiet,
            )
        return _write_results(
            work,
            plan,
            merged,
            complete=done == len(tasks) and is_complete(plan, merged.teachers, merged.results),
            wall=time.perf_counter() - start,
            command=command,
            results_file=results_file,
            # how this invocation's students trained: None where it trained none
            lanes=None
            if report_only or all(r.reused for per in results.values() for r in per.values())
            else f"{jobs} at a time, {max(1, _threads() // jobs)} thread(s) each"
            if jobs > 1
            else "one at a time",
            heldout=heldout,
        )

    def record(task: _Task, result: StageResult | None) -> None:
        nonlocal done, summary
        done += 1
        if result is not None:
            results[task.row][task.seed] = result
        if report_only and done < len(tasks):
            return
        summary = write()

    if jobs > 1 and not report_only:
        _run_in_parallel(tasks, jobs, custom_train_fn, tell, record)
    else:
        never_run: list[str] = []
        for task in tasks:
            lines: list[str] = []
            result, _ = run_stage(
                task.config,
                upstream=task.upstream,
                train_fn=train_fn,
                progress=progress,
                say=lines.append if report_only else tell,
                label=task.label,
                reuse_only=report_only,
            )
            if result is None and not Path(task.config.work_dir).exists():
                never_run.append(f"seed {task.seed} {task.row}")  # one line for all, below
            else:
                for line in lines:
                    tell(line)
            record(task, result)
        if never_run:
            named = ", ".join(never_run[:3]) + (
                f" and {len(never_run) - 3} more" if len(never_run) > 3 else ""
            )
            tell(f"never run in {work}, so left out: {len(never_run)} stage(s): {named}")
    # scoring, not training: --report-only scores the finished stages too (once: it is cached)
    if plan.heldout.images > 0 and (teachers or any(results.values())):
        configs = {(t.row, t.seed): t.config for t in tasks}
        held_fp, held_teachers, held_results = score_heldout(
            work,
            plan.synth,
            plan.heldout,
            {fam: (t, teacher_cfgs[fam]) for fam, t in teachers.items()},
            {
                row: {seed: (r, configs[(row, seed)]) for seed, r in per.items()}
                for row, per in results.items()
            },
            progress=progress,
            say=tell,
        )
        summary = write(_heldout_summary(plan, held_fp, held_teachers, held_results, results))
    return summary


def _heldout_summary(
    plan: BenchPlan,
    data_fp: str,
    teachers: Mapping[str, StageResult],
    held: Mapping[str, Mapping[int, StageResult]],
    val: Mapping[str, Mapping[int, StageResult]],
) -> dict[str, Any]:
    """:func:`summarise` and :func:`conclusions` of the held-out scores, with each row's
    validation AP over the same seeds (``val_AP``) beside them."""
    data = summarise(plan, teachers, held)
    for row in data["rows"]:
        per_seed = val[row["name"]]
        mean, std = _mean_std([per_seed[s].metrics.get("AP", math.nan) for s in row["seeds"]])
        row["val_AP"] = {"mean": mean, "std": std}
    data["conclusions"] = conclusions(data)
    data.update(
        {
            "images": plan.heldout.images,
            "seed": plan.heldout.seed,
            "data_fingerprint": data_fp,
        }
    )
    return data


@dataclass
class _Task:
    """One student stage: a row trained with one seed."""

    seed: int
    row: str
    config: TrainConfig
    upstream: list[str]
    label: str


def _run_in_parallel(
    tasks: Sequence[_Task],
    jobs: int,
    train_fn: Callable[..., Any] | None,
    tell: Callable[[str], None],
    record: Callable[[_Task, StageResult | None], None],
) -> None:
    """Reuse the finished stages here; train the others ``jobs`` at a time in child processes.

    Each child gets this process's torch threads divided by ``jobs`` (at least one); results are
    recorded as they finish, so the results files grow as in a serial run.
    """
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    pending: list[_Task] = []
    for task in tasks:
        lines: list[str] = []
        result, _ = run_stage(
            task.config,
            upstream=task.upstream,
            train_fn=_no_training,
            progress=False,
            say=lines.append,
            label=task.label,
            reuse_only=True,
        )
        if result is None:
            pending.append(task)
        else:
            tell(lines[-1])
            record(task, result)
    if not pending:
        return
    threads = max(1, _threads() // jobs)
    tell(f"training {len(pending)} runs, {jobs} at a time, {threads} thread(s) each")
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(
        max_workers=min(jobs, len(pending)),
        mp_context=context,
        initializer=_die_with_parent,
        initargs=(os.getpid(),),
    ) as pool:
        futures = {pool.submit(_train_in_child, task, threads, train_fn): task for task in pending}
        try:
            for future in as_completed(futures):
                record(futures[future], future.result())
        except BaseException:
            for future in futures:
                future.cancel()
            raise


def _die_with_parent(parent: int) -> None:
    """Ask the kernel to stop this pool worker when its parent ``parent`` dies.

    Killing only the ``bench quality`` process (``kill -9``, an out-of-memory kill) would otherwise
    leave its workers training for hours with nobody to record their results. Linux only; a worker
    elsewhere still stops when its parent exits cleanly.
    """
    if sys.platform.startswith("linux"):
        import ctypes
        import signal

        pr_set_pdeathsig = 1
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(pr_set_pdeathsig, int(signal.SIGTERM), 0, 0, 0)
        except (OSError, AttributeError):  # no prctl: the worker lives on as before
            return
    if os.getppid() != parent:  # the parent died before the request took hold
        os._exit(1)


def _quiet(line: str) -> None:
    """A ``say`` that drops its line."""


def _no_training(*args: Any, **kwargs: Any) -> Any:
    raise AssertionError("reuse_only never trains")


def _train_in_child(
    task: _Task, threads: int, train_fn: Callable[..., Any] | None
) -> StageResult | None:
    """One stage in a child process of :func:`_run_in_parallel`, with ``threads`` threads."""
    import torch

    from fgdistill.engine.runner import train

    torch.set_num_threads(threads)
    result, _ = run_stage(
        task.config,
        upstream=task.upstream,
        train_fn=train_fn or train,
        progress=False,
        say=_print_line,
        label=task.label,
    )
    return result


def _print_line(line: str) -> None:
    print(line, flush=True)


def _write_results(
    work: Path,
    plan: BenchPlan,
    merged: Imported,
    *,
    complete: bool,
    wall: float,
    command: str,
    results_file: str | Path | None,
    lanes: str | None = None,
    heldout: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    data = summarise(plan, merged.teachers, merged.results)
    first = plan.seeds[0]
    mags = {}
    for row in plan.rows:
        res = merged.results.get(row.name, {}).get(first)
        if res is not None and row.config.distill is not None:
            mag = (
                merged.loss_magnitudes.get(row.name)
                if res.imported_from
                else _loss_magnitudes(Path(res.work_dir) / "log.jsonl")
            )
            if mag:
                mags[row.name] = mag
    data.update(
        {
            "command": command,
            "machine": machine_line(),
            "lanes": lanes,
            "date": datetime.now(UTC).isoformat(timespec="seconds"),
            "seeds": plan.seeds,
            "status": "complete" if complete else "partial (rows still running or stopped)",
            "wall_time_s": wall,
            "synth": asdict(plan.synth),
            "imported": merged.notes,
            "loss_magnitudes": mags,
        }
    )
    data["conclusions"] = conclusions(data)
    if heldout is not None:
        data["heldout"] = heldout
    text = json.dumps(data, indent=2, default=str, allow_nan=True) + "\n"
    atomic_write_text(work / "results.json", text)
    md = render_markdown(data)
    atomic_write_text(work / "results.md", md)
    if results_file is not None:
        out = Path(results_file)
        kept = ""
        if out.is_file():
            old = out.read_text(encoding="utf-8")
            if NOTES_MARKER in old:
                kept = old[old.index(NOTES_MARKER) + len(NOTES_MARKER) :]
        out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out, md + "\n" + NOTES_MARKER + kept)
        atomic_write_text(out.with_suffix(".json"), text)
    return data


def _threads() -> int:
    import torch

    return int(torch.get_num_threads())
