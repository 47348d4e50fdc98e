"""Building torchvision detectors with FPN backbones, and loading their weights.

:func:`build_detector` builds RetinaNet, FCOS, Faster R-CNN, Mask R-CNN (torchvision's) or
RepPoints (ours) on a ResNet, ResNeXt or MobileNetV3-Large FPN backbone with any FPN width. The
returned model follows torchvision's detector contract and carries its build arguments in
``model.fgdistill_spec`` (see :func:`model_spec`), so ``build_detector(**model_spec(model))``
rebuilds the same architecture for a checkpoint, and :func:`load_detector` rebuilds a saved
detector with its weights.

Weights are never downloaded unless a torchvision weights name is given explicitly; checkpoints
are read with ``torch.load(..., weights_only=True)`` only.
"""

from __future__ import annotations

import inspect
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from functools import cache, partial
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torchvision.models import mobilenet_v3_large, resnet
from torchvision.models.detection import FCOS, FasterRCNN, MaskRCNN, RetinaNet
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead
from torchvision.models.detection.fcos import FCOSClassificationHead, FCOSHead, FCOSRegressionHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.retinanet import RetinaNetHead
from torchvision.models.detection.rpn import RPNHead
from torchvision.ops import FrozenBatchNorm2d
from torchvision.ops.feature_pyramid_network import (
    ExtraFPNBlock,
    LastLevelMaxPool,
    LastLevelP6P7,
)

from fgdistill.errors import CheckpointError, ConfigError
from fgdistill.models.checkpoint import find_model_spec, load_checkpoint, state_dict_of
from fgdistill.models.norm import batch_independent_group_norms
from fgdistill.models.weights import load_pretrained, load_state_dict_checked, load_weights

__all__ = [
    "ARCHS",
    "BACKBONES",
    "SPEC_ATTR",
    "build_backbone",
    "build_detector",
    "detector_options",
    "load_detector",
    "model_spec",
]

logger = logging.getLogger(__name__)

#: Detector architectures :func:`build_detector` knows.
ARCHS: tuple[str, ...] = ("retinanet", "fcos", "faster_rcnn", "mask_rcnn", "reppoints")
_RESNETS = (
    "resnet18",
    "resnet34",
    "resnet50",
    "resnet101",
    "resnet152",
    "resnext50_32x4d",
    "resnext101_32x8d",
    "resnext101_64x4d",
)
#: Backbone names :func:`build_detector` knows.
BACKBONES: tuple[str, ...] = (*_RESNETS, "mobilenet_v3_large")
#: Attribute of a built detector holding its build arguments.
SPEC_ATTR = "fgdistill_spec"

# One-stage detectors use P3-P7 (C3-C5 + P6/P7 from P5), two-stage detectors P2-P6 (C2-C5 + pool).
_ONE_STAGE = ("retinanet", "fcos", "reppoints")
_STRIDES_ONE_STAGE = (8, 16, 32)
_STRIDES_TWO_STAGE = (4, 8, 16, 32)
# torchvision weights whose FrozenBatchNorm2d layers were trained with eps=0 (see overwrite_eps).
_EPS_ZERO_WEIGHTS = (
    "RetinaNet_ResNet50_FPN_Weights.COCO_V1",
    "FasterRCNN_ResNet50_FPN_Weights.COCO_V1",
    "MaskRCNN_ResNet50_FPN_Weights.COCO_V1",
)


# --------------------------------------------------------------------------------------------
# Backbones
# --------------------------------------------------------------------------------------------


def _group_norm(channels: int) -> nn.Module:
    return nn.GroupNorm(math.gcd(32, channels), channels)


def _resnet_body(
    name: str,
    norm_layer: Callable[..., nn.Module],
    weights_backbone: str | Path | None,
    trainable_layers: int,
) -> nn.Module:
    body: nn.Module = getattr(resnet, name)(weights=None, norm_layer=norm_layer)
    if weights_backbone is not None:
        state, source = load_weights(weights_backbone)
        load_state_dict_checked(body, state, source=source)
    if not 0 <= trainable_layers <= 5:
        raise ConfigError(f"trainable_layers for {name} must be in [0, 5], got {trainable_layers}")
    train = ["layer4", "layer3", "layer2", "layer1", "conv1"][:trainable_layers]
    if trainable_layers == 5:
        train.append("bn1")
    for pname, param in body.named_parameters():
        if not any(pname.startswith(prefix) for prefix in train):
            param.requires_grad_(False)
    return body


