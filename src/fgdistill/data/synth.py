"""A synthetic COCO-format detection benchmark that this machine can make in seconds.

Design (see ``docs/data.md``):

* **Categories** are the 8 pairs of 4 shapes (disc, square, triangle, cross) and 2 textures
  (striped, checked). Colours are drawn at random, independently of the category, so a detector
  must use shape *and* texture: a striped disc and a checked disc differ only in texture, a
  striped disc and a striped square only in shape.
* **Distractors** belong to no category: other shapes (ellipse, ring, flower) with any texture,
  and category shapes with other textures (plain, dotted) -- hard negatives for both cues.
* **Sizes** are drawn log-uniformly relative to the image size, spanning COCO's small
  (< 32^2 px), medium and large (> 96^2 px) ranges where the image allows; objects stay at least
  ~8 px across so small images remain detectable.
* **Occlusion and truncation:** larger items tend to lie behind smaller ones; a placement is
  rejected when it would hide more than ``max_occlusion`` of an earlier object. Annotations
  describe the *visible* part (RLE segmentation, tight bbox, area).
* **Backgrounds** are gradients overlaid with a faint texture and clutter (lines, soft textured
  blobs); global contrast and brightness vary and Gaussian noise is added.

Everything is drawn from one ``numpy`` Generator per image, seeded from ``(seed, split, index)``,
so every image is independent of the others and the output is byte-identical for the same
arguments. Rendering is vectorised numpy over each item's bounding window.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import multiprocessing
import os
import struct
import time
import zlib
from dataclasses import asdict, dataclass, field
from multiprocessing.pool import Pool
from pathlib import Path
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils

from fgdistill.errors import ConfigError

__all__ = [
    "CATEGORY_SHAPES",
    "CATEGORY_TEXTURES",
    "SynthConfig",
    "SynthSummary",
    "generate_synthetic",
    "render_image",
    "synthetic_categories",
    "usable_cores",
]

logger = logging.getLogger(__name__)

CATEGORY_SHAPES: tuple[str, ...] = ("disc", "square", "triangle", "cross")
CATEGORY_TEXTURES: tuple[str, ...] = ("striped", "checked")
DISTRACTOR_SHAPES: tuple[str, ...] = ("ellipse", "ring", "flower")
DISTRACTOR_TEXTURES: tuple[str, ...] = ("plain", "dotted")
ALL_TEXTURES: tuple[str, ...] = CATEGORY_TEXTURES + DISTRACTOR_TEXTURES

_SPLIT_CODES = {"train": 0, "val": 1}
_SQRT_PI = math.sqrt(math.pi)
_TRIANGLE_AREA = 3 * math.sqrt(3) / 4  # area of an equilateral triangle of circumradius 1
_CROSS_AREA = 20 / 9  # area of the cross below with arm half-length 1


def synthetic_categories() -> list[dict[str, Any]]:
    """COCO ``categories`` of the benchmark: ids 1..8, ``name`` = ``"{texture}_{shape}"``."""
    cats: list[dict[str, Any]] = []
    for shape in CATEGORY_SHAPES:
        for texture in CATEGORY_TEXTURES:
            cats.append(
                {
                    "id": len(cats) + 1,
                    "name": f"{texture}_{shape}",
                    "supercategory": shape,
                }
            )
    return cats


def _lerp(a: float, b: float, t: float) -> float:
    return a + (b - a) * t


def _lerp_range(a: tuple[float, float], b: tuple[float, float], t: float) -> tuple[float, float]:
    return (_lerp(a[0], b[0], t), _lerp(a[1], b[1], t))


@dataclass(frozen=True)
class SynthConfig:
    """Knobs of the generator; :meth:`from_difficulty` gives consistent presets.

    Ranges are inclusive ``(low, high)``; sizes are the square root of an object's full area.
    """

    objects_per_image: tuple[int, int] = (2, 6)
    distractors_per_image: tuple[int, int] = (1, 3)
    clutter_per_image: tuple[int, int] = (2, 6)
    min_size_frac: float = 0.08
    """Smallest object size as a fraction of the image size (never below ``min_size_px``)."""
    min_size_px: float = 8.0
    max_size_frac: float = 0.85
    max_occlusion: float = 0.5
    """Largest fraction of an object's area that later items may hide."""
    noise_std: tuple[float, float] = (0.01, 0.05)
    contrast: tuple[float, float] = (0.6, 1.0)
    """Global contrast factor around mid-grey."""
    texture_contrast: tuple[float, float] = (0.25, 0.7)
    """Luminance difference between the two colours of an item's texture."""
    background_texture: tuple[float, float] = (0.1, 0.35)
    """Strength of the texture laid over the background."""
    hard_negative_prob: float = 0.5
    """Fraction of distractors that are category shapes with a non-category texture."""

    @classmethod
    def from_difficulty(cls, difficulty: float) -> SynthConfig:
        """Presets from 0 (clean, few objects) to 1 (crowded, noisy, low contrast)."""
        if not 0.0 <= difficulty <= 1.0:
            raise ConfigError(f"difficulty must be in [0, 1], got {difficulty}")
        d = difficulty

        def irange(a: tuple[int, int], b: tuple[int, int]) -> tuple[int, int]:
            return (round(_lerp(a[0], b[0], d)), round(_lerp(a[1], b[1], d)))

        return cls(
            objects_per_image=irange((1, 4), (3, 8)),
            distractors_per_image=irange((0, 1), (2, 5)),
            clutter_per_image=irange((1, 3), (4, 10)),
            min_size_frac=_lerp(0.12, 0.06, d),
            max_size_frac=0.85,
            max_occlusion=_lerp(0.3, 0.65, d),
            noise_std=_lerp_range((0.0, 0.02), (0.03, 0.1), d),
            contrast=_lerp_range((0.85, 1.0), (0.4, 1.0), d),
            texture_contrast=_lerp_range((0.4, 0.8), (0.15, 0.6), d),
            background_texture=_lerp_range((0.05, 0.15), (0.2, 0.5), d),
            hard_negative_prob=_lerp(0.3, 0.6, d),
        )


