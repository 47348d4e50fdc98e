"""Distillation settings per detector family: which FPN levels, with which weights.

FGD's are the settings of the authors' released configs; PKD's, CWD's and MGD's those of
mmrazor's published detection configs where one exists (PKD: RetinaNet, FCOS, RepPoints and
Faster R-CNN; CWD and MGD: RetinaNet), the same weights on each family's FGD levels elsewhere.
They belong to the detectors, not to the losses: :mod:`fgdistill.losses` takes levels and
hyperparameters as arguments and knows no detector names.
"""

from __future__ import annotations

from typing import Any

from fgdistill.losses.multilevel import (
    HPARAMS,
    ONE_STAGE_HPARAMS,
    CWDHyperParams,
    FGDHyperParams,
    MGDHyperParams,
    PKDHyperParams,
)

__all__ = ["DEFAULT_LEVELS", "METHOD_PRESETS", "PRESETS", "preset"]

_TWO_STAGE = FGDHyperParams(temperature=0.5, alpha=5e-5, beta=2.5e-5, gamma=5e-5, lambda_=5e-7)
_REPPOINTS = FGDHyperParams(temperature=0.5, alpha=1.6e-3, beta=8e-4, gamma=8e-4, lambda_=8e-6)
_FCOS = FGDHyperParams(temperature=0.8, alpha=1.6e-3, beta=8e-4, gamma=8e-4, lambda_=8e-6)

#: Settings of the authors' released configs, by detector family.
PRESETS: dict[str, FGDHyperParams] = {
    "retinanet": ONE_STAGE_HPARAMS,
    "fcos": _FCOS,
    "faster_rcnn": _TWO_STAGE,
    "mask_rcnn": _TWO_STAGE,
    "reppoints": _REPPOINTS,
}

#: FPN levels distilled by each family in the released configs.
DEFAULT_LEVELS: dict[str, tuple[str, ...]] = {
    "retinanet": ("p3", "p4", "p5", "p6", "p7"),
    "fcos": ("p3", "p4", "p5", "p6", "p7"),
    "reppoints": ("p3", "p4", "p5", "p6", "p7"),
    "faster_rcnn": ("p2", "p3", "p4", "p5"),
    "mask_rcnn": ("p2", "p3", "p4", "p5"),
}

_ONE_STAGE = ("retinanet", "fcos", "reppoints")
_P3_P6 = ("p3", "p4", "p5", "p6")

#: Levels and weights of PKD, CWD and MGD by detector family (FGD and plain imitation take
#: :data:`PRESETS` and :data:`DEFAULT_LEVELS`).
METHOD_PRESETS: dict[str, dict[str, tuple[tuple[str, ...], Any]]] = {
    "pkd": {
        **{fam: (_P3_P6, PKDHyperParams(loss_weight=10.0)) for fam in _ONE_STAGE},
        "faster_rcnn": (DEFAULT_LEVELS["faster_rcnn"], PKDHyperParams(loss_weight=6.0)),
        "mask_rcnn": (DEFAULT_LEVELS["mask_rcnn"], PKDHyperParams(loss_weight=6.0)),
    },
    "cwd": {
        fam: (levels, CWDHyperParams(tau=1.0, loss_weight=10.0))
        for fam, levels in DEFAULT_LEVELS.items()
    },
    "mgd": {
        fam: (levels, MGDHyperParams(alpha_mgd=2e-5, lambda_mgd=0.65))
        for fam, levels in DEFAULT_LEVELS.items()
    },
}


def preset(method: str, family: str) -> tuple[tuple[str, ...], Any]:
    """``(levels, hyperparameters)`` of ``method`` for the detector ``family``.

    Raises:
        KeyError: an unknown method or family.
    """
    if method not in HPARAMS:
        raise KeyError(f"unknown method {method!r}; choose one of {', '.join(HPARAMS)}")
    if family not in PRESETS:
        raise KeyError(f"unknown detector family {family!r}; choose one of {', '.join(PRESETS)}")
    if method in ("fgd", "mse"):
        hparams: FGDHyperParams = PRESETS[family]
        return DEFAULT_LEVELS[family], hparams
    return METHOD_PRESETS[method][family]
