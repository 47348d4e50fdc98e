"""Reading saved detectors: ``torch.load(weights_only=True)`` and the build kwargs beside them.

Every checkpoint fgdistill reads goes through :func:`load_checkpoint`: a training checkpoint
(``last.pt``, ``best.pt``, a dict holding the detector's state dict under ``"model"``), a plain
state dict (``model.pt``, ``student.pt``) or a torchvision-style file (``"state_dict"``). A plain
state dict comes with ``model.yaml`` beside it, the detector's build kwargs
(:func:`save_model_spec`, :func:`find_model_spec`), so that
:func:`fgdistill.models.load_detector` can rebuild the model.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import Tensor

from fgdistill.errors import CheckpointError
from fgdistill.io import atomic_write_text

__all__ = ["find_model_spec", "load_checkpoint", "save_model_spec", "state_dict_of"]

#: ``ModelConfig`` fields that are ``build_detector`` keywords of the same name.
_CONFIG_KEYS = (
    "arch",
    "backbone",
    "num_classes",
    "fpn_channels",
    "min_size",
    "max_size",
    "weights",
    "weights_backbone",
    "trainable_layers",
    "frozen_bn",
    "head_norm",
)


def load_checkpoint(
    path: str | Path, *, map_location: str | torch.device = "cpu"
) -> dict[str, Any]:
    """Read a checkpoint with ``torch.load(weights_only=True)``; the dict it holds.

    Raises:
        CheckpointError: naming the file, if it is missing, is not a readable checkpoint
            (truncated, corrupt, or holding objects other than tensors and plain data), or does
            not hold a dict.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: checkpoint not found")
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint is not a file")
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises many types for corrupt files
        first = _without_unsafe_advice(str(exc)) or type(exc).__name__
        raise CheckpointError(
            f"{path}: cannot read checkpoint (corrupt, truncated or not a weights-only "
            f"PyTorch file): {first}"
        ) from None
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path}: expected a dict, got {type(obj).__name__}")
    return dict(obj)


def state_dict_of(
    checkpoint: Mapping[str, Any], *, source: str = "checkpoint"
) -> dict[str, Tensor]:
    """The detector state dict in a checkpoint read by :func:`load_checkpoint`.

    That under ``"model"`` (a training checkpoint) or ``"state_dict"``, else the checkpoint
    itself (a plain state dict).

    Raises:
        CheckpointError: naming ``source``, when that is empty or not all named tensors.
    """
    state: Mapping[str, Any] = checkpoint
    for key in ("model", "state_dict"):
        if isinstance(checkpoint.get(key), Mapping):
            state = checkpoint[key]
            break
    if not state:
        raise CheckpointError(f"{source}: holds no state dict")
    bad = [str(k) for k, v in state.items() if not isinstance(k, str) or not isinstance(v, Tensor)]
    if bad:
        raise CheckpointError(
            f"{source}: holds no state dict: entries {bad[:10]} are not named tensors"
        )
    return dict(state)


def save_model_spec(spec: Mapping[str, Any], path: str | Path) -> Path:
    """Write a detector's build kwargs (:func:`~fgdistill.models.model_spec`) as YAML."""
    return atomic_write_text(path, yaml.safe_dump(_plain(spec), sort_keys=False))


def find_model_spec(path: str | Path, checkpoint: Mapping[str, Any] | None = None) -> dict:
    """The build kwargs of the detector stored at ``path``.

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
            return _spec_from_model_section(model, cfg_file)
    raise CheckpointError(
        f"{path}: cannot tell which detector this is: no 'model_spec' inside it and no "
        f"model.yaml or config.yaml (with model.num_classes) beside it"
    )


def _spec_from_model_section(model: Mapping[str, Any], source: Path) -> dict[str, Any]:
    """Build kwargs from the ``model`` section of a resolved training config."""
    spec: dict[str, Any] = {"arch": "retinanet"}
    spec.update({k: model[k] for k in _CONFIG_KEYS if k in model})
    if model.get("anchor_sizes") is not None:
        spec["anchor_sizes"] = list(model["anchor_sizes"])
    extra = model.get("extra") or {}
    if not isinstance(extra, Mapping):
        raise CheckpointError(f"{source}: model.extra must be a mapping")
    spec.update(extra)
    return spec


def _plain(obj: Any) -> Any:
    """Tuples to lists, recursively, and anything unusual to ``str``, so YAML stays plain."""
    if isinstance(obj, Mapping):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_plain(v) for v in obj]
    if isinstance(obj, str | int | float | bool) or obj is None:
        return obj
    return str(obj)


def _without_unsafe_advice(message: str) -> str:
    """The reason in torch's load error, without its advice to load unsafely.

    ``torch.load`` suggests retrying with ``weights_only=False`` (or allow-listing globals),
    which would run whatever code the file holds: fgdistill never passes that advice on.
    """
    text = message.replace("\x1b[1m", "").replace("\x1b[0m", "")
    advice = (
        "weights_only",
        "can still be loaded",
        "Check the documentation",
        "Alternatively",
        "trusted source",
        "add_safe_globals",
    )
    for raw in text.splitlines():
        line = raw.strip()
        if "WeightsUnpickler error:" in line:
            line = line.split("WeightsUnpickler error:", 1)[1].split(". Please use", 1)[0]
            return line.strip() + " (the file holds objects other than tensors and plain data)"
        line = line.replace("Weights only load failed.", "").strip()
        if line and not any(word in line for word in advice):
            if "GLOBAL" in line:
                line += " (the file holds objects other than tensors and plain data)"
            return line
    return ""
