"""Seeded detection loaders."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch.utils.data import DistributedSampler

from fgdistill.data.coco import CocoDetection
from fgdistill.data.loader import build_loader, detection_collate
from fgdistill.data.transforms import RandomHorizontalFlip


@pytest.fixture
def train_set(synth_dataset: Path) -> CocoDetection:
    return CocoDetection(
        synth_dataset / "annotations" / "instances_train.json",
        synth_dataset / "train",
        train=True,
        transforms=RandomHorizontalFlip(0.5),
    )


def _epoch(loader: torch.utils.data.DataLoader) -> list[tuple[int, float]]:
    """(image id, first box x0) per item: shows both the order and the flips."""
    seen = []
    for images, targets in loader:
        assert isinstance(images, list) and isinstance(targets, list)
        assert len(images) == len(targets)
        for image, target in zip(images, targets, strict=True):
            assert image.shape[0] == 3
            seen.append((target["image_id"], round(float(target["boxes"][0, 0]), 3)))
    return seen


def test_collate_keeps_lists() -> None:
    a = (torch.zeros(3, 4, 5), {"image_id": 1})
    b = (torch.zeros(3, 6, 2), {"image_id": 2})
    images, targets = detection_collate([a, b])
    assert [i.shape[1] for i in images] == [4, 6]
    assert [t["image_id"] for t in targets] == [1, 2]


def test_train_loader_is_seeded(train_set: CocoDetection) -> None:
    def run(seed: int, global_seed: int = 0) -> list[tuple[int, float]]:
        # without workers the flips draw from the main process's torch RNG
        torch.manual_seed(global_seed)
        return _epoch(build_loader(train_set, batch_size=3, train=True, seed=seed))

    first = run(5)
    assert first == run(5)
    assert [i for i, _ in first] != [i for i, _ in run(6)]
    assert [i for i, _ in first] == [i for i, _ in run(5, global_seed=1)]
    assert sorted(i for i, _ in first) == sorted(train_set.image_ids)


def test_eval_loader_keeps_order(synth_dataset: Path) -> None:
    ds = CocoDetection(synth_dataset / "annotations" / "instances_val.json", synth_dataset / "val")
    loader = build_loader(ds, batch_size=3, train=False, drop_last=False)
    assert [i for i, _ in _epoch(loader)] == ds.image_ids


def test_workers_are_seeded(train_set: CocoDetection) -> None:
    kwargs = {"batch_size": 2, "train": True, "seed": 3, "num_workers": 2}
    loader = build_loader(train_set, **kwargs)
    assert loader.persistent_workers
    assert _epoch(loader) == _epoch(build_loader(train_set, **kwargs))


def test_distributed_sampler(train_set: CocoDetection, tmp_path: Path) -> None:
    dist.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1
    )
    try:
        loader = build_loader(train_set, batch_size=2, train=True, seed=1, distributed=True)
        assert isinstance(loader.sampler, DistributedSampler)
        loader.sampler.set_epoch(0)
        epoch0 = _epoch(loader)
        loader.sampler.set_epoch(1)
        epoch1 = _epoch(loader)
        assert sorted(i for i, _ in epoch0) == sorted(train_set.image_ids)
        assert [i for i, _ in epoch0] != [i for i, _ in epoch1]
    finally:
        dist.destroy_process_group()


def test_bad_arguments(train_set: CocoDetection) -> None:
    with pytest.raises(ValueError, match="batch_size"):
        build_loader(train_set, batch_size=0, train=True)
