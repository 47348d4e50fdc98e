"""Seeded data loaders for detection datasets.

Reproducibility: the loader's shuffling uses its own ``torch.Generator`` seeded with ``seed``; each
worker's torch RNG is seeded by PyTorch from that generator and :func:`seed_worker` derives
numpy's and ``random``'s seeds from it, so augmentations repeat run to run for a given
``num_workers``. With ``num_workers=0`` the augmentations draw from the main process's torch RNG:
seed it (``torch.manual_seed``) for repeatable flips; the order still comes from ``seed``.

Distributed runs: with ``distributed=True`` a :class:`~torch.utils.data.DistributedSampler` splits
the data across ranks. The caller must call ``loader.sampler.set_epoch(epoch)`` at the start of
every epoch, otherwise every epoch sees the same order.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from fgdistill.data.coco import Target

__all__ = ["build_loader", "detection_collate", "seed_worker"]


def detection_collate(
    batch: Sequence[tuple[Tensor, Target]],
) -> tuple[list[Tensor], list[Target]]:
    """Keep images and targets as lists: images differ in size, targets in box count.

    Returns:
        ``(images, targets)``: ``images[i]`` Tensor[3, H_i, W_i], ``targets[i]`` its dict,
        the input form torchvision's detectors take.
    """
    images = [item[0] for item in batch]
    targets = [item[1] for item in batch]
    return images, targets


def seed_worker(worker_id: int) -> None:
    """``worker_init_fn``: seed numpy and ``random`` from the worker's torch seed."""
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def build_loader(
    dataset: Dataset[Any],
    *,
    batch_size: int,
    train: bool,
    num_workers: int = 0,
    seed: int = 0,
    distributed: bool = False,
    drop_last: bool = False,
    pin_memory: bool = False,
) -> DataLoader[Any]:
    """A seeded detection DataLoader yielding ``(list[image], list[target])`` batches.

    Args:
        dataset: a map-style dataset of ``(image, target)`` pairs.
        batch_size: images per batch (per process when distributed).
        train: shuffle (seeded) when True; keep dataset order when False.
        num_workers: worker processes; workers are persistent when > 0.
        seed: seeds the shuffling generator, the workers' RNGs and the distributed sampler.
        distributed: use a ``DistributedSampler`` (``torch.distributed`` must be initialised).
            Call ``loader.sampler.set_epoch(epoch)`` every epoch.
        drop_last: drop the last incomplete batch.
        pin_memory: pin host memory (useful with CUDA).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if num_workers < 0:
        raise ValueError(f"num_workers must be >= 0, got {num_workers}")
    generator = torch.Generator()
    generator.manual_seed(seed)
    sampler: DistributedSampler[Any] | None = None
    if distributed:
        sampler = DistributedSampler(dataset, shuffle=train, seed=seed, drop_last=drop_last)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=train if sampler is None else False,
        sampler=sampler,
        num_workers=num_workers,
        collate_fn=detection_collate,
        worker_init_fn=seed_worker if num_workers > 0 else None,
        generator=generator,
        drop_last=drop_last,
        persistent_workers=num_workers > 0,
        pin_memory=pin_memory,
    )
