"""Runs built from a :class:`~fgdistill.engine.config.TrainConfig`: train, distil, evaluate.

These functions wire the pieces together (datasets, detectors, the distiller, optimizer,
hooks) and are what the command line calls. Everything here works in a single process and under
``torchrun``; only rank 0 writes files.

A training work dir holds (see ``docs/outputs.md``)::

    config.yaml     the resolved config
    log.jsonl       train and eval records, one JSON object per line
    tb/             TensorBoard scalars
    last.pt         training checkpoint (resume from it with resume=True)
    best.pt         the checkpoint with the best bbox AP so far
    model.pt        the trained detector as a plain state dict (student.pt when distilling)
    model.yaml      build_detector keyword arguments for model.pt / student.pt
    categories.json the dataset's COCO categories (ids and names), for predictions
    metrics.json    final metrics, best metric, iterations, wall time
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fgdistill.engine import distributed as du
from fgdistill.engine.checkpoint import (
    build_from_spec,
    find_model_spec,
    load_checkpoint,
    model_spec_from_config,
    save_model_spec,
    state_dict_of,
)
from fgdistill.engine.config import ModelConfig, TrainConfig, dump_config
from fgdistill.engine.trainer import (
    CheckpointHook,
    EvalHook,
    FGDWarmupHook,
    HookBase,
    LoggerHook,
    LRScheduleHook,
    Trainer,
    WarmupMultiStepSchedule,
    build_optimizer,
    epoch_seed,
    move_batch,
    seed_everything,
)
from fgdistill.errors import CheckpointError, ConfigError
from fgdistill.io import write_json

__all__ = [
    "RunResult",
    "build_model",
    "evaluate_checkpoint",
    "evaluate_model",
    "load_categories",
    "train",
    "weights_name",
]

logger = logging.getLogger(__name__)


@dataclass
class RunResult:
    """What a training run produced (paths are inside ``work_dir``)."""

    work_dir: Path
    metrics: dict[str, dict[str, float]]
    best_metric: float | None
    iterations: int
    epochs: float
    wall_time: float
    images_per_s: float
    model_path: Path
    files: dict[str, Path] = field(default_factory=dict)


def build_model(model_cfg: ModelConfig, num_classes: int) -> nn.Module:
    """Build a detector from a :class:`ModelConfig`; ``num_classes`` includes background."""
    from fgdistill.models.build import build_detector

    kwargs = model_spec_from_config(model_cfg)
    kwargs["num_classes"] = model_cfg.num_classes or num_classes
    kwargs["weights"] = model_cfg.weights
    kwargs["weights_backbone"] = model_cfg.weights_backbone
    arch = kwargs.pop("arch")
    return build_detector(arch, **kwargs)


def _datasets(cfg: TrainConfig, *, train: bool = True, val: bool = True) -> tuple[Any, Any]:
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


def _categories(dataset: Any) -> list[dict[str, Any]]:
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
) -> dict[str, dict[str, float]]:
    """COCO metrics of a detector on a dataset; distributed-aware (each rank takes a share).

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
            outputs = [{k: v.float().cpu() for k, v in o.items()} for o in outputs]
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


def _fgd_hparams(cfg: TrainConfig, levels: Sequence[str], family: str) -> Any:
    """Per-level :class:`FGDHyperParams` from the preset and the config's overrides."""
    import dataclasses

    from fgdistill.losses import FGDHyperParams
    from fgdistill.models.presets import PRESETS

    dc = cfg.distill
    assert dc is not None
    preset_name = dc.preset or family
    if preset_name not in PRESETS:
        raise ConfigError(
            f"distill.preset: unknown preset {preset_name!r}; choose one of {', '.join(PRESETS)}"
        )
    base = PRESETS[preset_name]
    names = {f.name for f in dataclasses.fields(FGDHyperParams)}
    for key in list(dc.hparams) + [k for v in dc.level_hparams.values() for k in v]:
        if key not in names:
            raise ConfigError(
                f"distill.hparams: unknown key {key!r}; valid keys: {', '.join(sorted(names))}"
            )
    unknown_levels = [lv for lv in dc.level_hparams if lv not in levels]
    if unknown_levels:
        raise ConfigError(
            f"distill.level_hparams: level(s) {unknown_levels} are not distilled; "
            f"levels are {list(levels)}"
        )
    try:
        base = dataclasses.replace(base, **dc.hparams)
    except ValueError as exc:
        raise ConfigError(f"distill.hparams: {exc}") from None
    out = {}
    for lv in levels:
        try:
            out[lv] = dataclasses.replace(base, **dc.level_hparams.get(lv, {}))
        except ValueError as exc:
            raise ConfigError(f"distill.level_hparams.{lv}: {exc}") from None
    return out


