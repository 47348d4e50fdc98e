"""Training runs built from a :class:`~fgdistill.engine.config.TrainConfig`: train or distil.

These functions wire the pieces together (datasets, detectors, the distiller, optimizer,
hooks) and are what the command line calls; evaluation and prediction are in
:mod:`fgdistill.engine.inference`. Everything here works in a single process and under
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

import logging
import math
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fgdistill.engine import distributed as du
from fgdistill.engine.checkpoint import save_checkpoint
from fgdistill.engine.config import TrainConfig, detector_kwargs, dump_config
from fgdistill.engine.inference import (
    build_datasets,
    check_same_categories,
    dataset_categories,
    evaluate_model,
)
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
    seed_everything,
)
from fgdistill.errors import CheckpointError, ConfigError
from fgdistill.io import write_json
from fgdistill.models import build_detector, load_state_dict_checked, model_spec
from fgdistill.models.checkpoint import load_checkpoint, save_model_spec, state_dict_of

__all__ = [
    "RunResult",
    "TrainData",
    "TrainModel",
    "build_hooks",
    "build_optimizer_and_schedule",
    "build_train_loader",
    "build_trainable",
    "prepare_data",
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


@dataclass
class TrainData:
    """The datasets of a run and what is read off them."""

    train: Any
    val: Any
    num_classes: int
    """Classes including background, as ``build_detector`` counts them."""
    categories: list[dict[str, Any]]
    """The training set's COCO categories, ``[{"id", "name"}]`` in label order."""


