"""Command ``export``: a trained detector to an ONNX or TorchScript file, checked against it.

See :mod:`fgdistill.export` for what each file takes and returns.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from fgdistill.errors import ExportError
from fgdistill.export import FORMATS

__all__ = ["register"]


def register(subparsers: Any) -> None:
    """Add ``export`` to the top-level parser."""
    p = subparsers.add_parser(
        "export",
        help="write a detector as an ONNX or TorchScript file, checked against the model",
        description=(
            "Rebuild the detector of CKPT and write it as ONNX (one image [3, H, W] in [0, 1] "
            "in; boxes, scores, labels and, for Mask R-CNN, masks out; resize and normalisation "
            "inside) or TorchScript (called like the model: a list of images in, a list of "
            "dicts out). Then run the file and the model on a sample image and print how their "
            "top detections match, unless --no-verify."
        ),
    )
    p.add_argument(
        "--checkpoint",
        required=True,
        metavar="CKPT",
        help="model.pt or student.pt with model.yaml beside it (or a training checkpoint)",
    )
    p.add_argument("--format", required=True, choices=FORMATS, dest="fmt", help="file format")
    p.add_argument("--out", required=True, metavar="FILE", help="the file to write")
    p.add_argument(
        "--score-thresh",
        type=float,
        default=None,
        metavar="X",
        help="the detector's score threshold in the file (default: the model's)",
    )
    p.add_argument("--opset", type=int, default=None, metavar="N", help="ONNX opset (default 17)")
    p.add_argument(
        "--input-size",
        type=int,
        nargs=2,
        default=None,
        metavar=("H", "W"),
        help=(
            "ONNX: fix the input to [3, H, W] (default: H and W dynamic). Both formats: the "
            "size of the generated check image (default: min_size x 4/3 min_size)"
        ),
    )
    p.add_argument(
        "--half",
        action="store_true",
        help="float16 weights: TorchScript on a CUDA device only",
    )
    p.add_argument(
        "--verify-image",
        type=Path,
        default=None,
        metavar="PATH",
        help="check the file on this image instead of a generated one",
    )
    p.add_argument("--no-verify", action="store_true", help="do not check the written file")
    p.set_defaults(func=_cmd_export)


def _cmd_export(args: argparse.Namespace) -> int:
    from fgdistill.export import check_export_request, default_input_size, export_detector
    from fgdistill.models import load_detector

    verify = not args.no_verify
    input_size = tuple(args.input_size) if args.input_size is not None else None
    fmt, out = check_export_request(
        args.fmt, args.out, input_size=input_size, half=args.half, verify=verify
    )
    if args.opset is not None and fmt != "onnx":
        raise ExportError(f"--opset applies to ONNX only, not to {fmt}")
    if verify and args.verify_image is not None and not args.verify_image.is_file():
        raise ExportError(f"--verify-image {args.verify_image} not found")
    model = load_detector(args.checkpoint)  # CheckpointError naming a missing file
    path = export_detector(
        model,
        fmt,
        out,
        opset=args.opset if args.opset is not None else 17,
        input_size=input_size,
        score_thresh=args.score_thresh,
        half=args.half,
    )
    print(f"wrote {path} ({_describe_file(path, fmt, model, input_size, args)})")
    if not verify:
        return 0

    size = input_size or default_input_size(model)
    checks: list[tuple[str, Tensor]] = []
    if args.verify_image is not None:
        checks.append((str(args.verify_image), _read_image(args.verify_image, input_size)))
    else:
        checks.append(("a generated image", _sample(size)))
        if fmt == "onnx" and input_size is None:  # a second size shows H and W are dynamic
            checks.append(("a generated image", _sample((size[1], size[0]), seed=1)))
    _verify(model, path, checks, args)
    return 0


def _describe_file(
    path: Path,
    fmt: str,
    model: nn.Module,
    input_size: tuple[int, ...] | None,
    args: argparse.Namespace,
) -> str:
    megabytes = path.stat().st_size / 1e6
    if fmt == "torchscript":
        dtype = "float16 on CUDA" if args.half else "float32"
        return (
            f"TorchScript, {megabytes:.1f} MB, {dtype}: call it like the model, "
            "with a list of images [3, H, W] in [0, 1]"
        )
    from fgdistill.export import ONNX_INPUT, output_names

    shape = f"[3, {input_size[0]}, {input_size[1]}]" if input_size else "[3, H, W] (H, W dynamic)"
    outputs = ", ".join(output_names(model))
    opset = args.opset if args.opset is not None else 17
    return (
        f"ONNX opset {opset}, {megabytes:.1f} MB: input {ONNX_INPUT!r} float {shape} in [0, 1]; "
        f"outputs {outputs}"
    )


def _sample(size: tuple[int, int], seed: int = 0) -> Tensor:
    from fgdistill.export import sample_image

    return sample_image(size[0], size[1], seed=seed)


def _read_image(path: Path, input_size: tuple[int, ...] | None) -> Tensor:
    """``FloatTensor[3, H, W]``; resized to ``input_size`` when the ONNX input is fixed."""
    from fgdistill.data.images import read_image

    image = read_image(path)
    if input_size is not None and tuple(image.shape[-2:]) != tuple(input_size):
        print(
            f"note: resizing {path} from {image.shape[-2]}x{image.shape[-1]} to "
            f"{input_size[0]}x{input_size[1]} (the --input-size of the file)"
        )
        image = torch.nn.functional.interpolate(
            image[None], size=list(input_size), mode="bilinear", align_corners=False
        )[0]
    return image


def _verify(
    model: nn.Module, path: Path, checks: list[tuple[str, Tensor]], args: argparse.Namespace
) -> None:
    from fgdistill.export import verify_export

    # float16 rounds scores and boxes: compare with what it can reach
    iou_thresh, score_tol = (0.9, 1e-2) if args.half else (0.99, 1e-4)
    for name, image in checks:
        check = verify_export(
            model,
            path,
            image,
            score_thresh=args.score_thresh,
            iou_thresh=iou_thresh,
            score_tol=score_tol,
        )
        height, width = check.image_size
        print(f"check on {name} ({height}x{width}): {check.describe()}")
        if check.mismatch:
            raise ExportError(
                f"{path} does not compute what the model computes on {name} "
                f"({check.matched} of the top {check.compared} detections match); the file is "
                "kept for inspection"
            )
        if check.compared == 0:
            print(
                "note: nothing to compare; give --verify-image with an image the model "
                "detects objects in, or a lower --score-thresh"
            )
