"""A benchmark config, read and checked: the data, the teachers, the student rows and seeds.

A benchmark YAML (``configs/bench/quality.yaml``, ``configs/demo/demo.yaml``) has the sections:

- ``synth``: the synthetic data (arguments of ``fgdistill synth``);
- ``heldout``: a second set drawn like the validation split with another seed, on which every
  finished stage is also scored (``images: 0`` turns it off);
- ``seeds``: the students' seeds; every row runs with each;
- ``common``: a training config shared by every run;
- ``families``: per detector family, ``teacher`` and ``student`` (merged over ``common``) and the
  ``distill`` section each distilled row of the family starts from; a ``teacher`` given as the
  name of another family shares that family's teacher (a pair of two detector types);
- ``rows``: the student rows, each ``name``, ``description``, optional ``family``, ``train``
  (merged over the family's student), ``distill`` (merged over the family's; absent: no
  distillation) and ``baseline`` (the undistilled row its gain is measured against; default: the
  family's first undistilled row);
- ``diagnostics``: rows of the same form, run only on request;
- ``skip_rows``: names of rows not to run;
- ``compare``: named groups of rows of one family whose order the conclusions state;
- ``quick``: merged over the rest with ``--quick``; top-level keys starting with ``x-`` are
  ignored (a place for YAML anchors).
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fgdistill.engine.config import (
    TrainConfig,
    apply_overrides,
    config_from_dict,
    from_mapping,
    read_yaml,
)
from fgdistill.errors import ConfigError

__all__ = ["BenchPlan", "HeldoutSettings", "Row", "SynthSettings", "load_plan", "merge"]

SECTIONS = (
    "synth",
    "heldout",
    "seeds",
    "common",
    "families",
    "rows",
    "diagnostics",
    "skip_rows",
    "compare",
    "quick",
)
_FAMILY_KEYS = ("teacher", "student", "distill")
_ROW_KEYS = ("name", "family", "description", "distill", "train", "baseline")


@dataclass
class SynthSettings:
    """Synthetic data of a benchmark (arguments of ``generate_synthetic``)."""

    num_train: int = 1000
    num_val: int = 200
    image_size: int = 96
    difficulty: float = 0.5
    seed: int = 0


@dataclass
class HeldoutSettings:
    """``images`` images drawn like the validation split with ``seed``; 0 images: none."""

    images: int = 0
    seed: int = 7


@dataclass
class Row:
    """One student row: its resolved training config, distilled or not."""

    name: str
    family: str
    description: str
    config: TrainConfig
    #: the undistilled row its gain is measured against
    baseline: str | None = None
    diagnostic: bool = False


@dataclass
class BenchPlan:
    """A checked benchmark: data, seeds, one teacher config per family, and the rows to run."""

    synth: SynthSettings
    heldout: HeldoutSettings
    seeds: list[int]
    teachers: dict[str, TrainConfig]
    rows: list[Row]
    compare: dict[str, list[str]] = field(default_factory=dict)
    #: family -> the family whose teacher it distils from (itself unless it names another)
    teacher_of: dict[str, str] = field(default_factory=dict)

    def row(self, name: str) -> Row:
        """The row called ``name``."""
        return next(r for r in self.rows if r.name == name)

    def teacher_family(self, family: str) -> str:
        """The family whose teacher stage ``family``'s rows are distilled from."""
        return self.teacher_of.get(family, family)


