"""COCOEvaluator and score_results_file against pycocotools' own COCOeval."""

from __future__ import annotations

import contextlib
import io
import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from fgdistill.data.coco import CategoryMap, CocoDetection
from fgdistill.errors import DataError
from fgdistill.evaluation import METRIC_NAMES, COCOEvaluator, score_results_file

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


def _val(root: Path, masks: bool = True) -> CocoDetection:
    return CocoDetection(root / "annotations" / "instances_val.json", root / "val", masks=masks)


def _perfect(target: dict[str, Any]) -> dict[str, torch.Tensor]:
    return {
        "boxes": target["boxes"],
        "labels": target["labels"],
        "scores": torch.ones(len(target["labels"])),
        "masks": target["masks"][:, None].float(),
    }


def _noisy(target: dict[str, Any], gen: torch.Generator) -> dict[str, torch.Tensor]:
    """Jittered boxes, a few wrong labels, random scores and extra false positives."""
    n = len(target["labels"])
    boxes = target["boxes"] + torch.randn(n, 4, generator=gen) * 2.0
    boxes[:, 2:] = torch.maximum(boxes[:, 2:], boxes[:, :2] + 1)
    labels = target["labels"].clone()
    labels[torch.rand(n, generator=gen) < 0.3] = 1
    extra = torch.rand(3, 2, generator=gen) * 60
    boxes = torch.cat([boxes, torch.cat([extra, extra + 20], dim=1)])
    labels = torch.cat([labels, torch.randint(1, 9, (3,), generator=gen)])
    scores = torch.rand(len(labels), generator=gen)
    masks = torch.zeros(len(labels), 1, 96, 96)
    masks[:n, 0] = target["masks"].float() * 0.9
    masks[n:, 0, 10:30, 10:30] = 0.7
    return {"boxes": boxes, "labels": labels, "scores": scores, "masks": masks}


def _pycocotools_stats(ann_file: Path, results: list[dict[str, Any]], iou_type: str) -> list[float]:
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(ann_file))
        dt = gt.loadRes(results)
        ev = COCOeval(gt, dt, iou_type)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return [float(v) for v in ev.stats]


def _assert_matches(metrics: dict[str, float], stats: list[float]) -> None:
    assert list(metrics) == list(METRIC_NAMES)
    for name, ref in zip(METRIC_NAMES, stats, strict=True):
        if ref < 0:
            assert math.isnan(metrics[name]), name
        else:
            assert metrics[name] == pytest.approx(100 * ref, abs=1e-9), name


def test_ground_truth_as_detections_scores_100(
    synth_dataset: Path, capsys: pytest.CaptureFixture
) -> None:
    ds = _val(synth_dataset)
    evaluator = COCOEvaluator(ds.coco, ds.category_map, iou_types=("bbox", "segm"))
    for i in range(len(ds)):
        _, target = ds[i]
        evaluator.process([target], [_perfect(target)])
    result = evaluator.evaluate()
    assert set(result) == {"bbox", "segm"}
    for metrics in result.values():
        assert metrics["AP"] == pytest.approx(100.0)
        assert metrics["AP50"] == pytest.approx(100.0)
        assert metrics["AR100"] == pytest.approx(100.0)
        assert all(isinstance(v, float) for v in metrics.values())
    assert capsys.readouterr().out == ""  # pycocotools' printing is captured
    assert "Average Precision" in evaluator.summaries["bbox"]


@pytest.mark.parametrize("iou_type", ["bbox", "segm"])
def test_metrics_equal_pycocotools(synth_dataset: Path, tmp_path: Path, iou_type: str) -> None:
    ds = _val(synth_dataset)
    ann_file = synth_dataset / "annotations" / "instances_val.json"
    evaluator = COCOEvaluator(ann_file, iou_types=(iou_type,))
    gen = torch.Generator().manual_seed(0)
    for i in range(0, len(ds), 2):  # two images per batch
        batch = [ds[j][1] for j in range(i, min(i + 2, len(ds)))]
        evaluator.process(batch, [_noisy(t, gen) for t in batch])
    metrics = evaluator.evaluate()[iou_type]
    assert 5 < metrics["AP"] < 95  # a real, non-trivial score

    results = evaluator.results(iou_type)
    results_file = tmp_path / "results.json"
    results_file.write_text(json.dumps(results))
    stats = _pycocotools_stats(ann_file, json.loads(results_file.read_text()), iou_type)
    _assert_matches(metrics, stats)
    _assert_matches(score_results_file(ann_file, results_file, iou_type), stats)


