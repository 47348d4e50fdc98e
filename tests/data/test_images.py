"""The one image loader: RGB whatever the mode, errors naming the file."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fgdistill.data.images import read_image
from fgdistill.errors import DataError


@pytest.mark.parametrize(
    ("mode", "size"),
    [("L", (37, 23)), ("RGBA", (40, 31)), ("I;16", (17, 9)), ("P", (8, 8)), ("RGB", (33, 65))],
)
def test_read_image_converts_to_rgb(tmp_path: Path, mode: str, size: tuple[int, int]) -> None:
    rng = np.random.default_rng(0)
    if mode == "I;16":
        img = Image.fromarray(rng.integers(0, 4000, size[::-1], dtype=np.uint16))
    else:
        img = Image.fromarray(rng.integers(0, 255, (*size[::-1], 3), dtype=np.uint8)).convert(mode)
    path = tmp_path / "x.png"
    img.save(path)
    tensor = read_image(path)
    assert tensor.shape == (3, size[1], size[0]) and tensor.dtype == torch.float32
    assert float(tensor.min()) >= 0.0 and float(tensor.max()) <= 1.0
    if mode == "I;16":  # 16-bit grey is stretched to the full range, not clipped to white
        assert float(tensor.max()) == 1.0 and float(tensor.min()) == 0.0
    if mode in ("L", "I;16"):
        assert torch.equal(tensor[0], tensor[1]) and torch.equal(tensor[1], tensor[2])


def test_read_image_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"missing\.png: image file not found"):
        read_image(tmp_path / "missing.png")
    (tmp_path / "notes.png").write_text("not an image")
    with pytest.raises(DataError, match=r"notes\.png: image does not decode"):
        read_image(tmp_path / "notes.png")


def test_wide_grey_images_are_stretched_not_clipped(tmp_path: Path) -> None:
    ramp = np.linspace(0, 59900, 16 * 20).reshape(16, 20).astype(np.uint16)
    path = tmp_path / "ramp16.png"
    Image.fromarray(ramp).save(path)
    assert Image.open(path).mode.startswith("I")
    image = read_image(path, expected_size=(20, 16))
    rgb = (image * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    grey = rgb[..., 0]
    # PIL's own conversion clips everything above 255 to white
    assert grey.min() == 0 and grey.max() == 255 and (grey == 255).mean() < 0.01
    assert np.all(np.diff(grey.astype(int).ravel()) >= 0)  # still a ramp


def test_a_size_other_than_the_annotations_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "a.png"
    Image.new("RGB", (5, 4)).save(path)
    with pytest.raises(DataError, match=r"a\.png: image is 5x4 but the annotations say 4x5"):
        read_image(path, expected_size=(4, 5))