def _build_distiller(cfg: TrainConfig, student: nn.Module, num_classes: int) -> nn.Module:
    from fgdistill.models import Distiller, load_state_dict_checked
    from fgdistill.models.presets import DEFAULT_LEVELS

    dc = cfg.distill
    assert dc is not None
    if not dc.teacher_checkpoint:
        raise ConfigError("distill.teacher_checkpoint: a trained teacher checkpoint is required")
    teacher = build_model(dc.teacher, num_classes)
    ckpt = load_checkpoint(dc.teacher_checkpoint)
    load_state_dict_checked(
        teacher, state_dict_of(ckpt), source=str(dc.teacher_checkpoint), strict=True
    )
    family = cfg.model.arch
    levels = list(dc.levels) if dc.levels else list(DEFAULT_LEVELS[family])
    hparams = _fgd_hparams(cfg, levels, family)
    distiller: nn.Module = Distiller(
        student,
        teacher,
        levels=levels,
        hparams=hparams,
        inherit_teacher=dc.inherit_teacher,
        loss_type=dc.loss_type,
        split_regions=dc.split_regions,
        normalize=dc.normalize,
    )
    return distiller


def _student_state(trainable: nn.Module, distilling: bool) -> dict[str, torch.Tensor]:
    if distilling:
        return dict(trainable.student_state_dict())  # type: ignore[operator]
    return dict(trainable.state_dict())


def weights_name(cfg: TrainConfig) -> str:
    """File name of a finished run's weights in its work dir: ``student.pt`` when distilling."""
    return "student.pt" if cfg.distill is not None else "model.pt"