def test_labels_map_back_to_category_ids(synth_dataset: Path, tmp_path: Path) -> None:
    data = json.loads((synth_dataset / "annotations" / "instances_val.json").read_text())
    for cat in data["categories"]:
        cat["id"] = 100 - 10 * cat["id"]  # 90, 80, ... : reversed and non-contiguous
    for ann in data["annotations"]:
        ann["category_id"] = 100 - 10 * ann["category_id"]
    ann_file = tmp_path / "remapped.json"
    ann_file.write_text(json.dumps(data))
    ds = CocoDetection(ann_file, synth_dataset / "val", masks=True)
    assert ds.category_map.cat_ids[0] == 20
    evaluator = COCOEvaluator(ann_file)
    for i in range(len(ds)):
        _, target = ds[i]
        evaluator.process([target], [_perfect(target)])
    assert evaluator.evaluate()["bbox"]["AP"] == pytest.approx(100.0)
    assert {r["category_id"] for r in evaluator.results()} <= {c["id"] for c in data["categories"]}


def test_no_detections_scores_zero(synth_dataset: Path, tmp_path: Path) -> None:
    ds = _val(synth_dataset)
    evaluator = COCOEvaluator(ds.coco, iou_types=("bbox", "segm"))
    empty = {
        "boxes": torch.zeros(0, 4),
        "labels": torch.zeros(0, dtype=torch.int64),
        "scores": torch.zeros(0),
        "masks": torch.zeros(0, 1, 96, 96),
    }
    for i in range(len(ds)):
        evaluator.process([ds[i][1]], [empty])
    for metrics in evaluator.evaluate().values():
        assert metrics["AP"] == 0.0 and metrics["AR100"] == 0.0
    results = tmp_path / "empty.json"
    results.write_text("[]")
    ann_file = synth_dataset / "annotations" / "instances_val.json"
    assert score_results_file(ann_file, results)["AP"] == 0.0
    # nothing processed at all
    evaluator.reset()
    assert evaluator.evaluate()["bbox"]["AP"] == 0.0


def test_only_processed_images_are_scored(synth_dataset: Path) -> None:
    ds = _val(synth_dataset, masks=False)
    evaluator = COCOEvaluator(ds.coco)
    _, target = ds[0]
    scores = torch.ones(len(target["labels"]))
    evaluator.process(
        [target], [{"boxes": target["boxes"], "labels": target["labels"], "scores": scores}]
    )
    assert evaluator.evaluate()["bbox"]["AP"] == pytest.approx(100.0)


def test_process_rejects_bad_outputs(synth_dataset: Path) -> None:
    ds = _val(synth_dataset)
    evaluator = COCOEvaluator(ds.coco, iou_types=("segm",))
    _, target = ds[0]
    out = _perfect(target)
    with pytest.raises(ValueError, match="1 targets but 2 outputs"):
        evaluator.process([target], [out, out])
    with pytest.raises(DataError, match=r"labels must be in 1\.\.8"):
        evaluator.process([target], [{**out, "labels": out["labels"] * 0}])
    with pytest.raises(DataError, match="image_id 999 is not in the ground truth"):
        evaluator.process([{"image_id": 999}], [out])
    with pytest.raises(ValueError, match="needs 'masks'"):
        evaluator.process([target], [{k: v for k, v in out.items() if k != "masks"}])
    with pytest.raises(ValueError, match="iou type"):
        COCOEvaluator(ds.coco, iou_types=("keypoints",))
    other = CategoryMap([{"id": 1, "name": "a"}, {"id": 50, "name": "b"}])
    with pytest.raises(DataError, match=r"ids \[50\] that the ground truth does not"):
        COCOEvaluator(ds.coco, other)


@pytest.mark.parametrize("empty", ["missing", None, []])
def test_segm_needs_ground_truth_masks(synth_dataset: Path, tmp_path: Path, empty: Any) -> None:
    data = json.loads((synth_dataset / "annotations" / "instances_val.json").read_text())
    for ann in data["annotations"]:
        del ann["segmentation"]
        if empty != "missing":  # null and [] pass the file's check, but hold no mask
            ann["segmentation"] = empty
    ann_file = tmp_path / "boxes_only.json"
    ann_file.write_text(json.dumps(data))
    results = tmp_path / "r.json"
    results.write_text("[]")
    with pytest.raises(DataError, match=r"needs ground-truth masks.*no or an empty 'segm"):
        score_results_file(ann_file, results, "segm")