@dataclass
class SynthSummary:
    """What :func:`generate_synthetic` wrote."""

    out_dir: Path
    image_size: int
    seed: int
    difficulty: float
    num_images: dict[str, int] = field(default_factory=dict)
    num_instances: dict[str, int] = field(default_factory=dict)
    size_counts: dict[str, dict[str, int]] = field(default_factory=dict)
    """Per split: instances in COCO's ``small`` / ``medium`` / ``large`` area ranges."""
    num_occluded: dict[str, int] = field(default_factory=dict)
    """Per split: instances with more than 5% of their area hidden by other items."""
    ann_files: dict[str, Path] = field(default_factory=dict)
    image_dirs: dict[str, Path] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def total_images(self) -> int:
        """Images over all splits."""
        return sum(self.num_images.values())

    @property
    def images_per_second(self) -> float:
        """Generation speed over all splits (rendering, PNG and JSON writing included)."""
        return self.total_images / self.seconds if self.seconds > 0 else float("inf")


# --------------------------------------------------------------------------- rendering


@dataclass
class _Item:
    shape: str
    texture: str
    size: float
    category_id: int  # 0 for distractors


def _random_colours(
    rng: np.random.Generator, contrast: tuple[float, float]
) -> tuple[np.ndarray, np.ndarray]:
    """Two RGB colours float32 [3] whose luminances differ by a value drawn from ``contrast``."""
    r = rng.random(9).tolist()
    diff = contrast[0] + (contrast[1] - contrast[0]) * r[0]
    low = r[1] * max(1.0 - diff, 0.0)
    l0, l1 = (low, low + diff) if r[2] < 0.5 else (low + diff, low)
    saturation = 0.5 * r[3]
    c0 = [min(max(l0 + saturation * (2 * v - 1), 0.0), 1.0) for v in r[3:6]]
    c1 = [min(max(l1 + saturation * (2 * v - 1), 0.0), 1.0) for v in r[6:9]]
    return np.array(c0, dtype=np.float32), np.array(c1, dtype=np.float32)


