"""Inference: category checks, and ``predict`` drawing Mask R-CNN's masks as well as its boxes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

import fgdistill.viz.draw as draw
from fgdistill.engine.checkpoint import save_checkpoint
from fgdistill.engine.inference import check_same_categories, predict
from fgdistill.errors import ConfigError
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


def test_category_lists_must_agree() -> None:
    train = [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}, {"id": 3, "name": "bird"}]
    check_same_categories(train, "train.json", [dict(c) for c in train], "val.json")
    # without dog, bird would be label 2 in val but 3 in the model
    with pytest.raises(ConfigError) as err:
        check_same_categories(train, "train.json", [train[0], train[2]], "val.json")
    message = str(err.value)
    assert "categories of val.json differ from those of train.json" in message
    assert "only in train.json: 2 'dog'" in message and "only in val.json" not in message
    renamed = [train[0], train[1], {"id": 3, "name": "crow"}]
    both = r"only in train.json: 3 'bird'; only in v.json: 3 'crow'"
    with pytest.raises(ConfigError, match=both):
        check_same_categories(train, "train.json", renamed, "v.json")


def test_evaluation_leaves_out_background_detections(synth_dataset: Path) -> None:
    from fgdistill.data.coco import CocoDetection
    from fgdistill.engine.inference import evaluate_model

    dataset = CocoDetection(
        synth_dataset / "annotations" / "instances_val.json", synth_dataset / "val", train=False
    )

    class Guesser(torch.nn.Module):
        """Detects one box labelled 0 (the background slot) and one of class 1 per image."""

        def forward(self, images: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
            box = torch.tensor([[1.0, 1.0, 30.0, 30.0], [2.0, 2.0, 20.0, 20.0]])
            return [
                {"boxes": box, "labels": torch.tensor([0, 1]), "scores": torch.tensor([0.9, 0.5])}
                for _ in images
            ]

    metrics = evaluate_model(Guesser(), dataset, batch_size=3, progress=False)
    assert set(metrics) == {"bbox"} and "AP" in metrics["bbox"]  # label 0 was an error
