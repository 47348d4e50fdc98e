"""COCO metrics through pycocotools' ``COCOeval``, for ``bbox`` and ``segm``.

**Scale:** every metric is returned as a plain float in *percent* (0-100), the way papers and
our tables report them; pycocotools' own summary prints 0-1. A metric COCO cannot define (for
example ``APl`` when the ground truth has no large objects) is ``nan``.

Metric names, in COCOeval's ``stats`` order: ``AP`` (IoU .50:.95), ``AP50``, ``AP75``, ``APs``,
``APm``, ``APl``, ``AR1``, ``AR10``, ``AR100``, ``ARs``, ``ARm``, ``ARl``.

pycocotools prints progress to stdout, asserts on bad input and crashes on an empty result
list; here results are validated and turned into a ``COCO`` object directly, and its printing
is captured (the text summary stays available in :attr:`COCOEvaluator.summaries`).
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torch import Tensor

from fgdistill.data.coco import (
    CategoryMap,
    CocoIndex,
    Target,
    decode_rle_counts,
    read_annotations,
)
from fgdistill.errors import DataError

__all__ = ["IOU_TYPES", "METRIC_NAMES", "COCOEvaluator", "score_results_file"]

logger = logging.getLogger(__name__)

IOU_TYPES: tuple[str, ...] = ("bbox", "segm")
METRIC_NAMES: tuple[str, ...] = (
    "AP",
    "AP50",
    "AP75",
    "APs",
    "APm",
    "APl",
    "AR1",
    "AR10",
    "AR100",
    "ARs",
    "ARm",
    "ARl",
)


def _load_ground_truth(source: str | Path | COCO | CocoIndex) -> COCO:
    if isinstance(source, COCO):
        return source
    if isinstance(source, CocoIndex):
        return source.to_coco_api()
    index = read_annotations(source)
    assert index is not None  # raise mode
    return index.to_coco_api()


def _check_iou_type(iou_type: str) -> None:
    if iou_type not in IOU_TYPES:
        raise ValueError(f"iou type must be one of {IOU_TYPES}, got {iou_type!r}")


def _results_to_coco(coco_gt: COCO, results: list[dict[str, Any]], iou_type: str) -> COCO:
    """Detections -> a pycocotools ``COCO`` object, also for an empty list (unlike loadRes)."""
    anns = []
    for i, res in enumerate(results):
        ann = dict(res)
        if iou_type == "segm":
            ann["area"] = float(mask_utils.area(ann["segmentation"]))
            ann["bbox"] = [float(v) for v in mask_utils.toBbox(ann["segmentation"])]
        else:
            ann["area"] = float(ann["bbox"][2]) * float(ann["bbox"][3])
        ann["id"] = i + 1
        ann["iscrowd"] = 0
        anns.append(ann)
    coco_dt = COCO()
    coco_dt.dataset = {
        "images": list(coco_gt.dataset["images"]),
        "categories": copy.deepcopy(coco_gt.dataset["categories"]),
        "annotations": anns,
    }
    with contextlib.redirect_stdout(io.StringIO()):
        coco_dt.createIndex()
    return coco_dt


def _run_cocoeval(
    coco_gt: COCO,
    results: list[dict[str, Any]],
    iou_type: str,
    img_ids: Sequence[int] | None,
) -> tuple[dict[str, float], str]:
    """COCOeval on ``results``; ``img_ids`` None means every ground-truth image.

    Returns metrics in percent (``nan`` where undefined) and pycocotools' printed summary.
    """
    if iou_type == "segm":
        missing = [a["id"] for a in coco_gt.dataset["annotations"] if not a.get("segmentation")]
        if missing:
            raise DataError(
                f"segm evaluation needs ground-truth masks, but {len(missing)} annotation(s) "
                f"have no or an empty 'segmentation' (ids {missing[:5]})"
            )
    coco_dt = _results_to_coco(coco_gt, results, iou_type)
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        evaluator = COCOeval(coco_gt, coco_dt, iouType=iou_type)
        if img_ids is not None:
            evaluator.params.imgIds = sorted(set(int(i) for i in img_ids))
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    stats = [float(v) for v in evaluator.stats]
    metrics = {
        name: (100.0 * value if value >= 0 else math.nan)
        for name, value in zip(METRIC_NAMES, stats, strict=True)
    }
    return metrics, buffer.getvalue()


def _as_numpy(value: Any, name: str) -> np.ndarray:
    if isinstance(value, Tensor):
        return value.detach().to("cpu").numpy()
    return np.asarray(value)


class COCOEvaluator:
    """Collects detections batch by batch and scores them with pycocotools' COCOeval.

    Three verbs: :meth:`reset`, :meth:`process` a batch, :meth:`evaluate` into
    ``{iou_type: {metric: value}}`` with values in percent (0-100, ``nan`` where COCO leaves a
    metric undefined). Only the images passed to :meth:`process` are scored.

    Distributed runs: when ``torch.distributed`` is initialised, :meth:`evaluate` gathers every
    rank's detections with ``all_gather_object`` (a collective: call it on every rank) and every
    rank computes and returns the same metrics.

    Args:
        ann_file_or_coco: the ground truth: an instances JSON path, a validated
            :class:`~fgdistill.data.coco.CocoIndex` or a pycocotools ``COCO`` object (for
            example ``dataset.coco``).
        category_map: maps the model's labels back to category ids; by default built from
            the ground truth's categories (the same mapping :class:`CocoDetection` uses).
        iou_types: any of ``"bbox"``, ``"segm"``.
        mask_threshold: mask probabilities above this are foreground for ``segm``.
    """

    def __init__(
        self,
        ann_file_or_coco: str | Path | COCO | CocoIndex,
        category_map: CategoryMap | None = None,
        iou_types: Sequence[str] = ("bbox",),
        *,
        mask_threshold: float = 0.5,
    ) -> None:
        if isinstance(iou_types, str):
            iou_types = (iou_types,)
        for iou_type in iou_types:
            _check_iou_type(iou_type)
        if not iou_types:
            raise ValueError("iou_types must name at least one of 'bbox', 'segm'")
        self.coco_gt = _load_ground_truth(ann_file_or_coco)
        self.category_map = category_map or CategoryMap(self.coco_gt.dataset["categories"])
        unknown = set(self.category_map.cat_ids) - set(self.coco_gt.getCatIds())
        if unknown:
            raise DataError(
                f"the category map has ids {sorted(unknown)} that the ground truth does not; "
                "was it built from another dataset?"
            )
        self.iou_types = tuple(iou_types)
        self.mask_threshold = mask_threshold
        self._gt_image_ids = set(self.coco_gt.getImgIds())
        self._label_to_cat = np.array([0, *self.category_map.cat_ids], dtype=np.int64)
        self.summaries: dict[str, str] = {}
        """pycocotools' printed summary per iou type, from the last :meth:`evaluate`."""
        self.reset()

    def reset(self) -> None:
        """Forget every processed detection."""
        self._results: dict[str, list[dict[str, Any]]] = {t: [] for t in self.iou_types}
        self._img_ids: list[int] = []

    def process(self, targets: Sequence[Target], outputs: Sequence[dict[str, Tensor]]) -> None:
        """Add one batch of detections.

        Args:
            targets: one dict per image with ``image_id`` (int or 0-d tensor); other keys are
                ignored (the ground truth comes from the annotation file).
            outputs: one dict per image as torchvision's detectors return in eval mode, in
                the image's original coordinates: ``boxes`` FloatTensor[K, 4] (xyxy),
                ``labels`` Int64Tensor[K] (1..num_classes), ``scores`` FloatTensor[K], and for
                ``segm`` ``masks`` FloatTensor[K, 1, H, W] (probabilities) or [K, H, W].
        """
        if len(targets) != len(outputs):
            raise ValueError(f"got {len(targets)} targets but {len(outputs)} outputs")
        for target, output in zip(targets, outputs, strict=True):
            image_id = int(target["image_id"])
            if image_id not in self._gt_image_ids:
                raise DataError(f"image_id {image_id} is not in the ground truth")
            self._img_ids.append(image_id)
            boxes = _as_numpy(output["boxes"], "boxes").astype(np.float64).reshape(-1, 4)
            scores = _as_numpy(output["scores"], "scores").astype(np.float64).reshape(-1)
            labels = _as_numpy(output["labels"], "labels").astype(np.int64).reshape(-1)
            if not len(boxes) == len(scores) == len(labels):
                raise ValueError(
                    f"image {image_id}: {len(boxes)} boxes, {len(scores)} scores and "
                    f"{len(labels)} labels differ in number"
                )
            if len(labels) and (labels.min() < 1 or labels.max() >= len(self._label_to_cat)):
                raise DataError(
                    f"image {image_id}: labels must be in 1..{self.category_map.num_classes}, "
                    f"got {sorted(set(labels.tolist()))}"
                )
            cat_ids = self._label_to_cat[labels]
            if "bbox" in self._results:
                xywh = boxes.copy()
                xywh[:, 2:] -= xywh[:, :2]
                self._results["bbox"].extend(
                    {
                        "image_id": image_id,
                        "category_id": int(c),
                        "bbox": [round(float(v), 3) for v in b],
                        "score": float(s),
                    }
                    for b, c, s in zip(xywh, cat_ids, scores, strict=True)
                )
            if "segm" in self._results:
                self._results["segm"].extend(self._segm_results(image_id, output, cat_ids, scores))

    def _segm_results(
        self, image_id: int, output: dict[str, Tensor], cat_ids: np.ndarray, scores: np.ndarray
    ) -> list[dict[str, Any]]:
        if "masks" not in output:
            raise ValueError(f"image {image_id}: segm evaluation needs 'masks' in the outputs")
        masks = _as_numpy(output["masks"], "masks")
        if masks.ndim == 4:
            masks = masks[:, 0]
        if masks.ndim != 3 or len(masks) != len(scores):
            raise ValueError(
                f"image {image_id}: masks must be [K, 1, H, W] or [K, H, W] with K = "
                f"{len(scores)}, got shape {list(masks.shape)}"
            )
        if not len(masks):
            return []
        binary = np.asfortranarray((masks > self.mask_threshold).transpose(1, 2, 0), np.uint8)
        rles = mask_utils.encode(binary)
        return [
            {
                "image_id": image_id,
                "category_id": int(c),
                "segmentation": {"size": list(rle["size"]), "counts": rle["counts"].decode()},
                "score": float(s),
            }
            for rle, c, s in zip(rles, cat_ids, scores, strict=True)
        ]

    def results(self, iou_type: str = "bbox") -> list[dict[str, Any]]:
        """This process's detections so far as COCO results (``bbox`` xywh or RLE)."""
        return list(self._results[iou_type])

    def _gathered(self) -> tuple[dict[str, list[dict[str, Any]]], list[int]]:
        dist = torch.distributed
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return self._results, self._img_ids
        parts: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(parts, (self._results, self._img_ids))
        results: dict[str, list[dict[str, Any]]] = {t: [] for t in self.iou_types}
        img_ids: list[int] = []
        for part_results, part_ids in parts:
            for iou_type in self.iou_types:
                results[iou_type].extend(part_results[iou_type])
            img_ids.extend(part_ids)
        return results, img_ids

    def evaluate(self) -> dict[str, dict[str, float]]:
        """Score everything processed so far: ``{iou_type: {metric: percent}}``.

        With no detections every defined metric is 0.0. With no processed images at all,
        every metric is 0.0 and a warning is logged.
        """
        results, img_ids = self._gathered()
        out: dict[str, dict[str, float]] = {}
        if not img_ids:
            logger.warning("COCOEvaluator.evaluate() called before any image was processed")
            return {t: dict.fromkeys(METRIC_NAMES, 0.0) for t in self.iou_types}
        for iou_type in self.iou_types:
            metrics, summary = _run_cocoeval(self.coco_gt, results[iou_type], iou_type, img_ids)
            self.summaries[iou_type] = summary
            logger.debug("COCO %s summary:\n%s", iou_type, summary)
            out[iou_type] = metrics
        return out


