"""Benchmark plans: the packaged configs, row selection and clear errors for bad configs."""

from __future__ import annotations

from pathlib import Path

import pytest

from fgdistill.bench.plan import load_plan
from fgdistill.errors import ConfigError

CONFIGS = Path(__file__).resolve().parents[2] / "src/fgdistill/configs"
QUALITY = CONFIGS / "bench/quality.yaml"
DEMO = CONFIGS / "demo/demo.yaml"

#: The paper's ablation rows per family: baseline, plain imitation, fg only, bg only, fg and bg
#: as one region, split, full FGD, full FGD without inheriting.
ABLATION_ROWS = {
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


def test_packaged_table_has_the_ablation_rows_for_each_family() -> None:
    plan = load_plan(QUALITY)
    assert not any(r.diagnostic for r in plan.rows) and len(plan.seeds) >= 2
    rows = {r.name: r for r in plan.rows}
    for family, names in ABLATION_ROWS.items():
        base, imitation, fg, bg, joint, split, full, no_inherit = (rows[n].config for n in names)
        # one budget and one baseline per family's table
        assert len({rows[n].config.optim.epochs for n in names}) == 1, family
        assert {rows[n].baseline for n in names[1:]} == {names[0]} and base.distill is None
        assert imitation.distill and imitation.distill.method == "mse"
        assert not imitation.distill.inherit_teacher
        assert fg.distill and fg.distill.hparams["beta"] == 0
        assert bg.distill and bg.distill.hparams["alpha"] == 0
        assert joint.distill and joint.distill.split_regions is False
        assert split.distill and split.distill.hparams["lambda_"] == 0
        assert full.distill and full.distill.inherit_teacher
        assert full.distill.normalize == "teacher_rms" and full.distill.fgd_weight_scale == 1.0
        assert no_inherit.distill and not no_inherit.distill.inherit_teacher
    everything = load_plan(QUALITY, diagnostics=True)
    assert len(everything.rows) > len(plan.rows)
    assert min(t.optim.epochs for t in plan.teachers.values()) > max(
        r.config.optim.epochs for r in everything.rows
    )
    assert plan.heldout.images >= plan.synth.num_val and plan.heldout.seed != plan.synth.seed
    quick = load_plan(QUALITY, quick=True)
    assert quick.seeds == [0] and quick.synth.num_train < plan.synth.num_train
    assert 0 < quick.heldout.images < plan.heldout.images
    assert [r.name for r in quick.rows] == ABLATION_ROWS["retinanet"]
    for group, names in everything.compare.items():
        assert len({everything.row(n).family for n in names}) == 1, group


def test_the_demo_is_a_plan_of_two_rows() -> None:
    plan = load_plan(DEMO)
    assert [(r.name, r.baseline) for r in plan.rows] == [("baseline", None), ("fgd", "baseline")]
    assert plan.seeds == [0] and plan.heldout.images == 0
    teacher, (base, fgd) = plan.teachers["reppoints"], plan.rows
    assert teacher.model.backbone == "resnet50" and base.config.model.backbone == "resnet18"
    assert teacher.optim.epochs > fgd.config.optim.epochs == base.config.optim.epochs
    assert fgd.config.distill is not None and fgd.config.distill.inherit_teacher


_FAMILY = "families: {retinanet: {}}\n"
_TWO_BUDGETS = (
    "rows: [{name: a}, {name: b, distill: {}}, {name: c, train: {optim: {epochs: 3}}},"
    " {name: d, baseline: c, distill: {}}]\n"
)


def test_chosen_rows_bring_their_own_baseline(tmp_path: Path) -> None:
    cfg = tmp_path / "bench.yaml"
    cfg.write_text(_FAMILY + _TWO_BUDGETS + "diagnostics: [{name: e, distill: {}}]\n")

    def names(*rows: str) -> list[str]:
        return [r.name for r in load_plan(cfg, rows=list(rows)).rows]

    assert names("b") == ["a", "b"]
    assert names("d") == ["c", "d"]  # d's own baseline, not the family's
    assert names("c") == ["a", "c"]
    assert names("e") == ["a", "e"]  # a diagnostic row, chosen by name
    assert [r.name for r in load_plan(cfg).rows] == ["a", "b", "c", "d"]
    assert [r.diagnostic for r in load_plan(cfg, diagnostics=True).rows][-1] is True
    cfg.write_text(_FAMILY + _TWO_BUDGETS + "skip_rows: [a]\n")
    assert names("b") == ["b"]  # a skipped baseline stays skipped


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("synth: {}\nrowz: []\n", "unknown key 'rowz'; did you mean 'rows'?"),
        (_FAMILY + "rows: [{name: a, family: retina}]\n", "rows[0] (a).family: unknown key"),
        (_FAMILY + "rows: [{name: a}, {name: a}]\n", "duplicate row name 'a'"),
        (_FAMILY + "rows: [{name: a, distil: {}}]\n", "did you mean 'distill'?"),
        (_FAMILY + "rows: [{name: a}, {name: b, baseline: c}]\n", "row b: baseline: unknown"),
        (
            _FAMILY + "rows: [{name: a, distill: {}}, {name: b, baseline: a}]\n",
            "row b: baseline: 'a' must be a row of family 'retinanet' without a distill",
        ),
        (_FAMILY + "rows: [{name: a, train: {optim: {lr: fast}}}]\n", "rows[0] (a)"),
        (_FAMILY + "rows: [{name: a}]\ncompare: {g: [a, x]}\n", "compare.g: unknown key 'x'"),
        (_FAMILY + "rows: [{name: a}]\ncompare: {g: [a]}\n", "compare.g: expected a list of two"),
        (
            _FAMILY + _TWO_BUDGETS + "compare: {g: [b, d]}\n",
            "compare.g: rows ['b', 'd'] differ in family or baseline",
        ),
        (_FAMILY + "rows: [{name: a}]\ndiagnostics: [{name: a}]\n", "diagnostics[0]: duplicate"),
        (_FAMILY + "rows: [{name: a}]\nheldout: {images: 10, seed: 0}\n", "is synth.seed too"),
        (_FAMILY + "rows: [{name: a}]\nheldout: {imgs: 10}\n", "heldout.imgs: unknown key"),
        (_FAMILY + "rows: [{name: a}]\nheldout: {images: -1}\n", "need 0 (off) or more, got -1"),
        (_FAMILY + "rows: [{name: a}]\nseeds: [1, 1]\n", "seeds: need one or more distinct"),
        ("rows: [{name: a}]\n", "families: need at least one detector family"),
    ],
)
def test_bad_configs_name_the_file_and_key(tmp_path: Path, text: str, message: str) -> None:
    cfg = tmp_path / "bench.yaml"
    cfg.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_plan(cfg)
    assert message in str(err.value) and str(cfg) in str(err.value)


