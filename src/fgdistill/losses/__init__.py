"""FGD losses: attention, masks, the one-level loss, the multi-level wrapper and a baseline."""

from fgdistill.losses.attention import channel_attention, spatial_attention
from fgdistill.losses.fgd import FGDLoss
from fgdistill.losses.imitation import FeatureImitationLoss
from fgdistill.losses.masks import fgd_masks
from fgdistill.losses.multilevel import (
    NORMALIZE_MODES,
    ONE_STAGE_HPARAMS,
    FGDHyperParams,
    MultiLevelFGD,
)

__all__ = [
    "NORMALIZE_MODES",
    "ONE_STAGE_HPARAMS",
    "FGDHyperParams",
    "FGDLoss",
    "FeatureImitationLoss",
    "MultiLevelFGD",
    "channel_attention",
    "fgd_masks",
    "spatial_attention",
]