def _clip01(x: np.ndarray) -> np.ndarray:
    """Clip a temporary array to [0, 1] in place (cheaper than ``np.clip``) and return it."""
    np.maximum(x, 0.0, out=x)
    return np.minimum(x, 1.0, out=x)


def _wave(
    a: float, b: float, dx: np.ndarray, dy: np.ndarray, phase: float = 0.0, *, cos: bool = False
) -> np.ndarray:
    """``sin(a * dx + b * dy + phase)`` (or ``cos``) for ``dx`` [1, w], ``dy`` [h, 1] -> [h, w].

    Computed from 1-D sines and cosines (angle-sum identity): two products and a sum per pixel
    instead of a transcendental, which is most of the generator's speed.
    """
    sx, cx = np.sin(a * dx), np.cos(a * dx)
    sy, cy = np.sin(b * dy + phase), np.cos(b * dy + phase)
    if cos:
        return cx * cy - sx * sy
    return sx * cy + cx * sy


def _texture(
    texture: str, dx: np.ndarray, dy: np.ndarray, period: float, angle: float, extent: float
) -> np.ndarray:
    """Texture value in [0, 1] at offsets ``dx`` [1, w], ``dy`` [h, 1] -> [h, w].

    The pattern runs along direction ``angle`` with ``period`` pixels; ``extent`` (pixels)
    scales the ``plain`` texture's shading.
    """
    c, s = math.cos(angle), math.sin(angle)
    k = 2 * math.pi / period
    # p = c * dx + s * dy runs along the pattern, q = c * dy - s * dx across it.
    if texture == "striped":
        w = _wave(k * c, k * s, dx, dy)
        w *= 2.0
        w += 0.5
        return _clip01(w)
    if texture == "checked":
        w = _wave(k * c, k * s, dx, dy)
        w *= _wave(-k * s, k * c, dx, dy)
        w *= 3.0
        w += 0.5
        return _clip01(w)
    if texture == "dotted":
        wp = _wave(k * c, k * s, dx, dy, cos=True)
        wq = _wave(-k * s, k * c, dx, dy, cos=True)
        wp *= wq
        wp *= 4.0
        wp -= 1.7
        return _clip01(wp)
    if texture == "plain":  # a smooth shading across the item
        scale = 0.35 / max(extent, 1.0)
        return _clip01((0.5 + (scale * c) * dx) + (scale * s) * dy)
    raise ValueError(f"unknown texture {texture!r}")


def _shape_sdf(shape: str, u: np.ndarray, v: np.ndarray, size: float, aux: float) -> np.ndarray:
    """Approximate signed distance (pixels, negative inside) of a shape of area ~``size**2``.

    ``u``, ``v`` are the item's rotated local coordinates; ``aux`` is a shape parameter (the
    ellipse's aspect ratio).
    """
    if shape == "disc":
        return np.sqrt(u * u + v * v) - size / _SQRT_PI
    if shape == "square":
        return np.maximum(np.abs(u), np.abs(v)) - size / 2
    if shape == "triangle":
        radius = size / math.sqrt(_TRIANGLE_AREA)
        d = v  # edge normals at 90, 210 and 330 degrees; inradius is radius / 2
        d = np.maximum(d, -0.8660254 * u - 0.5 * v)
        d = np.maximum(d, 0.8660254 * u - 0.5 * v)
        return d - radius / 2
    if shape == "cross":
        arm = size / math.sqrt(_CROSS_AREA)
        au, av = np.abs(u), np.abs(v)
        t = arm / 3
        return np.minimum(np.maximum(au - arm, av - t), np.maximum(au - t, av - arm))
    if shape == "ellipse":
        r = size / _SQRT_PI
        a, b = r * math.sqrt(aux), r / math.sqrt(aux)
        return (np.sqrt((u / a) ** 2 + (v / b) ** 2) - 1.0) * b
    if shape == "ring":
        outer = size / _SQRT_PI * 1.2
        rho = np.sqrt(u * u + v * v)
        return np.maximum(rho - outer, 0.55 * outer - rho)
    if shape == "flower":
        r = size / _SQRT_PI
        rho = np.sqrt(u * u + v * v)
        theta = np.arctan2(v, u)
        return rho - r * (0.95 + 0.35 * np.cos(5 * theta))
    raise ValueError(f"unknown shape {shape!r}")


