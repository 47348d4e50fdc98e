"""GroupNorm whose result for an image does not depend on the batch around it.

``torch.nn.functional.group_norm`` refuses an input whose ``batch * channels_per_group * H * W``
is 1 ("Expected more than 1 value per channel when training"), a check written for BatchNorm
that counts the batch although GroupNorm normalises each image on its own. A head with as many
groups as channels (``fpn_channels=32``: 32 groups of one channel) on a 1x1 map (the p7 level of
a 64 px image) meets it whenever a batch holds one image: the last evaluation batch, or
``predict`` on a single image. Batched, the same image computes fine, and its result is the
same alone. :class:`GroupNorm` computes exactly what ``nn.GroupNorm`` does, without that check;
it has the same parameters, so checkpoints load either way.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["GroupNorm", "batch_independent_group_norms"]


class GroupNorm(nn.GroupNorm):
    """``nn.GroupNorm`` without the batch-size check that does not apply to it."""

    def forward(self, input: Tensor) -> Tensor:
        return torch.group_norm(
            input, self.num_groups, self.weight, self.bias, self.eps, torch.backends.cudnn.enabled
        )


def batch_independent_group_norms(model: nn.Module) -> nn.Module:
    """Turn every ``nn.GroupNorm`` in ``model`` into a :class:`GroupNorm` (in place)."""
    for module in model.modules():
        if type(module) is nn.GroupNorm:
            module.__class__ = GroupNorm
    return model
