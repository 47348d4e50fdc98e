"""Inference with trained detectors: COCO evaluation and predictions on image files.

:func:`evaluate_model` scores a detector on a dataset (distributed-aware),
:func:`evaluate_checkpoint` a saved one on a config's validation set, and :func:`predict` runs
one on image files. The datasets a config names are built by :func:`build_datasets`; a
detector's category list is checked against a dataset's by :func:`check_same_categories`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fgdistill.data.images import read_image
from fgdistill.engine import distributed as du
from fgdistill.engine.config import TrainConfig, detector_kwargs, dump_config
from fgdistill.engine.trainer import move_batch
from fgdistill.errors import ConfigError, DataError
from fgdistill.io import write_json
from fgdistill.models import load_detector
from fgdistill.models.checkpoint import load_checkpoint

__all__ = [
    "PredictResult",
    "build_datasets",
    "check_same_categories",
    "dataset_categories",
    "evaluate_checkpoint",
    "evaluate_model",
    "label_mapping",
    "load_categories",
    "predict",
    "remap_labels",
]

logger = logging.getLogger(__name__)


def build_datasets(cfg: TrainConfig, *, train: bool = True, val: bool = True) -> tuple[Any, Any]:
    """The config's training and validation :class:`~fgdistill.data.CocoDetection` sets.

    Either is ``None`` when not asked for. The training set flips images horizontally with
    ``cfg.data.flip_prob``.
    """
    from fgdistill.data.coco import CocoDetection
    from fgdistill.data.transforms import RandomHorizontalFlip

    d = cfg.data
    train_ds = val_ds = None
    if train:
        transforms = RandomHorizontalFlip(d.flip_prob) if d.flip_prob > 0 else None
        train_ds = CocoDetection(
            d.path("train_ann"),
            d.path("train_images"),
            masks=d.masks,
            train=True,
            filter_empty=d.filter_empty,
            transforms=transforms,
        )
    if val:
        val_ds = CocoDetection(d.path("val_ann"), d.path("val_images"), masks=d.masks, train=False)
    return train_ds, val_ds


def dataset_categories(dataset: Any) -> list[dict[str, Any]]:
    """A dataset's COCO categories, ``[{"id", "name"}]`` in label order (label 1 first)."""
    cmap = dataset.category_map
    return [
        {"id": int(cmap.cat_id_of(label)), "name": cmap.name_of(label)}
        for label in range(1, cmap.num_classes + 1)
    ]


def check_same_categories(
    expected: Sequence[Mapping[str, Any]],
    expected_source: str,
    got: Sequence[Mapping[str, Any]],
    got_source: str,
) -> None:
    """Raise ConfigError unless two category lists (``[{"id", "name"}]``) are the same.

    A detector's labels are positions in its training set's category list; scored against a
    set whose list differs, label ``k`` would be counted as another category, silently.
    """
    a = [(int(c["id"]), str(c.get("name", c["id"]))) for c in expected]
    b = [(int(c["id"]), str(c.get("name", c["id"]))) for c in got]
    if a == b:
        return
    only_a = [f"{i} {n!r}" for i, n in a if (i, n) not in b]
    only_b = [f"{i} {n!r}" for i, n in b if (i, n) not in a]
    detail = "; ".join(
        part
        for part in (
            f"only in {expected_source}: {', '.join(only_a)}" if only_a else "",
            f"only in {got_source}: {', '.join(only_b)}" if only_b else "",
        )
        if part
    )
    raise ConfigError(
        f"the categories of {got_source} differ from those of {expected_source} ({detail}); "
        "labels would be scored as the wrong categories: use one category list for both"
    )