def _extent(shape: str, size: float, aux: float) -> float:
    """Radius of a circle around the origin that contains the shape."""
    if shape == "disc":
        return size / _SQRT_PI
    if shape == "square":
        return size / 2 * math.sqrt(2)
    if shape == "triangle":
        return size / math.sqrt(_TRIANGLE_AREA)
    if shape == "cross":
        return size / math.sqrt(_CROSS_AREA) * math.sqrt(1 + 1 / 9)
    if shape == "ellipse":
        return size / _SQRT_PI * math.sqrt(aux)
    if shape == "ring":
        return size / _SQRT_PI * 1.2
    if shape == "flower":
        return size / _SQRT_PI * 1.3
    raise ValueError(f"unknown shape {shape!r}")


@functools.lru_cache(maxsize=4)
def _noise_bank(size: int) -> np.ndarray:
    """Standard normal noise float32 [3, 2 * size, 2 * size] from a fixed seed (read-only)."""
    bank = np.random.default_rng(0x5EED).standard_normal((2 * size, 2 * size, 3), np.float32)
    bank = np.ascontiguousarray(bank.transpose(2, 0, 1))  # planar, like the image
    bank.flags.writeable = False
    return bank


def _uniform(rng: np.random.Generator, low: float, high: float) -> float:
    """A Python float (weakly typed, so float32 arrays stay float32)."""
    return float(rng.uniform(low, high))


def _draw_background(rng: np.random.Generator, size: int, cfg: SynthConfig) -> np.ndarray:
    """Gradient + faint texture + clutter -> float32 [3, H, W] (roughly in [0, 1]).

    Planar (channel-first): every per-pixel operation then runs over contiguous rows instead of
    numpy inner loops of 3 elements, and computes the same float32 values element by element.
    """
    xs = np.arange(size, dtype=np.float32)[None, :] + 0.5
    ys = np.arange(size, dtype=np.float32)[:, None] + 0.5
    ca, cb = _random_colours(rng, (0.0, 0.5))
    angle = _uniform(rng, 0, 2 * math.pi)
    freq = 2 * math.pi / (size * _uniform(rng, 1.0, 3.0))
    phase = _uniform(rng, 0, 2 * math.pi)
    g = _wave(freq * math.cos(angle), freq * math.sin(angle), xs, ys, phase)
    img = ((ca + cb) / 2)[:, None, None] + ((cb - ca) / 2)[:, None, None] * g

    # A faint texture over the whole background (any texture, category ones included).
    strength = _uniform(rng, *cfg.background_texture)
    tex = _texture(
        ALL_TEXTURES[int(rng.integers(len(ALL_TEXTURES)))],
        xs - size / 2,
        ys - size / 2,
        period=_uniform(rng, 3.0, max(4.0, size / 6)),
        angle=_uniform(rng, 0, math.pi),
        extent=size / 2,
    )
    tint = (strength * rng.uniform(-1, 1, 3)).astype(np.float32)
    img += (tex - 0.5) * tint[:, None, None]

    n_clutter = int(rng.integers(cfg.clutter_per_image[0], cfg.clutter_per_image[1] + 1))
    for _ in range(n_clutter):
        colour = rng.random(3).astype(np.float32)
        if rng.random() < 0.5:
            # A straight line of random width across the image.
            theta = _uniform(rng, 0, math.pi)
            px, py = _uniform(rng, 0, size), _uniform(rng, 0, size)
            width = _uniform(rng, 0.5, max(1.0, size / 40))
            opacity = _uniform(rng, 0.4, 0.9)
            ct, st = math.cos(theta), math.sin(theta)
            alpha = np.abs((ct * xs - (ct * px + st * py)) + st * ys)  # distance to the line
            np.subtract(width + 0.5, alpha, out=alpha)
            alpha = _clip01(alpha)
            alpha *= opacity
            delta = colour[:, None, None] - img
            delta *= alpha
            img += delta
        else:
            # A soft-edged textured blob, rendered in its window only.
            r = _uniform(rng, 0.15, 0.45) * size
            px, py = _uniform(rng, 0, size), _uniform(rng, 0, size)
            squash = _uniform(rng, 0.4, 1.0)
            opacity = _uniform(rng, 0.3, 0.7)
            x0, x1 = (
                max(int(px - r / math.sqrt(squash)), 0),
                min(int(px + r / math.sqrt(squash)) + 1, size),
            )
            y0, y1 = max(int(py - r), 0), min(int(py + r) + 1, size)
            texture = ALL_TEXTURES[int(rng.integers(len(ALL_TEXTURES)))]
            period = _uniform(rng, 3.0, 10.0)
            tex_angle = _uniform(rng, 0, math.pi)
            c2 = rng.random(3).astype(np.float32)
            if x1 <= x0 or y1 <= y0:
                continue
            dx = xs[:, x0:x1] - px
            dy = ys[y0:y1] - py
            rho = np.sqrt(dx * dx * squash + dy * dy)
            alpha = _clip01((r - rho) * (1 / (0.3 * r)))
            alpha *= opacity
            tex = _texture(texture, dx, dy, period=period, angle=tex_angle, extent=r)
            patch = img[:, y0:y1, x0:x1]
            delta = (c2 - colour)[:, None, None] * tex
            delta += colour[:, None, None]
            delta -= patch
            delta *= alpha
            patch += delta
    return img


