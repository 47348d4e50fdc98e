"""COCO-format detection data: validation, category mapping and the dataset class.

One validator (:func:`read_annotations`) serves two modes:

* **raise-first** (``problems=None``): the first error raises :class:`~fgdistill.errors.DataError`
  naming the file and the offending entry. :class:`CocoDetection` and the evaluator use this.
* **collect-all** (``problems=[]``): every problem is appended to the list as a :class:`Problem`
  and bad entries are skipped, so a whole dataset can be reported at once
  (:func:`fgdistill.data.check.check_dataset`).

pycocotools' ``COCO()`` constructor prints to stdout and uses ``assert`` for bad input, so the JSON
is validated here first and the pycocotools index is built from the validated dict
(:meth:`CocoIndex.to_coco_api`). pycocotools is otherwise only used for mask decoding.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
import torch
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from torch import Tensor
from torch.utils.data import Dataset

from fgdistill.data.images import read_image
from fgdistill.errors import DataError

__all__ = [
    "CategoryMap",
    "CocoDetection",
    "CocoIndex",
    "Problem",
    "Target",
    "decode_rle_counts",
    "degenerate_after_clipping",
    "read_annotations",
    "segmentation_to_mask",
]

logger = logging.getLogger(__name__)

Target = dict[str, Any]
"""A detection target: ``boxes`` FloatTensor[K, 4] (xyxy), ``labels`` Int64Tensor[K],
optional ``masks`` UInt8Tensor[K, H, W], ``image_id`` int, ``area`` FloatTensor[K] and
``iscrowd`` Int64Tensor[K]."""

Severity = Literal["error", "warning"]

# Boxes narrower or lower than this many pixels are "degenerate" and left out of targets.
MIN_BOX_SIZE = 1.0


@dataclass(frozen=True)
class Problem:
    """One problem found in a dataset: ``severity`` is ``"error"`` or ``"warning"``."""

    severity: Severity
    message: str

    def __str__(self) -> str:
        return f"{self.severity}: {self.message}"


class _Problems:
    """Receives problems; raises on the first error when no list is given."""

    def __init__(self, sink: list[Problem] | None) -> None:
        self.sink = sink

    def error(self, message: str) -> None:
        if self.sink is None:
            raise DataError(message)
        self.sink.append(Problem("error", message))

    def warning(self, message: str) -> None:
        if self.sink is None:
            logger.warning("%s", message)
        else:
            self.sink.append(Problem("warning", message))


# --------------------------------------------------------------------------- category map


class CategoryMap:
    """Dataset category ids <-> contiguous labels ``1..K`` and names, in one place.

    Label 0 is the background, as torchvision's detectors expect. Labels follow the order of
    increasing category id, so the same categories always get the same labels.
    """

    def __init__(self, categories: Sequence[dict[str, Any]]) -> None:
        """Build from COCO ``categories`` entries (each with ``id`` and ``name``)."""
        ordered = sorted(categories, key=lambda c: int(c["id"]))
        self._cat_ids: list[int] = [int(c["id"]) for c in ordered]
        self._names: list[str] = [str(c.get("name", c["id"])) for c in ordered]
        if len(set(self._cat_ids)) != len(self._cat_ids):
            raise DataError(f"duplicate category ids in {self._cat_ids}")
        self._label_of = {cat_id: i + 1 for i, cat_id in enumerate(self._cat_ids)}

    @property
    def num_classes(self) -> int:
        """K, the number of object categories (background not counted)."""
        return len(self._cat_ids)

    @property
    def cat_ids(self) -> list[int]:
        """Dataset category ids in label order (label ``i`` is ``cat_ids[i - 1]``)."""
        return list(self._cat_ids)

    @property
    def names(self) -> list[str]:
        """Category names in label order (label ``i`` is ``names[i - 1]``)."""
        return list(self._names)

    def label_of(self, cat_id: int) -> int:
        """Contiguous label (1..K) of a dataset category id."""
        try:
            return self._label_of[int(cat_id)]
        except KeyError:
            raise DataError(f"unknown category id {cat_id}; known ids: {self._cat_ids}") from None

    def cat_id_of(self, label: int) -> int:
        """Dataset category id of a contiguous label (1..K)."""
        label = int(label)
        if not 1 <= label <= len(self._cat_ids):
            raise DataError(f"label {label} is outside 1..{len(self._cat_ids)}")
        return self._cat_ids[label - 1]

    def name_of(self, label: int) -> str:
        """Category name of a contiguous label (1..K)."""
        return self._names[self.label_of(self.cat_id_of(label)) - 1]

    def __len__(self) -> int:
        return len(self._cat_ids)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, CategoryMap):
            return NotImplemented
        return self._cat_ids == other._cat_ids and self._names == other._names

    def __repr__(self) -> str:
        pairs = ", ".join(f"{c}:{n}" for c, n in zip(self._cat_ids, self._names, strict=True))
        return f"CategoryMap({pairs})"


# --------------------------------------------------------------------------- validation


@dataclass(frozen=True)
class ImageRecord:
    """One validated ``images`` entry."""

    id: int
    file_name: str
    width: int
    height: int
    index: int  # position in the JSON list, for messages


@dataclass(frozen=True)
class AnnRecord:
    """One validated ``annotations`` entry; ``bbox`` is COCO xywh in pixels."""

    id: int
    image_id: int
    category_id: int
    bbox: tuple[float, float, float, float]
    area: float
    iscrowd: int
    segmentation: Any
    index: int  # position in the JSON list, for messages

    @property
    def degenerate(self) -> bool:
        """True when the box is under :data:`MIN_BOX_SIZE` pixels wide or high."""
        return self.bbox[2] < MIN_BOX_SIZE or self.bbox[3] < MIN_BOX_SIZE


@dataclass
class CocoIndex:
    """A validated COCO instances file.

    ``images`` keeps file order; ``anns_by_image`` maps every image id (also those without
    annotations) to its annotations in file order; ``data`` is the validated JSON holding only
    the entries that passed, ready for pycocotools.
    """

    path: Path
    images: list[ImageRecord]
    categories: list[dict[str, Any]]
    anns_by_image: dict[int, list[AnnRecord]]
    data: dict[str, Any]
    category_map: CategoryMap = field(init=False)

    def __post_init__(self) -> None:
        self.category_map = CategoryMap(self.categories)

    @property
    def annotations(self) -> list[AnnRecord]:
        """Every valid annotation, in file order."""
        anns = [a for lst in self.anns_by_image.values() for a in lst]
        return sorted(anns, key=lambda a: a.index)

    def to_coco_api(self) -> COCO:
        """A pycocotools ``COCO`` object built from the validated data, without stdout noise."""
        coco = COCO()
        coco.dataset = self.data
        with contextlib.redirect_stdout(io.StringIO()):
            coco.createIndex()
        return coco


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _short(value: Any, limit: int = 60) -> str:
    text = json.dumps(value) if not isinstance(value, str) else repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _load_json(path: Path, problems: _Problems) -> Any:
    name = str(path)
    if not path.exists():
        problems.error(f"{name}: annotation file not found")
        return None
    if path.is_dir():
        problems.error(f"{name}: is a directory, expected a COCO instances JSON file")
        return None
    try:
        text = path.read_bytes().decode("utf-8")
    except OSError as exc:
        problems.error(f"{name}: cannot read annotation file ({exc.strerror or exc})")
        return None
    except UnicodeDecodeError as exc:
        problems.error(f"{name}: not UTF-8 text ({exc.reason} at byte {exc.start})")
        return None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        problems.error(f"{name}: invalid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}")
        return None


def _check_segmentation(seg: Any, image: ImageRecord | None) -> str | None:
    """Why ``seg`` is not a valid COCO segmentation, or None when it is."""
    if isinstance(seg, list):
        for j, poly in enumerate(seg):
            if not isinstance(poly, list) or not all(_is_number(v) for v in poly):
                return f"segmentation[{j}] must be a list of finite numbers"
            if len(poly) < 6 or len(poly) % 2:
                return (
                    f"segmentation[{j}] must hold an even number (>= 6) of coordinates, "
                    f"got {len(poly)}"
                )
        return None
    if isinstance(seg, dict):
        if "counts" not in seg or "size" not in seg:
            return "RLE segmentation must have 'counts' and 'size'"
        size = seg["size"]
        if not (isinstance(size, list) and len(size) == 2 and all(_is_int(v) for v in size)):
            return f"RLE segmentation size must be [height, width], got {_short(size)}"
        if image is not None and size != [image.height, image.width]:
            return (
                f"RLE segmentation size {size} does not match the image's "
                f"[height, width] [{image.height}, {image.width}]"
            )
        counts = seg["counts"]
        if isinstance(counts, list):
            if not all(_is_int(v) and v >= 0 for v in counts):
                return "uncompressed RLE counts must be non-negative integers"
            if sum(counts) != size[0] * size[1]:
                return f"uncompressed RLE counts sum to {sum(counts)}, expected {size[0] * size[1]}"
        elif isinstance(counts, str):
            # pycocotools decodes a bad string without a word, into memory it never fills
            runs = decode_rle_counts(counts)
            if runs is None or (runs < 0).any():
                return "compressed RLE counts are not a valid COCO RLE string"
            if int(runs.sum()) != size[0] * size[1]:
                return (
                    f"compressed RLE counts decode to {int(runs.sum())} pixels, expected "
                    f"height * width = {size[0] * size[1]}"
                )
        else:
            return "RLE counts must be a string or a list of integers"
        return None
    return f"segmentation must be a list of polygons or an RLE dict, got {_short(seg)}"


def decode_rle_counts(counts: str) -> npt.NDArray[np.int64] | None:
    """The run lengths of a compressed COCO RLE string, ``int64[R]``, or None if it is not one.

    COCO's format: each run is written in 6-bit characters (offset by 48), 5 bits of value and
    a continuation bit each, the last one's top value bit the sign; from the fourth run on, the
    value is the difference to the run two before. Decoded with array operations, so checking a
    large mask costs about as much as reading it.
    """
    if not counts:
        return np.zeros(0, dtype=np.int64)
    try:
        codes = np.frombuffer(counts.encode("ascii"), dtype=np.uint8).astype(np.int64) - 48
    except UnicodeEncodeError:
        return None
    more = (codes & 0x20) != 0
    if ((codes < 0) | (codes > 63)).any() or more[-1]:
        return None  # a character outside the alphabet, or the last run cut off
    ends = np.flatnonzero(~more)
    starts = np.concatenate([[0], ends[:-1] + 1])
    lengths = ends - starts + 1
    if lengths.max() > 12:
        return None  # more than 60 bits: not a run length
    group = np.repeat(np.arange(len(ends)), lengths)
    shift = 5 * (np.arange(len(codes)) - starts[group])
    values = np.add.reduceat((codes & 0x1F) << shift, starts)
    negative = (codes[ends] & 0x10) != 0
    values[negative] -= np.left_shift(1, 5 * lengths[negative])
    runs = values.copy()
    runs[1::2] = np.cumsum(values[1::2])  # run m >= 3 adds run m - 2: two running sums
    runs[2::2] = np.cumsum(values[2::2])
    return runs


def read_annotations(
    ann_file: str | Path, *, problems: list[Problem] | None = None
) -> CocoIndex | None:
    """Read and validate a COCO instances JSON file.

    Checks: the file exists and is valid JSON; ``images``, ``annotations`` and ``categories`` are
    lists; every entry has its keys with the right types (images: ``id``, ``file_name``,
    ``width``, ``height``; categories: ``id``, ``name``; annotations: ``id``, ``image_id``,
    ``category_id``, ``bbox``); ids are unique; a bbox is 4 finite numbers with non-negative size;
    annotations point at known images and categories; optional ``area``, ``iscrowd`` and
    ``segmentation`` are well-formed. Boxes reaching more than a pixel outside their image are a
    warning (they are clipped when loaded).

    Args:
        ann_file: path to the instances JSON.
        problems: ``None`` to raise :class:`DataError` at the first error (warnings are logged);
            a list to append every :class:`Problem` to, skipping bad entries.

    Returns:
        The validated index; ``None`` only in collect mode when the file cannot be used at all.
    """
    path = Path(ann_file)
    name = str(ann_file)
    out = _Problems(problems)
    data = _load_json(path, out)
    if data is None or not _has_coco_lists(data, name, out):
        return None
    categories = _read_categories(data["categories"], name, out)
    if not data["categories"]:
        out.error(f"{name}: 'categories' is empty")
    images = _read_images(data["images"], name, out)
    image_by_id = {img.id: img for img in images}
    cat_ids = {cat["id"] for cat in categories}
    anns_by_image, valid_anns = _read_annotation_list(
        data["annotations"], name, image_by_id, cat_ids, out
    )
    if not categories:
        return None
    return CocoIndex(
        path=path,
        images=images,
        categories=categories,
        anns_by_image=anns_by_image,
        data=_clean_data(data, set(image_by_id), valid_anns, categories),
    )


def _has_coco_lists(data: Any, name: str, out: _Problems) -> bool:
    """Whether ``data`` is an object with the lists ``images``, ``annotations``, ``categories``."""
    if not isinstance(data, dict):
        out.error(f"{name}: top level must be a JSON object, got {type(data).__name__}")
        return False
    missing = [k for k in ("images", "annotations", "categories") if k not in data]
    if missing:
        out.error(f"{name}: missing top-level key(s) {', '.join(repr(k) for k in missing)}")
        return False
    for key in ("images", "annotations", "categories"):
        if not isinstance(data[key], list):
            out.error(f"{name}: '{key}' must be a list, got {type(data[key]).__name__}")
            return False
    return True


def _where(name: str, kind: str, i: int, entry: Any) -> str:
    """``"file: kind[i] (id ...)"``, the place of an entry in messages."""
    if isinstance(entry, dict) and "id" in entry:
        return f"{name}: {kind}[{i}] (id {_short(entry['id'], 20)})"
    return f"{name}: {kind}[{i}]"


def _read_categories(entries: list[Any], name: str, out: _Problems) -> list[dict[str, Any]]:
    """The valid ``categories`` entries (integer unique ``id``, string ``name``), in order."""
    categories: list[dict[str, Any]] = []
    cat_ids: set[int] = set()
    for i, cat in enumerate(entries):
        loc = _where(name, "categories", i, cat)
        if not isinstance(cat, dict):
            out.error(f"{loc}: must be an object, got {_short(cat)}")
            continue
        if "id" not in cat or "name" not in cat:
            out.error(f"{loc}: missing key {'id' if 'id' not in cat else 'name'!r}")
            continue
        if not _is_int(cat["id"]):
            out.error(f"{loc}: id must be an integer, got {_short(cat['id'])}")
            continue
        if cat["id"] in cat_ids:
            out.error(f"{loc}: duplicate category id {cat['id']}")
            continue
        if not isinstance(cat["name"], str):
            out.error(f"{loc}: name must be a string, got {_short(cat['name'])}")
            continue
        cat_ids.add(cat["id"])
        categories.append(cat)
    return categories


def _read_images(entries: list[Any], name: str, out: _Problems) -> list[ImageRecord]:
    """The valid ``images`` entries (unique id, file name, positive size), in order."""
    images: list[ImageRecord] = []
    ids: set[int] = set()
    for i, img in enumerate(entries):
        loc = _where(name, "images", i, img)
        if not isinstance(img, dict):
            out.error(f"{loc}: must be an object, got {_short(img)}")
            continue
        keys = [k for k in ("id", "file_name", "width", "height") if k not in img]
        if keys:
            out.error(f"{loc}: missing key(s) {', '.join(repr(k) for k in keys)}")
            continue
        if not _is_int(img["id"]):
            out.error(f"{loc}: id must be an integer, got {_short(img['id'])}")
            continue
        if img["id"] in ids:
            out.error(f"{loc}: duplicate image id {img['id']}")
            continue
        if not isinstance(img["file_name"], str) or not img["file_name"]:
            out.error(
                f"{loc}: file_name must be a non-empty string, got {_short(img['file_name'])}"
            )
            continue
        bad_size = [k for k in ("width", "height") if not (_is_int(img[k]) and img[k] > 0)]
        if bad_size:
            k = bad_size[0]
            out.error(f"{loc}: {k} must be a positive integer, got {_short(img[k])}")
            continue
        images.append(ImageRecord(img["id"], img["file_name"], img["width"], img["height"], i))
        ids.add(img["id"])
    return images


def _read_annotation_list(
    entries: list[Any],
    name: str,
    image_by_id: dict[int, ImageRecord],
    cat_ids: set[int],
    out: _Problems,
) -> tuple[dict[int, list[AnnRecord]], list[dict[str, Any]]]:
    """The valid annotations by image id, and their JSON entries (``area``, ``iscrowd`` filled).

    Boxes reaching more than a pixel outside their image are one warning.
    """
    anns_by_image: dict[int, list[AnnRecord]] = {image_id: [] for image_id in image_by_id}
    valid_anns: list[dict[str, Any]] = []
    ann_ids: set[int] = set()
    outside: list[str] = []
    for i, ann in enumerate(entries):
        record = _read_annotation(
            ann, i, _where(name, "annotations", i, ann), image_by_id, cat_ids, ann_ids, out
        )
        if record is None:
            continue
        image = image_by_id[record.image_id]
        x, y, w, h = record.bbox
        if x < -1 or y < -1 or x + w > image.width + 1 or y + h > image.height + 1:
            outside.append(f"annotations[{i}] (id {record.id})")
        ann_ids.add(record.id)
        anns_by_image[record.image_id].append(record)
        clean = dict(ann)
        clean.setdefault("area", record.area)
        clean.setdefault("iscrowd", record.iscrowd)
        valid_anns.append(clean)
    if outside:
        out.warning(
            f"{name}: {len(outside)} box(es) reach more than 1 px outside their image and will be "
            f"clipped: {', '.join(outside[:5])}{' ...' if len(outside) > 5 else ''}"
        )
    return anns_by_image, valid_anns


def _read_annotation(
    ann: Any,
    i: int,
    loc: str,
    image_by_id: dict[int, ImageRecord],
    cat_ids: set[int],
    ann_ids: set[int],
    out: _Problems,
) -> AnnRecord | None:
    """``annotations[i]`` as a record, or None (and an error) when it is not valid."""
    if not isinstance(ann, dict):
        out.error(f"{loc}: must be an object, got {_short(ann)}")
        return None
    keys = [k for k in ("id", "image_id", "category_id", "bbox") if k not in ann]
    if keys:
        out.error(f"{loc}: missing key(s) {', '.join(repr(k) for k in keys)}")
        return None
    bad_int = [k for k in ("id", "image_id", "category_id") if not _is_int(ann[k])]
    if bad_int:
        k = bad_int[0]
        out.error(f"{loc}: {k} must be an integer, got {_short(ann[k])}")
        return None
    if ann["id"] in ann_ids:
        out.error(f"{loc}: duplicate annotation id {ann['id']}")
        return None
    bbox = ann["bbox"]
    if not (isinstance(bbox, list) and len(bbox) == 4 and all(_is_number(v) for v in bbox)):
        out.error(f"{loc}: bbox must be 4 finite numbers, got {_short(bbox)}")
        return None
    if bbox[2] < 0 or bbox[3] < 0:
        out.error(f"{loc}: bbox has a negative size (width {bbox[2]}, height {bbox[3]})")
        return None
    image = image_by_id.get(ann["image_id"])
    if image is None:
        out.error(f"{loc}: image_id {ann['image_id']} is not in 'images'")
        return None
    if ann["category_id"] not in cat_ids:
        out.error(f"{loc}: category_id {ann['category_id']} is not in 'categories'")
        return None
    iscrowd = ann.get("iscrowd", 0)
    if iscrowd not in (0, 1) or isinstance(iscrowd, bool):
        out.error(f"{loc}: iscrowd must be 0 or 1, got {_short(iscrowd)}")
        return None
    area = ann.get("area", float(bbox[2]) * float(bbox[3]))
    if not (_is_number(area) and area >= 0):
        out.error(f"{loc}: area must be a finite non-negative number, got {_short(area)}")
        return None
    seg = ann.get("segmentation")
    if seg is not None:
        reason = _check_segmentation(seg, image)
        if reason is not None:
            out.error(f"{loc}: {reason}")
            return None
    x, y, w, h = (float(v) for v in bbox)
    return AnnRecord(
        id=ann["id"],
        image_id=ann["image_id"],
        category_id=ann["category_id"],
        bbox=(x, y, w, h),
        area=float(area),
        iscrowd=int(iscrowd),
        segmentation=seg,
        index=i,
    )


def _clean_data(
    data: dict[str, Any],
    valid_image_ids: set[int],
    valid_anns: list[dict[str, Any]],
    categories: list[dict[str, Any]],
) -> dict[str, Any]:
    """``data`` with only the valid images (first entry per id), annotations and categories."""
    clean_data = {k: v for k, v in data.items() if k not in ("images", "annotations", "categories")}
    seen: set[int] = set()
    unique_images = []
    for img in data["images"]:
        if isinstance(img, dict) and img.get("id") in valid_image_ids and img["id"] not in seen:
            seen.add(img["id"])
            unique_images.append(img)
    clean_data["images"] = unique_images
    clean_data["annotations"] = valid_anns
    clean_data["categories"] = categories
    return clean_data


def _read_or_raise(ann_file: str | Path) -> CocoIndex:
    index = read_annotations(ann_file)
    if index is None:  # pragma: no cover - raise mode raises before returning None
        raise DataError(f"{ann_file}: cannot be read as COCO annotations")
    return index


# --------------------------------------------------------------------------- masks and images


def segmentation_to_mask(segmentation: Any, height: int, width: int) -> np.ndarray:
    """Decode a COCO segmentation (polygons, RLE or uncompressed RLE) to uint8 ``[H, W]``."""
    if isinstance(segmentation, list):
        if not segmentation:
            return np.zeros((height, width), dtype=np.uint8)
        rle = mask_utils.merge(mask_utils.frPyObjects(segmentation, height, width))
    elif isinstance(segmentation["counts"], list):
        rle = mask_utils.frPyObjects(segmentation, height, width)
    else:
        counts = segmentation["counts"]
        rle = {
            "size": segmentation["size"],
            "counts": counts.encode("ascii") if isinstance(counts, str) else counts,
        }
    with warnings.catch_warnings():
        # pycocotools' decode trips numpy 2's __array__(copy=...) deprecation; harmless.
        warnings.simplefilter("ignore", DeprecationWarning)
        mask = mask_utils.decode(rle)
    return np.ascontiguousarray(mask, dtype=np.uint8)


# --------------------------------------------------------------------------- dataset

Transform = Callable[[Tensor, Target], tuple[Tensor, Target]]


class CocoDetection(Dataset[tuple[Tensor, Target]]):
    """A COCO-format detection dataset: an instances JSON plus an image folder.

    Each item is ``(image, target)``:

    * ``image``: FloatTensor[3, H, W] in ``[0, 1]`` (grey and RGBA images are converted to RGB);
    * ``target["boxes"]``: FloatTensor[K, 4], xyxy in pixels, clipped to the image;
    * ``target["labels"]``: Int64Tensor[K], contiguous labels 1..num_classes
      (see :attr:`category_map`);
    * ``target["masks"]``: UInt8Tensor[K, H, W], only with ``masks=True``;
    * ``target["image_id"]``: int, the dataset's image id;
    * ``target["area"]``: FloatTensor[K], the annotation's ``area``;
    * ``target["iscrowd"]``: Int64Tensor[K].

    The annotation file is validated up front (:func:`read_annotations`); a missing or broken
    image raises :class:`DataError` naming the file when it is loaded. Degenerate boxes (under
    1 px wide or high, also after clipping) are dropped with one counted warning.

    Args:
        ann_file: COCO instances JSON.
        image_dir: folder the images' ``file_name`` entries are relative to.
        masks: also return instance masks decoded from ``segmentation``.
        train: leave crowd annotations out of targets, and filter images without usable
            annotations unless ``filter_empty`` says otherwise.
        filter_empty: drop images with no usable (non-crowd, non-degenerate) annotation; the
            default (``None``) follows ``train``: filter for training, keep every image for
            evaluation.
        transforms: callable ``(image, target) -> (image, target)`` applied last.
    """

    def __init__(
        self,
        ann_file: str | Path,
        image_dir: str | Path,
        *,
        masks: bool = False,
        train: bool = False,
        filter_empty: bool | None = None,
        transforms: Transform | None = None,
    ) -> None:
        self.ann_file = Path(ann_file)
        self.image_dir = Path(image_dir)
        self.masks = masks
        self.train = train
        self.transforms = transforms
        self.index = _read_or_raise(ann_file)
        if not self.image_dir.is_dir():
            raise DataError(f"{image_dir}: image folder not found")
        if filter_empty is None:
            filter_empty = train

        self._anns: dict[int, list[AnnRecord]] = {}
        dropped: list[AnnRecord] = []
        for img in self.index.images:
            kept = []
            for ann in self.index.anns_by_image[img.id]:
                if train and ann.iscrowd:
                    continue
                if degenerate_after_clipping(ann, img):
                    dropped.append(ann)
                    continue
                if masks and not ann.segmentation:  # None, or an empty list of polygons
                    raise DataError(
                        f"{ann_file}: annotations[{ann.index}] (id {ann.id}): masks were asked "
                        "for but the annotation has no or an empty 'segmentation'"
                    )
                kept.append(ann)
            self._anns[img.id] = kept
        if dropped:
            examples = ", ".join(f"annotations[{a.index}] (id {a.id})" for a in dropped[:3])
            logger.warning(
                "%s: dropped %d degenerate box(es) under %g px wide or high, e.g. %s",
                ann_file,
                len(dropped),
                MIN_BOX_SIZE,
                examples,
            )
        self.num_degenerate = len(dropped)

        images = self.index.images
        if filter_empty:
            images = [img for img in images if any(not a.iscrowd for a in self._anns[img.id])]
            n_removed = len(self.index.images) - len(images)
            if n_removed:
                logger.info("%s: left out %d image(s) without annotations", ann_file, n_removed)
        self._images = images
        self._coco: COCO | None = None

    @property
    def category_map(self) -> CategoryMap:
        """The dataset's category ids <-> contiguous labels mapping."""
        return self.index.category_map

    @property
    def num_classes(self) -> int:
        """Number of object categories K (labels run 1..K)."""
        return self.index.category_map.num_classes

    @property
    def image_ids(self) -> list[int]:
        """Image ids in item order."""
        return [img.id for img in self._images]

    @property
    def coco(self) -> COCO:
        """The ground truth as a pycocotools ``COCO`` object (built once, quietly)."""
        if self._coco is None:
            self._coco = self.index.to_coco_api()
        return self._coco

    def image_info(self, idx: int) -> ImageRecord:
        """The ``images`` entry of item ``idx``."""
        return self._images[idx]

    def __len__(self) -> int:
        return len(self._images)

    def __getitem__(self, idx: int) -> tuple[Tensor, Target]:
        info = self._images[idx]
        image = read_image(self.image_dir / info.file_name, expected_size=(info.width, info.height))
        target = self.target(info)
        if self.transforms is not None:
            image, target = self.transforms(image, target)
        return image, target

    def target(self, info: ImageRecord) -> Target:
        """The target of image ``info`` as training sees it, before any transform: crowd
        annotations (in training) and degenerate boxes left out, boxes clipped to the image."""
        anns = self._anns[info.id]
        w, h = info.width, info.height
        xywh = np.array([a.bbox for a in anns], dtype=np.float32).reshape(-1, 4)
        xyxy = np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1)
        np.clip(xyxy[:, 0::2], 0, w, out=xyxy[:, 0::2])
        np.clip(xyxy[:, 1::2], 0, h, out=xyxy[:, 1::2])
        boxes = torch.from_numpy(xyxy)
        target: Target = {
            "boxes": boxes,
            "labels": torch.tensor(
                [self.category_map.label_of(a.category_id) for a in anns], dtype=torch.int64
            ),
            "image_id": info.id,
            "area": torch.tensor([a.area for a in anns], dtype=torch.float32),
            "iscrowd": torch.tensor([a.iscrowd for a in anns], dtype=torch.int64),
        }
        if self.masks:
            if anns:
                stack = np.stack([segmentation_to_mask(a.segmentation, h, w) for a in anns])
            else:
                stack = np.zeros((0, h, w), dtype=np.uint8)
            target["masks"] = torch.from_numpy(stack)
        return target

    def __repr__(self) -> str:
        return (
            f"CocoDetection({str(self.ann_file)!r}, images={len(self)}, "
            f"classes={self.num_classes}, train={self.train}, masks={self.masks})"
        )


def degenerate_after_clipping(ann: AnnRecord, img: ImageRecord) -> bool:
    """True when the box, clipped to the image, is under 1 px wide or high: the dataset drops it."""
    x, y, w, h = ann.bbox
    x0, x1 = max(x, 0.0), min(x + w, float(img.width))
    y0, y1 = max(y, 0.0), min(y + h, float(img.height))
    return (x1 - x0) < MIN_BOX_SIZE or (y1 - y0) < MIN_BOX_SIZE
