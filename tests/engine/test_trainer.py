"""The training loop, hooks, schedule, checkpoints and resuming, on a tiny mock detector."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from fgdistill.engine.hooks import (
    CheckpointHook,
    EvalHook,
    FGDWarmupHook,
    LoggerHook,
    LRScheduleHook,
)
from fgdistill.engine.trainer import (
    HookBase,
    Trainer,
    WarmupMultiStepSchedule,
    build_optimizer,
    epoch_seed,
)
from fgdistill.errors import CheckpointError, NonFiniteLossError
from fgdistill.models.checkpoint import load_checkpoint


class NoisyImages(Dataset):
    """Images whose augmentation draws from torch's global RNG, like RandomHorizontalFlip."""

    def __len__(self) -> int:
        return 10

    def __getitem__(self, i: int) -> tuple[torch.Tensor, dict[str, Any]]:
        g = torch.Generator().manual_seed(i)
        img = torch.rand(3, 8, 8, generator=g)
        if torch.rand(()) < 0.5:
            img = img.flip(-1)
        return img, {"boxes": torch.tensor([[1.0, 1.0, 4.0, 4.0]]), "labels": torch.tensor([1])}


def collate(batch: list) -> tuple[list, list]:
    return [b[0] for b in batch], [b[1] for b in batch]


class MockDetector(nn.Module):
    """Returns two named losses; samples with torch's RNG in forward, like R-CNN's sampler."""

    def __init__(self, bad_at: int | None = None) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.head = nn.Linear(4, 2)
        self.calls = 0
        self.bad_at = bad_at
        self.fgd_weight_scale = 1.0

    def forward(self, images: list[torch.Tensor], targets: list | None = None) -> Any:
        x = torch.stack(images)
        feat = self.conv(x).relu().mean(dim=(2, 3))
        out = self.head(feat)
        self.calls += 1
        keep = torch.randperm(out.shape[0])[: max(1, out.shape[0] // 2)]
        cls = (out[keep] ** 2).mean()
        reg = (out - 0.5).abs().mean() * self.fgd_weight_scale
        if self.bad_at is not None and self.calls == self.bad_at:
            reg = reg * float("nan")
        return {"classification": cls, "bbox_regression": reg}


def make_trainer(
    work_dir: Path, *, max_iters: int | None = None, bad_at: int | None = None, epochs: int = 3
) -> tuple[Trainer, MockDetector, CheckpointHook]:
    torch.manual_seed(0)
    model = MockDetector(bad_at=bad_at)
    opt = build_optimizer(model.parameters(), name="sgd", lr=0.1, momentum=0.9)
    ds = NoisyImages()

    def loader_fn(epoch: int) -> DataLoader:
        g = torch.Generator().manual_seed(epoch_seed(0, epoch))
        return DataLoader(ds, batch_size=4, shuffle=True, generator=g, collate_fn=collate)

    schedule = WarmupMultiStepSchedule(opt, milestones=[4, 7], warmup_iters=3)
    lr_hook = LRScheduleHook(schedule)

    def state_fn() -> dict[str, Any]:
        return {"model": model.state_dict(), "model_spec": {"arch": "mock"}}

    ckpt = CheckpointHook(work_dir, state_fn, interval=1)
    log = LoggerHook(work_dir, interval=2, lr_hook=lr_hook, progress=False, tensorboard=False)
    trainer = Trainer(
        model,
        opt,
        loader_fn,
        iters_per_epoch=3,
        epochs=epochs,
        max_iters=max_iters,
        grad_clip=1.0,
        seed=0,
        hooks=[lr_hook, FGDWarmupHook(model, scale=2.0, warmup_iters=4), ckpt, log],
    )
    return trainer, model, ckpt


def test_schedule_warmup_and_steps() -> None:
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.02)
    s = WarmupMultiStepSchedule(
        opt, milestones=[10, 20], gamma=0.1, warmup_iters=5, warmup_factor=0.001
    )
    assert s.set_iteration(0) == pytest.approx(0.02 * 0.001)
    assert s.factor(5) == pytest.approx(1.0)
    assert s.factor(9) == pytest.approx(1.0)
    assert s.factor(10) == pytest.approx(0.1)
    assert s.set_iteration(25) == pytest.approx(0.02 * 0.01)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.0002)