def render_image(
    rng: np.random.Generator, size: int, cfg: SynthConfig
) -> tuple[np.ndarray, list[dict[str, Any]], int]:
    """Render one image.

    Returns:
        ``(image, instances, num_occluded)``: image uint8 [size, size, 3]; instances as dicts
        with ``category_id``, ``mask`` (uint8 [size, size], Fortran order, the visible part),
        ``bbox`` (xywh)
        and ``area``; and how many instances lost more than 5% of their area to occlusion.
    """
    img = _draw_background(rng, size, cfg)
    owner = np.full((size, size), -1, dtype=np.int32)  # -1 background, -2 distractor, k instance

    min_size = max(cfg.min_size_px, cfg.min_size_frac * size)
    max_size = max(min_size * 1.5, cfg.max_size_frac * size)
    items: list[_Item] = []
    categories = synthetic_categories()
    n_obj = int(rng.integers(cfg.objects_per_image[0], cfg.objects_per_image[1] + 1))
    n_dis = int(rng.integers(cfg.distractors_per_image[0], cfg.distractors_per_image[1] + 1))
    log_lo, log_hi = math.log(min_size), math.log(max_size)
    log_hi_dis = math.log(max_size * 0.7)
    draws = rng.random((n_obj + n_dis, 4))
    for k in range(n_obj + n_dis):
        u0, u1, u2, u3 = (float(v) for v in draws[k])
        if k < n_obj:
            cat = categories[int(u0 * len(categories))]
            texture, shape = cat["name"].split("_")
            s = math.exp(log_lo + (log_hi - log_lo) * u1)
            items.append(_Item(shape, texture, s, cat["id"]))
            continue
        s = math.exp(log_lo + (log_hi_dis - log_lo) * u1)
        if u0 < cfg.hard_negative_prob:
            shape = CATEGORY_SHAPES[int(u2 * len(CATEGORY_SHAPES))]
            texture = DISTRACTOR_TEXTURES[int(u3 * len(DISTRACTOR_TEXTURES))]
        else:
            shape = DISTRACTOR_SHAPES[int(u2 * len(DISTRACTOR_SHAPES))]
            texture = ALL_TEXTURES[int(u3 * len(ALL_TEXTURES))]
        items.append(_Item(shape, texture, s, 0))
    # Mostly back-to-front by size, with jitter so small items are sometimes behind large ones.
    jitter = rng.lognormal(0.0, 0.4, len(items))
    order = np.argsort(-np.array([it.size for it in items]) * jitter, kind="stable")

    full_area: list[float] = []
    visible: list[int] = []
    windows: list[tuple[int, int, int, int]] = []
    cat_ids: list[int] = []
    attempts = 6
    for j in order:
        item = items[int(j)]
        # One batch of draws per item: shape/texture parameters, then candidate positions.
        r = rng.random(4 + 2 * attempts)
        aux = 2.2 + 1.3 * float(r[0])
        extent = _extent(item.shape, item.size, aux)
        angle = 2 * math.pi * float(r[1])
        period = min(max(item.size / (2.5 + 2.0 * float(r[2])), 3.0), 14.0)
        tex_angle = math.pi * float(r[3])
        c0, c1 = _random_colours(rng, cfg.texture_contrast)
        ca, sa = math.cos(angle), math.sin(angle)
        margin = min(0.6 * extent, size / 2)
        placed = False
        for attempt in range(attempts):
            cx = margin + (size - 2 * margin) * float(r[4 + 2 * attempt])
            cy = margin + (size - 2 * margin) * float(r[5 + 2 * attempt])
            x0, x1 = max(int(cx - extent) - 1, 0), min(int(cx + extent) + 2, size)
            y0, y1 = max(int(cy - extent) - 1, 0), min(int(cy + extent) + 2, size)
            if x1 <= x0 or y1 <= y0:
                continue
            dx = np.arange(x0, x1, dtype=np.float32)[None, :] + 0.5 - cx
            dy = np.arange(y0, y1, dtype=np.float32)[:, None] + 0.5 - cy
            u = ca * dx + sa * dy
            v = ca * dy - sa * dx
            sdf = _shape_sdf(item.shape, u, v, item.size, aux)
            mask = sdf < 0
            area = int(mask.sum())
            if item.category_id and area < 0.6 * item.size**2:  # too truncated by the border
                continue
            if area == 0:
                continue
            covered = owner[y0:y1, x0:x1][mask]
            covered = covered[covered >= 0]
            if covered.size and visible:
                hidden = np.bincount(covered, minlength=len(visible))
                left = np.array(visible) - hidden
                if np.any(left < (1.0 - cfg.max_occlusion) * np.array(full_area)):
                    continue
                for hit in np.flatnonzero(hidden):
                    visible[hit] -= int(hidden[hit])
            np.subtract(0.5, sdf, out=sdf)
            alpha = _clip01(sdf)  # anti-aliased coverage
            tex = _texture(item.texture, dx, dy, period, tex_angle, extent)
            colour = (c1 - c0)[:, None, None] * tex
            colour += c0[:, None, None]
            patch = img[:, y0:y1, x0:x1]  # a view: the updates below draw into img
            colour -= patch
            colour *= alpha
            patch += colour
            if item.category_id:
                owner[y0:y1, x0:x1][mask] = len(visible)
                visible.append(area)
                full_area.append(float(area))
                windows.append((x0, y0, x1, y1))
                cat_ids.append(item.category_id)
            else:
                owner[y0:y1, x0:x1][mask] = -2
            placed = True
            break
        if not placed:
            logger.debug("could not place a %s %s", item.texture, item.shape)

    # Global contrast, brightness and noise.
    contrast = _uniform(rng, *cfg.contrast)
    brightness = _uniform(rng, -0.1, 0.1)
    sigma = _uniform(rng, *cfg.noise_std)
    # To 8-bit in place: x * 255 * contrast + offset, plus noise, clipped.
    img *= 255.0 * contrast
    img += 255.0 * (0.5 + brightness - 0.5 * contrast) + 0.5
    if sigma > 0:
        # A window of a fixed noise bank at a random offset: drawing fresh normals per image
        # would cost more than all the rendering.
        bank = _noise_bank(size)
        oy, ox = (int(v) for v in rng.integers(0, size, 2))
        img += bank[:, oy : oy + size, ox : ox + size] * (255.0 * sigma)
    np.clip(img, 0, 255, out=img)
    image = np.ascontiguousarray(img.astype(np.uint8).transpose(1, 2, 0))

    instances = []
    occluded = 0
    for k, (x0, y0, x1, y1) in enumerate(windows):
        vis = owner[y0:y1, x0:x1] == k
        area = int(vis.sum())
        if area == 0:
            continue
        if area < 0.95 * full_area[k]:
            occluded += 1
        rows = np.flatnonzero(vis.any(axis=1))
        cols = np.flatnonzero(vis.any(axis=0))
        full = np.zeros((size, size), dtype=np.uint8, order="F")  # pycocotools wants Fortran
        full[y0:y1, x0:x1] = vis
        instances.append(
            {
                "category_id": cat_ids[k],
                "mask": full,
                "bbox": [
                    float(x0 + cols[0]),
                    float(y0 + rows[0]),
                    float(cols[-1] - cols[0] + 1),
                    float(rows[-1] - rows[0] + 1),
                ],
                "area": area,
            }
        )
    return image, instances, occluded


