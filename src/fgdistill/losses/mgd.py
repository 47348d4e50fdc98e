"""MGD loss for one FPN level: masked generative distillation.

Yang et al., "Masked Generative Distillation", ECCV 2022 (by FGD's authors). With ``S`` the
student map ``[N, Cs, H, W]`` and ``T`` the teacher map ``[N, Ct, H, W]``:

1. ``S`` goes through a 1x1 ``align`` conv (with bias) to ``Ct`` channels when ``Cs != Ct``;
2. it is multiplied by a spatial mask ``keep`` ``[N, 1, H, W]`` (1 = kept, 0 = masked), the same
   for every channel, where each position is masked with probability ``lambda_mgd``;
3. a generation block ``Conv3x3(Ct, Ct) - ReLU - Conv3x3(Ct, Ct)`` (both convs with bias, padding
   1) must rebuild the teacher's map from what is left, ``G``;
4. the loss is ``alpha_mgd * sum((G - T)^2) / N``.

The student is taught to hold enough of the teacher's information at the kept positions for the
generator to fill in the masked ones. ``align`` and ``generation`` are trained together with the
student and are not part of the distilled model.

Where it follows mmrazor's ``MGDLoss`` and ``MGDConnector``: the parameter names and layout (so
their state dicts load as they are), the mask applied after ``align``, the random mask drawn
uniformly and masking a position where the draw exceeds ``1 - lambda_mgd``, and the squared error
summed over all elements and divided by the batch size only (not a mean). PyTorch's default
initialisation is kept for every conv, as there.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fgdistill.errors import CompatibilityError
from fgdistill.losses._pair import check_channels, check_feature_pair, check_weight
from fgdistill.losses.fgd import check_finite_result

__all__ = ["MGDLoss"]


class MGDLoss(nn.Module):
    """Masked generative distillation loss for one feature level.

    Shapes: ``student [N, Cs, H, W]``, ``teacher [N, Ct, H, W]``, ``keep [N, 1, H, W]``, result
    a 0-dim tensor.

    Args:
        student_channels: ``Cs``.
        teacher_channels: ``Ct``; a 1x1 ``align`` conv maps ``Cs`` to ``Ct`` when they differ.
        alpha_mgd: multiplier of the loss (2e-5 in the paper's RetinaNet setting).
        lambda_mgd: probability that a position is masked, in ``[0, 1]`` (0.65 in the paper).

    Parameters (the keys of mmrazor's connector): ``align.weight``, ``align.bias`` (only when
    ``Cs != Ct``), ``generation.0.weight``, ``generation.0.bias``, ``generation.2.weight``,
    ``generation.2.bias``. Train them with the student; they are not part of the student model.

    The teacher map takes no gradient. Half-precision inputs are upcast to float32 and autocast
    is disabled inside the loss (the parameters must then be float32, or the inputs' dtype if
    wider). The random mask is drawn on the inputs' device; on CUDA nothing is read back to the
    host.
    """

    def __init__(
        self,
        student_channels: int,
        teacher_channels: int,
        alpha_mgd: float = 2e-5,
        lambda_mgd: float = 0.65,
    ) -> None:
        super().__init__()
        check_channels(student_channels, teacher_channels)
        self.student_channels = student_channels
        self.teacher_channels = teacher_channels
        self.alpha_mgd = check_weight("alpha_mgd", alpha_mgd)
        self.lambda_mgd = check_weight("lambda_mgd", lambda_mgd)
        if self.lambda_mgd > 1:
            raise ValueError(f"lambda_mgd is a probability in [0, 1], got {lambda_mgd!r}")
        self.align: nn.Conv2d | None = (
            nn.Conv2d(student_channels, teacher_channels, kernel_size=1)
            if student_channels != teacher_channels
            else None
        )
        self.generation = nn.Sequential(
            nn.Conv2d(teacher_channels, teacher_channels, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.Conv2d(teacher_channels, teacher_channels, kernel_size=3, padding=1),
        )

    def extra_repr(self) -> str:
        return (
            f"student_channels={self.student_channels}, teacher_channels={self.teacher_channels}, "
            f"alpha_mgd={self.alpha_mgd}, lambda_mgd={self.lambda_mgd}"
        )

    def random_keep(self, feat: Tensor) -> Tensor:
        """A random mask ``[N, 1, H, W]`` for ``feat`` ``[N, C, H, W]``, in its dtype and on its
        device: 1 where a uniform draw is at most ``1 - lambda_mgd``, else 0 (masked)."""
        n, _, h, w = feat.shape
        draw = torch.rand((n, 1, h, w), device=feat.device, dtype=feat.dtype)
        return (draw <= 1 - self.lambda_mgd).to(feat.dtype)

    def generate(self, student: Tensor, keep: Tensor) -> Tensor:
        """``G = generation(align(S) * keep)``: ``[N, Cs, H, W]`` and ``[N, 1, H, W]`` to
        ``[N, Ct, H, W]`` (no checks; :meth:`forward` checks)."""
        s = self.align(student) if self.align is not None else student
        return self.generation(s * keep)

    def forward(self, student: Tensor, teacher: Tensor, keep: Tensor | None = None) -> Tensor:
        """Weighted MGD loss.

        Args:
            student: ``FloatTensor[N, Cs, H, W]``.
            teacher: ``FloatTensor[N, Ct, H, W]`` (detached here: it takes no gradient).
            keep: ``[N, 1, H, W]``, 1 at kept and 0 at masked positions (bool or floating);
                None (the training default) draws it at random with :meth:`random_keep`.

        Returns:
            0-dim tensor, ``alpha_mgd * sum((G - T)^2) / N``, in the inputs' dtype (at least
            float32).

        Raises:
            CompatibilityError: wrong ranks, batch or spatial sizes that differ, channel counts
                other than the ones the loss was built for, or a ``keep`` of the wrong shape or
                device.
            NonFiniteError: (CPU only) NaN or Inf in a map.
        """
        check_feature_pair("MGD", student, teacher, same_channels=False, same_size=True)
        for name, x, expected in (
            ("student", student, self.student_channels),
            ("teacher", teacher, self.teacher_channels),
        ):
            if x.shape[1] != expected:
                raise CompatibilityError(
                    f"MGD: {name} has {x.shape[1]} channels (shape {tuple(x.shape)}), the loss "
                    f"was built for {expected}"
                )
        n, _, h, w = student.shape
        if keep is not None:
            if not isinstance(keep, Tensor):
                raise CompatibilityError(
                    f"MGD: keep must be a torch.Tensor, got {type(keep).__name__}"
                )
            if tuple(keep.shape) != (n, 1, h, w):
                raise CompatibilityError(
                    f"MGD: keep must have shape {(n, 1, h, w)} for a student of shape "
                    f"{tuple(student.shape)}, got {tuple(keep.shape)}"
                )
            if keep.device != student.device:
                raise CompatibilityError(
                    f"MGD: keep is on {keep.device} but student on {student.device}"
                )
        with torch.autocast(device_type=student.device.type, enabled=False):
            dtype = torch.promote_types(student.dtype, torch.float32)
            s = student.to(dtype)
            mask = self.random_keep(s) if keep is None else keep.detach().to(dtype)
            generated = self.generate(s, mask)
            err = F.mse_loss(generated, teacher.detach().to(dtype), reduction="sum")
            loss = (self.alpha_mgd / n) * err
        check_finite_result([loss], student, teacher)
        return loss