def _validate_results(data: Any, name: str, coco_gt: COCO, iou_type: str) -> list[dict[str, Any]]:
    if not isinstance(data, list):
        raise DataError(
            f"{name}: a COCO results file must hold a JSON list, got {type(data).__name__}"
        )
    image_ids = set(coco_gt.getImgIds())
    cat_ids = set(coco_gt.getCatIds())
    needed = ("image_id", "category_id", "score", "bbox" if iou_type == "bbox" else "segmentation")
    clean = []
    for i, res in enumerate(data):
        loc = f"{name}: [{i}]"
        if not isinstance(res, dict):
            raise DataError(f"{loc}: must be an object, got {json.dumps(res)[:60]}")
        missing = [k for k in needed if k not in res]
        if missing:
            raise DataError(f"{loc}: missing key(s) {', '.join(repr(k) for k in missing)}")
        if res["image_id"] not in image_ids:
            raise DataError(f"{loc}: image_id {res['image_id']!r} is not in the ground truth")
        if res["category_id"] not in cat_ids:
            raise DataError(f"{loc}: category_id {res['category_id']!r} is not in the ground truth")
        score = res["score"]
        if not (
            isinstance(score, int | float) and not isinstance(score, bool)
        ) or not math.isfinite(score):
            raise DataError(f"{loc}: score must be a finite number, got {score!r}")
        entry = {"image_id": res["image_id"], "category_id": res["category_id"], "score": score}
        if iou_type == "bbox":
            bbox = res["bbox"]
            if not (
                isinstance(bbox, list)
                and len(bbox) == 4
                and all(
                    isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
                    for v in bbox
                )
            ):
                raise DataError(f"{loc}: bbox must be 4 finite numbers, got {bbox!r}")
            if bbox[2] < 0 or bbox[3] < 0:
                raise DataError(f"{loc}: bbox has a negative size, got {bbox!r}")
            entry["bbox"] = bbox
        else:
            seg = res["segmentation"]
            image = coco_gt.imgs[res["image_id"]]
            try:
                if isinstance(seg, list):
                    rle = mask_utils.merge(
                        mask_utils.frPyObjects(seg, image["height"], image["width"])
                    )
                elif isinstance(seg, dict) and isinstance(seg.get("counts"), list):
                    rle = mask_utils.frPyObjects(seg, *seg["size"])
                elif isinstance(seg, dict) and isinstance(seg.get("counts"), str):
                    rle = {"size": seg["size"], "counts": seg["counts"].encode()}
                    runs = decode_rle_counts(seg["counts"])
                    h, w = seg["size"]
                    if runs is None or (runs < 0).any() or int(runs.sum()) != h * w:
                        raise ValueError(
                            f"compressed RLE counts do not decode to height * width = {h * w} "
                            "pixels"
                        )
                else:
                    raise TypeError("expected polygons or an RLE dict with 'counts' and 'size'")
                mask_utils.area(rle)
            except (TypeError, ValueError, KeyError, IndexError) as exc:
                raise DataError(f"{loc}: invalid segmentation ({exc})") from None
            if list(rle["size"]) != [image["height"], image["width"]]:
                raise DataError(
                    f"{loc}: segmentation size {list(rle['size'])} does not match image "
                    f"{res['image_id']} ([{image['height']}, {image['width']}])"
                )
            counts = rle["counts"]
            entry["segmentation"] = {
                "size": list(rle["size"]),
                "counts": counts.decode() if isinstance(counts, bytes) else counts,
            }
        clean.append(entry)
    return clean