def _mobilenet_features(
    norm_layer: Callable[..., nn.Module] | None,
    weights_backbone: str | Path | None,
    trainable_layers: int,
) -> tuple[nn.Sequential, dict[int, int], list[int]]:
    """MobileNetV3-Large features, {stride: index of the last block at that stride}, channels."""
    kwargs: dict[str, Any] = {} if norm_layer is None else {"norm_layer": norm_layer}
    net = mobilenet_v3_large(weights=None, **kwargs)
    if weights_backbone is not None:
        state, source = load_weights(weights_backbone)
        load_state_dict_checked(net, state, source=source)
    features: nn.Sequential = net.features
    stride, last_at, channels = 2, {}, []
    for i, block in enumerate(features):
        if i > 0 and getattr(block, "_is_cn", False):
            stride *= 2
        last_at[stride] = i
        channels.append(int(getattr(block, "out_channels", 0)))
    stage_starts = [0] + [i for i, b in enumerate(features) if getattr(b, "_is_cn", False)]
    stage_starts.append(len(features) - 1)
    num_stages = len(stage_starts)
    if not 0 <= trainable_layers <= num_stages:
        raise ConfigError(
            f"trainable_layers for mobilenet_v3_large must be in [0, {num_stages}], "
            f"got {trainable_layers}"
        )
    freeze_before = (
        len(features) if trainable_layers == 0 else stage_starts[num_stages - trainable_layers]
    )
    for block in features[:freeze_before]:
        for param in block.parameters():
            param.requires_grad_(False)
    return features, last_at, channels


def build_backbone(
    name: str,
    *,
    strides: Sequence[int],
    fpn_channels: int,
    extra_blocks: ExtraFPNBlock,
    frozen_bn: bool,
    trainable_layers: int,
    weights_backbone: str | Path | None = None,
    fpn_norm: str | None = None,
    frozen_bn_eps: float | None = None,
    returned_layers: Sequence[int] | None = None,
) -> BackboneWithFPN:
    """A backbone + FPN returning the C-levels of ``strides`` (e.g. ``(8, 16, 32)``) plus extras.

    The FPN's outputs are keyed ``'0', '1', ...`` in stride order, then the extra block's names
    (``'p6', 'p7'`` for :class:`LastLevelP6P7`, ``'pool'`` for :class:`LastLevelMaxPool`), like
    torchvision's detectors. ``weights_backbone`` (checkpoint path or torchvision weights name)
    is loaded into the classification network before its head is dropped.

    ``fpn_norm`` (``None``, ``"batch"`` or ``"group"``) puts a norm layer in the FPN's convs
    (torchvision's v2 R-CNNs use ``"batch"``); ``frozen_bn_eps`` is the epsilon of the frozen
    BatchNorm (default: 1e-5 for ResNets, 1e-3 for MobileNetV3; torchvision's v1 COCO weights of
    RetinaNet and the R-CNNs need 0). ``returned_layers`` picks MobileNetV3's FPN inputs the way
    torchvision's ``_mobilenet_extractor`` does (stage numbers; ``[4, 5]`` is torchvision's
    ``fasterrcnn_mobilenet_v3_large_fpn``); by default the last block of each stride is used.
    """
    fpn_norm_layer = _norm_layer(fpn_norm, "fpn_norm")
    if name in _RESNETS:
        if returned_layers is not None:
            raise ConfigError("returned_layers is an option of mobilenet_v3_large only")
        norm: Callable[..., nn.Module] = nn.BatchNorm2d
        if frozen_bn:
            norm = partial(FrozenBatchNorm2d, eps=1e-5 if frozen_bn_eps is None else frozen_bn_eps)
        body = _resnet_body(name, norm, weights_backbone, trainable_layers)
        stage_of = {4: 1, 8: 2, 16: 3, 32: 4}
        base = int(body.inplanes) // 8  # type: ignore[arg-type]
        return_layers = {f"layer{stage_of[s]}": str(i) for i, s in enumerate(strides)}
        in_channels = [base * 2 ** (stage_of[s] - 1) for s in strides]
        return BackboneWithFPN(
            body, return_layers, in_channels, fpn_channels, extra_blocks, norm_layer=fpn_norm_layer
        )
    if name == "mobilenet_v3_large":
        # MobileNetV3 uses BatchNorm with eps=1e-3; keep it when freezing (torchvision's COCO
        # MobileNetV3 detectors freeze it with eps=1e-5: frozen_bn_eps says which).
        eps = 1e-3 if frozen_bn_eps is None else frozen_bn_eps
        norm_mb = partial(FrozenBatchNorm2d, eps=eps) if frozen_bn else None
        features, last_at, channels = _mobilenet_features(
            norm_mb, weights_backbone, trainable_layers
        )
        if returned_layers is None:
            picked = [last_at[s] for s in strides]
        else:
            stages = [0] + [i for i, b in enumerate(features) if getattr(b, "_is_cn", False)]
            stages.append(len(features) - 1)
            if not returned_layers or any(not 0 <= k < len(stages) for k in returned_layers):
                raise ConfigError(
                    f"returned_layers must be stage numbers in [0, {len(stages) - 1}], "
                    f"got {list(returned_layers)}"
                )
            picked = [stages[k] for k in returned_layers]
        return_layers = {str(idx): str(i) for i, idx in enumerate(picked)}
        in_channels = [channels[idx] for idx in picked]
        return BackboneWithFPN(
            features,
            return_layers,
            in_channels,
            fpn_channels,
            extra_blocks,
            norm_layer=fpn_norm_layer,
        )
    raise ConfigError(f"unknown backbone {name!r}; choose one of {', '.join(BACKBONES)}")


