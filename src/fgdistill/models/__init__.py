"""fgdistill.models: detectors, saved detectors, and the distiller.

What users call is exported here; the rest is in the submodules (:mod:`~fgdistill.models.build`,
:mod:`~fgdistill.models.checkpoint`, :mod:`~fgdistill.models.distiller`,
:mod:`~fgdistill.models.levels`, :mod:`~fgdistill.models.presets`,
:mod:`~fgdistill.models.torchvision_zoo`).
"""

from fgdistill.models.build import ARCHS, BACKBONES, build_detector, load_detector, model_spec
from fgdistill.models.distiller import Distiller, InheritReport, inherit_weights
from fgdistill.models.levels import LevelInfo, feature_levels
from fgdistill.models.torchvision_zoo import (
    TORCHVISION_MODELS,
    coco_categories,
    convert_torchvision,
    from_torchvision,
    torchvision_spec,
)
from fgdistill.models.weights import LoadReport, load_state_dict_checked

__all__ = [
    "ARCHS",
    "BACKBONES",
    "TORCHVISION_MODELS",
    "Distiller",
    "InheritReport",
    "LevelInfo",
    "LoadReport",
    "build_detector",
    "coco_categories",
    "convert_torchvision",
    "feature_levels",
    "from_torchvision",
    "inherit_weights",
    "load_detector",
    "load_state_dict_checked",
    "model_spec",
    "torchvision_spec",
]