def test_train_runs_logs_and_checkpoints(tmp_path: Path) -> None:
    trainer, model, _ = make_trainer(tmp_path)
    trainer.train()
    assert trainer.iter == 9 and trainer.epoch == 3
    assert model.fgd_weight_scale == pytest.approx(2.0)
    records = [json.loads(x) for x in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["iter"] for r in records] == [2, 4, 6, 8, 9]
    first = records[0]
    assert first["type"] == "train" and first["epoch"] == 1
    assert set(first["losses"]) == {"classification", "bbox_regression"}
    assert first["loss"] == pytest.approx(sum(first["losses"].values()))
    assert records[-1]["lr"] == pytest.approx(0.1 * 0.01)
    ckpt = load_checkpoint(tmp_path / "last.pt")
    assert ckpt["iter"] == 9 and ckpt["epoch"] == 3 and ckpt["epoch_iter"] == 0
    assert torch.equal(ckpt["model"]["head.weight"], model.head.weight)


@pytest.mark.parametrize("stop_at", [4, 6])  # mid-epoch and at an epoch boundary
def test_resume_gives_the_same_weights(tmp_path: Path, stop_at: int) -> None:
    straight, model_a, _ = make_trainer(tmp_path / "a")
    straight.train()

    first, _, _ = make_trainer(tmp_path / "b", max_iters=stop_at)
    first.train()
    ckpt = load_checkpoint(tmp_path / "b" / "last.pt")
    assert ckpt["iter"] == stop_at

    # A fresh process would start with other random states: scramble them.
    torch.manual_seed(1234)
    resumed, model_b, _ = make_trainer(tmp_path / "b")
    model_b.load_state_dict(ckpt["model"])
    resumed.load_state_dict(ckpt)
    resumed.train()
    assert resumed.iter == 9
    for (name, a), b in zip(
        model_a.state_dict().items(), model_b.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b), name
    # The log is continuous: no duplicated iterations after the resume.
    iters = [json.loads(x)["iter"] for x in (tmp_path / "b" / "log.jsonl").read_text().splitlines()]
    assert iters == sorted(set(iters))


def test_an_iteration_checkpoint_on_an_epochs_last_step_starts_the_next_epoch(
    tmp_path: Path,
) -> None:
    trainer, _, ckpt_hook = make_trainer(tmp_path, max_iters=4)
    ckpt_hook.interval, ckpt_hook.every_iters = 0, 3  # 3 iterations per epoch
    saved: list[tuple[int, int, int]] = []
    save = ckpt_hook.save

    def recording_save(name: str = "last.pt") -> None:
        saved.append((trainer.iter, trainer.epoch, trainer.epoch_iter))
        save(name)

    ckpt_hook.save = recording_save  # type: ignore[method-assign]
    trainer.train()
    # iteration 3 ends epoch 1: written as epoch 1 done, not as epoch 0 with 3 steps to replay;
    # iteration 4 by the end of training
    assert saved == [(3, 1, 0), (4, 1, 1)]


def test_a_resumed_rank_takes_its_own_random_states(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fgdistill.engine import distributed as du

    first, _, _ = make_trainer(tmp_path, max_iters=2)
    first.train()
    ckpt = dict(load_checkpoint(tmp_path / "last.pt"))
    ckpt["rng_per_rank"] = [{"rank": 0}, {"rank": 1}]
    resumed, _, _ = make_trainer(tmp_path)
    monkeypatch.setattr(du, "get_rank", lambda: 1)
    monkeypatch.setattr(du, "get_world_size", lambda: 2)
    resumed.load_state_dict(ckpt)
    assert resumed._resume_rng == {"rank": 1}
    # another number of processes than saved it: rank 0's states, as before
    monkeypatch.setattr(du, "get_world_size", lambda: 4)
    resumed.load_state_dict(ckpt)
    assert resumed._resume_rng is ckpt["rng"]


def test_resuming_with_other_parameters_names_the_optimizer(tmp_path: Path) -> None:
    first, _, _ = make_trainer(tmp_path, max_iters=2)
    first.train()
    ckpt = load_checkpoint(tmp_path / "last.pt")
    # e.g. model.trainable_layers changed: the optimizer has another number of parameters
    other = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1, momentum=0.9)
    resumed, _, _ = make_trainer(tmp_path)
    resumed.optimizer = other
    with pytest.raises(CheckpointError, match=r"resume: the checkpoint's optimizer state"):
        resumed.load_state_dict(ckpt)


def test_non_finite_loss_stops_and_keeps_last_checkpoint(tmp_path: Path) -> None:
    trainer, _, _ = make_trainer(tmp_path, bad_at=5)
    with pytest.raises(NonFiniteLossError, match=r"iteration 5.*bbox_regression=nan"):
        trainer.train()
    ckpt = load_checkpoint(tmp_path / "last.pt")
    assert ckpt["iter"] == 3  # written at the end of epoch 1, untouched by the failure
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values())


