"""Checkpoints: atomic writes, ``weights_only`` reads, random-state capture, detector rebuild.

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

Everything in it is tensors, lists, dicts and scalars, so ``torch.load(weights_only=True)``
reads it; nothing else is ever used to read a checkpoint. A plain detector state dict
(``model.pt``, ``student.pt``) comes with ``model.yaml`` beside it holding the build kwargs, so
:func:`load_detector` can rebuild the model from either form.
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
import yaml
from torch import nn

from fgdistill.errors import CheckpointError
from fgdistill.io import atomic_write, atomic_write_text

__all__ = [
    "CHECKPOINT_FORMAT",
    "capture_rng_state",
    "find_model_spec",
    "load_checkpoint",
    "load_detector",
    "restore_rng_state",
    "save_checkpoint",
    "save_model_spec",
    "state_dict_of",
]

logger = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "fgdistill-checkpoint"


def save_checkpoint(obj: Mapping[str, Any], path: str | Path) -> Path:
    """Write ``obj`` with :func:`torch.save` atomically.

    The data goes to a temporary file in the same folder, is flushed and fsync'ed, then renamed
    over ``path`` with :func:`os.replace`; a crash leaves either the old file or the new one,
    never a truncated one.
    """
    data = dict(obj)
    return atomic_write(path, lambda fh: torch.save(data, fh), fsync=True)


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint with ``torch.load(weights_only=True)``.

    Raises:
        CheckpointError: if the file is missing, is not a readable checkpoint (truncated,
            corrupt, or holding non-tensor objects), or is not a mapping.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: checkpoint not found")
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint is not a file")
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises many types for corrupt files
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(
            f"{path}: cannot read checkpoint (corrupt, truncated or not a weights-only "
            f"PyTorch file): {first}"
        ) from None
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path}: expected a dict, got {type(obj).__name__}")
    return dict(obj)


def state_dict_of(checkpoint: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """The detector state dict inside a training checkpoint, or the checkpoint itself if plain."""
    if checkpoint.get("format") == CHECKPOINT_FORMAT or (
        "model" in checkpoint and isinstance(checkpoint["model"], Mapping)
    ):
        return dict(checkpoint["model"])
    return dict(checkpoint)


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


def save_model_spec(spec: Mapping[str, Any], path: str | Path) -> Path:
    """Write a detector's build kwargs (``model.fgdistill_spec``) as YAML (``model.yaml``)."""
    return atomic_write_text(path, yaml.safe_dump(_plain(spec), sort_keys=False))


def _plain(obj: Any) -> Any:
    """Convert tuples to lists recursively so that YAML and weights-only pickles stay plain."""
    if isinstance(obj, Mapping):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_plain(v) for v in obj]
    if isinstance(obj, str | int | float | bool) or obj is None:
        return obj
    return str(obj)


def find_model_spec(path: str | Path, checkpoint: Mapping[str, Any] | None = None) -> dict:
    """Find the build kwargs of the detector stored at ``path``.

    Looks, in order, for ``model_spec`` inside the checkpoint, ``model.yaml`` beside it, and the
    ``model`` section of a ``config.yaml`` beside it (a resolved training config; its
    ``num_classes`` must be set).

    Raises:
        CheckpointError: if none of them is found.
    """
    path = Path(path)
    if checkpoint is not None and isinstance(checkpoint.get("model_spec"), Mapping):
        return dict(checkpoint["model_spec"])
    spec_file = path.parent / "model.yaml"
    if spec_file.is_file():
        data = yaml.safe_load(spec_file.read_text(encoding="utf-8"))
        if isinstance(data, dict) and "arch" in data:
            return data
        raise CheckpointError(f"{spec_file}: expected a mapping with an 'arch' key")
    cfg_file = path.parent / "config.yaml"
    if cfg_file.is_file():
        data = yaml.safe_load(cfg_file.read_text(encoding="utf-8"))
        model = data.get("model") if isinstance(data, dict) else None
        if isinstance(model, dict) and model.get("num_classes"):
            from fgdistill.engine.config import ModelConfig, from_mapping

            return model_spec_from_config(from_mapping(ModelConfig, model, "model"))
    raise CheckpointError(
        f"{path}: cannot tell which detector this is: no 'model_spec' inside it and no "
        f"model.yaml or config.yaml (with model.num_classes) beside it"
    )


def model_spec_from_config(model_cfg: Any) -> dict[str, Any]:
    """Build kwargs for :func:`fgdistill.models.build_detector` from a ``ModelConfig``."""
    spec: dict[str, Any] = {
        "arch": model_cfg.arch,
        "backbone": model_cfg.backbone,
        "num_classes": model_cfg.num_classes,
        "fpn_channels": model_cfg.fpn_channels,
        "min_size": model_cfg.min_size,
        "max_size": model_cfg.max_size,
        "weights": model_cfg.weights,
        "weights_backbone": model_cfg.weights_backbone,
        "trainable_layers": model_cfg.trainable_layers,
        "frozen_bn": model_cfg.frozen_bn,
        "head_norm": model_cfg.head_norm,
    }
    if model_cfg.anchor_sizes is not None:
        spec["anchor_sizes"] = list(model_cfg.anchor_sizes)
    spec.update(model_cfg.extra)
    return spec


def build_from_spec(spec: Mapping[str, Any], *, pretrained: bool = False) -> nn.Module:
    """Build a detector from its build kwargs.

    With ``pretrained=False`` (the default, used when weights are loaded right after) the
    ``weights`` and ``weights_backbone`` entries are dropped so nothing is downloaded. An option
    the detector does not take (recorded by an older version, which ignored it as torchvision
    does) is left out with a warning: the model it describes was built without it.
    """
    import inspect

    from fgdistill.models.build import ARCHS, build_detector, detector_options

    kwargs = dict(spec)
    arch = kwargs.pop("arch", None)
    if not arch:
        raise CheckpointError("model spec has no 'arch'")
    if not pretrained:
        kwargs["weights"] = None
        kwargs["weights_backbone"] = None
    if arch in ARCHS:
        known = set(inspect.signature(build_detector).parameters) | detector_options(arch)
        ignored = sorted(set(kwargs) - known)
        if ignored:
            logger.warning("model spec: leaving out %s, which %s does not take", ignored, arch)
            for key in ignored:
                del kwargs[key]
    return build_detector(arch, **kwargs)


def load_detector(
    checkpoint_path: str | Path, map_location: str | torch.device = "cpu"
) -> nn.Module:
    """Rebuild a detector from a checkpoint and load its weights; returned in eval mode.

    Accepts a training checkpoint (``last.pt``, ``best.pt``), or a plain state dict
    (``model.pt``, ``student.pt``) with ``model.yaml`` or ``config.yaml`` beside it. For a
    distillation checkpoint this is the student.

    Raises:
        CheckpointError: if the file is missing or corrupt, the model cannot be identified, or
            the weights do not fit the rebuilt model.
    """
    from fgdistill.models.build import load_state_dict_checked

    path = Path(checkpoint_path)
    ckpt = load_checkpoint(path, map_location=map_location)
    spec = find_model_spec(path, ckpt)
    model = build_from_spec(spec)
    load_state_dict_checked(model, state_dict_of(ckpt), source=str(path), strict=True)
    model.eval()
    return model
