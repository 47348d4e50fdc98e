"""Training checkpoints: atomic saves and random states that survive a weights-only read."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from fgdistill.engine.checkpoint import capture_rng_state, restore_rng_state, save_checkpoint
from fgdistill.models.checkpoint import load_checkpoint


def test_rng_state_roundtrip_through_weights_only_checkpoint(tmp_path: Path) -> None:
    import random

    import numpy as np

    torch.manual_seed(3)
    np.random.seed(3)
    random.seed(3)
    state = capture_rng_state()
    expected = (torch.rand(3), np.random.rand(3), random.random())
    path = save_checkpoint({"rng": state}, tmp_path / "rng.pt")
    torch.manual_seed(99)
    np.random.seed(99)
    random.seed(99)
    restore_rng_state(load_checkpoint(path)["rng"])
    assert torch.equal(torch.rand(3), expected[0])
    assert np.array_equal(np.random.rand(3), expected[1])
    assert random.random() == expected[2]


def test_atomic_save_leaves_old_file_on_failure(tmp_path: Path) -> None:
    path = save_checkpoint({"w": torch.ones(2)}, tmp_path / "last.pt")

    class Unpicklable:
        def __reduce__(self) -> Any:
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        save_checkpoint({"w": Unpicklable()}, path)
    assert torch.equal(load_checkpoint(path)["w"], torch.ones(2))
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # no temporary left behind