_GOOD = {"image_id": 1, "category_id": 1, "score": 0.5, "bbox": [1, 2, 3, 4]}


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (None, "results file not found"),
        ("[{", "invalid JSON"),
        ('{"a": 1}', "must hold a JSON list"),
        (json.dumps([_GOOD, 3]), r"\[1\]: must be an object"),
        (
            json.dumps([{"image_id": 1, "bbox": [1, 2, 3, 4]}]),
            r"\[0\]: missing key\(s\) 'category_id', 'score'",
        ),
        (json.dumps([{**_GOOD, "image_id": 77}]), r"\[0\]: image_id 77 is not in the ground truth"),
        (json.dumps([_GOOD, {**_GOOD, "category_id": 42}]), r"\[1\]: category_id 42 is not in"),
        (json.dumps([{**_GOOD, "score": "high"}]), r"\[0\]: score must be a finite number"),
        (json.dumps([{**_GOOD, "bbox": [1, 2, 3]}]), r"\[0\]: bbox must be 4 finite numbers"),
        (json.dumps([{**_GOOD, "bbox": [1, 2, -3, 4]}]), r"\[0\]: bbox has a negative size"),
    ],
)
def test_bad_results_files(
    synth_dataset: Path, tmp_path: Path, content: str | None, expected: str
) -> None:
    results = tmp_path / "results.json"
    if content is not None:
        results.write_text(content)
    ann_file = synth_dataset / "annotations" / "instances_val.json"
    with pytest.raises(DataError, match=r"results\.json: .*" + expected):
        score_results_file(ann_file, results)


def test_bad_segm_results(synth_dataset: Path, tmp_path: Path) -> None:
    ann_file = synth_dataset / "annotations" / "instances_val.json"
    results = tmp_path / "results.json"
    seg = {"size": [10, 10], "counts": [100]}
    results.write_text(json.dumps([{**_GOOD, "segmentation": seg}]))
    with pytest.raises(DataError, match=r"results\.json: \[0\]: segmentation size \[10, 10\]"):
        score_results_file(ann_file, results, "segm")
    results.write_text(json.dumps([{**_GOOD, "segmentation": 7}]))
    with pytest.raises(DataError, match=r"results\.json: \[0\]: invalid segmentation"):
        score_results_file(ann_file, results, "segm")
    image = json.loads(ann_file.read_text())["images"][0]
    garbage = {"size": [image["height"], image["width"]], "counts": "zzzz"}
    results.write_text(json.dumps([{**_GOOD, "image_id": image["id"], "segmentation": garbage}]))
    with pytest.raises(DataError, match=r"\[0\]: invalid segmentation \(compressed RLE counts"):
        score_results_file(ann_file, results, "segm")


def test_bad_ground_truth_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"gt\.json: annotation file not found"):
        COCOEvaluator(tmp_path / "gt.json")


# --------------------------------------------------------------------------- distributed


def test_distributed_gather_matches_single_process(
    synth_dataset: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two ranks each process half of the images; both get the single-process metrics.

    torch.distributed is simulated (a real two-process group costs ~20 s to start here): the
    fake all_gather_object hands out both ranks' parts, as gloo would.
    """
    ds = _val(synth_dataset)
    gen = torch.Generator().manual_seed(0)
    outputs = [_noisy(ds[i][1], gen) for i in range(len(ds))]

    single = COCOEvaluator(ds.coco, ds.category_map)
    for i in range(len(ds)):
        single.process([ds[i][1]], [outputs[i]])
    expected = single.evaluate()

    ranks = [COCOEvaluator(ds.coco, ds.category_map) for _ in range(2)]
    for i in range(len(ds)):
        ranks[i % 2].process([ds[i][1]], [outputs[i]])
    parts = [(r._results, r._img_ids) for r in ranks]

    def all_gather_object(out: list[Any], obj: Any) -> None:
        assert obj in parts
        out[:] = parts

    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    monkeypatch.setattr(dist, "all_gather_object", all_gather_object)
    for evaluator in ranks:
        got = evaluator.evaluate()
        assert json.dumps(got) == json.dumps(expected)
    assert len(ranks[0].results()) < len(single.results())  # each rank kept only its half