def label_mapping(
    model_categories: Sequence[Mapping[str, Any]],
    model_source: str,
    dataset_categories_: Sequence[Mapping[str, Any]],
    dataset_source: str,
) -> torch.Tensor | None:
    """How a detector's labels read as a dataset's labels, or None when they are the same.

    A detector's label ``k`` is ``model_categories[k - 1]`` (its training set's, or, for
    torchvision's COCO models, the COCO category id ``k``: see
    :func:`fgdistill.models.coco_categories`). When the two lists differ, each dataset category
    must be among the detector's with the same id and name; the detector's other labels (COCO's
    unused ids, categories the set does not have) are dropped.

    Returns:
        ``LongTensor[len(model_categories) + 1]``: model label -> dataset label, 0 to drop.

    Raises:
        ConfigError: a dataset category the detector does not know, or knows by another name.
    """
    model_cats = [(int(c["id"]), str(c.get("name", c["id"]))) for c in model_categories]
    data_cats = [(int(c["id"]), str(c.get("name", c["id"]))) for c in dataset_categories_]
    if model_cats == data_cats:
        return None
    missing = [f"{i} {n!r}" for i, n in data_cats if (i, n) not in model_cats]
    if missing:
        check_same_categories(model_categories, model_source, dataset_categories_, dataset_source)
    label_of = {cat: label for label, cat in enumerate(data_cats, start=1)}
    return torch.tensor([0] + [label_of.get(cat, 0) for cat in model_cats], dtype=torch.long)


def remap_labels(
    outputs: Sequence[Mapping[str, torch.Tensor]], mapping: torch.Tensor | None
) -> list[dict[str, torch.Tensor]]:
    """Detections with labels read through ``mapping`` (:func:`label_mapping`), others dropped.

    Detections of label 0 (background; torchvision's RetinaNet and FCOS can return it) are
    dropped too.

    ``outputs``: per image ``{"boxes" [K, 4], "labels" [K], "scores" [K], ("masks" ...)}``.
    """
    out = []
    for o in outputs:
        labels = o["labels"].long()
        if mapping is not None:
            labels = mapping.to(labels.device)[labels]
        # torchvision's RetinaNet and FCOS score the background slot 0 too; it is no category
        keep = labels > 0
        kept = {k: v[keep] for k, v in o.items() if k != "labels"}
        kept["labels"] = labels[keep]
        out.append(kept)
    return out


def load_categories(checkpoint_path: str | Path, ckpt: Mapping[str, Any] | None = None) -> list:
    """COCO categories (``[{"id", "name"}]``, in label order) stored with a checkpoint.

    Looks inside the checkpoint, then for ``categories.json`` beside it. Returns ``[]`` when
    neither exists (labels are then used as category ids).
    """
    if ckpt is not None and isinstance(ckpt.get("categories"), list):
        return list(ckpt["categories"])
    path = Path(checkpoint_path).parent / "categories.json"
    if path.is_file():
        data = json.loads(path.read_text(encoding="utf-8"))
        if isinstance(data, list):
            return data
    return []


