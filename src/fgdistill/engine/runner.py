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

import contextlib
import logging
import math
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fgdistill.data.check import check_image_files
from fgdistill.engine import distributed as du
from fgdistill.engine.checkpoint import save_checkpoint
from fgdistill.engine.config import TrainConfig, detector_kwargs, dump_config, load_config
from fgdistill.engine.hooks import (
    CheckpointHook,
    EvalHook,
    FGDWarmupHook,
    LoggerHook,
    LRScheduleHook,
)
from fgdistill.engine.inference import (
    build_datasets,
    check_same_categories,
    dataset_categories,
    evaluate_model,
)
from fgdistill.engine.trainer import (
    HookBase,
    Trainer,
    WarmupMultiStepSchedule,
    build_optimizer,
    epoch_seed,
    seed_everything,
)
from fgdistill.engine.workdir import check_fresh_start, check_resume_config, lock_work_dir
from fgdistill.errors import CheckpointError, ConfigError, FgdistillError
from fgdistill.io import remove_temporaries, write_json
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
    overwrite: bool = False,
    allow_config_change: bool = False,
) -> RunResult:
    """Train a detector, or distil a student when ``cfg.distill`` is set.

    The work dir is locked for the whole run (:func:`~fgdistill.engine.workdir.lock_work_dir`).
    A fresh start over an earlier run's checkpoints or weights is refused unless ``overwrite``;
    a resume whose config alters the run (model, data, optimizer, schedule, seed) is refused
    unless ``allow_config_change``. Every image is checked cheaply before training starts.

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
    guard = lock_work_dir(work_dir, "train") if du.is_main() else contextlib.nullcontext()
    with guard:
        return _train_locked(
            cfg,
            device,
            resume=resume,
            progress=progress,
            extra_hooks=extra_hooks,
            overwrite=overwrite,
            allow_config_change=allow_config_change,
        )


def _train_locked(
    cfg: TrainConfig,
    device: torch.device,
    *,
    resume: bool,
    progress: bool,
    extra_hooks: Sequence[HookBase],
    overwrite: bool,
    allow_config_change: bool,
) -> RunResult:
    work_dir = Path(cfg.work_dir)
    if du.is_main():
        _remove_temporaries(work_dir)
    data = prepare_data(cfg)
    check_image_files(data.train, split="training")
    check_image_files(data.val, split="validation")
    resuming = resume and (work_dir / "last.pt").is_file()
    fresh_optimizer = False
    if resuming:
        changes = check_resume_config(
            _run_config(work_dir),
            _plain_config(cfg),
            source=work_dir / "config.yaml",
            allow=allow_config_change,
        )
        fresh_optimizer = any(k == "optim.optimizer" for k, _, _ in changes)
    else:
        check_fresh_start(work_dir, overwrite=overwrite, keep=_inputs_of(cfg), resume=resume)

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
    _start(trainer, cfg, built, resume=resume, device=device, fresh_optimizer=fresh_optimizer)
    if du.is_main():  # the run has really started: its config goes beside its outputs
        dump_config(cfg, work_dir / "config.yaml")
        write_json(work_dir / "categories.json", data.categories)
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


def _method_settings(cfg: TrainConfig, family: str) -> tuple[list[str], dict[str, Any]]:
    """The distilled levels and per-level hyperparameters: the preset's, with the config's
    overrides; a misspelt key is named."""
    import dataclasses
    import difflib

    from fgdistill.models.presets import PRESETS, preset

    dc = cfg.distill
    assert dc is not None
    preset_name = dc.preset or family
    if preset_name not in PRESETS:
        raise ConfigError(
            f"distill.preset: unknown preset {preset_name!r}; choose one of {', '.join(PRESETS)}"
        )
    preset_levels, base = preset(dc.method, preset_name)
    levels = list(dc.levels) if dc.levels else list(preset_levels)
    names = [f.name for f in dataclasses.fields(base)]
    for where, keys in [
        ("hparams", dc.hparams),
        *((f"level_hparams.{lv}", v) for lv, v in dc.level_hparams.items()),
    ]:
        for key in keys:
            if key not in names:
                close = difflib.get_close_matches(key, names, n=1)
                hint = f"did you mean {close[0]!r}?" if close else f"valid: {', '.join(names)}"
                raise ConfigError(
                    f"distill.{where}: unknown key {key!r} for method {dc.method!r}; {hint}"
                )
    unknown_levels = [lv for lv in dc.level_hparams if lv not in levels]
    if unknown_levels:
        raise ConfigError(
            f"distill.level_hparams: level(s) {unknown_levels} are not distilled; "
            f"levels are {levels}"
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
    return levels, out


def _build_distiller(
    cfg: TrainConfig,
    student: nn.Module,
    num_classes: int,
    categories: Sequence[Mapping[str, Any]] = (),
) -> nn.Module:
    from fgdistill.engine.teacher import inherit_exclusions, load_teacher
    from fgdistill.models import Distiller

    dc = cfg.distill
    assert dc is not None
    if not dc.teacher_checkpoint:
        raise ConfigError("distill.teacher_checkpoint: a trained teacher checkpoint is required")
    teacher, teacher_categories = load_teacher(dc, num_classes)
    levels, hparams = _method_settings(cfg, cfg.model.arch)
    distiller: nn.Module = Distiller(
        student,
        teacher,
        levels=levels,
        hparams=hparams,
        inherit_teacher=dc.inherit_teacher,
        method=dc.method,
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

    def export_fn() -> None:
        # the trained weights, written with the final last.pt (before the final evaluation)
        if du.is_main():
            _export_weights(cfg, built)

    lr_hook = LRScheduleHook(schedule)
    ckpt_hook = CheckpointHook(
        work_dir,
        state_fn,
        interval=cfg.checkpoint_interval,
        every_iters=cfg.checkpoint_iters,
        on_finished=export_fn,
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
        previous=log_hook.logged_eval,
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
    trainer: Trainer,
    cfg: TrainConfig,
    built: TrainModel,
    *,
    resume: bool,
    device: torch.device,
    fresh_optimizer: bool = False,
) -> None:
    """Resume from ``last.pt`` when asked and there is one; else clear an earlier run's files."""
    work_dir = Path(cfg.work_dir)
    last = work_dir / "last.pt"
    if resume and last.is_file():
        _resume(trainer, built, last, device, fresh_optimizer=fresh_optimizer)
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
        if not (model_path.is_file() and (work_dir / "model.yaml").is_file()):
            _export_weights(cfg, built)
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