@dataclass
class TrainModel:
    """The detector being trained and the module the optimizer steps.

    ``trainable`` is ``student`` itself, or a :class:`~fgdistill.models.Distiller` around it
    when distilling. ``spec`` is the student's build kwargs, without weights, as saved.
    """

    student: nn.Module
    trainable: nn.Module
    spec: dict[str, Any]
    distilling: bool

    def student_state(self) -> dict[str, torch.Tensor]:
        """The student's state dict (without the distiller's own modules)."""
        if self.distilling:
            return dict(self.trainable.student_state_dict())  # type: ignore[operator]
        return dict(self.trainable.state_dict())


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

    The steps, each a function of its own as in detectron2's ``DefaultTrainer``:
    :func:`prepare_data`, :func:`build_trainable`, :func:`build_optimizer_and_schedule`,
    :func:`build_train_loader`, :func:`build_hooks`, then the :class:`Trainer` runs.

    Raises:
        ConfigError, DataError, CheckpointError: for bad settings, data or checkpoints.
        NonFiniteLossError: when a loss term becomes NaN/inf (names the term).
        NonFiniteError: on the CPU, when the FGD loss meets NaN/inf features (names the level;
            :class:`NonFiniteLossError` is a subclass: catch this one for both).
    """
    device = du.init_from_env(cfg.device)
    work_dir = Path(cfg.work_dir)
    data = prepare_data(cfg)
    if du.is_main():
        work_dir.mkdir(parents=True, exist_ok=True)
        dump_config(cfg, work_dir / "config.yaml")
        write_json(work_dir / "categories.json", data.categories)

    seed_everything(cfg.seed)
    built = build_trainable(cfg, data.num_classes, data.categories)
    built.trainable.to(device)
    model = du.wrap_ddp(built.trainable, device)
    total_batch = cfg.data.batch_size * du.get_world_size()
    iters_per_epoch = math.ceil(len(data.train) / total_batch)
    optimizer, schedule = build_optimizer_and_schedule(cfg, built.trainable, iters_per_epoch)
    hooks, eval_hook = build_hooks(
        cfg, built, data, schedule, device=device, progress=progress, extra_hooks=extra_hooks
    )
    trainer = Trainer(
        model,
        optimizer,
        build_train_loader(cfg, data.train),
        iters_per_epoch=iters_per_epoch,
        epochs=cfg.optim.epochs,
        max_iters=cfg.max_iters,
        device=device,
        grad_clip=cfg.optim.grad_clip,
        amp=cfg.amp,
        seed=cfg.seed,
        hooks=hooks,
    )
    _start(trainer, cfg, built, resume=resume, device=device)
    if trainer.finished:
        logger.info("%s: already finished (%d iterations)", work_dir, trainer.iter)
    trainer.train()
    return _finish(cfg, built, trainer, eval_hook.results or {}, iters_per_epoch, total_batch)


def prepare_data(cfg: TrainConfig) -> TrainData:
    """Build the config's datasets, check them, and fill in ``num_classes`` where unset.

    Raises:
        ConfigError: the two sets' categories differ, or ``model.num_classes`` does not fit.
    """
    train_ds, val_ds = build_datasets(cfg)
    categories = dataset_categories(train_ds)
    check_same_categories(
        categories,
        str(cfg.data.path("train_ann")),
        dataset_categories(val_ds),
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
    return TrainData(train_ds, val_ds, num_classes, categories)


def build_trainable(
    cfg: TrainConfig, num_classes: int, categories: Sequence[Mapping[str, Any]] = ()
) -> TrainModel:
    """The student detector, wrapped in a :class:`~fgdistill.models.Distiller` when distilling.

    The teacher is read from ``cfg.distill.teacher_checkpoint``; ``categories`` (the training
    set's) tell whether its label space is the student's. Draws from torch's random generator
    (initialisation): seed first.
    """
    student = build_detector(**detector_kwargs(cfg.model, num_classes))
    spec = _spec_of(student, cfg)
    if cfg.distill is None:
        return TrainModel(student, student, spec, distilling=False)
    distiller = _build_distiller(cfg, student, num_classes, categories)
    return TrainModel(student, distiller, spec, distilling=True)


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


def _build_distiller(
    cfg: TrainConfig,
    student: nn.Module,
    num_classes: int,
    categories: Sequence[Mapping[str, Any]] = (),
) -> nn.Module:
    from fgdistill.engine.teacher import inherit_exclusions, load_teacher
    from fgdistill.models import Distiller
    from fgdistill.models.presets import DEFAULT_LEVELS

    dc = cfg.distill
    assert dc is not None
    if not dc.teacher_checkpoint:
        raise ConfigError("distill.teacher_checkpoint: a trained teacher checkpoint is required")
    teacher, teacher_categories = load_teacher(dc, num_classes)
    family = cfg.model.arch
    levels = list(dc.levels) if dc.levels else list(DEFAULT_LEVELS[family])
    distiller: nn.Module = Distiller(
        student,
        teacher,
        levels=levels,
        hparams=_fgd_hparams(cfg, levels, family),
        inherit_teacher=dc.inherit_teacher,
        loss_type=dc.loss_type,
        split_regions=dc.split_regions,
        normalize=dc.normalize,
        inherit_exclude=inherit_exclusions(student, teacher_categories, categories),
    )
    return distiller


def build_optimizer_and_schedule(
    cfg: TrainConfig, trainable: nn.Module, iters_per_epoch: int
) -> tuple[torch.optim.Optimizer, WarmupMultiStepSchedule]:
    """The optimizer over ``trainable``'s parameters and its warm-up + step schedule.

    With ``optim.scale_lr`` the learning rate scales with the total batch (all processes).
    """
    o = cfg.optim
    total_batch = cfg.data.batch_size * du.get_world_size()
    lr = o.lr * total_batch / o.base_batch_size if o.scale_lr else o.lr
    params: Any = trainable.parameters()
    if o.bias_lr_mult != 1.0 or o.bias_decay_mult != 1.0:
        from fgdistill.engine.param_groups import bias_param_groups

        params = bias_param_groups(
            trainable,
            lr=lr,
            weight_decay=o.weight_decay,
            bias_lr_mult=o.bias_lr_mult,
            bias_decay_mult=o.bias_decay_mult,
        )
    optimizer = build_optimizer(
        params,
        name=o.optimizer,
        lr=lr,
        momentum=o.momentum,
        weight_decay=o.weight_decay,
    )
    schedule = WarmupMultiStepSchedule(
        optimizer,
        milestones=[m * iters_per_epoch for m in o.milestones],
        gamma=o.gamma,
        warmup_iters=o.warmup_iters,
        warmup_factor=o.warmup_factor,
        warmup_method=o.warmup,
    )
    return optimizer, schedule


def build_train_loader(cfg: TrainConfig, dataset: Any) -> Callable[[int], Any]:
    """``epoch -> DataLoader``: the epoch's shuffled loader, its order fixed by (seed, epoch)."""
    from fgdistill.data.loader import build_loader

    def loader_fn(epoch: int) -> Any:
        # Same seed on every rank: the distributed sampler needs one common permutation.
        loader = build_loader(
            dataset,
            batch_size=cfg.data.batch_size,
            train=True,
            num_workers=cfg.data.num_workers,
            seed=epoch_seed(cfg.seed, epoch),
            distributed=du.is_distributed(),
        )
        if du.is_distributed():
            loader.sampler.set_epoch(epoch)  # type: ignore[attr-defined]
        return loader

    return loader_fn


def build_hooks(
    cfg: TrainConfig,
    built: TrainModel,
    data: TrainData,
    schedule: WarmupMultiStepSchedule,
    *,
    device: torch.device,
    progress: bool = True,
    extra_hooks: Sequence[HookBase] = (),
) -> tuple[list[HookBase], EvalHook]:
    """The run's hooks, in calling order, and the evaluation hook among them.

    Learning-rate schedule, FGD warm-up (distilling), evaluation on ``data.val``, checkpoints
    (``last.pt``, ``best.pt``), logging, then ``extra_hooks``.
    """
    work_dir = Path(cfg.work_dir)
    distilling = built.distilling
    total_batch = cfg.data.batch_size * du.get_world_size()

    def state_fn() -> dict[str, Any]:
        state: dict[str, Any] = {
            "model": built.student_state(),
            "model_spec": built.spec,
            "config": _plain_config(cfg),
            "categories": data.categories,
            "scheduler": schedule.state_dict(),
        }
        if distilling:
            state["trainable"] = built.trainable.state_dict()
        return state

    def eval_fn() -> dict[str, dict[str, float]]:
        return evaluate_model(
            built.student,
            data.val,
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
    if cfg.distill is not None:
        hooks.append(
            FGDWarmupHook(
                built.trainable,
                scale=cfg.distill.fgd_weight_scale,
                warmup_iters=cfg.distill.fgd_warmup_iters,
            )
        )
    hooks += [eval_hook, ckpt_hook, log_hook, *extra_hooks]
    return hooks, eval_hook


def _start(
    trainer: Trainer, cfg: TrainConfig, built: TrainModel, *, resume: bool, device: torch.device
) -> None:
    """Resume from ``last.pt`` when asked and there is one; else clear an earlier run's files."""
    work_dir = Path(cfg.work_dir)
    last = work_dir / "last.pt"
    if resume and last.is_file():
        _resume(trainer, built, last, device)
        logger.info("resumed from %s at iteration %d", last, trainer.iter)
    else:
        if resume:
            logger.info("no %s to resume from; starting fresh", last)
        du.barrier()  # every rank has read what it needs (the teacher, model.weights)
        if du.is_main():
            _clear_earlier_run(work_dir, keep=_inputs_of(cfg))
    du.barrier()


def _finish(
    cfg: TrainConfig,
    built: TrainModel,
    trainer: Trainer,
    metrics: dict[str, dict[str, float]],
    iters_per_epoch: int,
    total_batch: int,
) -> RunResult:
    """Write the trained weights, ``model.yaml`` and ``metrics.json`` (rank 0); the result."""
    work_dir = Path(cfg.work_dir)
    model_path = work_dir / weights_name(cfg)
    wall = trainer.elapsed
    images_per_s = trainer.iter * total_batch / wall if wall > 0 else 0.0
    files = {
        "config": work_dir / "config.yaml",
        "log": work_dir / "log.jsonl",
        "tensorboard": work_dir / "tb",
        "last": work_dir / "last.pt",
        "best": work_dir / "best.pt",
        "model": model_path,
        "model_spec": work_dir / "model.yaml",
        "metrics": work_dir / "metrics.json",
    }
    if du.is_main():
        save_checkpoint(built.student_state(), model_path)
        save_model_spec(built.spec, work_dir / "model.yaml")
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
                "world_size": du.get_world_size(),
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


def _spec_of(model: nn.Module, cfg: TrainConfig) -> dict[str, Any]:
    spec = model_spec(model)
    if spec is None:
        spec = detector_kwargs(cfg.model)
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


def _resume(trainer: Trainer, built: TrainModel, path: Path, device: torch.device) -> None:
    ckpt = load_checkpoint(path)
    if built.distilling:
        if "trainable" not in ckpt:
            raise CheckpointError(f"{path}: not a distillation checkpoint (no 'trainable' state)")
        state = ckpt["trainable"]
    else:
        state = state_dict_of(ckpt, source=str(path))
    load_state_dict_checked(built.trainable, state, source=str(path), strict=True)
    for key in ("iter", "epoch", "epoch_iter", "optimizer", "rng"):
        if key not in ckpt:
            raise CheckpointError(f"{path}: not a training checkpoint (no {key!r}); cannot resume")
    trainer.load_state_dict(ckpt)
    built.trainable.to(device)