@torch.no_grad()
def evaluate_model(
    model: nn.Module,
    dataset: Any,
    *,
    batch_size: int = 2,
    num_workers: int = 0,
    device: torch.device | str = "cpu",
    amp: bool = False,
    progress: bool = True,
    description: str = "eval",
    labels: torch.Tensor | None = None,
) -> dict[str, dict[str, float]]:
    """COCO metrics of a detector on a dataset; distributed-aware (each rank takes a share).

    ``labels`` (from :func:`label_mapping`) reads the detector's labels as the dataset's when
    the two label spaces differ (a torchvision COCO model's labels are category ids).

    Returns ``{"bbox": {"AP": ..., "AP50": ..., ...}}`` (plus ``"segm"`` for masks), the same on
    every rank.
    """
    from fgdistill.data.loader import build_loader
    from fgdistill.evaluation import COCOEvaluator

    device = torch.device(device)
    iou_types: tuple[str, ...] = ("bbox", "segm") if getattr(dataset, "masks", False) else ("bbox",)
    evaluator = COCOEvaluator(dataset.coco, dataset.category_map, iou_types=iou_types)
    evaluator.reset()
    # Each rank takes every world_size-th image. Unlike DistributedSampler this never pads
    # with repeated images, so the gathered detections hold each image exactly once.
    part: Any = dataset
    if du.is_distributed():
        from torch.utils.data import Subset

        part = Subset(dataset, range(du.get_rank(), len(dataset), du.get_world_size()))
    loader = build_loader(part, batch_size=batch_size, train=False, num_workers=num_workers)
    was_training = model.training
    model.eval()
    bar = None
    if progress and du.is_main():
        from tqdm.auto import tqdm

        bar = tqdm(total=len(loader), desc=description, unit="batch", leave=False)
    use_amp = amp and device.type == "cuda"
    try:
        for batch in loader:
            images, targets = move_batch(batch, device)
            with torch.autocast(device_type=device.type, enabled=use_amp):
                outputs = model(images)
            outputs = remap_labels(
                [
                    {k: v.float().cpu() if k != "labels" else v.cpu() for k, v in o.items()}
                    for o in outputs
                ],
                labels,
            )
            targets = [
                {k: (v.cpu() if isinstance(v, torch.Tensor) else v) for k, v in t.items()}
                for t in targets
            ]
            evaluator.process(targets, outputs)
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
        model.train(was_training)
    results = evaluator.evaluate()
    return {task: {k: float(v) for k, v in vals.items()} for task, vals in results.items()}


def evaluate_checkpoint(
    cfg: TrainConfig,
    checkpoint: str | Path,
    *,
    progress: bool = True,
) -> dict[str, dict[str, float]]:
    """Evaluate a checkpoint on the config's validation set; writes ``eval_metrics.json``.

    The config it used goes to ``eval_config.yaml`` beside it.

    The detector is rebuilt from the checkpoint's own spec (``model_spec`` inside it or
    ``model.yaml`` / ``config.yaml`` beside it), falling back to ``cfg.model``.
    """
    from fgdistill.engine.workdir import lock_work_dir

    work_dir = Path(cfg.work_dir)
    guard = lock_work_dir(work_dir, "eval") if du.is_main() else contextlib.nullcontext()
    with guard:
        return _evaluate_checkpoint(cfg, checkpoint, progress=progress)


def _evaluate_checkpoint(
    cfg: TrainConfig, checkpoint: str | Path, *, progress: bool
) -> dict[str, dict[str, float]]:
    device = du.init_from_env(cfg.device)
    _, val_ds = build_datasets(cfg, train=False)
    trained_on = load_categories(checkpoint, load_checkpoint(checkpoint))
    mapping = None
    if trained_on:
        mapping = label_mapping(
            trained_on,
            f"{checkpoint} (its label space)",
            dataset_categories(val_ds),
            str(cfg.data.path("val_ann")),
        )
    model = load_detector(
        checkpoint, fallback_spec=detector_kwargs(cfg.model, val_ds.num_classes + 1)
    )
    model.to(device)
    start = time.perf_counter()
    metrics = evaluate_model(
        model,
        val_ds,
        batch_size=cfg.data.eval_batch_size,
        num_workers=cfg.data.num_workers,
        device=device,
        amp=cfg.amp,
        progress=progress,
        labels=mapping,
    )
    if du.is_main():
        work_dir = Path(cfg.work_dir)
        work_dir.mkdir(parents=True, exist_ok=True)
        # not config.yaml: by default this is the checkpoint's folder, whose config.yaml is the
        # training run's own (and can repeat it)
        dump_config(cfg, work_dir / "eval_config.yaml")
        write_json(
            work_dir / "eval_metrics.json",
            {
                "checkpoint": str(checkpoint),
                "annotations": str(cfg.data.path("val_ann")),
                "metrics": metrics,
                "wall_time_s": round(time.perf_counter() - start, 2),
            },
        )
    return metrics


