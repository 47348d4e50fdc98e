"""Shared fixtures for the whole test suite."""

from __future__ import annotations

from pathlib import Path

import pytest

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
