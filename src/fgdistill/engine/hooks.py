"""A small training loop with hooks, after detectron2's ``SimpleTrainer``.

:class:`Trainer` owns the loop and one step (:meth:`Trainer.run_step`: batch, loss dict, sum,
backward, clip, step); everything else is a :class:`HookBase`: the learning-rate schedule
(:class:`LRScheduleHook`), the FGD weight warm-up (:class:`FGDWarmupHook`), periodic evaluation
(:class:`EvalHook`), checkpoints (:class:`CheckpointHook`) and logging (:class:`LoggerHook`).

Reproducibility and resuming
----------------------------
The data order of an epoch depends only on ``(seed, epoch)``: at the start of every epoch all
random generators are re-seeded from ``(seed, epoch, rank)`` before the epoch's loader is built.
A checkpoint stores the iteration inside the epoch and the random states at that moment; resuming
rebuilds the epoch's loader the same way, skips the batches already done (they are loaded and
thrown away, so augmentation draws happen exactly as before) and then restores the saved random
states. A run stopped at any iteration and resumed therefore ends with the same weights as an
uninterrupted run on CPU (on CUDA, up to non-deterministic kernels).
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from fgdistill.engine import distributed as du
from fgdistill.engine.checkpoint import (
    CHECKPOINT_FORMAT,
    capture_rng_state,
    restore_rng_state,
    save_checkpoint,
)
from fgdistill.errors import CheckpointError, FgdistillError, NonFiniteLossError
from fgdistill.io import atomic_write_text, read_jsonl

__all__ = [
    "CheckpointHook",
    "EvalHook",
    "FGDWarmupHook",
    "HookBase",
    "LRScheduleHook",
    "LoggerHook",
    "Trainer",
    "WarmupMultiStepSchedule",
    "build_optimizer",
    "epoch_seed",
    "move_batch",
    "nonfinite_summary",
    "seed_everything",
]

logger = logging.getLogger(__name__)


def seed_everything(seed: int) -> None:
    """Seed python's ``random``, numpy and torch (CPU and CUDA)."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def epoch_seed(seed: int, epoch: int, rank: int = 0) -> int:
    """The seed used at the start of ``epoch`` on ``rank``: a fixed mix of the three numbers."""
    return (seed * 1_000_003 + epoch * 10_007 + rank * 101) % (2**31 - 1)


def move_batch(batch: Any, device: torch.device) -> tuple[list[torch.Tensor], list[dict]]:
    """Move a collated ``(images, targets)`` batch to ``device``.

    ``images`` is a sequence of ``FloatTensor[3, H, W]``; ``targets`` a sequence of dicts whose
    tensor values are moved (others, such as file names, are kept).
    """
    images, targets = batch[0], batch[1]
    images = [img.to(device, non_blocking=True) for img in images]
    moved = [
        {
            k: (v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v)
            for k, v in t.items()
        }
        for t in targets
    ]
    return images, moved


