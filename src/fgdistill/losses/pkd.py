"""PKD loss for one FPN level: feature imitation on the Pearson correlation.

Cao et al., "PKD: General Distillation Framework for Object Detectors via Pearson Correlation
Coefficient", NeurIPS 2022. With ``S`` the student map ``[N, C, H, W]`` and ``T`` the teacher map
``[N, C, H', W']``:

1. if the spatial sizes differ, ``S`` is resized to ``(H', W')`` by bilinear interpolation
   (``align_corners=False``), or ``T`` to ``(H, W)`` when ``resize_student=False``;
2. each map is standardised per channel, over the batch and all positions together:
   ``(F - mean) / (std + 1e-6)`` with the unbiased standard deviation;
3. the loss is ``loss_weight * mean((S_n - T_n)^2) / 2``, the mean over all ``N*C*H*W`` elements.

Minimising the squared difference of standardised maps is minimising ``1 - r`` with ``r`` the
Pearson correlation of each channel, so the loss ignores the scale and offset of either map
(per channel). That is why PKD suits heterogeneous teacher and student pairs, and why it needs no
align layer; it does need equal channel counts.

Where it follows mmrazor's ``PKDLoss``: the unbiased standard deviation, the ``1e-6`` added to
the standard deviation (not to the variance), the mean (not sum) over elements and the halving.
Where it differs: mmrazor resizes only when the heights differ; here a difference in either
height or width triggers the resize.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fgdistill.errors import CompatibilityError
from fgdistill.losses._pair import check_feature_pair, check_weight
from fgdistill.losses.fgd import check_finite_result

__all__ = ["PKD_EPS", "PKDLoss", "pkd_normalize"]

PKD_EPS = 1e-6
"""Added to the per-channel standard deviation before dividing (as in mmrazor)."""


def pkd_normalize(feat: Tensor) -> Tensor:
    """Standardise ``[N, C, H, W]`` per channel over ``N, H, W``: ``(F - mean) / (std + 1e-6)``.

    The standard deviation is the unbiased one (divides by ``N*H*W - 1``). Returns a tensor of
    the same shape.
    """
    std, mean = torch.std_mean(feat, dim=(0, 2, 3), keepdim=True, correction=1)
    return (feat - mean) / (std + PKD_EPS)


class PKDLoss(nn.Module):
    """PKD (Pearson correlation) distillation loss for one feature level.

    Shapes: ``student [N, C, H, W]``, ``teacher [N, C, H', W']``, result a 0-dim tensor.

    Args:
        loss_weight: multiplier of the loss (mmrazor's detection configs use 6 for two-stage
            and 10 for one-stage detectors).
        resize_student: when the spatial sizes differ, resize the student to the teacher's
            size (True) or the teacher to the student's (False), bilinearly.

    The module has no parameters. The teacher map takes no gradient. Half-precision inputs are
    upcast to float32 and autocast is disabled inside the loss; on CUDA nothing is read back to
    the host.
    """

    def __init__(self, loss_weight: float = 1.0, resize_student: bool = True) -> None:
        super().__init__()
        self.loss_weight = check_weight("loss_weight", loss_weight)
        self.resize_student = bool(resize_student)

    def extra_repr(self) -> str:
        return f"loss_weight={self.loss_weight}, resize_student={self.resize_student}"

    def forward(self, student: Tensor, teacher: Tensor) -> Tensor:
        """Weighted PKD loss.

        Args:
            student: ``FloatTensor[N, C, H, W]``.
            teacher: ``FloatTensor[N, C, H', W']`` (detached here: it takes no gradient).

        Returns:
            0-dim tensor, ``loss_weight * mean((S_n - T_n)^2) / 2``, in the inputs' dtype
            (at least float32).

        Raises:
            CompatibilityError: wrong ranks, batch sizes or channel counts that differ, or fewer
                than two values per channel to standardise.
            NonFiniteError: (CPU only) NaN or Inf in a map.
        """
        check_feature_pair("PKD", student, teacher, same_channels=True, same_size=False)
        with torch.autocast(device_type=student.device.type, enabled=False):
            dtype = torch.promote_types(student.dtype, torch.float32)
            s = student.to(dtype)
            t = teacher.detach().to(dtype)
            if s.shape[2:] != t.shape[2:]:
                if self.resize_student:
                    s = F.interpolate(s, size=t.shape[2:], mode="bilinear", align_corners=False)
                else:
                    t = F.interpolate(t, size=s.shape[2:], mode="bilinear", align_corners=False)
            n, _, h, w = s.shape
            if n * h * w < 2:
                raise CompatibilityError(
                    "PKD needs at least two values per channel (N*H*W >= 2) for the unbiased "
                    f"standard deviation, got maps of shape {tuple(s.shape)}"
                )
            diff = pkd_normalize(s) - pkd_normalize(t)
            loss = self.loss_weight * diff.square().mean() / 2
        check_finite_result([loss], student, teacher)
        return loss
