"""Export a detector to ONNX or TorchScript, and check that the file computes what the model does.

:func:`export_detector` writes one of two files for a detector of torchvision's contract (every
architecture :func:`fgdistill.models.build_detector` builds):

- ``"onnx"``: one image ``FloatTensor[3, H, W]`` in ``[0, 1]`` named ``image`` in; ``boxes``
  (``[D, 4]`` xyxy in the input image's pixels), ``scores`` (``[D]``), ``labels`` (``[D]``,
  int64) and, for Mask R-CNN, ``masks`` (``[D, 1, H, W]`` probabilities) out, in that order. The
  model's resize and normalisation are inside the graph. ``H`` and ``W`` are dynamic unless
  ``input_size`` fixes them. Written by PyTorch's TorchScript-based exporter
  (``torch.onnx.export(..., dynamo=False)``): the ``torch.export``-based one cannot follow
  torchvision's data-dependent NMS. Needs the ``onnx`` package (``pip install
  'fgdistill[export]'``); the file is checked with ``onnx.checker``.
- ``"torchscript"``: ``torch.jit.script`` of the model, called like the eager model in eval
  mode: a list of ``FloatTensor[3, H_i, W_i]`` in, a list of dicts out. Any size; with ``half``
  (CUDA only) the weights are float16 and the images given to it must be CUDA float16 too.

:func:`verify_export` runs the file (onnxruntime or ``torch.jit.load``) and the model on one
image and matches their top detections (:class:`ExportCheck`).
"""

from __future__ import annotations

import copy
import importlib
import logging
import math
import warnings
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops import box_iou

from fgdistill.errors import ExportError

__all__ = [
    "FORMATS",
    "ExportCheck",
    "check_export_request",
    "compare_detections",
    "default_input_size",
    "export_detector",
    "load_exported",
    "output_names",
    "prepare_for_export",
    "sample_image",
    "verify_export",
]

logger = logging.getLogger(__name__)

#: Export formats :func:`export_detector` writes.
FORMATS: tuple[str, ...] = ("onnx", "torchscript")
#: Name of the ONNX graph's input.
ONNX_INPUT = "image"
_INSTALL_HINT = "install it with: pip install 'fgdistill[export]'"


# --------------------------------------------------------------------------------------------
# Preparing and exporting
# --------------------------------------------------------------------------------------------


def prepare_for_export(model: nn.Module, score_thresh: float | None = None) -> nn.Module:
    """A copy of ``model`` in eval mode on the CPU, with its score threshold set if given.

    The threshold is the detector's own: ``score_thresh`` of RetinaNet, FCOS and RepPoints,
    ``roi_heads.score_thresh`` of Faster and Mask R-CNN.
    """
    model = copy.deepcopy(model).cpu().eval()
    if score_thresh is not None:
        if not 0.0 <= score_thresh < 1.0:
            raise ExportError(f"score threshold must be in [0, 1), got {score_thresh}")
        owner = getattr(model, "roi_heads", model)
        if not hasattr(owner, "score_thresh"):
            raise ExportError(f"{type(model).__name__} has no score threshold to set")
        owner.score_thresh = float(score_thresh)
    return model


def default_input_size(model: nn.Module) -> tuple[int, int]:
    """``(H, W)`` of the sample image: the transform's ``min_size`` high, 4:3 (up to
    ``max_size``) wide; 800 x 1066 for torchvision's defaults."""
    transform = getattr(model, "transform", None)
    min_sizes = getattr(transform, "min_size", (800,))
    height = int(min_sizes[-1])
    width = min(int(getattr(transform, "max_size", 1333)), math.ceil(height * 4 / 3))
    return height, width