def _norm_layer(kind: str | None, option: str) -> Callable[..., nn.Module] | None:
    """The norm layer of ``kind``: None, ``"batch"`` (BatchNorm2d) or ``"group"`` (GroupNorm)."""
    if kind is None:
        return None
    if kind == "batch":
        return nn.BatchNorm2d
    if kind == "group":
        return _group_norm
    raise ConfigError(f"{option} must be None, 'batch' or 'group', got {kind!r}")


def _c5_channels(name: str) -> int:
    """Channels of the backbone's last stage (C5), what ``p6_from='c5'`` computes P6 from."""
    if name == "mobilenet_v3_large":
        return 960
    return 512 if name in ("resnet18", "resnet34") else 2048


# --------------------------------------------------------------------------------------------
# Detectors
# --------------------------------------------------------------------------------------------


#: An anchor size per level: one base size (the detector's scales of it), or the level's sizes.
AnchorSizes = Sequence[int | Sequence[int]]


def _level_sizes(
    anchor_sizes: AnchorSizes | None, scales: Callable[[int], tuple[int, ...]], levels: str, n: int
) -> tuple[tuple[int, ...], ...]:
    bases = tuple(anchor_sizes) if anchor_sizes is not None else (32, 64, 128, 256, 512)
    if len(bases) != n:
        raise ConfigError(f"anchor_sizes needs one entry per level {levels} ({n}), got {bases}")
    return tuple(scales(int(x)) if isinstance(x, int) else tuple(int(v) for v in x) for x in bases)


def _retinanet_anchors(anchor_sizes: AnchorSizes | None) -> AnchorGenerator:
    sizes = _level_sizes(
        anchor_sizes, lambda x: (x, int(x * 2 ** (1.0 / 3)), int(x * 2 ** (2.0 / 3))), "P3-P7", 5
    )
    return AnchorGenerator(sizes, ((0.5, 1.0, 2.0),) * len(sizes))


def _rpn_anchors(anchor_sizes: AnchorSizes | None, num_levels: int = 5) -> AnchorGenerator:
    sizes = _level_sizes(anchor_sizes, lambda x: (x,), "of the RPN", num_levels)
    return AnchorGenerator(sizes, ((0.5, 1.0, 2.0),) * len(sizes))


def _reppoints_class() -> type:
    try:
        from fgdistill.models.reppoints import RepPoints
    except ImportError as exc:
        if exc.name not in ("fgdistill.models.reppoints", None):
            raise
        raise ConfigError("reppoints not available in this installation") from exc
    return RepPoints


def _reppoints(backbone: nn.Module, num_classes: int, **kwargs: Any) -> nn.Module:
    model: nn.Module = _reppoints_class()(backbone, num_classes, **kwargs)
    return model


