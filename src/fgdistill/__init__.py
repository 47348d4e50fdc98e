"""fgdistill: Focal and Global Distillation (FGD) for torchvision object detectors."""

from fgdistill.losses.fgd import FGDLoss

__all__ = ["FGDLoss", "__version__"]
__version__ = "0.1.0"
