"""FitNet-style feature imitation: a plain MSE baseline for FGD.

Romero et al., "FitNets: Hints for Thin Deep Nets", ICLR 2015, applied to every FPN position.
The loss is ``weight * sum((S - T)^2) / N`` over all channels and positions, the same
normalisation as FGD's terms (a sum divided by the batch size), so ``weight`` can be read against
FGD's ``lambda_``. ``S`` is the student map after a 1x1 ``align`` conv which, as in
:class:`~fgdistill.losses.fgd.FGDLoss`, exists only when the channel counts differ: with equal
channels the student imitates the teacher's features directly.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fgdistill.losses._pair import check_channels
from fgdistill.losses.fgd import check_finite_result, check_loss_inputs

__all__ = ["FeatureImitationLoss"]


class FeatureImitationLoss(nn.Module):
    """Summed MSE between (aligned) student and teacher maps, divided by the batch size.

    Args:
        student_channels: ``Cs``.
        teacher_channels: ``Ct``; a 1x1 ``align`` conv maps ``Cs`` to ``Ct`` when they differ.
        weight: multiplier of the loss (default 5e-6, FGD's RetinaNet ``lambda_``).
    """

    def __init__(
        self, student_channels: int, teacher_channels: int, *, weight: float = 5e-6
    ) -> None:
        super().__init__()
        check_channels(student_channels, teacher_channels)
        if not weight >= 0:
            raise ValueError(f"weight must be >= 0, got {weight}")
        self.student_channels = student_channels
        self.teacher_channels = teacher_channels
        self.weight = float(weight)
        self.align: nn.Conv2d | None = (
            nn.Conv2d(student_channels, teacher_channels, kernel_size=1)
            if student_channels != teacher_channels
            else None
        )

    def extra_repr(self) -> str:
        return (
            f"student_channels={self.student_channels}, teacher_channels={self.teacher_channels}, "
            f"weight={self.weight}"
        )

    def forward(
        self,
        student: Tensor,
        teacher: Tensor,
        boxes: Sequence[Tensor],
        batch_shape: tuple[int, int],
    ) -> dict[str, Tensor]:
        """Weighted imitation loss for one level.

        Args:
            student: ``FloatTensor[N, Cs, H, W]``.
            teacher: ``FloatTensor[N, Ct, H, W]`` (detached: takes no gradient).
            boxes: N tensors ``[K_i, 4]``; checked but unused (the loss covers every position).
            batch_shape: ``(H_in, W_in)``; checked but unused.

        Returns:
            ``{"mse": 0-dim tensor}``, already weighted.

        Raises:
            ValueError: invalid shapes, or (CPU only) NaN or Inf in the maps.
        """
        check_loss_inputs(
            student, teacher, boxes, batch_shape, self.student_channels, self.teacher_channels
        )
        if self.weight == 0:
            return {"mse": student.new_zeros(())}
        with torch.autocast(device_type=student.device.type, enabled=False):
            dtype = torch.promote_types(student.dtype, torch.float32)
            s = student.to(dtype)
            if self.align is not None:
                s = self.align(s)
            loss = F.mse_loss(s, teacher.detach().to(dtype), reduction="sum") / student.shape[0]
        check_finite_result([loss], student, teacher)
        return {"mse": self.weight * loss}