def write_png(path: Path, pixels: np.ndarray, *, level: int = 0) -> None:
    """Write uint8 [H, W, 3] pixels as an RGB PNG (no filtering, zlib ``level``).

    Byte-deterministic and several times faster than PIL's encoder. The default level 0 stores
    the pixels uncompressed: the noisy images shrink only ~10% at level 1, which costs more time
    than rendering the objects.
    """
    height, width, channels = pixels.shape
    if channels != 3 or pixels.dtype != np.uint8:
        raise ValueError(f"expected uint8 [H, W, 3] pixels, got {pixels.dtype} {pixels.shape}")
    rows = np.zeros((height, width * 3 + 1), dtype=np.uint8)  # filter byte 0 ("none") per row
    rows[:, 1:] = pixels.reshape(height, width * 3)

    def chunk(kind: bytes, payload: bytes) -> bytes:
        crc = zlib.crc32(kind + payload) & 0xFFFFFFFF
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    data = (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(rows.tobytes(), level))
        + chunk(b"IEND", b"")
    )
    path.write_bytes(data)


def _size_class(area: float) -> str:
    if area < 32**2:
        return "small"
    if area < 96**2:
        return "medium"
    return "large"


def _make_image(
    task: tuple[Path, str, int, int, int, SynthConfig],
) -> tuple[list[dict[str, Any]], int]:
    """Render, write and annotate one image (runs in worker processes too).

    Returns the image's annotations (without ``id``/``image_id``) and its occluded count.
    """
    image_dir, split, index, image_size, seed, cfg = task
    rng = np.random.default_rng(np.random.SeedSequence([seed, _SPLIT_CODES[split], index]))
    pixels, instances, occluded = render_image(rng, image_size, cfg)
    write_png(image_dir / f"{index:06d}.png", pixels)
    anns = []
    for inst in instances:
        rle = mask_utils.encode(inst["mask"])
        anns.append(
            {
                "category_id": inst["category_id"],
                "bbox": inst["bbox"],
                "area": float(inst["area"]),
                "iscrowd": 0,
                "segmentation": {
                    "size": [int(v) for v in rle["size"]],
                    "counts": rle["counts"].decode("ascii"),
                },
            }
        )
    return anns, occluded


