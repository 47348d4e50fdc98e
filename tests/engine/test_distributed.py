"""Two gloo processes on CPU train a few iterations with DDP, then evaluate across ranks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import yaml
from torch import nn

from fgdistill.cli.main import main
from fgdistill.engine import distributed as du

TINY = {
    "model": {
        "arch": "retinanet",
        "backbone": "resnet18",
        "fpn_channels": 32,
        "min_size": 96,
        "max_size": 96,
        "anchor_sizes": [8, 16, 32, 64, 128],
    },
    "data": {
        "train_ann": "annotations/instances_train.json",
        "train_images": "train",
        "val_ann": "annotations/instances_val.json",
        "val_images": "val",
        "batch_size": 2,
        "eval_batch_size": 1,
        "num_workers": 0,
    },
    "optim": {"lr": 0.01, "base_batch_size": 4, "warmup_iters": 1, "epochs": 1, "milestones": []},
    "device": "cpu",
    "log_interval": 1,
}


def test_single_process_helpers() -> None:
    assert du.get_rank() == 0 and du.get_world_size() == 1 and du.is_main()
    assert not du.is_distributed()
    assert du.all_gather_object({"a": 1}) == [{"a": 1}]
    assert du.reduce_mean({"x": 2.0}) == {"x": 2.0}
    du.barrier()  # no-op without a process group


def test_collectives_use_the_backends_device(monkeypatch: pytest.MonkeyPatch) -> None:
    assert du.collective_device() == torch.device("cpu")
    monkeypatch.setattr(du, "is_distributed", lambda: True)
    monkeypatch.setattr(du, "get_world_size", lambda: 2)
    monkeypatch.setattr(dist, "get_backend", lambda *a, **k: "nccl")
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    # NCCL reduces CUDA tensors only: a CPU tensor fails there at the first log line
    assert du.collective_device() == torch.device("cuda", 3)
    monkeypatch.setattr(dist, "get_backend", lambda *a, **k: "gloo")
    assert du.collective_device() == torch.device("cpu")

    seen: list[torch.Tensor] = []

    def fake_all_reduce(t: torch.Tensor) -> None:
        seen.append(t)
        t *= 2  # the other rank sent the same values

    monkeypatch.setattr(dist, "all_reduce", fake_all_reduce)
    asked: list[str] = []

    def device() -> torch.device:
        asked.append("device")
        return torch.device("cpu")

    monkeypatch.setattr(du, "collective_device", device)
    assert du.reduce_mean({"b": 3.0, "a": 1.0}) == {"a": 1.0, "b": 3.0}
    assert asked == ["device"]  # the tensor is made where the backend reduces
    assert len(seen) == 1 and seen[0].dtype == torch.float64


@pytest.mark.slow
def test_two_process_gloo_training_and_gathered_eval(
    synth_dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = json.loads(json.dumps(TINY))
    data["data"]["root"] = str(synth_dataset)
    cfg = tmp_path / "ddp.yaml"
    cfg.write_text(yaml.safe_dump(data))
    work = tmp_path / "ddp"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("RANK", None)
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "fgdistill.cli.main",
        "train",
        str(cfg),
        "--work-dir",
        str(work),
        "--no-progress",
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    # Only rank 0 prints and writes.
    assert proc.stdout.count("outputs in") == 1
    metrics = json.loads((work / "metrics.json").read_text())
    assert metrics["world_size"] == 2
    # 8 images, 2 per rank and step, 2 ranks: 2 iterations per epoch.
    assert metrics["iterations"] == 2
    records = [json.loads(x) for x in (work / "log.jsonl").read_text().splitlines()]
    assert [r["iter"] for r in records if r["type"] == "train"] == [1, 2]
    evals = [r for r in records if r["type"] == "eval"]
    assert len(evals) == 1
    # Each rank's random states are kept, so that a resumed rank goes on with its own draws.
    from fgdistill.models.checkpoint import load_checkpoint

    states = load_checkpoint(work / "last.pt")["rng_per_rank"]
    assert len(states) == 2 and not torch.equal(states[0]["torch"], states[1]["torch"])
    # The evaluation in the run (each rank scored half of the 4 images) equals a single-process
    # evaluation of the same weights (test_gathered_evaluation checks the gathering itself).
    single = tmp_path / "single"
    code = main(
        [
            "eval",
            str(cfg),
            "--checkpoint",
            str(work / "model.pt"),
            "--work-dir",
            str(single),
            "--no-progress",
        ]
    )
    assert code == 0
    alone = json.loads((single / "eval_metrics.json").read_text())["metrics"]["bbox"]
    gathered = evals[0]["metrics"]["bbox"]
    for key in ("AP", "AP50", "AP75", "AR100"):
        assert gathered[key] == pytest.approx(alone[key], abs=1e-6, nan_ok=True), key


class Oracle(nn.Module):
    """Detects the ground truth exactly on odd image ids and nothing on even ones."""

    def __init__(self, dataset: object) -> None:
        super().__init__()
        self.answers: dict[float, dict[str, torch.Tensor]] = {}
        for i in range(len(dataset)):  # type: ignore[arg-type]
            image, target = dataset[i]  # type: ignore[index]
            keep = target["image_id"] % 2 == 1
            n = len(target["boxes"]) if keep else 0
            self.answers[round(float(image.sum()), 2)] = {
                "boxes": target["boxes"][:n],
                "labels": target["labels"][:n],
                "scores": torch.ones(n),
            }

    def forward(self, images: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        return [self.answers[round(float(img.sum()), 2)] for img in images]


def _eval_worker(rank: int, root: str, port: int, out: str) -> None:
    from fgdistill.data.coco import CocoDetection
    from fgdistill.engine.inference import evaluate_model

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        ds = CocoDetection(f"{root}/annotations/instances_val.json", f"{root}/val")
        metrics = evaluate_model(Oracle(ds), ds, batch_size=1, progress=False)
        Path(out, f"rank{rank}.json").write_text(json.dumps(metrics))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.slow
def test_gathered_evaluation(synth_dataset: Path, tmp_path: Path) -> None:
    from fgdistill.data.coco import CocoDetection
    from fgdistill.engine.inference import evaluate_model

    mp.spawn(
        _eval_worker, args=(str(synth_dataset), _free_port(), str(tmp_path)), nprocs=2, join=True
    )
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0] == ranks[1]  # every rank returns the metrics of all images
    ds = CocoDetection(synth_dataset / "annotations/instances_val.json", synth_dataset / "val")
    alone = evaluate_model(Oracle(ds), ds, batch_size=1, progress=False)["bbox"]
    gathered = ranks[0]["bbox"]
    # Half the images perfectly found, half missed: recall is neither 0 nor 100, and only the
    # union of both ranks' images gives the single-process numbers.
    assert 0 < alone["AR100"] < 100
    for key in ("AP", "AP50", "AR100"):
        assert gathered[key] == pytest.approx(alone[key], abs=1e-9), key