def train(
    cfg: TrainConfig,
    *,
    resume: bool = False,
    progress: bool = True,
    extra_hooks: Sequence[HookBase] = (),
) -> RunResult:
    """Train a detector, or distil a student when ``cfg.distill`` is set.

    Writes the work dir described in this module's docstring. With ``resume=True`` and a
    ``last.pt`` in the work dir, training continues from it (same final weights as an
    uninterrupted run on CPU); without one it starts fresh.

    Raises:
        ConfigError, DataError, CheckpointError: for bad settings, data or checkpoints.
        NonFiniteLossError: when a loss term becomes NaN/inf (names the term).
        NonFiniteError: on the CPU, when the FGD loss meets NaN/inf features (names the level;
            :class:`NonFiniteLossError` is a subclass: catch this one for both).
    """
    device = du.init_from_env(cfg.device)
    world = du.get_world_size()
    work_dir = Path(cfg.work_dir)
    distilling = cfg.distill is not None

    train_ds, val_ds = _datasets(cfg)
    check_same_categories(
        _categories(train_ds),
        str(cfg.data.path("train_ann")),
        _categories(val_ds),
        str(cfg.data.path("val_ann")),
    )
    num_classes = train_ds.num_classes + 1
    if cfg.model.num_classes is None:
        cfg.model.num_classes = num_classes
    elif cfg.model.num_classes != num_classes:
        raise ConfigError(
            f"model.num_classes: {cfg.model.num_classes} does not match the dataset "
            f"({train_ds.num_classes} categories + background = {num_classes})"
        )
    if cfg.distill is not None and cfg.distill.teacher.num_classes is None:
        cfg.distill.teacher.num_classes = num_classes
    categories = _categories(train_ds)

    if du.is_main():
        work_dir.mkdir(parents=True, exist_ok=True)
        dump_config(cfg, work_dir / "config.yaml")
        write_json(work_dir / "categories.json", categories)

    seed_everything(cfg.seed)
    student = build_model(cfg.model, num_classes)
    spec = _spec_of(student, cfg.model)
    trainable: nn.Module = _build_distiller(cfg, student, num_classes) if distilling else student
    trainable.to(device)
    model = du.wrap_ddp(trainable, device)

    o = cfg.optim
    total_batch = cfg.data.batch_size * world
    lr = o.lr * total_batch / o.base_batch_size if o.scale_lr else o.lr
    optimizer = build_optimizer(
        trainable.parameters(),
        name=o.optimizer,
        lr=lr,
        momentum=o.momentum,
        weight_decay=o.weight_decay,
    )

    from fgdistill.data.loader import build_loader

    def loader_fn(epoch: int) -> Any:
        # Same seed on every rank: the distributed sampler needs one common permutation.
        loader = build_loader(
            train_ds,
            batch_size=cfg.data.batch_size,
            train=True,
            num_workers=cfg.data.num_workers,
            seed=epoch_seed(cfg.seed, epoch),
            distributed=du.is_distributed(),
        )
        if du.is_distributed():
            loader.sampler.set_epoch(epoch)  # type: ignore[attr-defined]
        return loader

    iters_per_epoch = math.ceil(len(train_ds) / total_batch)
    schedule = WarmupMultiStepSchedule(
        optimizer,
        milestones=[m * iters_per_epoch for m in o.milestones],
        gamma=o.gamma,
        warmup_iters=o.warmup_iters,
        warmup_factor=o.warmup_factor,
    )

    def state_fn() -> dict[str, Any]:
        state: dict[str, Any] = {
            "model": _student_state(trainable, distilling),
            "model_spec": spec,
            "config": _plain_config(cfg),
            "categories": categories,
            "scheduler": schedule.state_dict(),
        }
        if distilling:
            state["trainable"] = trainable.state_dict()
        return state

    detector = student

    def eval_fn() -> dict[str, dict[str, float]]:
        return evaluate_model(
            detector,
            val_ds,
            batch_size=cfg.data.eval_batch_size,
            num_workers=cfg.data.num_workers,
            device=device,
            amp=cfg.amp,
            progress=progress,
            description=f"{cfg.name or 'run'} eval",
        )

    lr_hook = LRScheduleHook(schedule)
    ckpt_hook = CheckpointHook(
        work_dir, state_fn, interval=cfg.checkpoint_interval, every_iters=cfg.checkpoint_iters
    )
    log_hook = LoggerHook(
        work_dir,
        interval=cfg.log_interval,
        lr_hook=lr_hook,
        images_per_step=total_batch,
        progress=progress and du.is_main(),
        description=cfg.name or ("distill" if distilling else "train"),
    )
    eval_hook = EvalHook(
        eval_fn,
        interval=cfg.eval_interval,
        checkpoint_hook=ckpt_hook,
        on_result=log_hook.log_eval,
    )
    hooks: list[HookBase] = [lr_hook]
    if distilling:
        assert cfg.distill is not None
        hooks.append(
            FGDWarmupHook(
                trainable,
                scale=cfg.distill.fgd_weight_scale,
                warmup_iters=cfg.distill.fgd_warmup_iters,
            )
        )
    hooks += [eval_hook, ckpt_hook, log_hook, *extra_hooks]

    trainer = Trainer(
        model,
        optimizer,
        loader_fn,
        iters_per_epoch=iters_per_epoch,
        epochs=o.epochs,
        max_iters=cfg.max_iters,
        device=device,
        grad_clip=o.grad_clip,
        amp=cfg.amp,
        seed=cfg.seed,
        hooks=hooks,
    )
    last = work_dir / "last.pt"
    if resume and last.is_file():
        _resume(trainer, trainable, last, distilling, device)
        logger.info("resumed from %s at iteration %d", last, trainer.iter)
    else:
        if resume:
            logger.info("no %s to resume from; starting fresh", last)
        du.barrier()  # every rank has read what it needs (the teacher, model.weights)
        if du.is_main():
            _clear_earlier_run(work_dir, keep=_inputs_of(cfg))
    du.barrier()

    if trainer.finished:
        logger.info("%s: already finished (%d iterations)", work_dir, trainer.iter)
    trainer.train()

    metrics = eval_hook.results or {}
    model_path = work_dir / weights_name(cfg)
    wall = trainer.elapsed
    images_per_s = trainer.iter * total_batch / wall if wall > 0 else 0.0
    files = {
        "config": work_dir / "config.yaml",
        "log": work_dir / "log.jsonl",
        "tensorboard": work_dir / "tb",
        "last": last,
        "best": work_dir / "best.pt",
        "model": model_path,
        "model_spec": work_dir / "model.yaml",
        "metrics": work_dir / "metrics.json",
    }
    if du.is_main():
        from fgdistill.engine.checkpoint import save_checkpoint

        save_checkpoint(_student_state(trainable, distilling), model_path)
        save_model_spec(spec, work_dir / "model.yaml")
        write_json(
            work_dir / "metrics.json",
            {
                "metrics": metrics,
                "best_metric": trainer.best_metric,
                "best_metric_name": "bbox/AP",
                "iterations": trainer.iter,
                "epochs": trainer.iter / iters_per_epoch,
                "wall_time_s": round(wall, 2),
                "images_per_s": round(images_per_s, 2),
                "world_size": world,
                "model": model_path.name,
            },
        )
    du.barrier()
    return RunResult(
        work_dir=work_dir,
        metrics=metrics,
        best_metric=trainer.best_metric,
        iterations=trainer.iter,
        epochs=trainer.iter / iters_per_epoch,
        wall_time=wall,
        images_per_s=images_per_s,
        model_path=model_path,
        files=files,
    )


