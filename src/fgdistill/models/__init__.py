"""fgdistill.models: detectors, FPN level names, and the distiller."""

from fgdistill.models.build import (
    ARCHS,
    BACKBONES,
    LoadReport,
    build_backbone,
    build_detector,
    load_checkpoint,
    load_state_dict_checked,
    load_weights,
    model_spec,
)
from fgdistill.models.distiller import (
    INHERIT_PREFIXES,
    DistillBatch,
    Distiller,
    InheritReport,
    detector_family,
    inherit_weights,
)
from fgdistill.models.levels import (
    LevelInfo,
    backbone_levels,
    feature_levels,
    level_channels,
    level_name,
    level_strides,
    rename_features,
)

__all__ = [
    "ARCHS",
    "BACKBONES",
    "INHERIT_PREFIXES",
    "DistillBatch",
    "Distiller",
    "InheritReport",
    "LevelInfo",
    "LoadReport",
    "backbone_levels",
    "build_backbone",
    "build_detector",
    "detector_family",
    "feature_levels",
    "inherit_weights",
    "level_channels",
    "level_name",
    "level_strides",
    "load_checkpoint",
    "load_state_dict_checked",
    "load_weights",
    "model_spec",
    "rename_features",
]