def build_detector(
    arch: str,
    *,
    backbone: str = "resnet50",
    num_classes: int,
    fpn_channels: int = 256,
    min_size: int | Sequence[int] = 800,
    max_size: int = 1333,
    weights: str | Path | None = None,
    weights_backbone: str | Path | None = None,
    trainable_layers: int | None = None,
    frozen_bn: bool | None = None,
    head_norm: str | None = None,
    anchor_sizes: AnchorSizes | None = None,
    p6_from: str = "p5",
    fpn_norm: str | None = None,
    frozen_bn_eps: float | None = None,
    returned_layers: Sequence[int] | None = None,
    box_loss: str | None = None,
    **detector_kwargs: Any,
) -> nn.Module:
    """Build a detector following torchvision's contract.

    Args:
        arch: ``"retinanet"``, ``"fcos"``, ``"faster_rcnn"``, ``"mask_rcnn"`` or ``"reppoints"``.
        backbone: one of :data:`BACKBONES`.
        num_classes: number of classes INCLUDING background, as in torchvision (labels run
            ``1 .. num_classes - 1``).
        fpn_channels: channels of every FPN level.
        min_size, max_size: the transform's resize bounds.
        weights: the whole detector's weights: a checkpoint path (plain state dict or a dict with
            a ``"model"`` key) or a torchvision weights name such as
            ``"RetinaNet_ResNet50_FPN_Weights.COCO_V1"`` (downloaded, so needs network access).
        weights_backbone: the classification backbone's weights, path or name such as
            ``"ResNet50_Weights.IMAGENET1K_V1"``; ignored when ``weights`` is given.
        trainable_layers: backbone stages left trainable counted from the last (ResNet 0-5,
            MobileNetV3 0-6). Default: all when no pretrained weights are given (from-scratch
            training), else 3, as torchvision does.
        frozen_bn: use ``FrozenBatchNorm2d`` in the backbone. Default: True with pretrained
            weights (``weights`` or ``weights_backbone``), False without, because training from
            scratch needs BatchNorm statistics that adapt.
        head_norm: ``None``, ``"group"`` or ``"batch"``: GroupNorm in the heads (like
            torchvision's v2 RetinaNet; for R-CNN a 2-conv RPN head, a 4-conv box head and a
            GroupNorm mask head), which helps training from scratch; ``"batch"``: the same R-CNN
            heads with BatchNorm, torchvision's v2 Faster and Mask R-CNN. FCOS and RepPoints
            always use GroupNorm in their heads.
        anchor_sizes: base anchor size per level (five values), for RetinaNet (P3-P7, three
            scales each) and Faster/Mask R-CNN's RPN (P2-P6). Small images need small anchors.
            An entry may also be a list: that level's anchor sizes, as they are.
        min_size: an int, or a list of sizes: in training each image is resized to one of them,
            drawn at random (torchvision's transform; multi-scale training), in evaluation to
            the last.
        p6_from: ``"p5"`` (torchvision's v1 RetinaNet and FCOS) or ``"c5"`` (torchvision's v2
            RetinaNet, mmdetection's ``add_extra_convs='on_input'``): what the one-stage
            detectors' P6 is computed from.
        fpn_norm: ``None``, ``"batch"`` or ``"group"``: a norm layer in the FPN's convs
            (torchvision's v2 R-CNNs: ``"batch"``).
        frozen_bn_eps: epsilon of the backbone's frozen BatchNorm (default 1e-5, 1e-3 for
            MobileNetV3). torchvision's v1 COCO weights of RetinaNet, Faster and Mask R-CNN were
            trained with 0: :func:`fgdistill.models.from_torchvision` sets it.
        returned_layers: MobileNetV3 only: the FPN's inputs as torchvision's stage numbers
            (``[4, 5]`` in ``fasterrcnn_mobilenet_v3_large_fpn``, whose two FPN levels both have
            stride 32); default: the last block of each stride.
        box_loss: RetinaNet's box regression loss (torchvision's ``_loss_type``: ``"l1"``,
            ``"smooth_l1"``, ``"giou"``, ``"ciou"``, ``"diou"``); default torchvision's l1.
        **detector_kwargs: passed to the torchvision detector class (e.g. ``score_thresh``,
            ``detections_per_img``, ``image_mean``).

    Returns:
        The detector, with its build arguments in ``model.fgdistill_spec``.

    Raises:
        ConfigError: unknown arch/backbone/option, or bad option values.
        CheckpointError: weights that cannot be read, downloaded or do not fit.
    """
    if arch not in ARCHS:
        raise ConfigError(f"unknown detector arch {arch!r}; choose one of {', '.join(ARCHS)}")
    if backbone not in BACKBONES:
        raise ConfigError(f"unknown backbone {backbone!r}; choose one of {', '.join(BACKBONES)}")
    if not isinstance(num_classes, int) or num_classes < 2:
        raise ConfigError(
            f"num_classes must be an int >= 2 (it includes background), got {num_classes!r}"
        )
    if fpn_channels < 1:
        raise ConfigError(f"fpn_channels must be positive, got {fpn_channels}")
    if head_norm not in (None, "group", "batch"):
        raise ConfigError(f"head_norm must be None, 'group' or 'batch', got {head_norm!r}")
    if head_norm == "batch" and arch not in ("faster_rcnn", "mask_rcnn"):
        raise ConfigError(f"head_norm='batch' is an option of the R-CNNs, not of {arch}")
    if anchor_sizes is not None and arch not in ("retinanet", "faster_rcnn", "mask_rcnn"):
        raise ConfigError(f"anchor_sizes is not an option of {arch}")
    if p6_from not in ("p5", "c5"):
        raise ConfigError(f"p6_from must be 'p5' or 'c5', got {p6_from!r}")
    if p6_from == "c5" and arch not in _ONE_STAGE:
        raise ConfigError(f"p6_from is an option of the one-stage detectors, not {arch}")
    if box_loss is not None and arch != "retinanet":
        raise ConfigError(f"box_loss is an option of retinanet, not {arch}")
    sizes_ok = isinstance(min_size, int) or (
        isinstance(min_size, list | tuple)
        and len(min_size) > 0
        and all(isinstance(v, int) for v in min_size)
    )
    if not sizes_ok:
        raise ConfigError(f"min_size must be an int or a list of ints, got {min_size!r}")
    _check_options(arch, detector_kwargs)
    pretrained = weights is not None or weights_backbone is not None
    if trainable_layers is None:
        trainable_layers = (6 if backbone == "mobilenet_v3_large" else 5) if not pretrained else 3
    if frozen_bn is None:
        frozen_bn = pretrained

    if isinstance(weights, str) and weights in _EPS_ZERO_WEIGHTS and frozen_bn_eps is None:
        frozen_bn_eps = 0.0

    one_stage = arch in _ONE_STAGE
    extra: ExtraFPNBlock = LastLevelMaxPool()
    if one_stage:
        p6_in = _c5_channels(backbone) if p6_from == "c5" else fpn_channels
        p6p7 = LastLevelP6P7(p6_in, fpn_channels)
        p6p7.use_P5 = p6_from == "p5"  # torchvision infers it from the channels; say it
        extra = p6p7
    body = build_backbone(
        backbone,
        strides=_STRIDES_ONE_STAGE if one_stage else _STRIDES_TWO_STAGE,
        fpn_channels=fpn_channels,
        extra_blocks=extra,
        frozen_bn=frozen_bn,
        trainable_layers=trainable_layers,
        weights_backbone=weights_backbone if weights is None else None,
        fpn_norm=fpn_norm,
        frozen_bn_eps=frozen_bn_eps,
        returned_layers=returned_layers,
    )
    sizes: dict[str, Any] = {
        "min_size": tuple(min_size) if isinstance(min_size, list | tuple) else min_size,
        "max_size": max_size,
    }
    model = _assemble(
        arch, body, num_classes, fpn_channels, head_norm, anchor_sizes, sizes, detector_kwargs
    )
    batch_independent_group_norms(model)  # one image alone on a 1x1 map: see models/norm.py
    if box_loss is not None:
        head: Any = model.head
        regression: Any = head.regression_head
        regression._loss_type = box_loss

    if weights is not None:
        state, source = load_weights(weights)
        load_pretrained(model, state, source=source)

    spec: dict[str, Any] = {
        "arch": arch,
        "backbone": backbone,
        "num_classes": num_classes,
        "fpn_channels": fpn_channels,
        "min_size": list(min_size) if isinstance(min_size, list | tuple) else min_size,
        "max_size": max_size,
        "trainable_layers": trainable_layers,
        "frozen_bn": frozen_bn,
        "head_norm": head_norm,
        "anchor_sizes": (
            [x if isinstance(x, int) else list(x) for x in anchor_sizes]
            if anchor_sizes is not None
            else None
        ),
        **detector_kwargs,
    }
    # Options added later are recorded only when set, so earlier specs stay as they were.
    options = {
        "p6_from": (p6_from, "p5"),
        "fpn_norm": (fpn_norm, None),
        "frozen_bn_eps": (frozen_bn_eps, None),
        "returned_layers": (list(returned_layers) if returned_layers else None, None),
        "box_loss": (box_loss, None),
    }
    spec.update({k: v for k, (v, default) in options.items() if v != default})
    setattr(model, SPEC_ATTR, spec)
    logger.debug("built %s", spec)
    return model


