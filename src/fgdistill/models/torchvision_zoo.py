"""torchvision's COCO detectors as fgdistill detectors: same layers, same weights, same outputs.

A user who downloaded ``retinanet_resnet50_fpn_v2_coco-5905b1c5.pth`` once turns it into one of
our detectors with :func:`from_torchvision` (or ``fgdistill convert torchvision``): our
:func:`~fgdistill.models.build_detector` with the options that give torchvision's layout
(:func:`torchvision_spec`: P6 from C5, BatchNorm in the FPN, the v2 heads, the frozen BatchNorm's
epsilon of that weights family, the 91-way head), so ``build_detector(**model_spec(model))``
rebuilds it and every command takes it. Its FPN features and detections equal those of
torchvision's own model loaded with the same file.

torchvision's COCO models predict COCO category ids: label ``k`` is category id ``k`` (1..90,
with ids no category has). :func:`coco_categories` is that list in label order, which
``fgdistill convert`` writes to ``categories.json`` beside the model so that evaluation and
prediction read the labels as category ids. Nothing here downloads or unpickles code: the file
is read with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from fgdistill.errors import ConfigError
from fgdistill.io import atomic_write, write_json
from fgdistill.models.build import build_detector, model_spec
from fgdistill.models.checkpoint import load_checkpoint, save_model_spec, state_dict_of
from fgdistill.models.weights import load_state_dict_checked

__all__ = [
    "TORCHVISION_MODELS",
    "coco_categories",
    "convert_torchvision",
    "from_torchvision",
    "torchvision_spec",
]

logger = logging.getLogger(__name__)

_R50 = {"backbone": "resnet50", "num_classes": 91, "fpn_channels": 256, "trainable_layers": 3}
_V1 = {**_R50, "frozen_bn": True, "frozen_bn_eps": 0.0}  # overwrite_eps(model, 0.0)
_V2 = {**_R50, "frozen_bn": False}  # the v2 builders keep BatchNorm2d in the backbone

#: torchvision builder name -> ``build_detector`` kwargs giving the same layers, and the name of
#: the COCO weights the layout belongs to (their BatchNorm epsilon is part of the layout).
TORCHVISION_MODELS: dict[str, tuple[dict[str, Any], str]] = {
    "retinanet_resnet50_fpn": (
        {"arch": "retinanet", **_V1},
        "RetinaNet_ResNet50_FPN_Weights.COCO_V1",
    ),
    "retinanet_resnet50_fpn_v2": (
        {"arch": "retinanet", **_V2, "head_norm": "group", "p6_from": "c5", "box_loss": "giou"},
        "RetinaNet_ResNet50_FPN_V2_Weights.COCO_V1",
    ),
    "fcos_resnet50_fpn": (
        {"arch": "fcos", **_R50, "frozen_bn": True},
        "FCOS_ResNet50_FPN_Weights.COCO_V1",
    ),
    "fasterrcnn_resnet50_fpn": (
        {"arch": "faster_rcnn", **_V1},
        "FasterRCNN_ResNet50_FPN_Weights.COCO_V1",
    ),
    "fasterrcnn_resnet50_fpn_v2": (
        {"arch": "faster_rcnn", **_V2, "fpn_norm": "batch", "head_norm": "batch"},
        "FasterRCNN_ResNet50_FPN_V2_Weights.COCO_V1",
    ),
    "fasterrcnn_mobilenet_v3_large_fpn": (
        {
            "arch": "faster_rcnn",
            "backbone": "mobilenet_v3_large",
            "num_classes": 91,
            "fpn_channels": 256,
            "trainable_layers": 3,
            "frozen_bn": True,
            # torchvision passes FrozenBatchNorm2d as MobileNetV3's norm layer: eps 1e-5, not
            # the 1e-3 MobileNetV3 trains with
            "frozen_bn_eps": 1e-5,
            "returned_layers": [4, 5],
            "anchor_sizes": [[32, 64, 128, 256, 512]] * 3,
            "rpn_score_thresh": 0.05,
        },
        "FasterRCNN_MobileNet_V3_Large_FPN_Weights.COCO_V1",
    ),
    "maskrcnn_resnet50_fpn": (
        {"arch": "mask_rcnn", **_V1},
        "MaskRCNN_ResNet50_FPN_Weights.COCO_V1",
    ),
    "maskrcnn_resnet50_fpn_v2": (
        {"arch": "mask_rcnn", **_V2, "fpn_norm": "batch", "head_norm": "batch"},
        "MaskRCNN_ResNet50_FPN_V2_Weights.COCO_V1",
    ),
}


def _check_name(name: str) -> tuple[dict[str, Any], str]:
    if name not in TORCHVISION_MODELS:
        raise ConfigError(
            f"unknown torchvision detector {name!r}; choose one of {', '.join(TORCHVISION_MODELS)}"
        )
    spec, weights = TORCHVISION_MODELS[name]
    return dict(spec), weights


def torchvision_spec(name: str, **overrides: Any) -> dict[str, Any]:
    """``build_detector`` kwargs of torchvision's COCO detector ``name`` (a new dict).

    ``overrides`` replace or add kwargs (``min_size``, ``score_thresh``, ...; a student built
    in this layout with another ``num_classes`` can start from the COCO file through
    ``weights``, its class-specific layers skipped).

    Raises:
        ConfigError: ``name`` is not one of :data:`TORCHVISION_MODELS`.
    """
    spec, _ = _check_name(name)
    spec.setdefault("min_size", 800)
    spec.setdefault("max_size", 1333)
    spec.update(overrides)
    return spec


def coco_categories() -> list[dict[str, Any]]:
    """The label space of torchvision's COCO detectors, ``[{"id", "name"}]`` in label order.

    Label ``k`` (1..90) is COCO category id ``k``; the ten ids COCO does not use are named
    ``"N/A"``. Read from torchvision's weights metadata (nothing is downloaded).
    """
    from torchvision.models.detection import RetinaNet_ResNet50_FPN_Weights

    names = list(RetinaNet_ResNet50_FPN_Weights.COCO_V1.meta["categories"])
    return [{"id": i, "name": str(n)} for i, n in enumerate(names) if i > 0]


def _state_dict(weights: str | Path | Mapping[str, Tensor]) -> tuple[dict[str, Tensor], str]:
    if isinstance(weights, Mapping):
        return state_dict_of(weights, source="the given state dict"), "the given state dict"
    return state_dict_of(load_checkpoint(weights), source=str(weights)), str(weights)


def from_torchvision(
    name: str, weights: str | Path | Mapping[str, Tensor], **overrides: Any
) -> nn.Module:
    """One of our detectors holding torchvision's COCO detector ``name`` with ``weights``.

    Args:
        name: a key of :data:`TORCHVISION_MODELS`, e.g. ``"retinanet_resnet50_fpn_v2"``.
        weights: the state-dict file a user has (``*.pth`` from torchvision's model zoo,
            read with ``weights_only=True``), or the state dict itself.
        **overrides: ``build_detector`` kwargs to change, e.g. ``min_size=512`` or
            ``score_thresh=0.3`` (inference settings; the layers stay torchvision's).

    Returns:
        The detector in eval mode. ``model(images)`` with ``images`` a list of
        ``FloatTensor[3, H, W]`` in 0-1 returns ``{"boxes", "labels", "scores"}`` per image with
        labels the COCO category ids (see :func:`coco_categories`), equal to torchvision's own
        model's; ``model_spec(model)`` rebuilds it.

    Raises:
        ConfigError: unknown ``name``.
        CheckpointError: an unreadable file, or weights that do not fit (the keys are listed).
    """
    spec = torchvision_spec(name, **overrides)
    model = build_detector(**spec)
    state, source = _state_dict(weights)
    load_state_dict_checked(model, state, source=source, strict=True)
    model.eval()
    return model


def convert_torchvision(
    name: str, weights: str | Path | Mapping[str, Tensor], out_dir: str | Path
) -> Path:
    """Write ``out_dir/model.pt``, ``model.yaml`` and ``categories.json`` for a torchvision model.

    ``model.pt`` is the detector's plain state dict, ``model.yaml`` its ``build_detector``
    kwargs and ``categories.json`` its label space (:func:`coco_categories`): together what
    ``--teacher``, ``eval``, ``predict`` and ``visualize`` take. Returns the path of
    ``model.pt``.
    """
    model = from_torchvision(name, weights)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    path = atomic_write(out / "model.pt", lambda fh: torch.save(state, fh), fsync=True)
    spec = model_spec(model) or {}
    spec.pop("weights", None)
    spec.pop("weights_backbone", None)
    save_model_spec(spec, out / "model.yaml")
    write_json(out / "categories.json", coco_categories())
    logger.info("converted torchvision %s to %s", name, path)
    return path