def score_results_file(
    ann_file: str | Path, results_json: str | Path, iou_type: str = "bbox"
) -> dict[str, float]:
    """Score any COCO results file against a ground-truth instances file.

    Every ground-truth image is evaluated (pycocotools' default), so images without
    detections count as misses.

    Args:
        ann_file: ground-truth COCO instances JSON.
        results_json: a JSON list of ``{"image_id", "category_id", "score", "bbox"}``
            (xywh) or, for ``segm``, ``"segmentation"`` (RLE or polygons).
        iou_type: ``"bbox"`` or ``"segm"``.

    Returns:
        ``{metric: percent}`` (0-100, ``nan`` where undefined).
    """
    _check_iou_type(iou_type)
    coco_gt = _load_ground_truth(ann_file)
    path = Path(results_json)
    name = str(results_json)
    if not path.is_file():
        raise DataError(f"{name}: results file not found")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise DataError(f"{name}: cannot read results file ({exc.strerror or exc})") from None
    except UnicodeDecodeError as exc:
        raise DataError(f"{name}: not UTF-8 text ({exc.reason})") from None
    except json.JSONDecodeError as exc:
        raise DataError(
            f"{name}: invalid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}"
        ) from None
    results = _validate_results(data, name, coco_gt, iou_type)
    metrics, summary = _run_cocoeval(coco_gt, results, iou_type, None)
    logger.debug("COCO %s summary for %s:\n%s", iou_type, name, summary)
    return metrics
