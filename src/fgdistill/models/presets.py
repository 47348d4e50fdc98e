"""FGD settings per detector family: which FPN levels are distilled, and with which weights.

These are the settings of the authors' released configs. They belong to the detectors, not to
the losses: :mod:`fgdistill.losses` takes levels and :class:`FGDHyperParams` as arguments and
knows no detector names.
"""

from __future__ import annotations

from fgdistill.losses.multilevel import ONE_STAGE_HPARAMS, FGDHyperParams

__all__ = ["DEFAULT_LEVELS", "PRESETS"]

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
