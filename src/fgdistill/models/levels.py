"""FPN level names for torchvision backbones.

fgdistill names FPN levels by stride: the level of stride ``2**k`` is ``"pk"`` (``"p2"`` ...
``"p7"``). torchvision's backbones key their outputs differently: RetinaNet and FCOS (and our
RepPoints) give ``'0', '1', '2', 'p6', 'p7'`` = P3-P7, Faster and Mask R-CNN give
``'0', '1', '2', '3', 'pool'`` = P2-P6. This module is the only place that translates between
the two.

Strides are measured, not assumed: the backbone runs once on a dummy batch (on the ``meta``
device, so nothing is computed and no statistic moves; in eval mode, its train/eval flags
restored afterwards) and each output's stride is the input size divided by the output size. The
result is cached per backbone module, so the probe runs once per model.
"""

from __future__ import annotations

import logging
import math
import weakref
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.func import functional_call

from fgdistill.errors import CompatibilityError

__all__ = [
    "LevelInfo",
    "backbone_levels",
    "feature_levels",
    "level_channels",
    "level_name",
    "level_strides",
    "rename_features",
]

logger = logging.getLogger(__name__)

#: Size of the dummy image used to measure strides: multiples of 2**8 so that every level up to
#: P8 divides them exactly, and not square so that a stride is checked along both axes.
PROBE_H, PROBE_W = 256, 512


@dataclass(frozen=True)
class LevelInfo:
    """One FPN output of a backbone: its key in the backbone's output dict, stride and channels."""

    key: str
    stride: int
    channels: int


_CACHE: weakref.WeakKeyDictionary[nn.Module, dict[str, LevelInfo]] = weakref.WeakKeyDictionary()


def level_name(stride: int) -> str:
    """Level name of a stride: ``2**k`` -> ``"pk"``.

    Raises:
        CompatibilityError: the stride is not a power of two of at least 2.
    """
    if stride < 2 or stride & (stride - 1):
        raise CompatibilityError(f"FPN stride {stride} is not a power of two >= 2; cannot name it")
    return f"p{int(math.log2(stride))}"


def _backbone_of(model: nn.Module) -> nn.Module:
    backbone = getattr(model, "backbone", None)
    return backbone if isinstance(backbone, nn.Module) else model


def _run_probe(backbone: nn.Module) -> object:
    """Run ``backbone`` on ``FloatTensor[1, 3, PROBE_H, PROBE_W]`` in eval mode, without gradients.

    The run first goes on the ``meta`` device (shapes only: no arithmetic, nothing touched), and
    falls back to a real forward on the backbone's device when some operation has no meta kernel.
    """
    named: dict[str, Tensor] = dict(backbone.named_parameters())
    named.update(backbone.named_buffers())
    modes = {m: m.training for m in backbone.modules()}
    backbone.eval()
    try:
        with torch.no_grad():
            floats = [t for t in named.values() if t.is_floating_point()]
            dtype = floats[0].dtype if floats else torch.float32
            device = floats[0].device if floats else torch.device("cpu")
            try:
                meta = {n: torch.empty_like(t, device="meta") for n, t in named.items()}
                x = torch.empty(1, 3, PROBE_H, PROBE_W, device="meta", dtype=dtype)
                return functional_call(backbone, meta, (x,))
            except Exception as exc:  # an operation without a meta kernel: run it for real
                logger.debug("meta probe of %s failed (%s); running it", type(backbone), exc)
            return backbone(torch.zeros(1, 3, PROBE_H, PROBE_W, device=device, dtype=dtype))
    finally:
        for module, mode in modes.items():
            module.training = mode


def _probe(backbone: nn.Module) -> dict[str, LevelInfo]:
    """Measure the stride and channels of every output of ``backbone``."""
    out = _run_probe(backbone)
    if isinstance(out, Tensor):
        out = {"0": out}
    if not isinstance(out, Mapping):
        raise CompatibilityError(
            f"backbone {type(backbone).__name__} returned {type(out).__name__}, "
            "expected a dict of feature maps"
        )
    infos: dict[str, LevelInfo] = {}
    for key, feat in out.items():
        if not isinstance(feat, Tensor) or feat.dim() != 4:
            raise CompatibilityError(f"backbone output {key!r} is not a [N, C, H, W] feature map")
        h, w = feat.shape[-2:]
        if PROBE_H % h or PROBE_W % w or PROBE_H // h != PROBE_W // w:
            raise CompatibilityError(
                f"backbone output {key!r} has size {h}x{w} for a {PROBE_H}x{PROBE_W} input; "
                "cannot tell its stride"
            )
        stride = PROBE_H // h
        name = level_name(stride)
        if name in infos:
            raise CompatibilityError(
                f"backbone outputs {infos[name].key!r} and {key!r} both have stride {stride} "
                f"(level {name}); levels must have distinct strides"
            )
        infos[name] = LevelInfo(key=str(key), stride=stride, channels=int(feat.shape[1]))
    logger.debug(
        "measured levels of %s: %s",
        type(backbone).__name__,
        {n: (i.key, i.stride, i.channels) for n, i in infos.items()},
    )
    return infos


def backbone_levels(model: nn.Module) -> dict[str, LevelInfo]:
    """Level name -> :class:`LevelInfo` for a detector (uses ``model.backbone``) or a backbone.

    Ordered by stride, finest first. Cached per backbone module.
    """
    backbone = _backbone_of(model)
    infos = _CACHE.get(backbone)
    if infos is None:
        infos = dict(sorted(_probe(backbone).items(), key=lambda item: item[1].stride))
        _CACHE[backbone] = infos
    return dict(infos)


def feature_levels(model: nn.Module) -> dict[str, str]:
    """Level name -> backbone output key, e.g. ``{"p3": "0", ..., "p7": "p7"}`` for RetinaNet."""
    return {name: info.key for name, info in backbone_levels(model).items()}


def level_strides(model: nn.Module) -> dict[str, int]:
    """Level name -> stride in input pixels, e.g. ``{"p2": 4, ..., "p6": 64}`` for Faster R-CNN."""
    return {name: info.stride for name, info in backbone_levels(model).items()}


def level_channels(model: nn.Module) -> dict[str, int]:
    """Level name -> number of channels of that FPN output."""
    return {name: info.channels for name, info in backbone_levels(model).items()}


def rename_features(
    features: Mapping[str, Tensor], mapping: Mapping[str, str], levels: list[str] | None = None
) -> dict[str, Tensor]:
    """Re-key backbone outputs by level name.

    Args:
        features: backbone output, key -> ``FloatTensor[N, C, H, W]``.
        mapping: level name -> backbone key, as from :func:`feature_levels`.
        levels: the level names to keep (default: every level in ``mapping``).

    Returns:
        level name -> the same tensors (no copies).
    """
    wanted = list(mapping) if levels is None else levels
    missing = [lvl for lvl in wanted if lvl not in mapping or mapping[lvl] not in features]
    if missing:
        raise CompatibilityError(
            f"backbone output lacks levels {missing}; it has keys {sorted(features)}"
        )
    return {lvl: features[mapping[lvl]] for lvl in wanted}
