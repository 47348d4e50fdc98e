"""Training checkpoints: atomic saves and the random states a resumed run restores.

A training checkpoint (``last.pt``, ``best.pt``) is a dict::

    {
      "format": "fgdistill-checkpoint", "version": 1,
      "model": student/detector state dict,
      "distill": state dict of the FGD modules (align convs, context blocks) or absent,
      "optimizer": ..., "scheduler": ..., "scaler": ... (CUDA AMP only),
      "epoch": completed epochs, "iter": completed iterations, "epoch_iter": iterations
      done in the current epoch, "best_metric": float or None,
      "rng": random states of torch, CUDA, numpy and python's random (tensors and lists),
      "config": the resolved config as plain data, "model_spec": the detector's build kwargs,
    }

Everything in it is tensors, lists, dicts and scalars, so
:func:`fgdistill.models.checkpoint.load_checkpoint` (``torch.load(weights_only=True)``) reads
it; :func:`fgdistill.models.load_detector` rebuilds the detector from it.
"""

from __future__ import annotations

import logging
import random
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fgdistill.io import atomic_write

__all__ = [
    "CHECKPOINT_FORMAT",
    "capture_rng_state",
    "restore_rng_state",
    "save_checkpoint",
]

logger = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "fgdistill-checkpoint"


def save_checkpoint(obj: Mapping[str, Any], path: str | Path) -> Path:
    """Write ``obj`` with :func:`torch.save` atomically.

    Through :func:`fgdistill.io.atomic_write` with ``fsync=True``: a crash or a power cut
    leaves either the old file or the new one, never a truncated one.
    """
    data = dict(obj)
    return atomic_write(path, lambda fh: torch.save(data, fh), fsync=True)


def capture_rng_state() -> dict[str, Any]:
    """Random states of torch (CPU and CUDA), numpy and ``random``, as weights-only-safe data."""
    np_state = typing.cast(tuple, np.random.get_state(legacy=True))
    py_state = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "name": str(np_state[0]),
            "keys": torch.from_numpy(np.asarray(np_state[1], dtype=np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "python": {
            "version": int(py_state[0]),
            "state": list(py_state[1]),
            "gauss_next": py_state[2],
        },
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: Mapping[str, Any]) -> None:
    """Restore the states captured by :func:`capture_rng_state`."""
    torch.set_rng_state(state["torch"])
    npst = state["numpy"]
    np.random.set_state(
        (
            npst["name"],
            npst["keys"].numpy().astype(np.uint32),
            int(npst["pos"]),
            int(npst["has_gauss"]),
            float(npst["cached_gaussian"]),
        )
    )
    pyst = state["python"]
    random.setstate(
        (int(pyst["version"]), tuple(int(x) for x in pyst["state"]), pyst["gauss_next"])
    )
    if "cuda" in state and torch.cuda.is_available():
        cuda_states = list(state["cuda"])
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)
