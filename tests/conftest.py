"""Shared fixtures for the whole test suite."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

from fgdistill.data.synth import generate_synthetic


@pytest.fixture(scope="session")
def synth_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny synthetic COCO-format dataset, generated once per test session.

    Returns the root folder holding ``train/`` (8 images), ``val/`` (4 images), both 96x96, and
    ``annotations/instances_train.json`` / ``instances_val.json`` (8 categories, RLE masks).
    Treat it as read-only: other tests share it.
    """
    root = tmp_path_factory.mktemp("synth")
    generate_synthetic(root, num_train=8, num_val=4, image_size=96, seed=0)
    return root


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Run a test's tiny models single-threaded: on a shared 2-core machine that is several times
    faster than two threads fighting over the cores, and the results do not change."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_plan() -> Callable[[str], list[str]]:
    """``--set`` items that shrink a benchmark plan (``demo``, ``bench quality``) to seconds.

    Called with the family whose teacher and students to shrink: 8 + 4 images, no held-out set,
    a 32-channel FPN without GroupNorm, batches of 4, a ResNet-18 teacher, one epoch each.
    """

    def sets(family: str) -> list[str]:
        fam = f"families.{family}"
        return [
            "synth.num_train=8",
            "synth.num_val=4",
            "heldout.images=0",
            "common.model.fpn_channels=32",
            "common.model.head_norm=null",
            "common.data.batch_size=4",
            "common.log_interval=1",
            "common.optim.warmup_iters=1",
            f"{fam}.teacher.model.backbone=resnet18",
            f"{fam}.teacher.optim.epochs=1",
            f"{fam}.teacher.optim.milestones=[]",
            f"{fam}.student.optim.epochs=1",
            f"{fam}.student.optim.milestones=[]",
            f"{fam}.distill.fgd_warmup_iters=1",
        ]

    return sets