def detector_options(arch: str) -> set[str]:
    """The keyword options ``build_detector(arch, ...)`` passes on to the detector class.

    Those of the class's constructor, less what ``build_detector`` sets itself (sizes, anchors,
    heads), plus ``size_divisible`` and ``fixed_size``, which every detector hands on to its
    ``GeneralizedRCNNTransform``. A new set each call; the signature is read once per ``arch``.
    """
    return set(_detector_options(arch))


@cache
def _detector_options(arch: str) -> frozenset[str]:
    if arch == "reppoints":
        cls = _reppoints_class()
    else:
        cls = {"retinanet": RetinaNet, "fcos": FCOS, "faster_rcnn": FasterRCNN}.get(arch, MaskRCNN)
    named = {
        p.name
        for p in inspect.signature(cls).parameters.values()
        if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)
    }
    ours = {"backbone", "num_classes", "min_size", "max_size", "head", "anchor_generator"}
    ours |= {"rpn_anchor_generator", "rpn_head"}
    return frozenset((named - ours) | {"size_divisible", "fixed_size"})


def _check_options(arch: str, options: Mapping[str, Any]) -> None:
    """Raise ConfigError for a keyword the detector class of ``arch`` does not take.

    torchvision's detectors pass unknown keywords on to their transform, which ignores them, so
    a misspelt option (``scor_thresh``) would otherwise change nothing, silently.
    """
    if not options:
        return
    valid = detector_options(arch)
    unknown = sorted(set(options) - valid)
    if unknown:
        raise ConfigError(
            f"{arch}: unknown option(s) {', '.join(map(repr, unknown))} (model.extra); "
            f"valid options: {', '.join(sorted(valid))}"
        )