def _write_split(
    out_dir: Path,
    split: str,
    count: int,
    image_size: int,
    seed: int,
    cfg: SynthConfig,
    info: dict[str, Any],
    summary: SynthSummary,
    pool: Pool | None,
) -> None:
    image_dir = out_dir / split
    image_dir.mkdir(parents=True, exist_ok=True)
    images: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []
    sizes = {"small": 0, "medium": 0, "large": 0}
    occluded_total = 0
    tasks = [(image_dir, split, index, image_size, seed, cfg) for index in range(count)]
    made = pool.imap(_make_image, tasks, chunksize=4) if pool else map(_make_image, tasks)
    for index, (anns, occluded) in enumerate(made):
        occluded_total += occluded
        image_id = index + 1
        images.append(
            {
                "id": image_id,
                "file_name": f"{index:06d}.png",
                "width": image_size,
                "height": image_size,
            }
        )
        for ann in anns:
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, **ann})
            sizes[_size_class(ann["area"])] += 1
    data = {
        "info": dict(info, split=split),
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": synthetic_categories(),
    }
    ann_file = out_dir / "annotations" / f"instances_{split}.json"
    ann_file.parent.mkdir(parents=True, exist_ok=True)
    ann_file.write_text(json.dumps(data, separators=(",", ":")) + "\n", encoding="utf-8")
    summary.num_images[split] = count
    summary.num_instances[split] = len(annotations)
    summary.size_counts[split] = sizes
    summary.num_occluded[split] = occluded_total
    summary.ann_files[split] = ann_file
    summary.image_dirs[split] = image_dir


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask where the OS has one)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def _pool(workers: int) -> Pool:
    # fork where the OS has it: workers start in milliseconds and inherit the imported modules
    # (spawn would import fgdistill, hence torch, again in every worker: seconds each). The
    # workers run numpy, zlib and pycocotools only.
    methods = multiprocessing.get_all_start_methods()
    return multiprocessing.get_context("fork" if "fork" in methods else None).Pool(workers)