def test_eval_hook_keeps_best(tmp_path: Path) -> None:
    scores = iter([10.0, 30.0, 20.0])
    trainer, _, ckpt_hook = make_trainer(tmp_path)
    seen: list[float] = []

    def eval_fn() -> dict[str, dict[str, float]]:
        value = next(scores)
        seen.append(value)
        return {"bbox": {"AP": value}}

    hook = EvalHook(eval_fn, interval=1, checkpoint_hook=ckpt_hook)
    trainer.hooks.insert(2, hook)
    hook.trainer = trainer
    trainer.train()
    assert seen == [10.0, 30.0, 20.0]
    assert trainer.best_metric == 30.0
    assert load_checkpoint(tmp_path / "best.pt")["iter"] == 6
    assert load_checkpoint(tmp_path / "last.pt")["iter"] == 9  # best.pt does not replace last.pt


def test_hook_order_and_calls(tmp_path: Path) -> None:
    calls: list[str] = []

    class Recorder(HookBase):
        def before_train(self) -> None:
            calls.append("bt")

        def after_epoch(self) -> None:
            calls.append(f"ae{self.trainer.epoch}")

        def after_train(self) -> None:
            calls.append("at")

    trainer, _, _ = make_trainer(tmp_path, max_iters=4)
    trainer.register(Recorder())
    trainer.train()
    assert calls == ["bt", "ae1", "at"]


# -- what survives what ---------------------------------------------------------------------------


def _with_eval(
    tmp_path: Path, eval_fn: Any, **kwargs: Any
) -> tuple[Trainer, CheckpointHook, EvalHook, LoggerHook]:
    trainer, _, ckpt_hook = make_trainer(tmp_path, **kwargs)
    log_hook = next(h for h in trainer.hooks if isinstance(h, LoggerHook))
    hook = EvalHook(
        eval_fn,
        interval=1,
        checkpoint_hook=ckpt_hook,
        on_result=log_hook.log_eval,
        previous=log_hook.logged_eval,
    )
    trainer.hooks.insert(2, hook)  # before the checkpoint hook, as the runner orders them
    hook.trainer = trainer
    return trainer, ckpt_hook, hook, log_hook


def test_last_pt_is_written_before_each_evaluation(tmp_path: Path) -> None:
    seen: list[int] = []

    def eval_fn() -> dict[str, dict[str, float]]:
        seen.append(load_checkpoint(tmp_path / "last.pt")["iter"])
        return {"bbox": {"AP": float(len(seen))}}  # improves every time

    trainer, _, _, _ = _with_eval(tmp_path, eval_fn)
    trainer.train()
    assert seen == [3, 6, 9]
    # re-written after an improving evaluation: it carries the best metric for a resume
    assert load_checkpoint(tmp_path / "last.pt")["best_metric"] == 3.0


def test_a_failing_final_evaluation_keeps_the_trained_weights(tmp_path: Path) -> None:
    exported: list[int] = []

    def eval_fn() -> dict[str, dict[str, float]]:
        if len(exported):
            raise RuntimeError("Expected more than 1 value per channel")
        return {"bbox": {"AP": 1.0}}

    trainer, ckpt_hook, _, _ = _with_eval(tmp_path, eval_fn, max_iters=5)
    ckpt_hook.on_finished = lambda: exported.append(trainer.iter)
    with pytest.raises(RuntimeError, match="more than 1 value"):
        trainer.train()
    assert exported == [5]  # the trained weights were written before the evaluation
    assert load_checkpoint(tmp_path / "last.pt")["iter"] == 5


def test_a_failing_mid_run_evaluation_saves_last_pt(tmp_path: Path) -> None:
    def eval_fn() -> dict[str, dict[str, float]]:
        raise OSError("a bad validation image")

    trainer, ckpt_hook, _, _ = _with_eval(tmp_path, eval_fn)
    ckpt_hook.interval = 0  # no periodic checkpoints: only the one the failure writes
    with pytest.raises(OSError, match="bad validation image"):
        trainer.train()
    assert load_checkpoint(tmp_path / "last.pt")["iter"] == 3


def test_resuming_a_finished_run_does_not_evaluate_or_log_again(tmp_path: Path) -> None:
    calls: list[int] = []

    def eval_fn() -> dict[str, dict[str, float]]:
        calls.append(1)
        return {"bbox": {"AP": 5.0}}

    first, _, _, _ = _with_eval(tmp_path, eval_fn, max_iters=4)
    first.train()
    ckpt = load_checkpoint(tmp_path / "last.pt")
    for _ in range(2):
        again, _, hook, _ = _with_eval(tmp_path, eval_fn, max_iters=4)
        again.load_state_dict(ckpt)
        again.train()
        assert hook.results == {"bbox": {"AP": 5.0}}
    assert len(calls) == 2  # epoch 1 and the end of the first run, never again
    records = [json.loads(x) for x in (tmp_path / "log.jsonl").read_text().splitlines()]
    evals = [r["iter"] for r in records if r["type"] == "eval"]
    assert evals == [3, 4]


