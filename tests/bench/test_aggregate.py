"""The benchmark's table: statistics over seeds, paired gains, conclusions, results files."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from fgdistill.bench.aggregate import conclusions, render_markdown, summarise, write_results
from fgdistill.bench.plan import BenchPlan, load_plan
from fgdistill.bench.runner import StageRecord

CONFIG = """
families: {retinanet: {}}
rows:
  - {name: base, description: alone}
  - {name: fgd, distill: {}}
  - {name: imit, distill: {method: mse}}
  - {name: big_batch, distill: {}, train: {data: {batch_size: 16}}}
  - {name: base_long, train: {optim: {epochs: 4}}}
  - {name: fgd_long, baseline: base_long, distill: {}, train: {optim: {epochs: 4}}}
diagnostics:
  - {name: extra, distill: {}}
compare: {fgd_vs_imitation: [fgd, imit]}
"""


def _plan(tmp_path: Path, seeds: list[int]) -> BenchPlan:
    cfg = tmp_path / "bench.yaml"
    cfg.write_text(CONFIG)
    return load_plan(cfg, seeds=seeds, diagnostics=True)


def _rec(ap: float, heldout: float | None = None) -> StageRecord:
    held = {} if heldout is None else {"data": "d", "metrics": {"AP": heldout}}
    return StageRecord("fp", "retinanet resnet50", {"AP": ap, "AP50": 2 * ap}, 10.0, 5, held)


def test_gains_are_paired_by_seed_and_shares_need_one_budget(tmp_path: Path) -> None:
    plan = _plan(tmp_path, [0, 1, 2])
    records = {("retinanet", None): _rec(10.0)}
    records |= {("base", s): _rec(ap) for s, ap in enumerate((2.0, 4.0, 9.0))}
    records |= {("fgd", 0): _rec(6.0), ("fgd", 1): _rec(8.0)}
    records |= {("imit", s): _rec(ap) for s, ap in enumerate((3.0, 5.0, 9.5))}
    records |= {
        ("big_batch", 0): _rec(7.0),
        ("base_long", 0): _rec(5.0),
        ("fgd_long", 0): _rec(7.0),
    }
    data = summarise(plan, records)
    rows = {r["name"]: r for r in data["rows"]}
    assert "extra" not in rows  # a diagnostic row without results is left out
    assert rows["base"]["metrics"]["AP"]["mean"] == pytest.approx(5.0)  # all its seeds
    assert rows["base"]["metrics"]["AP"]["std"] == pytest.approx(math.sqrt(13.0))
    assert math.isnan(rows["fgd"]["metrics"]["APl"]["mean"])  # a missing metric stays missing
    # fgd's gain is over seeds 0 and 1 only: 7 - 3, not 7 - 5
    assert rows["fgd"]["paired_seeds"] == [0, 1] and rows["fgd"]["gain_AP"] == pytest.approx(4.0)
    assert rows["fgd"]["gap_AP"] == pytest.approx(7.0)
    assert rows["fgd"]["gap_share"] == pytest.approx(4.0 / 7.0)
    # another batch size, or another number of epochs, than the baseline: no share of the gap
    assert rows["big_batch"]["gain_AP"] == pytest.approx(5.0)
    assert math.isnan(rows["big_batch"]["gap_share"]) and math.isnan(rows["base_long"]["gap_share"])
    # a row with its own baseline is measured against it
    assert rows["fgd_long"]["gain_AP"] == pytest.approx(2.0)
    assert rows["fgd_long"]["gap_share"] == pytest.approx(2.0 / 5.0)
    text = "\n".join(conclusions(data))
    assert "retinanet: teacher 10.00 vs base 5.00 AP (gap +5.00)." in text
    assert "retinanet: teacher 10.00 vs base_long 5.00 AP (gap +5.00)." in text
    assert "retinanet fgd: 7.00 AP, +4.00 over base on seeds [0, 1], 57.1% of the gap" in text
    assert "retinanet big_batch: 7.00 AP, +5.00 over base on seeds [0] (within twice" in text
    assert "fgd_vs_imitation: fgd 7.00 > imit 5.83 (means over different seeds)." in text
    md = render_markdown({**data, "conclusions": [], **_RUN, "synth": {"num_val": 4, "seed": 0}})
    assert "| fgd | retinanet resnet50 | 2 | 7.00 ± 1.41 | 14.00 ± 2.83 |" in md
    assert (
        "| 4.00 | 57% |" in md and "| teacher (retinanet) | retinanet resnet50 | 1 | 10.00 |" in md
    )


_RUN = {"command": "c", "machine": "m", "date": "d", "seeds": [0], "status": "s", "wall_time_s": 1}


def test_results_files_hold_both_sets_and_no_nan(tmp_path: Path) -> None:
    plan = _plan(tmp_path, [0])
    plan.heldout.images = 6
    records = {("retinanet", None): _rec(9.0, 8.0), ("base", 0): _rec(1.0, 0.5)}
    records[("fgd", 0)] = _rec(5.0, 4.5)
    data = write_results(plan, records, tmp_path, command="fgdistill bench", wall_s=3.0)
    assert data["status"] == "partial"  # rows imit ... have no result
    saved = json.loads((tmp_path / "results.json").read_text())
    assert "NaN" not in (tmp_path / "results.json").read_text()
    fgd = next(r for r in saved["heldout"]["rows"] if r["name"] == "fgd")
    assert fgd["metrics"]["AP"]["mean"] == 4.5 and fgd["gap_share"] == pytest.approx(4 / 7.5)
    assert fgd["metrics"]["AP"]["std"] is None  # one seed: written as null
    md = (tmp_path / "results.md").read_text()
    assert "## Validation split (200 images, seed 0)" in md
    assert "## Held-out set (6 images, seed 7)" in md
    assert "retinanet fgd: 4.50 AP, +4.00 over base on seeds [0], 53.3% of the gap" in md
    records |= {(n, 0): _rec(2.0) for n in ("imit", "big_batch", "base_long", "fgd_long")}
    assert write_results(plan, records, tmp_path, command="c", wall_s=1.0)["status"] == "complete"


def test_a_row_whose_baseline_is_skipped_has_no_gain(tmp_path: Path) -> None:
    cfg = tmp_path / "bench.yaml"
    cfg.write_text(CONFIG + "skip_rows: [base]\n")
    plan = load_plan(cfg, rows=["fgd"], seeds=[0])
    assert [r.name for r in plan.rows] == ["fgd"]
    data = summarise(plan, {("retinanet", None): _rec(9.0), ("fgd", 0): _rec(5.0)})
    (fgd,) = data["rows"]
    assert fgd["paired_seeds"] == [] and math.isnan(fgd["gain_AP"])
    assert "retinanet fgd: no seed in common with base." not in conclusions(data)


def test_mask_rows_get_mask_ap_its_gain_and_share(tmp_path: Path) -> None:
    cfg = tmp_path / "bench.yaml"
    cfg.write_text(
        """
