"""Distillation losses: FGD (attention, masks, the one-level loss, the multi-level wrapper), an MSE
baseline, and the one-level PKD, CWD and MGD losses."""

from fgdistill.losses.attention import channel_attention, spatial_attention
from fgdistill.losses.cwd import CWDLoss
from fgdistill.losses.fgd import FGDLoss
from fgdistill.losses.imitation import FeatureImitationLoss
from fgdistill.losses.masks import fgd_masks
from fgdistill.losses.mgd import MGDLoss
from fgdistill.losses.multilevel import (
    NORMALIZE_MODES,
    ONE_STAGE_HPARAMS,
    FGDHyperParams,
    MultiLevelFGD,
)
from fgdistill.losses.pkd import PKDLoss

__all__ = [
    "NORMALIZE_MODES",
    "ONE_STAGE_HPARAMS",
    "CWDLoss",
    "FGDHyperParams",
    "FGDLoss",
    "FeatureImitationLoss",
    "MGDLoss",
    "MultiLevelFGD",
    "PKDLoss",
    "channel_attention",
    "fgd_masks",
    "spatial_attention",
]
