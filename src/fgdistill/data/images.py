"""Reading image files: the one loader that training, checks, prediction and pictures share."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor

from fgdistill.errors import DataError

__all__ = ["read_image", "to_rgb"]

#: PIL modes of grey images with more than 8 bits (16-bit and 32-bit integers, 32-bit floats)
_WIDE_GREY = ("I", "I;16", "I;16B", "I;16L", "F")


def read_image(path: str | Path, *, expected_size: tuple[int, int] | None = None) -> Tensor:
    """``FloatTensor[3, H, W]`` in ``[0, 1]``: an image file, fully decoded, as RGB.

    Grey (8-bit and wider), palette, RGBA and CMYK images are converted by :func:`to_rgb`;
    transparency is dropped. Odd sizes are kept: a detector's transform pads them.

    Args:
        path: the image file.
        expected_size: ``(width, height)`` from the annotations; a different size is an error.

    Raises:
        DataError: naming the file: missing, not decodable, or not of ``expected_size``.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: image file not found")
    if path.stat().st_size == 0:
        raise DataError(f"{path}: image file is empty (0 bytes)")
    try:
        with Image.open(path) as img:
            img.load()
            rgb = to_rgb(img)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise DataError(f"{path}: image does not decode ({exc})") from None
    except (MemoryError, KeyboardInterrupt):
        raise
    except Exception as exc:  # decoders raise other types too (zlib.error, struct.error, ...)
        raise DataError(f"{path}: image does not decode ({type(exc).__name__}: {exc})") from None
    if expected_size is not None and rgb.size != expected_size:
        raise DataError(
            f"{path}: image is {rgb.size[0]}x{rgb.size[1]} but the annotations say "
            f"{expected_size[0]}x{expected_size[1]} (width x height)"
        )
    array = np.asarray(rgb, dtype=np.uint8)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float().div_(255.0)


def to_rgb(img: Image.Image) -> Image.Image:
    """``img`` as an 8-bit RGB image, whatever its mode.

    Grey images of more than 8 bits are stretched from their own minimum to maximum onto 0-255
    (PIL's plain conversion would clip every value above 255 to white); a palette image with
    transparency goes through RGBA; transparency is dropped.
    """
    if img.mode in _WIDE_GREY:
        arr = np.asarray(img, dtype=np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        scaled = (arr - lo) / (hi - lo) if hi > lo else np.zeros_like(arr)
        img = Image.fromarray((scaled * 255).round().astype(np.uint8), mode="L")
    elif img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    return img.convert("RGB")
