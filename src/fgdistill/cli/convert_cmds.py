"""Command ``convert``: a torchvision COCO detector's weights file as an fgdistill detector.

``fgdistill convert torchvision NAME WEIGHTS_FILE --out DIR`` writes ``DIR/model.pt``,
``DIR/model.yaml`` and ``DIR/categories.json``, which every command takes: ``distill --teacher
DIR/model.pt``, ``eval --checkpoint DIR/model.pt``, ``predict`` and ``visualize``.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

__all__ = ["register"]


def register(subparsers: Any) -> None:
    """Add the ``convert`` command to the top-level parser."""
    from fgdistill.models.torchvision_zoo import TORCHVISION_MODELS

    helptext = "turn a downloaded torchvision COCO detector into model.pt + model.yaml"
    p = subparsers.add_parser("convert", help=helptext, description=helptext)
    p.add_argument("source", choices=("torchvision",), help="where the weights come from")
    p.add_argument("name", choices=list(TORCHVISION_MODELS), help="torchvision builder name")
    p.add_argument("weights", type=Path, help="the state-dict file (*.pth), read weights-only")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.set_defaults(func=_cmd_convert)


def _cmd_convert(args: argparse.Namespace) -> int:
    from fgdistill.models.torchvision_zoo import convert_torchvision

    path = convert_torchvision(args.name, args.weights, args.out)
    print(f"converted torchvision {args.name} ({args.weights})")
    print(f"outputs in {args.out}/:")
    print(f"  model        {path} (plain detector state dict)")
    print(f"  model_spec   {Path(args.out) / 'model.yaml'} (build_detector arguments)")
    print(f"  categories   {Path(args.out) / 'categories.json'} (labels are COCO category ids)")
    print(f"use it as: fgdistill distill CONFIG --teacher {path}")
    return 0