def generate_synthetic(
    out_dir: str | Path,
    *,
    num_train: int = 512,
    num_val: int = 128,
    image_size: int = 128,
    seed: int = 0,
    difficulty: float = 0.5,
    config: SynthConfig | None = None,
    workers: int = 1,
) -> SynthSummary:
    """Write the synthetic benchmark as a COCO-format dataset.

    Layout: ``out_dir/train/*.png``, ``out_dir/val/*.png``,
    ``out_dir/annotations/instances_train.json`` and ``instances_val.json``. Image ids start at
    1 in each split. Every annotation has ``bbox`` (xywh, tight around the visible part), an RLE
    ``segmentation`` of the visible part, ``area`` (visible pixels) and ``iscrowd`` 0.

    Args:
        out_dir: output folder (created; existing files of the same names are overwritten).
        num_train: training images.
        num_val: validation images.
        image_size: side of the square images in pixels (>= 32).
        seed: the same arguments give byte-identical JSON and images.
        difficulty: 0 (easy) .. 1 (hard); see :meth:`SynthConfig.from_difficulty`.
        config: explicit knobs; overrides ``difficulty`` when given.
        workers: render and write the images in this many processes (1: in this one; never
            more than there are images; ``fgdistill synth`` defaults to :func:`usable_cores`).
            The output does not depend on it: every image has its own random generator, and
            the annotations are gathered in image order.

    Returns:
        A :class:`SynthSummary` with counts, size distribution and the speed.
    """
    if image_size < 32:
        raise ConfigError(f"image_size must be >= 32, got {image_size}")
    if num_train < 0 or num_val < 0:
        raise ConfigError(f"image counts must be >= 0, got train {num_train}, val {num_val}")
    if workers < 1:
        raise ConfigError(f"workers must be >= 1, got {workers}")
    workers = min(workers, num_train + num_val)
    cfg = config if config is not None else SynthConfig.from_difficulty(difficulty)
    out = Path(out_dir)
    start = time.perf_counter()
    summary = SynthSummary(out_dir=out, image_size=image_size, seed=seed, difficulty=difficulty)
    info = {
        "description": "fgdistill synthetic detection benchmark",
        "version": "1",
        "image_size": image_size,
        "seed": seed,
        "config": {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(cfg).items()},
    }
    pool = _pool(workers) if workers > 1 else None
    try:
        for split, count in (("train", num_train), ("val", num_val)):
            _write_split(out, split, count, image_size, seed, cfg, info, summary, pool)
        if pool is not None:
            pool.close()  # every result is in: let the workers finish
    finally:
        if pool is not None:
            pool.terminate()  # on an error: stop the images still queued
            pool.join()
    summary.seconds = time.perf_counter() - start
    logger.info(
        "wrote %d images to %s in %.2fs (%.0f images/s)",
        summary.total_images,
        out,
        summary.seconds,
        summary.images_per_second,
    )
    return summary