def merge(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    """Deep merge of two plain mappings; ``over`` wins, nested mappings are merged."""
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def _unknown(key: str, valid: Sequence[str], where: str) -> ConfigError:
    close = difflib.get_close_matches(str(key), valid, n=1)
    hint = f"; did you mean '{close[0]}'?" if close else f"; valid: {', '.join(valid)}"
    return ConfigError(f"{where}: unknown key '{key}'{hint}")


def load_plan(
    path: str | Path,
    overrides: Sequence[str] = (),
    *,
    quick: bool = False,
    seeds: Sequence[int] | None = None,
    rows: Sequence[str] | None = None,
    diagnostics: bool = False,
) -> BenchPlan:
    """Read and check a benchmark YAML.

    ``quick`` merges the file's ``quick`` section over the rest; ``overrides`` (``--set``
    dotted keys) apply after that; ``seeds`` replaces the seeds. The plan runs ``rows`` (names
    from either row section, each with its baseline) or else the ``rows`` section, plus the
    ``diagnostics`` with ``diagnostics``, less ``skip_rows``.

    Raises:
        ConfigError: naming the file and the key.
    """
    raw = {k: v for k, v in read_yaml(path).items() if not str(k).startswith("x-")}
    try:
        for key in raw:
            if key not in SECTIONS:
                raise _unknown(str(key), SECTIONS, "top level")
        if quick:
            raw = merge(raw, raw.get("quick") or {})
        raw.pop("quick", None)
        raw = apply_overrides(raw, overrides)
        for key in raw:  # a --set of an unknown section
            if key not in SECTIONS or key == "quick":
                raise _unknown(str(key), SECTIONS[:-1], "--set: top level")
        return _plan(raw, quick=quick, seeds=seeds, rows=rows, diagnostics=diagnostics)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def _plan(
    raw: Mapping[str, Any],
    *,
    quick: bool,
    seeds: Sequence[int] | None,
    rows: Sequence[str] | None,
    diagnostics: bool,
) -> BenchPlan:
    synth = from_mapping(SynthSettings, raw.get("synth") or {}, "synth")
    heldout = from_mapping(HeldoutSettings, raw.get("heldout") or {}, "heldout")
    if heldout.images < 0:
        raise ConfigError(f"heldout.images: need 0 (off) or more, got {heldout.images}")
    if heldout.images and heldout.seed == synth.seed:
        raise ConfigError(
            f"heldout.seed: {heldout.seed} is synth.seed too, so the held-out set would repeat "
            "the validation split's images; choose another seed"
        )
    seed_list = [int(s) for s in (seeds if seeds is not None else raw.get("seeds") or [0])]
    if not seed_list or len(set(seed_list)) != len(seed_list):
        raise ConfigError(f"seeds: need one or more distinct seeds, got {seed_list}")
    common = raw.get("common") or {}
    families = raw.get("families") or {}
    if not isinstance(families, Mapping) or not families:
        raise ConfigError("families: need at least one detector family")
    teachers: dict[str, TrainConfig] = {}
    teacher_of: dict[str, str] = {}
    for fam, section in families.items():
        for key in section or {}:
            if key not in _FAMILY_KEYS:
                raise _unknown(str(key), _FAMILY_KEYS, f"families.{fam}")
        teacher = (section or {}).get("teacher") or {}
        if isinstance(teacher, str):
            owner = families.get(teacher)
            if owner is None or isinstance((owner or {}).get("teacher"), str):
                raise ConfigError(
                    f"families.{fam}.teacher: '{teacher}' is not a family with a teacher of its own"
                )
            teacher_of[fam] = teacher
            continue
        try:
            teachers[fam] = config_from_dict(merge(common, teacher))
        except ConfigError as exc:
            raise ConfigError(f"families.{fam}.teacher: {exc}") from None
    for fam, owner in teacher_of.items():
        teachers[fam] = teachers[owner]
    all_rows = _rows(raw.get("rows") or [], "rows", families, common, [])
    all_rows += _rows(raw.get("diagnostics") or [], "diagnostics", families, common, all_rows)
    _resolve_baselines(all_rows)
    by_name = {r.name: r for r in all_rows}
    skip = [str(n) for n in raw.get("skip_rows") or []]
    for name in skip:
        if name not in by_name:
            raise _unknown(name, sorted(by_name), "skip_rows")
    if rows is not None:
        for name in rows:
            if name not in by_name:
                raise _unknown(name, sorted(by_name), "--rows")
        wanted = set(rows) | {by_name[n].baseline for n in rows if by_name[n].baseline}
        chosen = [r for r in all_rows if r.name in wanted]
    else:
        chosen = [r for r in all_rows if diagnostics or not r.diagnostic]
    plan_rows = [r for r in chosen if r.name not in skip]
    if not plan_rows:
        raise ConfigError("rows: nothing to run")
    compare = _compare(raw.get("compare") or {}, by_name)
    return BenchPlan(synth, heldout, seed_list, teachers, plan_rows, compare, teacher_of)


def _rows(
    entries: Any,
    section: str,
    families: Mapping[str, Any],
    common: Mapping[str, Any],
    earlier: Sequence[Row],
) -> list[Row]:
    """The rows of one section, each config resolved over its family and ``common``."""
    if not isinstance(entries, list):
        raise ConfigError(f"{section}: expected a list of rows")
    names = {r.name for r in earlier}
    out: list[Row] = []
    for index, row in enumerate(entries):
        where = f"{section}[{index}]"
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
        family = families[fam] or {}
        merged = merge(merge(common, family.get("student") or {}), row.get("train") or {})
        if row.get("distill") is not None:
            merged["distill"] = merge(family.get("distill") or {}, row["distill"])
        try:
            cfg = config_from_dict(merged)
        except ConfigError as exc:
            raise ConfigError(f"{where} ({name}): {exc}") from None
        base = row.get("baseline")
        description = str(row.get("description", ""))
        out.append(
            Row(name, fam, description, cfg, None if base is None else str(base), section != "rows")
        )
    return out


def _resolve_baselines(rows: Sequence[Row]) -> None:
    """Give every row its baseline: its own, checked, else its family's first undistilled row."""
    by_name = {r.name: r for r in rows}
    defaults: dict[str, str] = {}
    for row in rows:
        if row.config.distill is None:
            defaults.setdefault(row.family, row.name)
    for row in rows:
        if row.baseline is None:
            own = defaults.get(row.family)
            row.baseline = own if own != row.name else None
            continue
        where = f"row {row.name}: baseline"
        other = by_name.get(row.baseline)
        if other is None:
            raise _unknown(row.baseline, sorted(by_name), where)
        if other.family != row.family or other.config.distill is not None:
            raise ConfigError(
                f"{where}: '{other.name}' must be a row of family '{row.family}' "
                "without a distill section"
            )


def _compare(section: Any, by_name: Mapping[str, Row]) -> dict[str, list[str]]:
    """The ``compare`` groups: each a list of known rows of one family and one baseline."""
    if not isinstance(section, Mapping):
        raise ConfigError("compare: expected a mapping of group name to a list of rows")
    out: dict[str, list[str]] = {}
    for group, names in section.items():
        where = f"compare.{group}"
        if not isinstance(names, list) or len(names) < 2:
            raise ConfigError(f"{where}: expected a list of two or more row names")
        for name in names:
            if str(name) not in by_name:
                raise _unknown(str(name), sorted(by_name), where)
        rows = [by_name[str(n)] for n in names]
        if len({(r.family, r.baseline or r.name) for r in rows}) > 1:
            raise ConfigError(f"{where}: rows {names} differ in family or baseline")
        out[str(group)] = [str(n) for n in names]
    return out
