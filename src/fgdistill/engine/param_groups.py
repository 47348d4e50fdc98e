"""Parameter groups with their own learning rate and weight decay for biases (mmdetection's
``paramwise_cfg=dict(bias_lr_mult=..., bias_decay_mult=...)``, used by the released FCOS)."""

from __future__ import annotations

from typing import Any

from torch import nn

__all__ = ["bias_param_groups"]

_NORMS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)


def bias_param_groups(
    model: nn.Module,
    *,
    lr: float,
    weight_decay: float,
    bias_lr_mult: float = 1.0,
    bias_decay_mult: float = 1.0,
) -> list[dict[str, Any]]:
    """Two parameter groups: the biases of non-norm layers, with ``lr * bias_lr_mult`` and
    ``weight_decay * bias_decay_mult``, and every other parameter with ``lr`` and
    ``weight_decay``.

    As mmdetection's ``DefaultOptimizerConstructor``: the parameters of norm layers
    (BatchNorm, GroupNorm, LayerNorm), biases included, keep the base settings. Parameters that
    do not require gradients are left out; a parameter shared by two modules is counted once.
    """
    biases: list[nn.Parameter] = []
    others: list[nn.Parameter] = []
    seen: set[int] = set()
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            if id(param) in seen or not param.requires_grad:
                continue
            seen.add(id(param))
            is_bias = name == "bias" and not isinstance(module, _NORMS)
            (biases if is_bias else others).append(param)
    groups: list[dict[str, Any]] = [{"params": others, "lr": lr, "weight_decay": weight_decay}]
    if biases:
        groups.append(
            {
                "params": biases,
                "lr": lr * bias_lr_mult,
                "weight_decay": weight_decay * bias_decay_mult,
            }
        )
    return groups