def sample_image(height: int, width: int, seed: int = 0) -> Tensor:
    """``FloatTensor[3, height, width]`` in ``[0, 1]``: a few flat-coloured rectangles on a
    smooth background, the same for the same arguments."""
    g = torch.Generator().manual_seed(seed)
    ys = torch.linspace(0, 1, height)[:, None]
    xs = torch.linspace(0, 1, width)[None, :]
    image = torch.stack(
        (
            0.3 + 0.4 * ys * xs,
            (0.5 - 0.3 * xs).expand(height, width),
            (0.2 + 0.3 * ys).expand(height, width),
        )
    )
    for _ in range(6):
        h = int(torch.randint(max(height // 8, 1), max(height // 2, 2), (1,), generator=g))
        w = int(torch.randint(max(width // 8, 1), max(width // 2, 2), (1,), generator=g))
        y = int(torch.randint(0, max(height - h, 1), (1,), generator=g))
        x = int(torch.randint(0, max(width - w, 1), (1,), generator=g))
        image[:, y : y + h, x : x + w] = torch.rand(3, 1, 1, generator=g)
    return image.clamp(0, 1)


def export_detector(
    model: nn.Module,
    fmt: str,
    out: str | Path,
    *,
    opset: int = 17,
    input_size: tuple[int, int] | None = None,
    score_thresh: float | None = None,
    half: bool = False,
) -> Path:
    """Write ``model`` to ``out`` as ONNX or TorchScript (see the module docstring).

    Args:
        model: a detector of torchvision's contract; it is copied, not changed.
        fmt: ``"onnx"`` or ``"torchscript"``.
        out: the file to write; its folder is created.
        opset: ONNX opset (17 by default; GridSample, which RepPoints needs, is 16 or later).
        input_size: ``(H, W)``: ONNX takes exactly ``FloatTensor[3, H, W]``; ``None`` makes H and
            W dynamic. It is traced at this size (default :func:`default_input_size`). TorchScript
            takes any size, so it does not use it.
        score_thresh: the detector's score threshold in the file (default: the model's).
        half: float16 weights; TorchScript on a CUDA device only.

    Returns:
        ``out`` as a :class:`~pathlib.Path`.

    Raises:
        ExportError: unknown format, ``out`` is a folder, a missing package, ``half`` where it
            is not supported, or the exporter failed (its message included).
    """
    fmt, path = check_export_request(fmt, out, input_size=input_size, half=half)
    model = prepare_for_export(model, score_thresh)
    if fmt == "onnx":
        _export_onnx(model, path, opset, input_size)
    else:
        _export_torchscript(model, path, half)
    logger.debug("wrote %s (%s, %.1f MB)", path, fmt, path.stat().st_size / 1e6)
    return path


def check_export_request(
    fmt: str,
    out: str | Path,
    *,
    input_size: tuple[int, int] | None = None,
    half: bool = False,
    verify: bool = False,
) -> tuple[str, Path]:
    """Check the arguments of :func:`export_detector` before any model is loaded.

    Creates the output's folder. ``verify``: :func:`verify_export` will run the file too, so its
    runtime (onnxruntime for ONNX) must be installed.

    Returns:
        The format in lower case and the output path.

    Raises:
        ExportError: unknown format, ``out`` is a folder, bad ``input_size``, ``half`` where it
            is not supported, or a missing package.
    """
    fmt = _check_format(fmt)
    if input_size is not None and (len(input_size) != 2 or min(input_size) < 1):
        raise ExportError(f"input size must be two positive numbers H W, got {input_size}")
    if half and fmt == "onnx":
        raise ExportError(
            "half precision is not supported for ONNX export; export float32, or use "
            "--format torchscript --half on a CUDA device"
        )
    if half and not torch.cuda.is_available():
        raise ExportError(
            "half precision TorchScript needs a CUDA device, and none is available: float16 "
            "detectors do not run on a CPU; export float32 instead"
        )
    if fmt == "onnx":
        _require("onnx", "ONNX export")
        if verify:
            _require("onnxruntime", "checking the ONNX file")
    return fmt, _check_out(out)


def _check_format(fmt: str) -> str:
    name = str(fmt).lower()
    if name not in FORMATS:
        raise ExportError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    return name


def _check_out(out: str | Path) -> Path:
    path = Path(out)
    if path.is_dir():
        raise ExportError(f"{path} is a folder; give the file to write, e.g. {path / 'model.onnx'}")
    if path.parent.exists() and not path.parent.is_dir():
        raise ExportError(f"{path.parent} is a file, not a folder: cannot write {path}")
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def _require(module: str, purpose: str) -> Any:
    """Import ``module`` or raise an ExportError saying how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ExportError(
            f"{purpose} needs the {module} package, which is not installed; {_INSTALL_HINT}"
        ) from None


def _has_masks(model: nn.Module) -> bool:
    roi_heads = getattr(model, "roi_heads", None)
    return roi_heads is not None and bool(getattr(roi_heads, "has_mask", lambda: False)())


def output_names(model: nn.Module) -> list[str]:
    """Names of the ONNX file's outputs, in order: ``boxes, scores, labels[, masks]``."""
    return ["boxes", "scores", "labels"] + (["masks"] if _has_masks(model) else [])


class _OnnxDetector(nn.Module):
    """One image ``FloatTensor[3, H, W]`` -> ``(boxes, scores, labels[, masks])``."""

    def __init__(self, model: nn.Module, with_masks: bool) -> None:
        super().__init__()
        self.model = model
        self.with_masks = with_masks

    def forward(self, image: Tensor) -> tuple[Tensor, ...]:
        det = self.model([image])[0]
        outputs = (det["boxes"], det["scores"], det["labels"])
        return (*outputs, det["masks"]) if self.with_masks else outputs


def _export_onnx(
    model: nn.Module, path: Path, opset: int, input_size: tuple[int, int] | None
) -> None:
    onnx = _require("onnx", "ONNX export")
    height, width = input_size if input_size is not None else default_input_size(model)
    names = output_names(model)
    dynamic: dict[str, dict[int, str]] = {name: {0: "detections"} for name in names}
    if "masks" in names:
        dynamic["masks"] = {0: "detections", 2: "height", 3: "width"}
    if input_size is None:
        dynamic[ONNX_INPUT] = {1: "height", 2: "width"}
    wrapper = _OnnxDetector(model, "masks" in names)
    try:
        with warnings.catch_warnings(), torch.no_grad():
            # The tracer warns of every Python value it records; torchvision's detectors are
            # written so that those do not depend on the image. Checked by verify_export.
            warnings.simplefilter("ignore")
            torch.onnx.export(
                wrapper,
                (sample_image(height, width),),
                str(path),
                dynamo=False,
                opset_version=opset,
                input_names=[ONNX_INPUT],
                output_names=names,
                dynamic_axes=dynamic,
            )
        onnx.checker.check_model(str(path))
    except ExportError:
        raise
    except Exception as exc:
        raise ExportError(
            f"ONNX export of {type(model).__name__} to {path} failed (opset {opset}): "
            f"{_first_line(exc)}"
        ) from exc


class _ScriptedTorchvision(nn.Module):
    """A scripted torchvision detector returns ``(losses, detections)``; keep the detections."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: list[Tensor]) -> list[dict[str, Tensor]]:
        return self.model(images)[1]


class _ScriptedRepPoints(nn.Module):
    """A scripted RepPoints returns losses or detections; keep the detections (eval mode)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: list[Tensor]) -> list[dict[str, Tensor]]:
        out = self.model(images)
        assert isinstance(out, list)
        return out


class _EagerResizeTransform(GeneralizedRCNNTransform):
    """torchvision's transform, resizing in TorchScript to the size eager PyTorch resizes to.

    Scripted, torchvision computes the resize factor in float32, eager in float64, and the two
    round some sizes differently: a side of 480 pixels resized to 800 becomes 799 pixels when
    scripted, 800 in eager mode, and the detections move. This transform resizes as in eager
    mode; it runs inference only (no targets, no training-time random sizes).
    """

    def resize(
        self, image: Tensor, target: dict[str, Tensor] | None = None
    ) -> tuple[Tensor, dict[str, Tensor] | None]:
        if self.training or target is not None:
            raise RuntimeError("the exported detector runs inference only")
        if self.fixed_size is not None:
            size: list[int] = [self.fixed_size[1], self.fixed_size[0]]
            return F.interpolate(image[None], size=size, mode="bilinear")[0], target
        h, w = image.shape[-2:]
        scale = min(float(self.min_size[-1]) / min(h, w), float(self.max_size) / max(h, w))
        resized = F.interpolate(
            image[None],
            scale_factor=scale,
            mode="bilinear",
            recompute_scale_factor=True,
            align_corners=False,
        )[0]
        return resized, target


def _export_torchscript(model: nn.Module, path: Path, half: bool) -> None:
    from fgdistill.models.reppoints import RepPoints

    if type(getattr(model, "transform", None)) is GeneralizedRCNNTransform:
        model.transform.__class__ = _EagerResizeTransform  # a copy: the caller's model is intact
    if half:
        model = model.cuda().half()
    wrapper = (_ScriptedRepPoints if isinstance(model, RepPoints) else _ScriptedTorchvision)(model)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch.jit.script is deprecated
            scripted = torch.jit.script(wrapper)
        scripted.save(str(path))
    except Exception as exc:
        raise ExportError(
            f"TorchScript export of {type(model).__name__} to {path} failed: {_first_line(exc)}"
        ) from exc


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


# --------------------------------------------------------------------------------------------
# Running and checking the file
# --------------------------------------------------------------------------------------------


def load_exported(path: str | Path) -> Callable[[Tensor], dict[str, Tensor]]:
    """A function running the exported file on one image.

    It takes ``FloatTensor[3, H, W]`` (or ``[1, 3, H, W]``) in ``[0, 1]`` and returns the
    detections as the eager model does: a dict with ``boxes`` ``[D, 4]``, ``scores`` ``[D]``,
    ``labels`` ``[D]`` (and ``masks`` ``[D, 1, H, W]``), CPU tensors. ONNX files run in
    onnxruntime (CPU), TorchScript files with ``torch.jit.load`` (a float16 file on CUDA).

    Raises:
        ExportError: the file is missing, of an unknown kind, or onnxruntime is not installed.
    """
    path = Path(path)
    if not path.is_file():
        raise ExportError(f"{path}: exported file not found")
    if zipfile.is_zipfile(path):  # TorchScript files are zip archives, ONNX ones protobuf
        return _torchscript_runner(path)
    return _onnx_runner(path)


def _single(image: Tensor) -> Tensor:
    if image.dim() == 4 and image.shape[0] == 1:
        image = image[0]
    if image.dim() != 3 or image.shape[0] != 3:
        raise ExportError(f"expected an image [3, H, W], got {list(image.shape)}")
    return image.float()


def _onnx_runner(path: Path) -> Callable[[Tensor], dict[str, Tensor]]:
    ort = _require("onnxruntime", "running an ONNX file")
    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only: no warnings about unused initialisers
    options.intra_op_num_threads = torch.get_num_threads()
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]

    def run(image: Tensor) -> dict[str, Tensor]:
        feed = {ONNX_INPUT: _single(image).detach().cpu().numpy()}
        return {n: torch.from_numpy(v) for n, v in zip(names, session.run(None, feed), strict=True)}

    return run


def _torchscript_runner(path: Path) -> Callable[[Tensor], dict[str, Tensor]]:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch.jit.load is deprecated
            module = torch.jit.load(str(path), map_location="cpu")
    except Exception as exc:
        raise ExportError(f"{path}: not a TorchScript file: {_first_line(exc)}") from exc
    half = any(p.dtype == torch.float16 for p in module.parameters())
    if half:
        module = module.cuda()
    module.eval()

    def run(image: Tensor) -> dict[str, Tensor]:
        img = _single(image)
        img = img.cuda().half() if half else img
        with torch.no_grad(), warnings.catch_warnings():
            # torchvision's "always returns a (Losses, Detections) tuple": the file does not
            warnings.filterwarnings("ignore", ".*always returns", UserWarning)
            det = module([img])[0]
        keys = [k for k in ("boxes", "scores", "labels", "masks") if k in det]  # ONNX's order
        return {
            k: det[k].float().cpu() if det[k].is_floating_point() else det[k].cpu() for k in keys
        }

    return run


@dataclass
class ExportCheck:
    """How the exported file's detections on one image compare to the model's.

    The ``compared`` highest-scoring detections of the model are each matched to the file's
    detection of the same label with the highest IoU.
    """

    image_size: tuple[int, int]
    reference: int
    exported: int
    compared: int
    matched: int
    max_score_diff: float
    min_iou: float
    max_mask_diff: float | None = None
    iou_thresh: float = 0.99
    score_tol: float = 1e-4

    @property
    def ok(self) -> bool:
        """Every compared detection matched (and the model detected something)."""
        return self.compared > 0 and self.matched == self.compared

    @property
    def mismatch(self) -> bool:
        """Some compared detection did not match: the file computes something else."""
        return self.matched < self.compared

    def describe(self) -> str:
        """One line for people."""
        text = (
            f"model {self.reference} detections, file {self.exported}; "
            f"top {self.compared}: {self.matched} match (same label, IoU > {self.iou_thresh}, "
            f"score within {self.score_tol:g}); max score difference {self.max_score_diff:.2e}, "
            f"min IoU {self.min_iou:.6f}"
        )
        if self.max_mask_diff is not None:
            text += f", max mask difference {self.max_mask_diff:.2e}"
        if self.compared == 0:
            text += " (nothing to compare: the model detects nothing on this image)"
        return text


def compare_detections(
    reference: dict[str, Tensor],
    exported: dict[str, Tensor],
    *,
    image_size: tuple[int, int],
    top_k: int = 10,
    iou_thresh: float = 0.99,
    score_tol: float = 1e-4,
) -> ExportCheck:
    """Match the ``top_k`` best detections of ``reference`` to ``exported``.

    Both are detection dicts (``boxes`` ``[D, 4]``, ``scores`` ``[D]``, ``labels`` ``[D]``,
    optionally ``masks`` ``[D, 1, H, W]``). A reference detection matches when the exported
    detection of the same label with the highest IoU has IoU above ``iou_thresh`` and a score
    within ``score_tol``.
    """
    ref_scores = reference["scores"].float().cpu()
    order = torch.argsort(ref_scores, descending=True, stable=True)[:top_k]
    ref_boxes = reference["boxes"].float().cpu()[order]
    ref_labels = reference["labels"].cpu()[order]
    exp_boxes = exported["boxes"].float().cpu()
    exp_labels = exported["labels"].cpu()
    exp_scores = exported["scores"].float().cpu()
    compared = int(order.numel())
    matched, max_score_diff, min_iou = 0, 0.0, 1.0
    mask_diff: float | None = None
    if compared and exp_boxes.numel():
        iou = box_iou(ref_boxes, exp_boxes).nan_to_num(0.0)  # NaN: two empty boxes
        iou = torch.where(ref_labels[:, None] == exp_labels[None, :], iou, torch.zeros_like(iou))
        best_iou, best = iou.max(dim=1)
        score_diff = (ref_scores[order] - exp_scores[best]).abs()
        matched = int(((best_iou > iou_thresh) & (score_diff <= score_tol)).sum())
        max_score_diff = float(score_diff.max())
        min_iou = float(best_iou.min())
        if "masks" in reference and "masks" in exported:
            diff = reference["masks"].float().cpu()[order] - exported["masks"].float().cpu()[best]
            mask_diff = float(diff.abs().max()) if diff.numel() else 0.0
    elif compared:
        max_score_diff, min_iou = float("inf"), 0.0
    return ExportCheck(
        image_size=image_size,
        reference=int(ref_scores.numel()),
        exported=int(exported["scores"].numel()),
        compared=compared,
        matched=matched,
        max_score_diff=max_score_diff,
        min_iou=min_iou,
        max_mask_diff=mask_diff,
        iou_thresh=iou_thresh,
        score_tol=score_tol,
    )


def verify_export(
    model: nn.Module,
    path: str | Path,
    image: Tensor,
    *,
    score_thresh: float | None = None,
    top_k: int = 10,
    iou_thresh: float = 0.99,
    score_tol: float = 1e-4,
) -> ExportCheck:
    """Run ``model`` and the exported file at ``path`` on ``image`` and compare their detections.

    Args:
        model: the detector that was exported (float32; it is copied, not changed).
        path: the ``.onnx`` or TorchScript file.
        image: ``FloatTensor[3, H, W]`` in ``[0, 1]``.
        score_thresh: the threshold given to :func:`export_detector`, applied to the model too.
        top_k, iou_thresh, score_tol: see :func:`compare_detections`.
    """
    image = _single(image)
    run = load_exported(path)
    reference_model = prepare_for_export(model, score_thresh)
    with torch.no_grad():
        reference = reference_model([image])[0]
    exported = run(image)
    return compare_detections(
        reference,
        exported,
        image_size=(int(image.shape[-2]), int(image.shape[-1])),
        top_k=top_k,
        iou_thresh=iou_thresh,
        score_tol=score_tol,
    )