class PoisonHook(HookBase):
    """Makes a weight NaN after a given step, as an infinite learning rate would."""

    def __init__(self, model: nn.Module, at: int) -> None:
        self.model, self.at = model, at

    def after_step(self) -> None:
        if self.trainer.iter == self.at:
            with torch.no_grad():
                self.model.head.weight[0, 0] = float("nan")  # type: ignore[index]


def test_non_finite_weights_are_never_checkpointed(tmp_path: Path) -> None:
    trainer, model, _ = make_trainer(tmp_path)
    trainer.hooks.insert(0, PoisonHook(model, at=6))
    trainer.hooks[0].trainer = trainer
    with pytest.raises(NonFiniteLossError, match=r"iteration 6.*last\.pt, iteration 3\) is kept"):
        trainer.train()
    ckpt = load_checkpoint(tmp_path / "last.pt")
    assert ckpt["iter"] == 3
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values())


def test_non_finite_weights_before_any_checkpoint_write_nothing(tmp_path: Path) -> None:
    trainer, model, _ = make_trainer(tmp_path, max_iters=1)
    trainer.hooks.insert(0, PoisonHook(model, at=1))
    trainer.hooks[0].trainer = trainer
    with pytest.raises(NonFiniteLossError, match="no checkpoint had been written yet"):
        trainer.train()
    assert not (tmp_path / "last.pt").exists()


def test_a_bad_batch_saves_the_iterations_done(tmp_path: Path) -> None:
    from fgdistill.errors import DataError

    trainer, _, ckpt_hook = make_trainer(tmp_path)
    ckpt_hook.interval = 0
    good = trainer.loader_fn

    def loader_fn(epoch: int) -> Any:
        for i, batch in enumerate(good(epoch)):
            if epoch == 1 and i == 1:
                raise DataError("img.png: image does not decode")
            yield batch

    trainer.loader_fn = loader_fn
    with pytest.raises(DataError, match=r"img\.png"):
        trainer.train()
    assert load_checkpoint(tmp_path / "last.pt")["iter"] == 4


def test_resuming_with_another_optimizer_is_a_checkpoint_error(tmp_path: Path) -> None:
    first, model, _ = make_trainer(tmp_path, max_iters=2)
    first.train()
    ckpt = load_checkpoint(tmp_path / "last.pt")
    resumed, model, _ = make_trainer(tmp_path)
    resumed.optimizer = build_optimizer(model.parameters(), name="adamw", lr=0.1)
    with pytest.raises(CheckpointError, match=r"not of a AdamW \(it has no 'betas'"):
        resumed.load_state_dict(ckpt)
    ckpt["optimizer"] = None  # what the runner passes when the change is allowed
    resumed.load_state_dict(ckpt)
    assert resumed.iter == 2


def test_adamw_is_fused_on_the_cpu_and_matches_the_loop_implementation() -> None:
    def net() -> nn.Module:
        return nn.Sequential(nn.Conv2d(3, 8, 3), nn.GroupNorm(2, 8), nn.Conv2d(8, 4, 1))

    torch.manual_seed(0)
    reference, fused_model = net(), net()
    fused_model.load_state_dict(reference.state_dict())
    start = {k: v.clone() for k, v in reference.state_dict().items()}

    def groups(model: nn.Module) -> list[dict[str, Any]]:
        decay = [p for n, p in model.named_parameters() if n.endswith("weight")]
        no_decay = [p for n, p in model.named_parameters() if n.endswith("bias")]
        return [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]

    fused = build_optimizer(groups(fused_model), name="adamw", lr=1e-2, weight_decay=0.05)
    looped = torch.optim.AdamW(groups(reference), lr=1e-2, weight_decay=0.05)
    assert fused.defaults["fused"] is True
    assert not looped.defaults["fused"]
    for step in range(5):
        x = torch.randn(2, 3, 9, 9, generator=torch.Generator().manual_seed(step))
        for model, opt in ((reference, looped), (fused_model, fused)):
            opt.zero_grad()
            model(x).square().mean().backward()
            opt.step()
    trained = fused_model.state_dict()
    for name, value in reference.state_dict().items():
        assert not torch.equal(value, start[name]), name  # five steps moved every tensor
        torch.testing.assert_close(trained[name], value, rtol=1e-5, atol=1e-6, msg=name)