def _assemble(
    arch: str,
    body: nn.Module,
    num_classes: int,
    fpn_channels: int,
    head_norm: str | None,
    anchor_sizes: AnchorSizes | None,
    sizes: dict[str, Any],
    detector_kwargs: dict[str, Any],
) -> nn.Module:
    """The detector of ``arch`` on the FPN backbone ``body``, with its heads."""
    if arch == "retinanet":
        anchors = _retinanet_anchors(anchor_sizes)
        norm = _group_norm if head_norm == "group" else None
        head = RetinaNetHead(
            fpn_channels, anchors.num_anchors_per_location()[0], num_classes, norm_layer=norm
        )
        return RetinaNet(
            body, num_classes, anchor_generator=anchors, head=head, **sizes, **detector_kwargs
        )
    if arch == "fcos":
        # torchvision's FCOS head uses GroupNorm(32, C); when 32 does not divide C, build the
        # head on 32 channels and replace both branches with ones of a group count that does.
        head = FCOSHead(fpn_channels if fpn_channels % 32 == 0 else 32, 1, num_classes)
        if fpn_channels % 32:
            head.classification_head = FCOSClassificationHead(
                fpn_channels, 1, num_classes, norm_layer=_group_norm
            )
            head.regression_head = FCOSRegressionHead(fpn_channels, 1, norm_layer=_group_norm)
        return FCOS(body, num_classes, head=head, **sizes, **detector_kwargs)
    if arch in ("faster_rcnn", "mask_rcnn"):
        getter: Any = body.body
        num_levels = len(getter.return_layers) + 1  # + the max-pooled level
        anchors = _rpn_anchors(anchor_sizes, num_levels)
        rcnn: dict[str, Any] = {
            "rpn_anchor_generator": anchors,
            "rpn_head": RPNHead(
                fpn_channels,
                anchors.num_anchors_per_location()[0],
                conv_depth=2 if head_norm else 1,
            ),
        }
        head_norm_layer = _norm_layer(head_norm, "head_norm")
        if head_norm_layer is not None:
            rcnn["box_head"] = FastRCNNConvFCHead(
                (fpn_channels, 7, 7), [fpn_channels] * 4, [1024], norm_layer=head_norm_layer
            )
            if arch == "mask_rcnn":
                # as wide as the FPN, like the box head (torchvision's 256 at its FPN's 256)
                rcnn["mask_head"] = MaskRCNNHeads(
                    fpn_channels, [fpn_channels] * 4, 1, norm_layer=head_norm_layer
                )
        cls = MaskRCNN if arch == "mask_rcnn" else FasterRCNN
        model = cls(body, num_classes, **rcnn, **sizes, **detector_kwargs)
        if arch == "mask_rcnn" and head_norm_layer is not None:
            # torchvision builds the predictor for a 256-channel mask head
            roi_heads: Any = model.roi_heads
            roi_heads.mask_predictor = MaskRCNNPredictor(fpn_channels, fpn_channels, num_classes)
        return model
    return _reppoints(body, num_classes, **sizes, **detector_kwargs)


