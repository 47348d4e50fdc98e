"""CWD loss for one FPN level: channel-wise distillation.

Shu et al., "Channel-wise Knowledge Distillation for Dense Prediction", ICCV 2021. With ``S``
the student map and ``T`` the teacher map, both ``[N, C, H, W]``, each channel of each image is
turned into a distribution over its ``H*W`` positions, ``P = softmax(F / tau)``, and the loss is

``loss_weight * tau^2 * sum_{n,c} KL(P_T[n, c] || P_S[n, c]) / (N * C)``.

The student is thus pushed to put its activation mass where the teacher's most salient positions
of each channel are, ignoring each channel's offset (softmax is shift invariant).

Where it follows mmrazor's ``ChannelWiseDivergence``: the KL divergence summed over positions,
channels and images and then divided by ``N * C`` (not a mean over the ``H*W`` positions as
well), and the ``tau^2`` factor. Equal channel counts and equal spatial sizes are needed; there
is no align layer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fgdistill.losses._pair import check_feature_pair, check_weight
from fgdistill.losses.fgd import check_finite_result

__all__ = ["CWDLoss"]


class CWDLoss(nn.Module):
    """Channel-wise distillation loss for one feature level.

    Shapes: ``student [N, C, H, W]``, ``teacher [N, C, H, W]``, result a 0-dim tensor.

    Args:
        tau: softmax temperature (> 0; 1 in mmrazor's detection configs).
        loss_weight: multiplier of the loss (10 in mmrazor's RetinaNet FPN config).

    The module has no parameters. The teacher map takes no gradient. Half-precision inputs are
    upcast to float32 and autocast is disabled inside the loss; on CUDA nothing is read back to
    the host.
    """

    def __init__(self, tau: float = 1.0, loss_weight: float = 1.0) -> None:
        super().__init__()
        self.tau = check_weight("tau", tau, positive=True)
        self.loss_weight = check_weight("loss_weight", loss_weight)

    def extra_repr(self) -> str:
        return f"tau={self.tau}, loss_weight={self.loss_weight}"

    def forward(self, student: Tensor, teacher: Tensor) -> Tensor:
        """Weighted CWD loss.

        Args:
            student: ``FloatTensor[N, C, H, W]``.
            teacher: ``FloatTensor[N, C, H, W]`` (detached here: it takes no gradient).

        Returns:
            0-dim tensor, ``loss_weight * tau^2 * sum KL(P_T || P_S) / (N * C)``, in the
            inputs' dtype (at least float32).

        Raises:
            CompatibilityError: wrong ranks, or batch sizes, channel counts or spatial sizes
                that differ.
            NonFiniteError: (CPU only) NaN or Inf in a map.
        """
        check_feature_pair("CWD", student, teacher, same_channels=True, same_size=True)
        with torch.autocast(device_type=student.device.type, enabled=False):
            dtype = torch.promote_types(student.dtype, torch.float32)
            n, c = student.shape[:2]
            log_p_s = F.log_softmax(student.to(dtype).flatten(2) / self.tau, dim=-1)
            log_p_t = F.log_softmax(teacher.detach().to(dtype).flatten(2) / self.tau, dim=-1)
            kl = F.kl_div(log_p_s, log_p_t, reduction="sum", log_target=True)
            loss = (self.loss_weight * self.tau**2 / (n * c)) * kl
        check_finite_result([loss], student, teacher)
        return loss
