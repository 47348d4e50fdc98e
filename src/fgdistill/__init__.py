"""fgdistill: Focal and Global Distillation (FGD) for torchvision object detectors.

The names most programs need are here::

    from fgdistill import Distiller, FGDLoss, MultiLevelFGD, build_detector, load_detector

Training from a config is :func:`fgdistill.engine.runner.train`.
"""

from importlib.metadata import PackageNotFoundError, version

from fgdistill.losses import FGDLoss, MultiLevelFGD
from fgdistill.models import Distiller, build_detector, load_detector

__all__ = [
    "Distiller",
    "FGDLoss",
    "MultiLevelFGD",
    "__version__",
    "build_detector",
    "load_detector",
]

try:
    __version__ = version("fgdistill")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0+unknown"