def build_optimizer(
    params: Iterable[nn.Parameter] | Iterable[dict[str, Any]],
    *,
    name: str,
    lr: float,
    momentum: float = 0.9,
    weight_decay: float = 1e-4,
) -> torch.optim.Optimizer:
    """SGD with momentum (the paper's) or AdamW, over the parameters that require gradients.

    ``params`` may also be parameter groups (dicts with ``"params"``, as from
    :func:`fgdistill.engine.param_groups.bias_param_groups`).
    """
    items: list[Any] = list(params)
    trainable: list[Any]
    if items and isinstance(items[0], dict):
        groups = [dict(g, params=[p for p in g["params"] if p.requires_grad]) for g in items]
        trainable = [g for g in groups if g["params"]]
    else:
        trainable = [p for p in items if p.requires_grad]
    if not trainable:
        raise FgdistillError("optimizer: the model has no trainable parameters")
    if name == "sgd":
        return torch.optim.SGD(trainable, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(trainable, lr=lr, weight_decay=weight_decay)
    raise FgdistillError(f"optim.optimizer: expected 'sgd' or 'adamw', got {name!r}")


def nonfinite_summary(state: Mapping[str, Any]) -> list[tuple[str, int]]:
    """``(key, count)`` of the floating-point tensors in a state dict that hold NaN or inf.

    One host sync for the whole state dict.
    """
    keys = [
        k
        for k, v in state.items()
        if isinstance(v, torch.Tensor) and v.is_floating_point() and v.numel()
    ]
    if not keys:
        return []
    device = state[keys[0]].device
    counts = torch.stack(
        [(~torch.isfinite(state[k].detach())).sum().to(device, torch.int64) for k in keys]
    ).tolist()
    return [(k, int(n)) for k, n in zip(keys, counts, strict=True) if n]


class WarmupMultiStepSchedule:
    """Linear warm-up then step decay, as a pure function of the iteration.

    ``factor(i) = warm(i) * gamma ** (number of milestones <= i)`` with ``warm(i)`` going
    linearly from ``warmup_factor`` at ``i = 0`` to 1 at ``i = warmup_iters`` (``warmup_method=
    "constant"``: ``warmup_factor`` until ``warmup_iters``, then 1). Milestones are in
    iterations. Being stateless, it resumes exactly from the iteration alone.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        *,
        milestones: Sequence[int],
        gamma: float = 0.1,
        warmup_iters: int = 0,
        warmup_factor: float = 0.001,
        warmup_method: str = "linear",
    ) -> None:
        if warmup_method not in ("linear", "constant"):
            raise FgdistillError(f"warmup must be 'linear' or 'constant', got {warmup_method!r}")
        self.warmup_method = warmup_method
        self.optimizer = optimizer
        self.milestones = sorted(int(m) for m in milestones)
        self.gamma = gamma
        self.warmup_iters = warmup_iters
        self.warmup_factor = warmup_factor
        self.base_lrs = [float(g.get("initial_lr", g["lr"])) for g in optimizer.param_groups]
        for group, base in zip(optimizer.param_groups, self.base_lrs, strict=True):
            group["initial_lr"] = base

    def factor(self, iteration: int) -> float:
        """The multiplier of the base learning rate at ``iteration`` (0-based)."""
        warm = 1.0
        if iteration < self.warmup_iters and self.warmup_method == "constant":
            warm = self.warmup_factor
        elif iteration < self.warmup_iters:
            alpha = iteration / self.warmup_iters
            warm = self.warmup_factor * (1 - alpha) + alpha
        decays = sum(1 for m in self.milestones if iteration >= m)
        return warm * self.gamma**decays

    def set_iteration(self, iteration: int) -> float:
        """Set every group's learning rate for ``iteration``; returns the first group's."""
        f = self.factor(iteration)
        for group, base in zip(self.optimizer.param_groups, self.base_lrs, strict=True):
            group["lr"] = base * f
        return self.base_lrs[0] * f

    def state_dict(self) -> dict[str, Any]:
        """Settings (the schedule holds no other state)."""
        return {
            "milestones": list(self.milestones),
            "gamma": self.gamma,
            "warmup_iters": self.warmup_iters,
            "warmup_factor": self.warmup_factor,
            "warmup_method": self.warmup_method,
            "base_lrs": list(self.base_lrs),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Nothing to restore beyond the iteration; kept for symmetry and checks."""
        if list(state.get("base_lrs", self.base_lrs)) != self.base_lrs:
            logger.warning(
                "resumed with a different learning rate (%s, was %s)",
                self.base_lrs,
                state.get("base_lrs"),
            )


class HookBase:
    """Something run around the loop; ``self.trainer`` is set when registered."""

    trainer: Trainer

    def before_train(self) -> None:
        """Called once before the first step."""

    def after_train(self) -> None:
        """Called once after the last step (also when stopped by ``max_iters``)."""

    def before_epoch(self) -> None:
        """Called at the start of each epoch (and of a resumed part-epoch)."""

    def after_epoch(self) -> None:
        """Called after each completed epoch (``trainer.epoch`` already counts it)."""

    def before_step(self) -> None:
        """Called before each step (``trainer.iter`` is the number of steps done)."""

    def after_step(self) -> None:
        """Called after each step (``trainer.iter`` already counts it)."""

    def on_data_error(self) -> None:
        """Called when reading the next batch failed (a bad image), before the error goes on."""

    def close(self) -> None:
        """Called last, also when training fails: release files and bars."""


class Trainer:
    """The loop: epochs of batches, one optimizer step each, hooks around them.

    Args:
        model: the trainable module (a detector or a Distiller, DDP-wrapped or not); in train
            mode, ``model(images, targets)`` returns a dict of named scalar losses.
        optimizer: over ``model``'s trainable parameters.
        loader_fn: ``loader_fn(epoch)`` returns the epoch's data loader; it is called after
            the random generators are seeded for the epoch.
        iters_per_epoch: batches per epoch on this rank.
        epochs: epochs in the schedule.
        max_iters: stop after this many iterations in total (``None``: the whole schedule).
        device: where batches go.
        grad_clip: max L2 norm of all gradients, or ``None``.
        amp: mixed precision (only honoured on CUDA).
        seed: the run's seed (see :func:`epoch_seed`).
        hooks: run in the given order.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        loader_fn: Callable[[int], Iterable[Any]],
        *,
        iters_per_epoch: int,
        epochs: int,
        max_iters: int | None = None,
        device: torch.device | str = "cpu",
        grad_clip: float | None = None,
        amp: bool = False,
        seed: int = 0,
        hooks: Sequence[HookBase] = (),
    ) -> None:
        if iters_per_epoch <= 0:
            raise FgdistillError("training data: no batches in an epoch (is the dataset empty?)")
        self.model = model
        self.optimizer = optimizer
        self.loader_fn = loader_fn
        self.iters_per_epoch = iters_per_epoch
        self.epochs = epochs
        total = epochs * iters_per_epoch
        self.max_iters = total if max_iters is None else min(max_iters, total)
        self.device = torch.device(device)
        self.grad_clip = grad_clip
        self.amp = bool(amp) and self.device.type == "cuda"
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp)
        self.seed = seed
        self.hooks: list[HookBase] = []
        for hook in hooks:
            self.register(hook)
        # Progress state.
        self.iter = 0
        self.epoch = 0
        self.epoch_iter = 0
        self.best_metric: float | None = None
        self.elapsed_before = 0.0
        self.start_time = time.perf_counter()
        self.last_losses: dict[str, float] = {}
        self.last_total = 0.0
        self.last_step_images = 0
        self._resume_rng: Mapping[str, Any] | None = None
        self.extra_state: dict[str, Any] = {}

    def register(self, hook: HookBase) -> None:
        """Add a hook (runs after the ones already registered)."""
        hook.trainer = self
        self.hooks.append(hook)

    @property
    def elapsed(self) -> float:
        """Training seconds so far, including those before a resume."""
        return self.elapsed_before + time.perf_counter() - self.start_time

    @property
    def finished(self) -> bool:
        """True when the schedule (or ``max_iters``) is done."""
        return self.iter >= self.max_iters

    # -- state -----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Loop state for a checkpoint: counters, random states, optimizer, AMP scaler."""
        state = {
            "iter": self.iter,
            "epoch": self.epoch,
            "epoch_iter": self.epoch_iter,
            "best_metric": self.best_metric,
            "elapsed": self.elapsed,
            "optimizer": self.optimizer.state_dict(),
            "rng": capture_rng_state(),
        }
        if self.amp:
            state["scaler"] = self.scaler.state_dict()
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`; training continues where it stopped."""
        self.iter = int(state["iter"])
        self.epoch = int(state["epoch"])
        self.epoch_iter = int(state["epoch_iter"])
        self.best_metric = state.get("best_metric")
        self.elapsed_before = float(state.get("elapsed", 0.0))
        saved = state["optimizer"]
        if saved is None:
            logger.warning("resume: the optimizer's state is not restored; it starts afresh")
        else:
            self._check_same_optimizer(saved)
        try:
            if saved is not None:
                self.optimizer.load_state_dict(saved)
        except (ValueError, KeyError) as exc:
            raise CheckpointError(
                f"resume: the checkpoint's optimizer state does not fit this run's parameters "
                f"({exc}); was model.trainable_layers, the model or the optimizer changed?"
            ) from None
        if self.amp and "scaler" in state:
            self.scaler.load_state_dict(state["scaler"])
        per_rank = state.get("rng_per_rank")
        if per_rank is not None and len(per_rank) == du.get_world_size():
            self._resume_rng = per_rank[du.get_rank()]
        else:  # a single-process checkpoint, or another number of processes
            self._resume_rng = state.get("rng")

    def _check_same_optimizer(self, saved: Mapping[str, Any]) -> None:
        """Refuse an optimizer state of another kind (an AdamW state for SGD has no momentum)."""
        groups = saved.get("param_groups") or [{}]
        missing = [
            k
            for k, v in self.optimizer.defaults.items()
            if k not in groups[0] and v is not None and not isinstance(v, bool)
        ]
        if missing:
            raise CheckpointError(
                f"resume: the checkpoint's optimizer state is not of a "
                f"{type(self.optimizer).__name__} (it has no {', '.join(map(repr, missing))}); "
                "was optim.optimizer changed?"
            )

    # -- loop ------------------------------------------------------------------------------
    def _start_epoch(self) -> Iterator[Any]:
        seed_everything(epoch_seed(self.seed, self.epoch, du.get_rank()))
        data_iter = iter(self.loader_fn(self.epoch))
        if self.epoch_iter:
            for skipped in range(self.epoch_iter):
                try:
                    next(data_iter)
                except StopIteration:
                    raise FgdistillError(
                        f"resume: the epoch has fewer batches than the {self.epoch_iter} "
                        f"already done ({skipped}); was the dataset or batch size changed?"
                    ) from None
        if self._resume_rng is not None and self.epoch_iter:
            # Mid-epoch: continue with the generators exactly as they were at the checkpoint.
            # At an epoch boundary the epoch seed above is already what an uninterrupted run
            # uses.
            restore_rng_state(self._resume_rng)
        self._resume_rng = None
        return data_iter

    def train(self) -> None:
        """Run until the schedule or ``max_iters`` is done, calling the hooks."""
        self.start_time = time.perf_counter()
        self.model.train()
        try:
            for hook in self.hooks:
                hook.before_train()
            while not self.finished and self.epoch < self.epochs:
                data_iter = self._start_epoch()
                for hook in self.hooks:
                    hook.before_epoch()
                exhausted = False
                while self.epoch_iter < self.iters_per_epoch and not self.finished:
                    try:
                        batch = next(data_iter)
                    except StopIteration:
                        exhausted = True
                        break
                    except FgdistillError:
                        for hook in self.hooks:
                            hook.on_data_error()
                        raise
                    for hook in self.hooks:
                        hook.before_step()
                    self.run_step(batch)
                    self.iter += 1
                    self.epoch_iter += 1
                    for hook in self.hooks:
                        hook.after_step()
                if not (exhausted or self.epoch_iter >= self.iters_per_epoch):
                    break  # stopped by max_iters inside the epoch
                self.epoch += 1
                self.epoch_iter = 0
                for hook in self.hooks:
                    hook.after_epoch()
            for hook in self.hooks:
                hook.after_train()
        finally:
            for hook in self.hooks:
                hook.close()

    def run_step(self, batch: Any) -> None:
        """One step: forward, check losses, sum, backward, clip, optimizer step."""
        images, targets = move_batch(batch, self.device)
        with torch.autocast(device_type=self.device.type, enabled=self.amp):
            loss_dict = self.model(images, targets)
        bad = [k for k, v in loss_dict.items() if not bool(torch.isfinite(v.detach()).all())]
        if bad:
            values = ", ".join(f"{k}={float(loss_dict[k].detach()):.4g}" for k in bad)
            raise NonFiniteLossError(
                f"non-finite loss at iteration {self.iter + 1} (epoch {self.epoch + 1}): "
                f"{values}; stopping before the update. The last checkpoint is kept; try a "
                f"lower optim.lr, optim.grad_clip, or a smaller distill.fgd_weight_scale"
            )
        losses = sum(loss_dict.values())
        assert isinstance(losses, torch.Tensor)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(losses).backward()
        if self.grad_clip is not None:
            self.scaler.unscale_(self.optimizer)
            params = [p for g in self.optimizer.param_groups for p in g["params"]]
            norm = torch.nn.utils.clip_grad_norm_(params, self.grad_clip)
            if not self.amp and not math.isfinite(float(norm)):
                raise NonFiniteLossError(
                    f"non-finite gradient norm at iteration {self.iter + 1}; stopping before "
                    f"the update. The last checkpoint is kept."
                )
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.last_losses = {k: float(v.detach()) for k, v in loss_dict.items()}
        self.last_total = float(losses.detach())
        self.last_step_images = len(images)


class LRScheduleHook(HookBase):
    """Sets the learning rate before every step from :class:`WarmupMultiStepSchedule`."""

    def __init__(self, schedule: WarmupMultiStepSchedule) -> None:
        self.schedule = schedule
        self.lr = 0.0

    def before_step(self) -> None:
        self.lr = self.schedule.set_iteration(self.trainer.iter)


class FGDWarmupHook(HookBase):
    """Ramps ``distiller.fgd_weight_scale`` from 0 to ``scale`` over ``warmup_iters`` steps.

    From-scratch features give FGD terms far larger than the detection loss at the start; a
    ramp lets the detection loss shape the student first. With ``warmup_iters = 0`` the scale is
    constant.
    """

    def __init__(self, distiller: Any, *, scale: float = 1.0, warmup_iters: int = 0) -> None:
        self.distiller = distiller
        self.scale = scale
        self.warmup_iters = warmup_iters

    def before_step(self) -> None:
        i = self.trainer.iter
        ramp = 1.0 if self.warmup_iters <= 0 else min(1.0, (i + 1) / self.warmup_iters)
        self.distiller.fgd_weight_scale = self.scale * ramp


class CheckpointHook(HookBase):
    """Writes ``last.pt`` at epoch ends (every ``interval`` epochs), every ``every_iters``
    iterations if set, and at the end; only on rank 0.

    ``state_fn()`` returns the model part of the checkpoint (model state, spec, config).
    """

    def __init__(
        self,
        work_dir: str | Path,
        state_fn: Callable[[], dict[str, Any]],
        *,
        interval: int = 1,
        every_iters: int = 0,
        on_finished: Callable[[], None] | None = None,
    ) -> None:
        self.on_finished = on_finished
        self.work_dir = Path(work_dir)
        self.state_fn = state_fn
        self.interval = interval
        self.every_iters = every_iters
        self._saved_at = -1
        self._saved_best: float | None = None
        self._kept_at: int | None = None
        self._due = False

    def before_train(self) -> None:
        # a resumed run's last.pt is the checkpoint kept when nothing newer can be written
        self._kept_at = self.trainer.iter or None

    def checkpoint(self) -> dict[str, Any]:
        """The full checkpoint dict for the trainer's current state."""
        ckpt: dict[str, Any] = {"format": CHECKPOINT_FORMAT, "version": 1}
        ckpt.update(self.state_fn())
        ckpt.update(self.trainer.state_dict())
        return ckpt

    def save(self, name: str = "last.pt") -> None:
        """Write ``work_dir/name`` atomically (rank 0 writes; every rank must call it).

        In a multi-process run the checkpoint also holds every rank's random states
        (``rng_per_rank``), so that a resumed rank continues its own draws, not rank 0's.
        """
        per_rank = du.all_gather_object(capture_rng_state()) if du.is_distributed() else None
        if du.is_main():
            ckpt = self.checkpoint()
            self._check_finite(ckpt, name)
            if per_rank is not None:
                ckpt["rng_per_rank"] = per_rank
            path = save_checkpoint(ckpt, self.work_dir / name)
            logger.debug("wrote %s at iteration %d", path, self.trainer.iter)
        if name == "last.pt":
            first = self._saved_at != self.trainer.iter
            self._saved_at = self.trainer.iter
            self._saved_best = self.trainer.best_metric
            self._kept_at = self.trainer.iter
            if first and self.trainer.finished and self.on_finished is not None:
                self.on_finished()  # e.g. the trained weights, before the final evaluation

    def _check_finite(self, ckpt: Mapping[str, Any], name: str) -> None:
        """Refuse to write weights holding NaN or infinity: the last good checkpoint stays."""
        state = ckpt.get("trainable") or ckpt.get("model") or {}
        bad = nonfinite_summary(state)
        if not bad:
            return
        t = self.trainer
        key, count = bad[0]
        total = sum(n for _, n in bad)
        kept = (
            f"the last checkpoint ({self.work_dir / 'last.pt'}, iteration {self._kept_at}) is kept"
            if self._kept_at
            else "no checkpoint had been written yet"
        )
        raise NonFiniteLossError(
            f"the weights became non-finite by iteration {t.iter} ({total} NaN/inf values in "
            f"{len(bad)} tensor(s), first {key!r}: {count}); {name} was not written and "
            f"{kept}. Try a lower optim.lr, optim.grad_clip, or a smaller "
            "distill.fgd_weight_scale"
        )

    def _epoch_end_due(self) -> bool:
        t = self.trainer
        return bool(self._due or (self.interval and t.epoch % self.interval == 0) or t.finished)

    def before_eval(self, *, end: bool = False) -> None:
        """Write ``last.pt`` before an evaluation if one is due now (at an epoch end, or at the
        end with ``end``), so that a failing evaluation loses no training."""
        if self._saved_at != self.trainer.iter and (end or self._epoch_end_due()):
            self.save()

    def on_data_error(self) -> None:
        """Save the iterations done before a bad batch stops the run (single process only)."""
        t = self.trainer
        if du.is_distributed() or t.iter == 0 or self._saved_at == t.iter:
            return
        try:
            self.save()
        except FgdistillError as exc:  # e.g. non-finite weights: keep the older checkpoint
            logger.warning("not saving %s: %s", self.work_dir / "last.pt", exc)
            return
        logger.warning(
            "reading the data failed: saved %s at iteration %d; fix the data and run again "
            "with --resume",
            self.work_dir / "last.pt",
            t.iter,
        )

    def after_step(self) -> None:
        t = self.trainer
        if self.every_iters and t.iter % self.every_iters == 0:
            if t.epoch_iter >= t.iters_per_epoch:
                # the epoch's last step: save once the epoch is counted (and evaluated), so a
                # resume starts the next epoch instead of replaying this one to its end
                self._due = True
            else:
                self.save()

    def after_epoch(self) -> None:
        t = self.trainer
        due = self._epoch_end_due()
        self._due = False
        if self._saved_at == t.iter:
            if self._saved_best != t.best_metric:
                self.save()  # written before the evaluation: record its best metric too
            return
        if due:
            self.save()

    def after_train(self) -> None:
        t = self.trainer
        if self._saved_at != t.iter or self._saved_best != t.best_metric:
            self.save()


class EvalHook(HookBase):
    """Evaluates every ``interval`` epochs and at the end; keeps ``best.pt``.

    ``eval_fn()`` returns ``{task: {metric: value}}`` on every rank (the evaluator gathers);
    ``metric`` (``"bbox/AP"``) picks the value that decides ``best.pt``. Results go to
    ``self.results`` and to every :class:`LoggerHook` through ``trainer.extra_state``.
    """

    def __init__(
        self,
        eval_fn: Callable[[], dict[str, dict[str, float]]],
        *,
        interval: int = 1,
        metric: str = "bbox/AP",
        checkpoint_hook: CheckpointHook | None = None,
        on_result: Callable[[dict[str, dict[str, float]]], None] | None = None,
        previous: Callable[[int], dict[str, dict[str, float]] | None] | None = None,
    ) -> None:
        self.previous = previous
        self.eval_fn = eval_fn
        self.interval = interval
        self.metric = metric
        self.checkpoint_hook = checkpoint_hook
        self.on_result = on_result
        self.results: dict[str, dict[str, float]] | None = None
        self._done_at = -1

    def _evaluate(self, *, end: bool = False) -> None:
        t = self.trainer
        if self.checkpoint_hook is not None:
            self.checkpoint_hook.before_eval(end=end)
        try:
            results = self.eval_fn()
        except BaseException:
            self._save_after_failure()
            raise
        t.model.train()
        self._done_at = t.iter
        self.results = results
        task, _, name = self.metric.partition("/")
        value = results.get(task, {}).get(name)
        if (
            value is not None
            and math.isfinite(value)
            and (t.best_metric is None or value > t.best_metric)
        ):
            t.best_metric = float(value)
            if self.checkpoint_hook is not None:
                self.checkpoint_hook.save("best.pt")
        if self.on_result is not None:
            self.on_result(results)

    def _save_after_failure(self) -> None:
        """Keep the training done when the evaluation fails: ``last.pt`` at this iteration."""
        t = self.trainer
        hook = self.checkpoint_hook
        if hook is None:
            return
        if hook._saved_at != t.iter and not du.is_distributed():
            try:
                hook.save()
            except Exception as exc:  # the evaluation's error is the one to report
                logger.warning("could not save %s: %s", hook.work_dir / "last.pt", exc)
        if hook._saved_at == t.iter:
            logger.error(
                "evaluation failed at iteration %d: the training is saved in %s; fix the cause "
                "and run again with --resume to evaluate it",
                t.iter,
                hook.work_dir / "last.pt",
            )

    def after_epoch(self) -> None:
        t = self.trainer
        if (self.interval and t.epoch % self.interval == 0) or t.finished:
            self._evaluate()

    def after_train(self) -> None:
        t = self.trainer
        if self._done_at == t.iter:
            return
        # a resumed finished run: the evaluation at this iteration is already in the log
        earlier = self.previous(t.iter) if self.previous is not None else None
        if earlier is not None:
            self._done_at = t.iter
            self.results = earlier
            return
        self._evaluate(end=True)


class LoggerHook(HookBase):
    """Writes ``log.jsonl`` and TensorBoard scalars and drives the tqdm bar (rank 0 only).

    Every ``interval`` iterations (and at the last one) a train record is appended::

        {"type": "train", "iter": 40, "epoch": 1, "lr": 0.01, "time": 12.3,
         "loss": 1.52, "losses": {"classification": 1.1, "bbox_regression": 0.42}}

    ``iter`` counts completed iterations, ``epoch`` is 1-based (the epoch the iteration belongs
    to), ``time`` is training seconds since the run started (resumes included), and the loss
    values are means over the iterations since the previous record. :meth:`log_eval` appends
    ``{"type": "eval", "iter": i, "epoch": e, "metrics": {"bbox": {"AP": ...}}}``.
    """

    def __init__(
        self,
        work_dir: str | Path,
        *,
        interval: int = 20,
        lr_hook: LRScheduleHook | None = None,
        images_per_step: int = 1,
        progress: bool = True,
        description: str = "train",
        tensorboard: bool = True,
    ) -> None:
        self.work_dir = Path(work_dir)
        self.interval = max(1, interval)
        self.lr_hook = lr_hook
        self.images_per_step = images_per_step
        self.progress = progress
        self.description = description
        self.tensorboard = tensorboard
        self._sums: dict[str, float] = {}
        self._total = 0.0
        self._count = 0
        self._bar: Any = None
        self._tb: Any = None
        self._fh: Any = None
        self._step_start = 0.0
        self._rate = 0.0

    @property
    def log_path(self) -> Path:
        """``work_dir/log.jsonl``."""
        return self.work_dir / "log.jsonl"

    def before_train(self) -> None:
        t = self.trainer
        if not du.is_main():
            return
        self.work_dir.mkdir(parents=True, exist_ok=True)
        _truncate_log(self.log_path, t.iter)
        self._fh = self.log_path.open("a", encoding="utf-8")
        if self.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(self.work_dir / "tb"), purge_step=t.iter or None)
            except Exception as exc:  # pragma: no cover - tensorboard missing or broken
                logger.warning("TensorBoard disabled: %s", exc)
        if self.progress:
            from tqdm.auto import tqdm

            self._bar = tqdm(
                total=t.max_iters,
                initial=t.iter,
                desc=self.description,
                unit="it",
                dynamic_ncols=True,
                leave=True,
            )

    def before_step(self) -> None:
        self._step_start = time.perf_counter()

    def after_step(self) -> None:
        t = self.trainer
        dt = max(time.perf_counter() - self._step_start, 1e-9)
        rate = self.images_per_step / dt
        self._rate = rate if self._rate == 0 else 0.9 * self._rate + 0.1 * rate
        for k, v in t.last_losses.items():
            self._sums[k] = self._sums.get(k, 0.0) + v
        self._total += t.last_total
        self._count += 1
        if self._bar is not None:
            self._bar.update(1)
            self._bar.set_postfix_str(self._postfix(), refresh=False)
        if t.iter % self.interval == 0 or t.finished:
            self._write_train()

    def _postfix(self) -> str:
        t = self.trainer
        parts = [f"loss {t.last_total:.3f}"]
        detection = {k: v for k, v in t.last_losses.items() if not k.startswith("fgd/")}
        fgd = sum(v for k, v in t.last_losses.items() if k.startswith("fgd/"))
        parts += [f"{_short(k)} {v:.3f}" for k, v in detection.items()]
        if any(k.startswith("fgd/") for k in t.last_losses):
            parts.append(f"fgd {fgd:.3f}")
        parts.append(f"{self._rate:.1f} img/s")
        return ", ".join(parts)

    def _write_train(self) -> None:
        if not self._count:
            return
        t = self.trainer
        means = {k: v / self._count for k, v in self._sums.items()}
        means = du.reduce_mean(means)
        total = du.reduce_mean({"loss": self._total / self._count})["loss"]
        self._sums, self._total, self._count = {}, 0.0, 0
        if not du.is_main():
            return
        lr = self.lr_hook.lr if self.lr_hook is not None else t.optimizer.param_groups[0]["lr"]
        record = {
            "type": "train",
            "iter": t.iter,
            "epoch": t.epoch + (1 if t.epoch_iter else 0),
            "lr": lr,
            "time": round(t.elapsed, 3),
            "loss": total,
            "losses": means,
        }
        self._write(record)
        if self._tb is not None:
            self._tb.add_scalar("train/loss", total, t.iter)
            self._tb.add_scalar("train/lr", lr, t.iter)
            self._tb.add_scalar("train/images_per_s", self._rate, t.iter)
            for k, v in means.items():
                self._tb.add_scalar(f"train/{k}", v, t.iter)

    def log_eval(self, metrics: Mapping[str, Mapping[str, float]]) -> None:
        """Append an eval record and TensorBoard scalars (rank 0 only)."""
        if not du.is_main():
            return
        t = self.trainer
        self._write(
            {
                "type": "eval",
                "iter": t.iter,
                "epoch": t.epoch,
                "metrics": {k: dict(v) for k, v in metrics.items()},
            }
        )
        if self._tb is not None:
            for task, values in metrics.items():
                for name, value in values.items():
                    self._tb.add_scalar(f"eval/{task}/{name}", value, t.iter)
        if self._bar is not None:
            ap = metrics.get("bbox", {}).get("AP")
            if ap is not None:
                self._bar.write(f"{self.description}: epoch {t.epoch}, bbox AP {ap:.2f}")

    def logged_eval(self, iteration: int) -> dict[str, dict[str, float]] | None:
        """The metrics of the eval record at ``iteration`` already in the log, or ``None``.

        Read on rank 0 and shared with every rank (they must agree on evaluating).
        """
        found = None
        if du.is_main() and self.log_path.is_file():
            try:
                records = read_jsonl(self.log_path)
            except FgdistillError:
                records = []
            for record in records:
                if record.get("type") == "eval" and record.get("iter") == iteration:
                    metrics = record.get("metrics")
                    found = metrics if isinstance(metrics, dict) else None
        if du.is_distributed():
            found = du.all_gather_object(found)[0]
        return found

    def _write(self, record: Mapping[str, Any]) -> None:
        if self._fh is None:
            return
        self._fh.write(json.dumps(record) + "\n")
        self._fh.flush()

    def close(self) -> None:
        """Close the bar, the log file and the TensorBoard writer."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self._tb is not None:
            self._tb.flush()
            self._tb.close()
            self._tb = None
        if self._fh is not None:
            self._fh.close()
            self._fh = None


def _short(name: str) -> str:
    return {
        "classification": "cls",
        "bbox_regression": "reg",
        "bbox_ctrness": "ctr",
        "loss_classifier": "cls",
        "loss_box_reg": "reg",
        "loss_objectness": "obj",
        "loss_rpn_box_reg": "rpn",
        "loss_mask": "mask",
    }.get(name, name)


def _truncate_log(path: Path, iteration: int) -> None:
    """Keep only the records up to ``iteration`` (a fresh run keeps none).

    A resumed run rewrites its log from the checkpoint's iteration, so records of a killed run
    after its last checkpoint are not duplicated.
    """
    if not path.exists():
        return
    if iteration == 0:
        path.unlink()
        return
    kept = [r for r in read_jsonl(path) if int(r.get("iter", 0)) <= iteration]
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in kept))