#: what a finished or interrupted run leaves in its work dir (besides config, log and categories)
RUN_OUTPUTS: tuple[str, ...] = (
    "last.pt",
    "best.pt",
    "model.pt",
    "student.pt",
    "model.yaml",
    "metrics.json",
)


def _inputs_of(cfg: TrainConfig) -> set[Path]:
    """Files a run reads its weights from (a teacher, ``model.weights``), resolved."""
    paths = [cfg.model.weights, cfg.model.weights_backbone]
    if cfg.distill is not None:
        paths += [cfg.distill.teacher_checkpoint, cfg.distill.teacher.weights]
    return {Path(p).expanduser().resolve() for p in paths if p and Path(p).expanduser().is_file()}


def _clear_earlier_run(work_dir: Path, keep: Collection[Path] = ()) -> None:
    """Remove an earlier run's checkpoints and outputs from ``work_dir`` before a fresh start.

    Otherwise a fresh run that stops before its first checkpoint would leave the earlier run's
    ``last.pt`` for ``--resume`` to continue, and its model and metrics beside the new config.
    Files in ``keep`` (this run's own inputs, e.g. a teacher in the same folder) stay, and so
    does the ``model.yaml`` beside a kept model.
    """
    kept = {p.name for p in keep if p.parent == work_dir.resolve()}
    if kept & {"model.pt", "student.pt", "best.pt", "last.pt"}:
        kept.add("model.yaml")
    removed = [n for n in RUN_OUTPUTS if n not in kept and (work_dir / n).is_file()]
    for name in removed:
        (work_dir / name).unlink()
    if removed:
        logger.info(
            "starting fresh in %s: removed the earlier run's %s", work_dir, ", ".join(removed)
        )


