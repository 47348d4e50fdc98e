"""``predict`` draws Mask R-CNN's masks as well as its boxes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

import fgdistill.viz.draw as draw
from fgdistill.engine.checkpoint import save_checkpoint
from fgdistill.engine.runner import predict
from fgdistill.models.build import build_detector, model_spec


def test_predict_passes_mask_rcnn_masks_to_the_drawing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    torch.manual_seed(0)
    model = build_detector(
        "mask_rcnn", backbone="resnet18", num_classes=3, fpn_channels=32, min_size=64, max_size=64
    )
    spec = model_spec(model)
    assert spec is not None
    ckpt = save_checkpoint({"model": model.state_dict(), "model_spec": spec}, tmp_path / "m.pt")
    image = tmp_path / "img.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 80, 3), dtype=np.uint8)).save(
        image
    )
    seen: list[Any] = []
    original = draw.draw_detections

    def spy(*args: Any, **kwargs: Any) -> Image.Image:
        seen.append(kwargs.get("masks"))
        return original(*args, **kwargs)

    monkeypatch.setattr(draw, "draw_detections", spy)
    result = predict(ckpt, [image], tmp_path / "out", score_threshold=0.0, progress=False)
    assert len(seen) == 1 and isinstance(seen[0], torch.Tensor)
    masks = seen[0]
    assert masks.shape[0] == result.num_detections > 0
    assert tuple(masks.shape[-2:]) == (64, 80)
    assert Image.open(result.drawings[0]).size == (80, 64)