def _resume(
    trainer: Trainer,
    built: TrainModel,
    path: Path,
    device: torch.device,
    *,
    fresh_optimizer: bool = False,
) -> None:
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
    if fresh_optimizer:  # optim.optimizer changed (allowed): the old state does not fit
        ckpt["optimizer"] = None
    trainer.load_state_dict(ckpt)
    built.trainable.to(device)


def _run_config(work_dir: Path) -> dict[str, Any] | None:
    """The run's own config (``config.yaml`` in its work dir) as plain data, if readable."""
    path = work_dir / "config.yaml"
    if not path.is_file():
        return None
    try:
        return _plain_config(load_config(path))
    except FgdistillError as exc:
        logger.warning("%s: cannot compare the resumed config with it (%s)", path, exc)
        return None


def _remove_temporaries(work_dir: Path) -> None:
    """Remove what atomic writes killed mid-way left behind (we hold the work dir's lock)."""
    if work_dir.is_dir():
        remove_temporaries(work_dir)


def _export_weights(cfg: TrainConfig, built: TrainModel) -> None:
    """Write ``model.pt`` (``student.pt``) and ``model.yaml``: the trained detector."""
    work_dir = Path(cfg.work_dir)
    save_checkpoint(built.student_state(), work_dir / weights_name(cfg))
    save_model_spec(built.spec, work_dir / "model.yaml")
