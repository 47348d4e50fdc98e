"""One FGD loss per FPN level, each with its own :class:`FGDHyperParams`."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from fgdistill.errors import NonFiniteError
from fgdistill.losses.fgd import FGDLoss
from fgdistill.losses.imitation import FeatureImitationLoss

__all__ = ["NORMALIZE_MODES", "ONE_STAGE_HPARAMS", "FGDHyperParams", "MultiLevelFGD"]


@dataclass(frozen=True)
class FGDHyperParams:
    """Weights and temperature of one level's FGD loss (the keywords of :class:`FGDLoss`)."""

    temperature: float = 0.5
    alpha: float = 1e-3
    beta: float = 5e-4
    gamma: float = 1e-3
    lambda_: float = 5e-6

    def __post_init__(self) -> None:
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        for name in ("alpha", "beta", "gamma", "lambda_"):
            value = getattr(self, name)
            if not value >= 0:
                raise ValueError(f"{name} must be >= 0, got {value}")


#: The paper's one-stage setting, :class:`MultiLevelFGD`'s default. The settings per detector
#: family are in :mod:`fgdistill.models.presets`.
ONE_STAGE_HPARAMS = FGDHyperParams(temperature=0.5, alpha=1e-3, beta=5e-4, gamma=5e-4, lambda_=5e-6)

LOSS_TYPES: tuple[str, ...] = ("fgd", "mse")

#: How features are scaled before the loss: ``"none"`` as the released code; ``"teacher_rms"``
#: divides both maps of a level by the root mean square of the teacher's map on the batch.
NORMALIZE_MODES: tuple[str, ...] = ("none", "teacher_rms")


def _per_level(name: str, value: object, levels: Sequence[str], kind: type) -> dict[str, object]:
    if isinstance(value, Mapping):
        missing = [lv for lv in levels if lv not in value]
        if missing:
            raise ValueError(f"{name} has no entry for level(s) {missing}; got {sorted(value)}")
        out = {lv: value[lv] for lv in levels}
    else:
        out = dict.fromkeys(levels, value)
    for lv, v in out.items():
        if not isinstance(v, kind) or isinstance(v, bool):
            raise ValueError(f"{name}[{lv!r}] must be {kind.__name__}, got {type(v).__name__}")
    return out


class MultiLevelFGD(nn.Module):
    """One distillation loss per FPN level; returns named per-level terms and their total.

    Args:
        levels: FPN level names, e.g. ``("p3", "p4", "p5", "p6", "p7")``.
        student_channels: student channels, one int for all levels or a mapping level -> int.
        teacher_channels: teacher channels, likewise.
        hparams: one :class:`FGDHyperParams` for all levels or a mapping level -> hparams
            (default: :data:`ONE_STAGE_HPARAMS`).
        loss_type: ``"fgd"`` (:class:`FGDLoss`) or ``"mse"`` (:class:`FeatureImitationLoss`,
            weighted by each level's ``lambda_``), the baseline for ablations.
        normalize: ``"none"`` (the released code) or ``"teacher_rms"``: both maps of a level are
            divided by ``sqrt(mean(T**2))`` of the teacher's map on the batch (a detached
            scalar) before the loss. The terms then no longer grow with the teacher's feature
            scale, and the attention temperature acts on features of unit scale.

    ``losses`` is an ``nn.ModuleDict`` level -> loss module.
    """

    def __init__(
        self,
        levels: Sequence[str],
        student_channels: int | Mapping[str, int],
        teacher_channels: int | Mapping[str, int],
        hparams: FGDHyperParams | Mapping[str, FGDHyperParams] = ONE_STAGE_HPARAMS,
        *,
        loss_type: str = "fgd",
        normalize: str = "none",
    ) -> None:
        super().__init__()
        if isinstance(levels, str):
            raise ValueError(f"levels must be a sequence of level names, got the string {levels!r}")
        levels = tuple(levels)
        if not levels:
            raise ValueError("levels must name at least one FPN level")
        if len(set(levels)) != len(levels):
            raise ValueError(f"levels must be unique, got {levels}")
        if loss_type not in LOSS_TYPES:
            raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
        if normalize not in NORMALIZE_MODES:
            raise ValueError(f"normalize must be one of {NORMALIZE_MODES}, got {normalize!r}")
        s_ch = _per_level("student_channels", student_channels, levels, int)
        t_ch = _per_level("teacher_channels", teacher_channels, levels, int)
        hp = _per_level("hparams", hparams, levels, FGDHyperParams)
        self.levels = levels
        self.loss_type = loss_type
        self.normalize = normalize
        self.hparams: dict[str, FGDHyperParams] = {lv: hp[lv] for lv in levels}  # type: ignore[misc]
        self.losses = nn.ModuleDict()
        for lv in levels:
            h = self.hparams[lv]
            cs, ct = int(s_ch[lv]), int(t_ch[lv])  # type: ignore[call-overload]
            if loss_type == "fgd":
                self.losses[lv] = FGDLoss(
                    cs,
                    ct,
                    temperature=h.temperature,
                    alpha=h.alpha,
                    beta=h.beta,
                    gamma=h.gamma,
                    lambda_=h.lambda_,
                )
            else:
                self.losses[lv] = FeatureImitationLoss(cs, ct, weight=h.lambda_)

    def forward(
        self,
        student: Mapping[str, Tensor],
        teacher: Mapping[str, Tensor],
        boxes: Sequence[Tensor],
        batch_shape: tuple[int, int],
    ) -> tuple[dict[str, Tensor], Tensor]:
        """Distillation terms of every level.

        Args:
            student: level name -> ``FloatTensor[N, Cs, H_l, W_l]``; extra levels are ignored.
            teacher: level name -> ``FloatTensor[N, Ct, H_l, W_l]`` on the same padded batch.
            boxes: N tensors ``FloatTensor[K_i, 4]``, xyxy in pixels of the input batch.
            batch_shape: ``(H_in, W_in)`` of the input batch, padding included.

        Returns:
            ``(terms, total)``: ``terms`` keyed ``f"fgd/{level}/{term}"`` (``fg``, ``bg``,
            ``attention``, ``global``; ``mse`` for ``loss_type="mse"``), already weighted, and
            ``total`` their 0-dim sum.

        Raises:
            ValueError: a level is missing from ``student`` or ``teacher``, or a level's inputs
                are invalid (the message names the level).
        """
        for name, feats in (("student", student), ("teacher", teacher)):
            missing = [lv for lv in self.levels if lv not in feats]
            if missing:
                raise ValueError(
                    f"{name} features lack level(s) {missing}; got {sorted(feats)}, "
                    f"the loss distils {list(self.levels)}"
                )
        terms: dict[str, Tensor] = {}
        for lv in self.levels:
            s_map, t_map = student[lv], teacher[lv].detach()
            if self.normalize == "teacher_rms":
                rms = t_map.float().pow(2).mean().sqrt().clamp_min(1e-6).to(t_map.dtype)
                s_map, t_map = s_map / rms, t_map / rms
            try:
                level_terms = self.losses[lv](s_map, t_map, boxes, batch_shape)
            except NonFiniteError as err:
                raise NonFiniteError(f"level {lv}: {err}") from err
            except ValueError as err:
                raise ValueError(f"level {lv}: {err}") from err
            for term, value in level_terms.items():
                terms[f"fgd/{lv}/{term}"] = value
        total = torch.stack(list(terms.values())).sum()
        return terms, total

    def extra_repr(self) -> str:
        return f"loss_type={self.loss_type!r}, normalize={self.normalize!r}"
