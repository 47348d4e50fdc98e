"""fgdistill.models: detectors, saved detectors, and the distiller.

What users call is exported here; the rest is in the submodules (:mod:`~fgdistill.models.build`,
:mod:`~fgdistill.models.checkpoint`, :mod:`~fgdistill.models.distiller`,
:mod:`~fgdistill.models.levels`, :mod:`~fgdistill.models.presets`).
"""

from fgdistill.models.build import (
    ARCHS,
    BACKBONES,
    LoadReport,
    build_detector,
    load_detector,
    load_state_dict_checked,
    model_spec,
)
from fgdistill.models.distiller import Distiller, InheritReport, inherit_weights
from fgdistill.models.levels import LevelInfo, feature_levels

__all__ = [
    "ARCHS",
    "BACKBONES",
    "Distiller",
    "InheritReport",
    "LevelInfo",
    "LoadReport",
    "build_detector",
    "feature_levels",
    "inherit_weights",
    "load_detector",
    "load_state_dict_checked",
    "model_spec",
]