def test_overrides_and_row_names_are_checked() -> None:
    with pytest.raises(ConfigError, match=r"--set: top level: unknown key 'teachr'"):
        load_plan(QUALITY, ["teachr.optim.epochs=2"])
    with pytest.raises(ConfigError, match=r"--set: top level: unknown key 'quick'"):
        load_plan(QUALITY, ["quick.seeds=[0]"])
    with pytest.raises(ConfigError, match="--rows: unknown key 'fdg'; did you mean 'fgd'"):
        load_plan(QUALITY, rows=["fdg"])
    plan = load_plan(QUALITY, ["common.optim.lr=0.02"], rows=["baseline"])
    assert plan.rows[0].config.optim.lr == 0.02


def test_a_family_may_share_another_familys_teacher(tmp_path: Path) -> None:
    cfg = tmp_path / "bench.yaml"
    cfg.write_text(
        "families:\n"
        "  a: {teacher: {model: {backbone: resnet50}}}\n"
        "  b: {teacher: a, student: {model: {arch: fcos}}}\n"
        "rows: [{name: x, family: b}, {name: y, family: b, distill: {method: pkd}}]\n"
    )
    plan = load_plan(cfg)
    assert plan.teacher_family("b") == "a" and plan.teacher_family("a") == "a"
    assert plan.teachers["b"] is plan.teachers["a"]
    assert plan.row("y").baseline == "x" and plan.row("y").config.model.arch == "fcos"
    everything = load_plan(QUALITY)
    assert everything.teacher_family("reppoints_to_retinanet") == "reppoints"
    cfg.write_text("families:\n  b: {teacher: a}\nrows: [{name: x}]\n")
    with pytest.raises(
        ConfigError, match=r"families\.b\.teacher: 'a' is not a family with a teacher"
    ):
        load_plan(cfg)