def _check_resizable(path: Path, picture: torch.Tensor, model: nn.Module) -> None:
    """Raise DataError when the detector's resize would leave an image under 1 px on a side.

    torchvision scales an image so that its short side is ``min_size`` unless its long side
    would pass ``max_size``; a 1x5000 image scaled to 64 px long is 0 px high.
    """
    transform = getattr(model, "transform", None)
    if transform is None or not hasattr(transform, "min_size"):
        return
    height, width = (int(v) for v in picture.shape[-2:])
    min_size = float(transform.min_size[-1])
    max_size = float(transform.max_size)
    scale = min(min_size / min(height, width), max_size / max(height, width))
    if math.floor(height * scale) < 1 or math.floor(width * scale) < 1:
        raise DataError(
            f"{path}: image is {width}x{height} (width x height): resized to at most "
            f"{max_size:g} px on its long side it would be under 1 px on its short side; "
            "crop or pad it to a less extreme aspect ratio"
        )


@dataclass
class PredictResult:
    """What :func:`predict` wrote."""

    results_file: Path
    images_file: Path
    drawings: list[Path]
    num_detections: int


@torch.no_grad()
def predict(
    checkpoint: str | Path,
    images: Sequence[str | Path],
    out_dir: str | Path,
    *,
    score_threshold: float = 0.3,
    device: str = "auto",
    progress: bool = True,
) -> PredictResult:
    """Run a trained detector on image files; write COCO results and drawn images.

    Writes ``out_dir/results.json`` (COCO results format: ``image_id``, ``category_id``,
    ``bbox`` as xywh, ``score``; every detection the model returns), ``out_dir/images.json``
    (the COCO ``images`` entries: ids 1..N in the order given, file names, sizes) and one PNG per
    image with the detections at or above ``score_threshold`` drawn (their masks too, for a
    detector that predicts masks, such as Mask R-CNN).

    Raises:
        CheckpointError: missing, corrupt or unidentifiable checkpoint.
        DataError: an image is missing or unreadable.
    """
    from fgdistill.viz.draw import draw_detections, unique_png_names

    paths = [Path(p) for p in images]
    pictures = [read_image(p) for p in paths]  # fail early, before loading the model
    if device == "auto":
        dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        dev = torch.device(device)
    model = load_detector(checkpoint).to(dev)
    for path, picture in zip(paths, pictures, strict=True):
        _check_resizable(path, picture, model)
    categories = load_categories(checkpoint, load_checkpoint(checkpoint))
    names = [c["name"] for c in categories] if categories else None

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    results: list[dict[str, Any]] = []
    entries: list[dict[str, Any]] = []
    drawings: list[Path] = []
    drawing_names = unique_png_names([path.stem for path in paths])
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(paths), desc="predict", unit="img")
    for image_id, (path, picture) in enumerate(zip(paths, pictures, strict=True), start=1):
        output = {k: v.cpu() for k, v in model([picture.to(dev)])[0].items()}
        height, width = picture.shape[-2:]
        entries.append({"id": image_id, "file_name": str(path), "width": width, "height": height})
        for box, label, score in zip(
            output["boxes"].tolist(),
            output["labels"].tolist(),
            output["scores"].tolist(),
            strict=True,
        ):
            cat_id = (
                int(categories[label - 1]["id"])
                if categories and 0 < label <= len(categories)
                else int(label)
            )
            results.append(
                {
                    "image_id": image_id,
                    "category_id": cat_id,
                    "bbox": [
                        round(v, 2) for v in (box[0], box[1], box[2] - box[0], box[3] - box[1])
                    ],
                    "score": round(float(score), 5),
                }
            )
        name = drawing_names[image_id - 1]
        drawn = draw_detections(
            picture,
            output["boxes"],
            output["labels"],
            output["scores"],
            names=names,
            score_threshold=score_threshold,
            masks=output.get("masks"),
        )
        drawn.save(out / name)
        drawings.append(out / name)
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    results_file = out / "results.json"
    write_json(results_file, results)
    images_file = out / "images.json"
    write_json(images_file, {"images": entries, "categories": categories})
    return PredictResult(results_file, images_file, drawings, len(results))