def _spec_of(model: nn.Module, model_cfg: ModelConfig) -> dict[str, Any]:
    from fgdistill.models.build import model_spec

    spec = model_spec(model)
    if spec is None:
        spec = model_spec_from_config(model_cfg)
    spec.pop("weights", None)
    spec.pop("weights_backbone", None)
    return _plain(spec)


def _plain(obj: Any) -> Any:
    if isinstance(obj, Mapping):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_plain(v) for v in obj]
    return obj


def _plain_config(cfg: TrainConfig) -> dict[str, Any]:
    from fgdistill.engine.config import config_to_dict

    return _plain(config_to_dict(cfg))


def _resume(
    trainer: Trainer,
    trainable: nn.Module,
    path: Path,
    distilling: bool,
    device: torch.device,
) -> None:
    from fgdistill.models.build import load_state_dict_checked

    ckpt = load_checkpoint(path)
    if distilling:
        if "trainable" not in ckpt:
            raise CheckpointError(f"{path}: not a distillation checkpoint (no 'trainable' state)")
        load_state_dict_checked(trainable, ckpt["trainable"], source=str(path), strict=True)
    else:
        load_state_dict_checked(trainable, state_dict_of(ckpt), source=str(path), strict=True)
    for key in ("iter", "epoch", "epoch_iter", "optimizer", "rng"):
        if key not in ckpt:
            raise CheckpointError(f"{path}: not a training checkpoint (no {key!r}); cannot resume")
    trainer.load_state_dict(ckpt)
    trainable.to(device)


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
    from fgdistill.models.build import load_state_dict_checked

    device = du.init_from_env(cfg.device)
    _, val_ds = _datasets(cfg, train=False)
    ckpt = load_checkpoint(checkpoint)
    trained_on = load_categories(checkpoint, ckpt)
    if trained_on:
        check_same_categories(
            trained_on,
            f"{checkpoint} (its training set)",
            _categories(val_ds),
            str(cfg.data.path("val_ann")),
        )
    try:
        spec = find_model_spec(checkpoint, ckpt)
        model = build_from_spec(spec)
    except CheckpointError:
        model = build_model(cfg.model, val_ds.num_classes + 1)
    load_state_dict_checked(model, state_dict_of(ckpt), source=str(checkpoint), strict=True)
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


@dataclass
class PredictResult:
    """What :func:`predict` wrote."""

    results_file: Path
    images_file: Path
    drawings: list[Path]
    num_detections: int


def _read_image(path: Path) -> Any:
    from PIL import Image, UnidentifiedImageError

    from fgdistill.data.coco import to_rgb
    from fgdistill.errors import DataError

    if not path.is_file():
        raise DataError(f"{path}: image not found")
    try:
        with Image.open(path) as img:
            return to_rgb(img)
    except (UnidentifiedImageError, OSError) as exc:
        raise DataError(f"{path}: cannot read image: {exc}") from None


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
    import numpy as np

    from fgdistill.models.build import load_state_dict_checked
    from fgdistill.viz.draw import draw_detections, unique_png_names

    paths = [Path(p) for p in images]
    pil_images = [_read_image(p) for p in paths]  # fail early, before loading the model
    if device == "auto":
        dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        dev = torch.device(device)
    ckpt = load_checkpoint(checkpoint)
    spec = find_model_spec(checkpoint, ckpt)
    model = build_from_spec(spec)
    load_state_dict_checked(model, state_dict_of(ckpt), source=str(checkpoint), strict=True)
    model.to(dev).eval()
    categories = load_categories(checkpoint, ckpt)
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
    for image_id, (path, pil) in enumerate(zip(paths, pil_images, strict=True), start=1):
        tensor = torch.from_numpy(np.asarray(pil, dtype=np.uint8).copy()).permute(2, 0, 1)
        tensor = tensor.float().div_(255.0).to(dev)
        output = {k: v.cpu() for k, v in model([tensor])[0].items()}
        entries.append(
            {"id": image_id, "file_name": str(path), "width": pil.width, "height": pil.height}
        )
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
            pil,
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
