"""torchvision COCO weight files as a user has them, made offline with random weights.

``torchvision_reference(name)`` builds torchvision's own detector through its builder's
pretrained-weights path (``weights=<COCO_V1 enum>``), with the download replaced by a random
state dict: so the model has exactly the layers, frozen BatchNorm and epsilon
(``overwrite_eps``) of that weights family. Its BatchNorm statistics are then randomised (small
variances, so that an epsilon of 0 or 1e-5 changes the features), and its state dict is what a
downloaded ``*.pth`` file holds.
"""

from __future__ import annotations

from typing import Any
from unittest import mock

import torch
import torchvision
from torch import nn
from torchvision.models import detection
from torchvision.models._api import WeightsEnum
from torchvision.ops import FrozenBatchNorm2d

from fgdistill.models.torchvision_zoo import TORCHVISION_MODELS

#: inference settings that make a random detector return detections quickly
ONE_STAGE_FAST = {"score_thresh": 0.0, "topk_candidates": 100, "detections_per_img": 50}
TWO_STAGE_FAST = {
    "box_score_thresh": 0.0,
    "rpn_pre_nms_top_n_test": 100,
    "rpn_post_nms_top_n_test": 50,
    "box_detections_per_img": 50,
}


def fast_settings(name: str, min_size: int = 128, max_size: int = 160) -> dict[str, Any]:
    """Small images and a low score threshold, for torchvision's builder and ours alike."""
    one_stage = name.startswith(("retinanet", "fcos"))
    fast = ONE_STAGE_FAST if one_stage else TWO_STAGE_FAST
    return {"min_size": min_size, "max_size": max_size, **fast}


def torchvision_reference(name: str, seed: int = 0, **kwargs: Any) -> nn.Module:
    """torchvision's ``name`` built as with its COCO weights, random, in eval mode."""
    _, weights_name = TORCHVISION_MODELS[name]
    builder = getattr(detection, name)
    torch.manual_seed(seed)
    plain = builder(weights=None, weights_backbone=None, num_classes=91).state_dict()
    enum = torchvision.models.get_weight(weights_name)
    with mock.patch.object(WeightsEnum, "get_state_dict", lambda self, *a, **k: plain):
        model: nn.Module = builder(weights=enum, **kwargs)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, FrozenBatchNorm2d | nn.BatchNorm2d):
                n = m.weight.numel()
                var = torch.rand(n, generator=g) * 1e-3 + 1e-3
                m.running_var.copy_(var)
                m.weight.copy_(var.sqrt() * (torch.rand(n, generator=g) * 0.5 + 0.5))
                m.bias.copy_(torch.randn(n, generator=g) * 0.1)
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
    return model.eval()
