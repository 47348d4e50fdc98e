"""``fgdistill bench quality`` on a tiny budget: rows, seeds, statistics, reuse and bad configs."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fgdistill.cli.main import main
from fgdistill.engine.bench import (
    NOTES_MARKER,
    conclusions,
    import_results,
    is_complete,
    load_bench_config,
    read_results_file,
    render_markdown,
    run_quality_bench,
    summarise,
)
from fgdistill.engine.stages import StageResult
from fgdistill.errors import ConfigError

PACKAGED = Path(__file__).resolve().parents[2] / "src/fgdistill/configs/bench/quality.yaml"

TINY = [
    "synth.num_train=8",
    "synth.num_val=4",
    "heldout.images=0",
    "common.model.fpn_channels=32",
    "common.model.head_norm=null",
    "common.data.batch_size=4",
    "common.log_interval=1",
    "common.optim.warmup_iters=1",
    "families.retinanet.teacher.model.backbone=resnet18",
    "families.retinanet.teacher.optim.epochs=1",
    "families.retinanet.teacher.optim.milestones=[]",
    "families.retinanet.student.optim.epochs=1",
    "families.retinanet.student.optim.milestones=[]",
    "families.retinanet.distill.fgd_warmup_iters=1",
]


#: The issue's eight rows (baseline, plain imitation, fg only, bg only, fg and bg as one region,
#: split, full FGD, full FGD without inheriting), as the table names them for each family.
ISSUE_ROWS = {
    "retinanet": [
        "baseline",
        "imitation_norm",
        "fg_only_norm",
        "bg_only_norm",
        "fg_bg_joint_norm",
        "focal_split_norm",
        "fgd_norm",
        "fgd_norm_no_inherit",
    ],
    "reppoints": [
        "reppoints_baseline_8ep",
        "reppoints_imitation_norm_8ep",
        "reppoints_fg_only_norm_8ep",
        "reppoints_bg_only_norm_8ep",
        "reppoints_fg_bg_joint_norm_8ep",
        "reppoints_focal_split_norm_8ep",
        "reppoints_fgd_norm_8ep",
        "reppoints_fgd_norm_no_inherit_8ep",
    ],
}


def test_packaged_table_has_the_issue_rows_for_each_family() -> None:
    plan = load_bench_config(PACKAGED)
    assert not any(r.diagnostic for r in plan.rows)
    for family, wanted in ISSUE_ROWS.items():
        names = [r.name for r in plan.rows if r.family == family]
        assert [n for n in names if n in wanted] == wanted
        rows = {r.name: r for r in plan.rows}
        # One budget and one baseline per family's table.
        assert len({rows[n].config.optim.epochs for n in names}) == 1, family
        assert {rows[n].baseline or plan.baselines[family] for n in names} == {wanted[0]}
    rows = {r.name: r.config for r in plan.rows}
    for family, (base, imitation, fg, bg, joint, split, full, no_inherit) in ISSUE_ROWS.items():
        assert rows[base].distill is None, family
        assert rows[imitation].distill is not None and rows[imitation].distill.loss_type == "mse"
        assert not rows[imitation].distill.inherit_teacher
        assert rows[fg].distill is not None and rows[fg].distill.hparams["beta"] == 0
        assert rows[bg].distill is not None and rows[bg].distill.hparams["alpha"] == 0
        assert rows[joint].distill is not None and rows[joint].distill.split_regions is False
        assert rows[split].distill is not None and rows[split].distill.hparams["lambda_"] == 0
        assert rows[full].distill is not None and rows[full].distill.inherit_teacher
        assert rows[no_inherit].distill is not None and not rows[no_inherit].distill.inherit_teacher


def test_packaged_config_rows() -> None:
    plan = load_bench_config(PACKAGED, diagnostics=True)
    names = [r.name for r in plan.rows]
    assert "reppoints_fgd" in names and len(plan.seeds) >= 2
    rows = {r.name: r.config for r in plan.rows}
    norm = rows["fgd_norm"].distill
    assert norm is not None and norm.normalize == "teacher_rms" and norm.fgd_weight_scale == 1.0
    assert rows["fgd"].distill.normalize == "none"  # type: ignore[union-attr]
    assert rows["reppoints_fgd"].model.arch == "reppoints"
    assert rows["r50_student_budget"].model.backbone == "resnet50"
    # Students share one schedule, but the rows named *_long double it, *_8ep quadruple it and
    # *_16ep take eight times it; the teachers train longer than any.
    longer = ("_long", "_8ep", "_16ep")
    budget = {r.config.optim.epochs for r in plan.rows if not r.name.endswith(longer)}
    assert len(budget) == 1
    epochs = budget.pop()
    assert {r.config.optim.epochs for r in plan.rows if r.name.endswith("_long")} == {2 * epochs}
    assert {r.config.optim.epochs for r in plan.rows if r.name.endswith("_8ep")} == {4 * epochs}
    assert {r.config.optim.epochs for r in plan.rows if r.name.endswith("_16ep")} == {8 * epochs}
    assert min(t.optim.epochs for t in plan.teachers.values()) > 8 * epochs
    # The table alone is a subset; diagnostics run only when asked for.
    table = load_bench_config(PACKAGED).rows
    assert 0 < len(table) < len(plan.rows) and all(r.name in names for r in table)
    quick = load_bench_config(PACKAGED, quick=True)
    assert quick.seeds == [0] and quick.synth.num_train < plan.synth.num_train
    # Every finished stage is also scored on images the options were not chosen on.
    assert plan.heldout.images >= plan.synth.num_val and plan.heldout.seed != plan.synth.seed
    assert 0 < quick.heldout.images < plan.heldout.images
    # The issue's eight RetinaNet rows, nothing more.
    assert [r.name for r in quick.rows] == ISSUE_ROWS["retinanet"]


def test_packaged_comparisons_name_known_rows() -> None:
    compare = load_bench_config(PACKAGED).compare
    assert compare.full_fgd[0] == ("fgd_norm", ("imitation_norm", "imitation_norm_inherit"))
    assert compare.table1[1][:2] == ("reppoints_fg_only_norm_8ep", "reppoints_bg_only_norm_8ep")
    assert compare.model_size == [
        "r50_student_budget",
        "reppoints_r50_student_budget_long",
        "reppoints_r50_student_budget_8ep",
    ]


_FAMILY = "families: {retinanet: {}}\n"
_TWO_BUDGETS = (
    "rows: [{name: a}, {name: b, distill: {}}, {name: c, train: {optim: {epochs: 3}}},"
    " {name: d, baseline: c, distill: {}}]\n"
)


def test_chosen_rows_bring_their_own_baseline(tmp_path: Path) -> None:
    cfg = tmp_path / "bench.yaml"
    cfg.write_text(_FAMILY + _TWO_BUDGETS)
    names = lambda *rows: [r.name for r in load_bench_config(cfg, rows=list(rows)).rows]  # noqa: E731
    assert names("b") == ["a", "b"]
    assert names("d") == ["c", "d"]  # d's own baseline, not the family's
    assert names("c") == ["a", "c"]  # an undistilled row on another budget is measured too
    assert names("a") == ["a"]
    cfg.write_text(_FAMILY + _TWO_BUDGETS + "skip_rows: [a]\n")
    assert names("b") == ["b"]  # a skipped baseline stays skipped


def test_the_run_says_which_baseline_it_added(tmp_path: Path) -> None:
    lines: list[str] = []
    data = run_quality_bench(
        tmp_path, config=PACKAGED, rows=["fgd"], report_only=True, say=lines.append, seeds=[0]
    )
    assert any(line.startswith("also running baseline:") for line in lines), lines
    assert [r["name"] for r in data["rows"]] == ["baseline"]  # fgd, a diagnostic, is apart


def test_diagnostics_run_only_on_request(tmp_path: Path) -> None:
    cfg = tmp_path / "bench.yaml"
    cfg.write_text(
        "x-anchors: {d: &d {inherit_teacher: false}}\n"
        + _FAMILY
        + "rows: [{name: a}, {name: b, distill: *d}]\n"
        + "diagnostics: [{name: c, distill: {}}]\n"
    )
    assert [r.name for r in load_bench_config(cfg).rows] == ["a", "b"]
    plan = load_bench_config(cfg, diagnostics=True)
    assert [(r.name, r.diagnostic) for r in plan.rows] == [("a", 0), ("b", 0), ("c", 1)]
    assert plan.rows[1].config.distill is not None
    assert not plan.rows[1].config.distill.inherit_teacher  # the anchor was read
    # A chosen row brings its baseline, so its gain can be computed.
    assert [r.name for r in load_bench_config(cfg, rows=["c"]).rows] == ["a", "c"]
    # A diagnostic row is reported once it has a result, in a table of its own.
    teacher = StageResult("teacher", "t", {"AP": 9.0}, 1.0, 5, False, "/t")
    empty = summarise(plan, {"retinanet": teacher}, {"a": {0: _result("a", 1.0, 0)}})
    assert [r["name"] for r in empty["rows"]] == ["a", "b"]
    data = summarise(
        plan,
        {"retinanet": teacher},
        {"a": {0: _result("a", 1.0, 0)}, "c": {0: _result("c", 3.0, 0)}},
    )
    assert [r["name"] for r in data["rows"]] == ["a", "b", "c"]
    # A diagnostic row nobody ran leaves the table complete; a main row without a seed does not.
    done = {"a": {0: _result("a", 1.0, 0)}, "b": {0: _result("b", 2.0, 0)}}
    assert is_complete(plan, {"retinanet": teacher}, done)
    assert not is_complete(plan, {}, done)
    assert not is_complete(plan, {"retinanet": teacher}, {"a": done["a"]})
    two_seeds = load_bench_config(cfg, diagnostics=True, seeds=[0, 1])
    both = {n: {s: _result(n, 1.0, s) for s in (0, 1)} for n in ("a", "b")}
    assert is_complete(two_seeds, {"retinanet": teacher}, both)
    # a diagnostic row that ran counts: with one seed of two the table is partial
    assert not is_complete(
        two_seeds, {"retinanet": teacher}, {**both, "c": {0: _result("c", 3.0, 0)}}
    )
    text = render_markdown({**data, **_RUN_INFO, "conclusions": []})
    table, diagnostics = text.split("Diagnostic rows")
    assert "| b |" in table and "| c |" not in table
    assert "| c | retinanet resnet50 | 1 | 3.00" in diagnostics


_RUN_INFO = {
    "command": "c",
    "machine": "m",
    "date": "d",
    "seeds": [0],
    "status": "s",
    "wall_time_s": 1.0,
}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("synth: {}\nrowz: []\n", "unknown key 'rowz'; did you mean 'rows'?"),
        (
            "families: {retinanet: {}}\nrows: [{name: a, family: retina}]\n",
            "rows[0] (a).family: unknown key 'retina'",
        ),
        ("families: {retinanet: {}}\nrows: [{name: a}, {name: a}]\n", "duplicate row name 'a'"),
        (
            "families: {retinanet: {}}\nrows: [{name: a, distil: {}}]\n",
            "rows[0]: unknown key 'distil'; did you mean 'distill'?",
        ),
        (
            "families: {retinanet: {}}\nrows: [{name: a}, {name: b, baseline: c}]\n",
            "row b: baseline: unknown key 'c'",
        ),
        (
            "families: {retinanet: {}}\nrows: [{name: a, distill: {}}, {name: b, baseline: a}]\n",
            "row b: baseline: 'a' must be a row of family 'retinanet' without a distill",
        ),
        (
            "families: {retinanet: {}}\nrows: [{name: a, train: {optim: {lr: fast}}}]\n",
            "rows[0] (a)",
        ),
        (
            _FAMILY + "rows: [{name: a}]\ncompare: {fulL_fgd: []}\n",
            "compare: unknown key 'fulL_fgd'; did you mean 'full_fgd'?",
        ),
        (
            _FAMILY + "rows: [{name: a}]\ncompare: {full_fgd: [{row: fdg}]}\n",
            "compare.full_fgd[0]: unknown key 'fdg'",
        ),
        (
            _FAMILY + _TWO_BUDGETS + "compare: {full_fgd: [{row: b, imitation: [d]}]}\n",
            "compare.full_fgd[0]: rows ['b', 'd'] differ in family or baseline",
        ),
        (
            _FAMILY
            + "rows: [{name: a}, {name: b, distill: {}},"
            + " {name: c, distill: {}, train: {data: {batch_size: 16}}}]\n"
            + "compare: {full_fgd: [{row: b, imitation: [c]}]}\n",
            "compare.full_fgd[0]: rows ['b', 'c'] differ in their budget "
            "(epochs, data.batch_size or max_iters)",
        ),
        (
            _FAMILY + "rows: [{name: a}]\ncompare: {table1: [{fg_only: a, bg_only: a}]}\n",
            "compare.table1[0]: expected the keys fg_only, bg_only, joint, split",
        ),
        (
            _FAMILY + _TWO_BUDGETS + "compare: {model_size: [b]}\n",
            "compare.model_size[0]: 'b' must be a row without a distill section",
        ),
        (
            _FAMILY + "rows: [{name: a}]\ndiagnostics: [{name: a}]\n",
            "diagnostics[0]: duplicate row name 'a'",
        ),
        (
            _FAMILY + "rows: [{name: a}]\nheldout: {images: 10, seed: 0}\n",
            "heldout.seed: 0 is synth.seed too",
        ),
        (
            _FAMILY + "rows: [{name: a}]\nheldout: {imgs: 10}\n",
            "heldout.imgs: unknown key",
        ),
        (
            _FAMILY + "rows: [{name: a}]\nheldout: {images: -1}\n",
            "heldout.images: need 0 (off) or more, got -1",
        ),
    ],
)
def test_bad_configs_name_the_key(tmp_path: Path, text: str, message: str) -> None:
    cfg = tmp_path / "bench.yaml"
    cfg.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_bench_config(cfg)
    assert message in str(err.value) and str(cfg) in str(err.value)


def test_overrides_of_unknown_sections_are_refused() -> None:
    with pytest.raises(ConfigError, match=r"--set teachr\.\.\.: top level: unknown key 'teachr'"):
        load_bench_config(PACKAGED, ["teachr.optim.epochs=2"])
    with pytest.raises(ConfigError, match=r"--set quick\.\.\.: top level: unknown key 'quick'"):
        load_bench_config(PACKAGED, ["quick.seeds=[0]"])
    plan = load_bench_config(PACKAGED, ["common.optim.lr=0.02"], rows=["baseline"])
    assert plan.rows[0].config.optim.lr == 0.02


def test_rows_selection_rejects_unknown_names() -> None:
    with pytest.raises(ConfigError, match="--rows: unknown key 'fdg'; did you mean 'fgd'"):
        load_bench_config(PACKAGED, rows=["fdg"])


def _result(name: str, ap: float, seed: int) -> StageResult:
    return StageResult(name, "m", {"AP": ap, "AP50": 2 * ap}, 10.0 + seed, 5, False, f"/x/{seed}")


def test_summary_statistics_gain_and_gap_share() -> None:
    plan = load_bench_config(PACKAGED, rows=["baseline", "imitation", "fgd"], seeds=[0, 1])
    teacher = StageResult("teacher", "t", {"AP": 10.0}, 100.0, 50, False, "/t")
    results = {
        "baseline": {0: _result("baseline", 2.0, 0), 1: _result("baseline", 4.0, 1)},
        "imitation": {0: _result("imitation", 3.0, 0)},
        "fgd": {0: _result("fgd", 6.0, 0), 1: _result("fgd", 8.0, 1)},
    }
    data = summarise(plan, {"retinanet": teacher}, results)
    rows = {r["name"]: r for r in data["rows"]}
    assert rows["baseline"]["metrics"]["AP"]["mean"] == pytest.approx(3.0)
    assert rows["baseline"]["metrics"]["AP"]["std"] == pytest.approx(math.sqrt(2.0))
    assert math.isnan(rows["imitation"]["metrics"]["AP"]["std"])  # one seed: spread unknown
    assert math.isnan(rows["fgd"]["metrics"]["APl"]["mean"])  # missing metric stays missing
    assert rows["fgd"]["gain_AP"] == pytest.approx(4.0)
    assert rows["fgd"]["gap_share"] == pytest.approx(4.0 / 7.0)
    assert rows["fgd"]["wall_time_s"] == pytest.approx(10.5)
    assert data["baselines"] == {"retinanet": "baseline"}


def test_gain_is_paired_by_seed() -> None:
    # The baseline has a seed the row lacks: the gain is taken over the seeds both have, so
    # the missing seed's luck does not enter the difference.
    plan = load_bench_config(PACKAGED, rows=["baseline", "imitation", "fgd"], seeds=[0, 1, 2])
    teacher = StageResult("teacher", "t", {"AP": 10.0}, 100.0, 50, False, "/t")
    results = {
        "baseline": {s: _result("baseline", ap, s) for s, ap in enumerate((2.0, 4.0, 9.0))},
        "imitation": {s: _result("imitation", ap, s) for s, ap in enumerate((3.0, 5.0, 9.5))},
        "fgd": {0: _result("fgd", 6.0, 0), 1: _result("fgd", 8.0, 1)},
    }
    data = summarise(plan, {"retinanet": teacher}, results)
    rows = {r["name"]: r for r in data["rows"]}
    assert rows["baseline"]["metrics"]["AP"]["mean"] == pytest.approx(5.0)  # all its seeds
    assert rows["fgd"]["paired_seeds"] == [0, 1]
    assert rows["fgd"]["gain_AP"] == pytest.approx(4.0)  # 7 - 3, not 7 - 5
    assert rows["fgd"]["gap_AP"] == pytest.approx(7.0)
    assert rows["fgd"]["gap_share"] == pytest.approx(4.0 / 7.0)
    assert rows["imitation"]["paired_seeds"] == [0, 1, 2]
    assert rows["imitation"]["gain_AP"] == pytest.approx(2.5 / 3)
    data["conclusions"] = conclusions(data)
    text = "\n".join(data["conclusions"])
    assert "fgd: 7.00 AP, +4.00 over the baseline on the seeds both have, [0, 1], 57%" in text
    assert (
        "full FGD (fgd) beat plain feature imitation (imitation): 7.00 vs 5.83 AP (means over "
        "different seeds: fgd [0, 1], imitation [0, 1, 2])." in text
    )
    assert (
        "closed 57% of the 7.00 AP gap (target >= 50%: MET; gap and gain over the seeds both "
        in (text)
    )
    md = render_markdown({**data, **_RUN_INFO})
    assert "| 4.00 * | 57% |" in md and "`fgd` seeds [0, 1]." in md
    assert "| 0.83 | 17% |" in md  # same seeds as its baseline: no mark

    # no seed in common: no gain, said so, never a number
    results["fgd"] = {2: _result("fgd", 6.0, 2)}
    results["baseline"] = {0: _result("baseline", 2.0, 0)}
    data = summarise(plan, {"retinanet": teacher}, results)
    fgd = next(r for r in data["rows"] if r["name"] == "fgd")
    assert fgd["paired_seeds"] == [] and fgd["unpaired"] and math.isnan(fgd["gain_AP"])
    data["conclusions"] = conclusions(data)
    assert (
        "retinanet fgd: 6.00 AP; no seed in common with the baseline, so no gain."
        in (data["conclusions"])
    )
    assert "`fgd` no seed in common" in render_markdown({**data, **_RUN_INFO})


def test_a_row_with_its_own_baseline_is_measured_against_it() -> None:
    names = ["baseline", "baseline_long", "fgd_norm_long"]
    plan = load_bench_config(PACKAGED, rows=names, seeds=[0])
    assert {r.name: r.baseline for r in plan.rows}["fgd_norm_long"] == names[1]
    teacher = StageResult("teacher", "t", {"AP": 8.0}, 100.0, 50, False, "/t")
    results = {
        name: {0: _result(name, ap, 0)} for name, ap in zip(names, (2.0, 4.0, 7.0), strict=True)
    }
    data = summarise(plan, {"retinanet": teacher}, results)
    rows = {r["name"]: r for r in data["rows"]}
    assert data["baselines"] == {"retinanet": "baseline"}
    assert rows["baseline_long"]["gain_AP"] == pytest.approx(2.0)  # vs the family's
    assert math.isnan(rows["baseline_long"]["gap_share"])  # other budget: no share claimed
    assert rows["fgd_norm_long"]["gain_AP"] == pytest.approx(3.0)
    assert rows["fgd_norm_long"]["gap_share"] == pytest.approx(3.0 / 4.0)
    data["conclusions"] = conclusions(data)
    text = "\n".join(data["conclusions"])
    assert "teacher 8.00 vs baseline 2.00 AP: gap +6.00 (target >= 5 AP: MET)" in text
    assert "vs baseline baseline_long 4.00 AP: gap +4.00 (target >= 5 AP: NOT met)" in text
    assert "fgd_norm_long: 7.00 AP, +3.00 over baseline_long, 75%" in text
    assert (
        "baseline_long: 4.00 AP, +2.00 over the baseline, trained 4 epochs against its "
        "baseline's 2 epochs: training length, not distillation, so no share of the gap" in text
    )
    assert (
        "full FGD (fgd_norm_long) closed 75% of the 4.00 AP gap (target >= 50%: MET; this gap "
        "is under the 5 AP target)." in text
    )
    assert "measured against `baseline_long`" in render_markdown({**data, **_RUN_INFO})


def test_a_row_on_another_batch_gets_no_share_of_the_gap(tmp_path: Path) -> None:
    cfg = tmp_path / "bench.yaml"
    cfg.write_text(
        _FAMILY
        + "rows: [{name: a}, {name: b, distill: {}},"
        + " {name: c, distill: {}, train: {data: {batch_size: 16}, max_iters: 30}}]\n"
    )
    plan = load_bench_config(cfg, seeds=[0])
    teacher = StageResult("teacher", "t", {"AP": 8.0}, 100.0, 50, False, "/t")
    results = {n: {0: _result(n, ap, 0)} for n, ap in (("a", 2.0), ("b", 5.0), ("c", 6.0))}
    data = summarise(plan, {"retinanet": teacher}, results)
    rows = {r["name"]: r for r in data["rows"]}
    assert rows["b"]["gap_share"] == pytest.approx(0.5)
    assert rows["c"]["gain_AP"] == pytest.approx(4.0)
    assert math.isnan(rows["c"]["gap_share"])  # same epochs, but twice the batch: no share
    assert rows["c"]["budget"]["batch_size"] == 16
    text = "\n".join(conclusions(data))
    batch = rows["a"]["budget"]["batch_size"]
    epochs = rows["a"]["epochs"]
    assert (
        f"c: 6.00 AP, +4.00 over the baseline, trained {epochs} epochs of batch 16 cut at 30 "
        f"iterations against its baseline's {epochs} epochs of batch {batch}: training length"
    ) in text


def _row(name: str, family: str, ap: float, std: float, share: float) -> dict:
    return {
        "name": name,
        "family": family,
        "seeds": [0, 1],
        "metrics": {"AP": {"mean": ap, "std": std}},
        "gap_share": share,
    }


def test_conclusions_state_each_target() -> None:
    rows = [
        _row("baseline", "retinanet", 1.5, 0.1, 0.0),
        _row("imitation", "retinanet", 1.6, 0.1, 0.03),
        _row("fgd", "retinanet", 2.9, 0.1, 0.44),
        _row("fgd_norm", "retinanet", 3.8, 0.1, 0.72),
        _row("imitation_norm_inherit", "retinanet", 3.9, 0.1, 0.75),
        _row("fg_only", "retinanet", 3.1, 0.1, 0.5),
        _row("bg_only", "retinanet", 3.6, 0.1, 0.6),
        _row("fg_bg_joint", "retinanet", 3.5, 0.1, 0.6),
        _row("focal_split", "retinanet", 3.0, 0.1, 0.5),
        _row("fg_only_norm", "retinanet", 3.7, 0.1, 0.7),
        _row("bg_only_norm", "retinanet", 3.6, 0.1, 0.6),
        _row("fg_bg_joint_norm", "retinanet", 3.5, 0.1, 0.6),
        _row("focal_split_norm", "retinanet", 3.8, 0.1, 0.7),
        _row("reppoints_baseline", "reppoints", 1.9, 0.1, 0.0),
        # 49.7%: whole percent would say 50%, and the target is not met
        _row("reppoints_fgd_norm", "reppoints", 4.68, 0.1, 0.497),
    ]
    table1 = [
        ["fg_only", "bg_only", "fg_bg_joint", "focal_split"],
        ["fg_only_norm", "bg_only_norm", "fg_bg_joint_norm", "focal_split_norm"],
    ]
    compare = {
        "full_fgd": [
            ["fgd", ["imitation"]],
            ["fgd_norm", ["imitation", "imitation_norm", "imitation_norm_inherit"]],
            ["reppoints_fgd_norm", ["reppoints_imitation"]],
        ],
        "table1": table1,
        "model_size": [],
    }
    data = {
        "rows": rows,
        "compare": compare,
        "baselines": {"retinanet": "baseline", "reppoints": "reppoints_baseline"},
        "teachers": {
            "retinanet": {"metrics": {"AP": 4.6}},
            "reppoints": {"metrics": {"AP": 7.5}},
        },
    }
    text = "\n".join(conclusions(data))
    assert (
        "retinanet: teacher 4.60 vs baseline 1.50 AP: gap +3.10 (target >= 5 AP: NOT met)" in text
    )
    assert "reppoints: teacher 7.50 vs baseline 1.90 AP: gap +5.60 (target >= 5 AP: MET)" in text
    assert "full FGD (fgd) beat plain feature imitation (imitation): 2.90 vs 1.60 AP." in text
    assert "(fgd_norm) beat plain feature imitation (imitation): 3.80 vs 1.60" in text
    assert (
        "full FGD (fgd_norm) did NOT beat plain feature imitation (imitation_norm_inherit): "
        "3.80 vs 3.90 AP." in text
    )
    assert "(imitation_norm)" not in text  # a row that did not run is not compared
    assert "full FGD (fgd) closed 44% of the 3.10 AP gap (target >= 50%: NOT met; this" in text
    assert "full FGD (fgd_norm) closed 72% of the 3.10 AP gap (target >= 50%: MET; this" in text
    assert (
        "full FGD (reppoints_fgd_norm) closed 49.7% of the 5.60 AP gap (target >= 50%: NOT met)."
        in text
    )
    assert "reppoints_fgd_norm) beat" not in text  # no RepPoints imitation row to compare with
    raw, norm = (line for line in text.splitlines() if line.startswith("Table 1"))
    assert raw.endswith("NOT reproduced.") and "bg_only 3.60 > fg_bg_joint 3.50" in raw
    assert norm.startswith("Table 1 ordering here: focal_split_norm 3.80 > fg_only_norm 3.70")
    assert norm.endswith(": reproduced.")


def test_bench_runs_rows_and_reuses_them(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    work = tmp_path / "bench"
    results_md = tmp_path / "docs" / "results.md"
    results_md.parent.mkdir()
    results_md.write_text(f"old table\n{NOTES_MARKER}\nwhat we tried\n")
    args = ["bench", "quality", "--work-dir", str(work), "--no-progress"]
    args += ["--rows", "baseline", "fg_bg_joint", "fgd", "--seeds", "0", "1"]
    args += ["--results", str(results_md)]
    for item in TINY:
        args += ["--set", item]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "| teacher (retinanet) | retinanet resnet18 | 1 |" in out
    assert "| fgd | retinanet resnet18 | 2 |" in out
    for seed in (0, 1):
        for row in ("baseline", "fg_bg_joint", "fgd"):
            folder = work / f"seed{seed}" / row
            assert (folder / "metrics.json").is_file()
            # A finished stage keeps its model, not its training checkpoints.
            assert (folder / ("model.pt" if row == "baseline" else "student.pt")).is_file()
            assert not (folder / "last.pt").exists() and not (folder / "best.pt").exists()
    data = json.loads((work / "results.json").read_text())
    assert data["status"] == "complete" and data["seeds"] == [0, 1]
    fgd = next(r for r in data["rows"] if r["name"] == "fgd")
    assert fgd["seeds"] == [0, 1] and set(fgd["per_seed"]) == {"0", "1"}
    # Seeds really differ: two runs of one row are not the same run.
    assert fgd["per_seed"]["0"] != fgd["per_seed"]["1"] or fgd["metrics"]["AP"]["mean"] == 0
    # The joint row saw no boxes: its foreground term is exactly zero throughout.
    joint_log = (work / "seed0" / "fg_bg_joint" / "log.jsonl").read_text().splitlines()
    train = [json.loads(line) for line in joint_log if '"train"' in line]
    assert train and all(rec["losses"]["fgd/p3/fg"] == 0 for rec in train)
    assert any(rec["losses"]["fgd/p3/bg"] > 0 for rec in train)
    assert "fgd" in data["loss_magnitudes"] and "baseline" not in data["loss_magnitudes"]
    md = results_md.read_text()
    assert md.startswith("# Quality benchmark") and md.rstrip().endswith("what we tried")
    assert "old table" not in md
    assert json.loads(results_md.with_suffix(".json").read_text())["status"] == "complete"
    assert (work / "report.html").is_file() and (work / "curves.png").is_file()

    mtime = (work / "teacher_retinanet" / "model.pt").stat().st_mtime_ns
    assert main(args) == 0
    again = capsys.readouterr().out
    assert again.count("reusing") == 1 + 1 + 6  # data, teacher, 3 rows x 2 seeds
    assert (work / "teacher_retinanet" / "model.pt").stat().st_mtime_ns == mtime

    # --report-only trains nothing: a table row never run shows 0 seeds, a diagnostic row never
    # run is left out, and the status says partial.
    report_args = [*args, "--report-only", "--no-report"]
    report_args[report_args.index("fgd")] = "fgd_norm"
    report_args.insert(report_args.index("fgd_norm"), "focal_split")
    assert main(report_args) == 0
    partial = capsys.readouterr().out
    assert (
        f"never run in {work}, so left out: 4 stage(s): seed 0 fgd_norm, seed 0 focal_split, "
        "seed 1 fgd_norm and 1 more"
    ) in partial
    assert "not finished" not in partial  # the stages that were never started: one line
    assert "| fgd_norm | retinanet resnet18 | 0 |" in partial
    assert "| fg_bg_joint | retinanet resnet18 | 2 |" in partial
    assert "| focal_split |" not in partial
    data = json.loads((work / "results.json").read_text())
    assert data["status"].startswith("partial")
    assert not (work / "seed0" / "fgd_norm").exists()


def _tiny_args(work: Path, *rows: str) -> list[str]:
    """``fgdistill bench quality`` of ``rows`` on the tiny budget, seed 0, no report."""
    args = ["bench", "quality", "--work-dir", str(work), "--no-progress", "--no-report"]
    args += ["--rows", *rows, "--seeds", "0"]
    for item in TINY:
        args += ["--set", item]
    return args


def test_parallel_jobs_train_the_stages_a_serial_run_reuses(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    work = tmp_path / "bench"
    args = _tiny_args(work, "baseline", "fgd")
    assert main([*args, "--jobs", "2"]) == 0
    assert "training 2 runs, 2 at a time" in capsys.readouterr().out
    data = json.loads((work / "results.json").read_text())
    assert data["status"] == "complete"
    assert [(r["name"], r["seeds"]) for r in data["rows"]] == [("baseline", [0]), ("fgd", [0])]
    # The children trained exactly the stages a serial run would: it reuses all of them.
    assert main(args) == 0
    assert capsys.readouterr().out.count("reusing") == 1 + 1 + 2  # data, teacher, 2 rows
    assert main([*args, "--jobs", "0"]) == 2
    assert "--jobs: need at least 1, got 0" in capsys.readouterr().err


def test_finished_stages_are_scored_on_a_held_out_set_once(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    work = tmp_path / "bench"
    args = [*_tiny_args(work, "baseline", "fgd"), "--set", "heldout.images=6"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert out.count(": scoring ") == 3  # the teacher and two rows
    assert "## On a held-out set (6 images, seed 7)" in out
    data = json.loads((work / "results.json").read_text())
    held = data["heldout"]
    assert held["images"] == 6 and held["seed"] == 7
    assert set(held["teachers"]) == {"retinanet"}
    rows = {r["name"]: r for r in held["rows"]}
    assert rows["baseline"]["seeds"] == rows["fgd"]["seeds"] == [0]
    val = {r["name"]: r["metrics"]["AP"]["mean"] for r in data["rows"]}
    assert rows["fgd"]["val_AP"]["mean"] == val["fgd"]
    for name, folder in (("baseline", work / "seed0/baseline"), ("fgd", work / "seed0/fgd")):
        cached = json.loads((folder / "heldout/heldout.json").read_text())
        assert cached["metrics"] == rows[name]["per_seed"]["0"]
    # Six new images, none of them the validation split's.
    held_ann = json.loads((work / "heldout_data/annotations/instances_val.json").read_text())
    assert len(held_ann["images"]) == 6
    first = held_ann["images"][0]["file_name"]
    val_image = (work / "data/val" / first).read_bytes()
    assert (work / "heldout_data/val" / first).read_bytes() != val_image

    # A re-run reads the scores back; a stage whose checkpoint changed is scored again.
    assert main([*args, "--report-only"]) == 0
    assert ": scoring " not in capsys.readouterr().out
    ckpt = work / "seed0/fgd/student.pt"
    os.utime(ckpt, ns=(ckpt.stat().st_atime_ns, ckpt.stat().st_mtime_ns + 10**9))
    assert main([*args, "--report-only"]) == 0
    again = capsys.readouterr().out
    assert again.count(": scoring ") == 1 and "seed 0 fgd: scoring" in again
    rescored = json.loads((work / "results.json").read_text())["heldout"]["rows"]
    assert [r["per_seed"]["0"]["AP"] for r in rescored] == [
        r["per_seed"]["0"]["AP"] for r in held["rows"]
    ]


_ORPHAN_PARENT = """
import os, sys, time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from fgdistill.engine.bench import _die_with_parent