def model_spec(model: nn.Module) -> dict[str, Any] | None:
    """The build arguments of a detector made by :func:`build_detector` (a copy), else None.

    ``build_detector(**model_spec(model))`` rebuilds the same architecture without weights.
    """
    spec = getattr(model, SPEC_ATTR, None)
    return dict(spec) if isinstance(spec, dict) else None


def load_detector(
    path: str | Path,
    *,
    map_location: str | torch.device = "cpu",
    fallback_spec: Mapping[str, Any] | None = None,
) -> nn.Module:
    """Rebuild a saved detector and load its weights; returned in eval mode.

    Accepts a training checkpoint (``last.pt``, ``best.pt``; for a distillation run, the
    student), or a plain state dict (``model.pt``, ``student.pt``) with ``model.yaml`` or
    ``config.yaml`` beside it (see :func:`~fgdistill.models.checkpoint.find_model_spec`).

    Args:
        path: the checkpoint file.
        map_location: where its tensors are loaded.
        fallback_spec: ``build_detector`` keyword arguments used as they are when the
            checkpoint carries no spec (inside it or beside it); without it that is an error.

    Raises:
        CheckpointError: naming the file, if it is missing or corrupt, the detector cannot be
            identified, or the weights do not fit the rebuilt model.
    """
    path = Path(path)
    checkpoint = load_checkpoint(path, map_location=map_location)
    try:
        kwargs = _stored_spec(find_model_spec(path, checkpoint))
    except CheckpointError:
        if fallback_spec is None:
            raise
        kwargs = dict(fallback_spec)
    model = build_detector(**kwargs)
    load_state_dict_checked(
        model, state_dict_of(checkpoint, source=str(path)), source=str(path), strict=True
    )
    model.eval()
    return model


def _stored_spec(spec: Mapping[str, Any]) -> dict[str, Any]:
    """The ``build_detector`` kwargs of a stored spec, without pretrained weights.

    The ``weights`` and ``weights_backbone`` entries are dropped, so nothing is loaded or
    downloaded (the saved weights are loaded right after). An option the detector does not take
    (recorded by an older version, which ignored it as torchvision does) is left out with a
    warning: the model it describes was built without it.
    """
    kwargs = dict(spec)
    arch = kwargs.get("arch")
    if not arch:
        raise CheckpointError("model spec has no 'arch'")
    kwargs["weights"] = None
    kwargs["weights_backbone"] = None
    if arch in ARCHS:
        known = set(inspect.signature(build_detector).parameters) | detector_options(arch)
        ignored = sorted(set(kwargs) - known)
        if ignored:
            logger.warning("model spec: leaving out %s, which %s does not take", ignored, arch)
            for key in ignored:
                del kwargs[key]
    return kwargs
