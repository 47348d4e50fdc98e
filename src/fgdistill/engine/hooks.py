"""The training loop's hooks: learning-rate schedule, FGD weight warm-up, checkpoints,
evaluation and logging (:class:`~fgdistill.engine.trainer.Trainer` calls them)."""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from fgdistill.engine import distributed as du
from fgdistill.engine.checkpoint import (
    CHECKPOINT_FORMAT,
    capture_rng_state,
    save_checkpoint,
)
from fgdistill.engine.trainer import (
    HookBase,
    WarmupMultiStepSchedule,
    nonfinite_summary,
)
from fgdistill.errors import FgdistillError, NonFiniteLossError
from fgdistill.io import atomic_write_text, read_jsonl

__all__ = ["CheckpointHook", "EvalHook", "FGDWarmupHook", "LRScheduleHook", "LoggerHook"]

logger = logging.getLogger(__name__)


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