if __name__ == "__main__":
    pool = ProcessPoolExecutor(1, get_context("spawn"), _die_with_parent, (os.getpid(),))
    print(pool.submit(os.getpid).result(), flush=True)  # the initializer has run
    time.sleep(600)
"""


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie nobody has reaped yet counts as dead)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    return "\nState:\tZ" not in status


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="parent-death signal is Linux's")
def test_a_pool_worker_dies_with_its_killed_parent(tmp_path: Path) -> None:
    script = tmp_path / "parent.py"
    script.write_text(_ORPHAN_PARENT)
    parent = subprocess.Popen(
        [sys.executable, str(script)], stdout=subprocess.PIPE, text=True, cwd=tmp_path
    )
    try:
        assert parent.stdout is not None
        worker = int(parent.stdout.readline())
        assert _alive(worker)
        parent.kill()  # SIGKILL: no clean-up runs in the parent
        parent.wait(timeout=30)
        deadline = time.monotonic() + 30
        while _alive(worker) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _alive(worker), f"pool worker {worker} outlived its parent"
    finally:
        parent.kill()


def _results_file(path: Path, teacher_ap: float, rows: dict[str, dict[int, float]]) -> Path:
    """A results JSON as written before fingerprints were recorded (e.g. docs/results.json)."""
    entries = [
        {
            "name": name,
            "model": "retinanet resnet18",
            "seeds": sorted(aps),
            "per_seed": {str(s): {"AP": ap, "AP50": 2 * ap} for s, ap in sorted(aps.items())},
            "wall_time_s": 60.0,
            "iterations": 5,
            "work_dirs": [f"/elsewhere/seed{s}/{name}" for s in sorted(aps)],
        }
        for name, aps in rows.items()
    ]
    data = {
        "teachers": {"retinanet": {"model": "t", "metrics": {"AP": teacher_ap}, "wall_time_s": 9}},
        "rows": entries,
        "seeds": [0, 1],
        "loss_magnitudes": {"fgd": {"first": {"iter": 1, "detection": 1.0, "distill": {}}}},
    }
    path.write_text(json.dumps(data))
    return path


def test_import_fills_gaps_checked_by_teacher_or_fingerprint(tmp_path: Path) -> None:
    rows = ("baseline", "fgd_no_inherit", "fgd", "reppoints_fgd_norm_8ep")
    plan = load_bench_config(PACKAGED, rows=list(rows), seeds=[0, 1, 2])
    teacher = StageResult("teacher", "t", {"AP": 10.0}, 100.0, 50, False, "/t")
    local = {
        "baseline": {2: _result("baseline", 2.5, 2)},
        "fgd_no_inherit": {2: _result("fgd_no_inherit", 7.0, 2)},
    }
    fps = {(r, s): f"fp-{r}-{s}" for r in rows for s in (0, 1, 2)}
    old = _results_file(
        tmp_path / "old.json",
        10.0,
        {
            "baseline": {0: 2.0, 1: 3.0},
            "fgd_no_inherit": {0: 6.0, 1: 8.0, 2: 1.0},
            "fgd": {0: 9.0},
            "reppoints_fgd_norm_8ep": {0: 9.5},
        },
    )
    lines: list[str] = []
    got = import_results(
        [(old, read_results_file(old))],
        plan,
        {"retinanet": teacher},
        local,
        teacher_fps={},
        stage_fps=fps,
        say=lines.append,
    )
    assert {r: sorted(v) for r, v in got.results.items()} == {
        "baseline": [0, 1, 2],
        "fgd_no_inherit": [0, 1, 2],
        "fgd": [0],
        "reppoints_baseline_8ep": [],  # brought by the chosen RepPoints row; the file has none
        "reppoints_fgd_norm_8ep": [],
    }
    # a file older than fingerprints is older than RepPoints' current inheriting rule (RetinaNet's
    # did not change)
    skipped = "reppoints_fgd_norm_8ep seed 0 (inherited by an older rule, before fingerprints)"
    assert f"import {old}: left out {skipped}" in lines
    fni = got.results["fgd_no_inherit"]
    assert fni[2].metrics["AP"] == 7.0  # the work dir's own result wins
    assert fni[0].imported_from == str(old)
    assert fni[0].work_dir == "/elsewhere/seed0/fgd_no_inherit"
    assert got.notes == [
        f"from {old}: 5 row result(s) of one seed; checked by fingerprint 0, by the teacher's "
        "metrics 3, by row name and seed only 2; left out 1"
    ]
    assert local["fgd_no_inherit"].keys() == {2}  # the caller's results are not changed
    data = summarise(plan, got.teachers, got.results)
    row = next(r for r in data["rows"] if r["name"] == "fgd_no_inherit")
    assert row["metrics"]["AP"]["mean"] == pytest.approx(7.0)
    assert row["imported"] == {"0": str(old), "1": str(old)}
    assert "| fgd_no_inherit | retinanet resnet18 | 3 (2 imported) | 7.00 ± 1.00" in (
        render_markdown({**data, **_RUN_INFO, "conclusions": []})
    )

    # Distilled from another teacher: the distilled rows are left out, the baseline is taken.
    other = _results_file(
        tmp_path / "other.json", 11.0, {"baseline": {0: 2.0}, "fgd_no_inherit": {0: 6.0}}
    )
    lines = []
    got = import_results(
        [(other, read_results_file(other))],
        plan,
        {"retinanet": teacher},
        {},
        teacher_fps={},
        stage_fps=fps,
        say=lines.append,
    )
    assert sorted(got.results["baseline"]) == [0] and not got.results["fgd_no_inherit"]
    assert f"import {other}: left out fgd_no_inherit seed 0 (distilled from another teacher)" in (
        lines
    )

    # Recorded fingerprints must match the plan's; the file's teacher fills a missing one.
    data = json.loads(other.read_text())
    data["rows"][0]["fingerprints"] = {"0": "fp-baseline-0"}
    data["rows"][1]["fingerprints"] = {"0": "stale"}
    data["teachers"]["retinanet"]["fingerprint"] = "fp-teacher"
    other.write_text(json.dumps(data))
    got = import_results(
        [(other, read_results_file(other))],
        plan,
        {},
        {},
        teacher_fps={"retinanet": "fp-teacher"},
        stage_fps=fps,
    )
    assert sorted(got.results["baseline"]) == [0] and not got.results["fgd_no_inherit"]
    assert got.teachers["retinanet"].metrics == {"AP": 11.0}
    assert "checked by fingerprint 1" in got.notes[0] and "left out 1" in got.notes[0]


def test_import_checks_the_teacher_even_with_fingerprints(tmp_path: Path) -> None:
    # Same settings (fingerprints equal) but another teacher: another kind of CPU trains
    # another teacher from the same config, so its distilled seeds are not pooled with ours.
    plan = load_bench_config(PACKAGED, rows=["baseline", "fgd"], seeds=[0])
    fps = {(r, s): f"fp-{r}-{s}" for r in ("baseline", "fgd") for s in (0, 1)}
    path = _results_file(
        tmp_path / "elsewhere.json", 11.0, {"baseline": {0: 2.0, 1: 3.0}, "fgd": {0: 6.0}}
    )
    data = json.loads(path.read_text())
    for entry in data["rows"]:
        entry["fingerprints"] = {s: f"fp-{entry['name']}-{s}" for s in entry["per_seed"]}
    data["rows"].append({**data["rows"][0], "name": "renamed_row"})
    path.write_text(json.dumps(data))
    ours = StageResult("teacher", "t", {"AP": 10.0}, 100.0, 50, False, "/t")
    lines: list[str] = []
    got = import_results(
        [(path, read_results_file(path))],
        plan,
        {"retinanet": ours},
        {},
        teacher_fps={},
        stage_fps=fps,
        say=lines.append,
    )
    assert sorted(got.results["baseline"]) == [0] and not got.results["fgd"]
    assert f"import {path}: left out fgd seed 0 (distilled from another teacher)" in lines
    # what the plan does not hold is named, not dropped in silence
    assert f"import {path}: left out baseline seed 1 (seed not in --seeds)" in lines
    assert f"import {path}: left out renamed_row (not a row of this plan)" in lines
    # with no teacher of its own, the work dir takes the file's, by name only, and says so
    lines = []
    got = import_results(
        [(path, read_results_file(path))],
        plan,
        {},
        {},
        teacher_fps={},
        stage_fps=fps,
        say=lines.append,
    )
    assert sorted(got.results["fgd"]) == [0]
    assert f"import {path}: took teacher retinanet by name only (the file records no " in (
        " ".join(lines)
    )
    assert "by name only: teacher retinanet" in got.notes[0]
    # a file without fingerprints, merged where there is no teacher: its distilled rows are
    # not "checked" against the teacher it brought along
    legacy = _results_file(tmp_path / "legacy.json", 11.0, {"fgd": {0: 6.0}})
    got = import_results(
        [(legacy, read_results_file(legacy))], plan, {}, {}, teacher_fps={}, stage_fps=fps
    )
    assert sorted(got.results["fgd"]) == [0]
    assert "by the teacher's metrics 0, by row name and seed only 1" in got.notes[0]


def test_results_files_are_markdown(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"--results out\.json: name the Markdown file"):
        run_quality_bench(tmp_path, config=PACKAGED, results_file="out.json", report_only=True)


def test_a_second_training_run_in_one_work_dir_is_refused(tmp_path: Path) -> None:
    import fcntl

    from fgdistill.engine.bench import run_quality_bench

    class Stop(Exception):
        pass

    def stop(*args: object, **kwargs: object) -> None:
        raise Stop  # the lock was taken: nothing needs to train

    run = {"config": PACKAGED, "overrides": TINY, "rows": ["baseline"], "progress": False}
    # a bad argument fails before the work dir is touched
    with pytest.raises(ConfigError, match="--jobs: need at least 1"):
        run_quality_bench(tmp_path / "never", **run, jobs=0)  # type: ignore[arg-type]
    assert not (tmp_path / "never").exists()
    # another process holds the lock (a second open file description stands in for it)
    (tmp_path / ".bench.lock").touch()
    with open(tmp_path / ".bench.lock", "a+") as other:
        fcntl.flock(other.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(ConfigError, match="another `fgdistill bench quality` is training"):
            run_quality_bench(tmp_path, **run, train_fn=stop)  # type: ignore[arg-type]
        # looking at what it finished is allowed
        data = run_quality_bench(tmp_path, **run, report_only=True)  # type: ignore[arg-type]
        assert data["status"].startswith("partial")
    # once it has ended, the lock is free
    with pytest.raises(Stop):
        run_quality_bench(tmp_path, **run, train_fn=stop)  # type: ignore[arg-type]


def test_merge_joins_an_earlier_work_dirs_results(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["bench", "quality", "--no-progress", "--no-report", "--rows", "baseline", "fgd"]
    for item in TINY:
        args += ["--set", item]
    first, second = tmp_path / "first", tmp_path / "second"
    assert main([*args, "--work-dir", str(first), "--seeds", "0"]) == 0
    assert "- students trained by this invocation: one at a time" in (
        (first / "results.md").read_text()
    )
    # Another machine: the same teacher, seed 1; then one table of both seeds.
    assert main([*args, "--work-dir", str(second), "--seeds", "1"]) == 0
    capsys.readouterr()
    merged = [*args, "--work-dir", str(second), "--seeds", "0", "1", "--report-only"]
    assert main([*merged, "--merge", str(first / "results.json")]) == 0
    out = capsys.readouterr().out
    assert "| fgd | retinanet resnet18 | 2 (1 imported) |" in out
    data = json.loads((second / "results.json").read_text())
    assert data["status"] == "complete" and data["lanes"] is None  # trained nothing
    assert "checked by fingerprint 2" in data["imported"][0]
    fgd = next(r for r in data["rows"] if r["name"] == "fgd")
    first_fgd = json.loads((first / "results.json").read_text())["rows"][1]
    assert fgd["per_seed"]["0"] == first_fgd["per_seed"]["0"]
    assert fgd["fingerprints"]["0"] == first_fgd["fingerprints"]["0"] != fgd["fingerprints"]["1"]
    assert "fgd" in data["loss_magnitudes"]  # seed 0's, carried over from the first file
    # A work dir with nothing of its own: the table comes whole from the file, the pictures
    # (which need the models) are skipped with a line that says why.
    alone = [a for a in args if a != "--no-report"]
    alone += ["--work-dir", str(tmp_path / "empty"), "--seeds", "0", "--report-only"]
    assert main([*alone, "--merge", str(first / "results.json")]) == 0
    out = capsys.readouterr().out
    assert "| teacher (retinanet) | retinanet resnet18 | 1 (imported) |" in out
    assert "report.html skipped: its runs were imported" in out
    assert not (tmp_path / "empty" / "report.html").exists()

    # Merged into the very file it is read from (the published table's case): the file is read
    # before anything is written, so it ends with both seeds; merging again changes nothing.
    pub = tmp_path / "pub.json"
    pub.write_text((first / "results.json").read_text())
    for _ in range(2):
        assert main([*merged, "--merge", str(pub), "--results", str(tmp_path / "pub.md")]) == 0
        rewritten = json.loads(pub.read_text())
        again = next(r for r in rewritten["rows"] if r["name"] == "fgd")
        assert again["per_seed"] == fgd["per_seed"]
        assert "checked by fingerprint 2" in rewritten["imported"][0]
    capsys.readouterr()

    assert main([*merged, "--merge", str(tmp_path / "missing.json")]) == 2
    assert "missing.json: cannot read the results file" in capsys.readouterr().err
    bad = tmp_path / "bad.json"
    for text, message in [
        ('{"rows": []}', "not a results file of `fgdistill bench quality` (no 'teachers' dict)"),
        ("[1, 2", "not a JSON file (line 1"),
        (
            '{"teachers": {}, "seeds": [0], "rows": [{"name": "fgd", "per_seed": {"x": {}}}]}',
            "rows[0] (fgd): per_seed['x'] must map a seed to its metrics",
        ),
    ]:
        bad.write_text(text)
        assert main([*merged, "--merge", str(bad)]) == 2
        assert f"bad.json: {message}" in capsys.readouterr().err

    # While training, what the file gave is said once, at the end, not after every run.
    assert main([*args, "--work-dir", str(first), "--seeds", "0", "1", "--merge", str(pub)]) == 0
    assert capsys.readouterr().out.count(f"import from {pub}") == 1