families: {mask_rcnn: {teacher: {model: {arch: mask_rcnn}}, student: {model: {arch: mask_rcnn}}}}
rows:
  - {name: base}
  - {name: fgd, distill: {}}
  - {name: imit, distill: {method: mse}}
compare: {fgd_vs_imitation: [fgd, imit]}
"""
    )
    plan = load_plan(cfg, seeds=[0, 1])

    def rec(ap: float, mask_ap: float) -> StageRecord:
        return StageRecord("fp", "mask_rcnn resnet50", {"AP": ap, "mask_AP": mask_ap}, 10.0, 5)

    records = {("mask_rcnn", None): rec(10.0, 8.0)}
    records |= {("base", 0): rec(2.0, 1.0), ("base", 1): rec(4.0, 3.0)}
    records |= {("fgd", 0): rec(6.0, 4.0), ("fgd", 1): rec(8.0, 6.0)}
    records |= {("imit", 0): rec(5.0, 5.0), ("imit", 1): rec(5.0, 7.0)}
    data = summarise(plan, records)
    fgd = next(r for r in data["rows"] if r["name"] == "fgd")
    assert fgd["metrics"]["mask_AP"]["mean"] == pytest.approx(5.0)
    assert fgd["gain_mask_AP"] == pytest.approx(3.0) and fgd["gap_mask_AP"] == pytest.approx(6.0)
    assert fgd["gap_share_mask"] == pytest.approx(0.5)
    text = "\n".join(conclusions(data))
    assert "mask_rcnn: teacher 8.00 vs base 2.00 mask AP (gap +6.00)." in text
    assert "mask_rcnn fgd: 5.00 mask AP, +3.00 over base on seeds [0, 1], 50.0% of the gap" in text
    # the order by box AP and by mask AP differ here, and both are stated
    assert "fgd_vs_imitation: fgd 7.00 > imit 5.00." in text
    assert "fgd_vs_imitation (mask AP): imit 6.00 > fgd 5.00." in text
    md = render_markdown({**data, "conclusions": [], **_RUN, "synth": {"num_val": 4, "seed": 0}})
    assert "| gain AP | gap closed | mask AP | mask gain | mask gap closed | wall/seed |" in md
    assert "| 4.00 | 57% | 5.00 ± 1.41 | 3.00 | 50% | 0m10s |" in md
    assert "| teacher (mask_rcnn) | mask_rcnn resnet50 | 1 | 10.00 |" in md and "| 8.00 | | |" in md


def test_box_only_tables_have_no_mask_columns(tmp_path: Path) -> None:
    plan = _plan(tmp_path, [0])
    data = summarise(plan, {("retinanet", None): _rec(9.0), ("base", 0): _rec(1.0)})
    md = render_markdown({**data, "conclusions": [], **_RUN, "synth": {"num_val": 4, "seed": 0}})
    assert "mask" not in md and not any("mask" in c for c in conclusions(data))
