"""fgdistill.data: COCO-format datasets, augmentation, loaders, the synthetic benchmark."""

from fgdistill.data.check import DatasetReport, check_dataset
from fgdistill.data.coco import (
    CategoryMap,
    CocoDetection,
    CocoIndex,
    Problem,
    Target,
    read_annotations,
    segmentation_to_mask,
)
from fgdistill.data.images import read_image
from fgdistill.data.loader import build_loader, detection_collate
from fgdistill.data.synth import SynthConfig, SynthSummary, generate_synthetic
from fgdistill.data.transforms import Compose, RandomHorizontalFlip, hflip

__all__ = [
    "CategoryMap",
    "CocoDetection",
    "CocoIndex",
    "Compose",
    "DatasetReport",
    "Problem",
    "RandomHorizontalFlip",
    "SynthConfig",
    "SynthSummary",
    "Target",
    "build_loader",
    "check_dataset",
    "detection_collate",
    "generate_synthetic",
    "hflip",
    "read_annotations",
    "read_image",
    "segmentation_to_mask",
]
