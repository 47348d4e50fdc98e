"""One distillation loss per FPN level, each with its own hyperparameters.

The method is chosen by name: ``"fgd"`` (:class:`FGDLoss`, the default), ``"mse"`` (plain feature
imitation), ``"pkd"`` (:class:`PKDLoss`), ``"cwd"`` (:class:`CWDLoss`) or ``"mgd"``
(:class:`MGDLoss`); each has a frozen dataclass of hyperparameters (:data:`HPARAMS`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from fgdistill.errors import NonFiniteError
from fgdistill.losses.cwd import CWDLoss
from fgdistill.losses.fgd import FGDLoss
from fgdistill.losses.imitation import FeatureImitationLoss
from fgdistill.losses.mgd import MGDLoss
from fgdistill.losses.pkd import PKDLoss

__all__ = [
    "HPARAMS",
    "METHODS",
    "NORMALIZE_MODES",
    "ONE_STAGE_HPARAMS",
    "CWDHyperParams",
    "FGDHyperParams",
    "MGDHyperParams",
    "MultiLevelFGD",
    "PKDHyperParams",
]


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


def _check(obj: object, positive: Sequence[str] = (), non_negative: Sequence[str] = ()) -> None:
    for name in (*positive, *non_negative):
        value = getattr(obj, name)
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(f"{name} must be a number, got {value!r}")
        ok = value > 0 if name in positive else value >= 0
        if not ok or value == float("inf"):
            sign = "> 0" if name in positive else ">= 0"
            raise ValueError(f"{name} must be finite and {sign}, got {value}")


@dataclass(frozen=True)
class PKDHyperParams:
    """The keywords of :class:`PKDLoss` (Cao et al., NeurIPS 2022)."""

    loss_weight: float = 1.0
    resize_student: bool = True

    def __post_init__(self) -> None:
        _check(self, non_negative=("loss_weight",))
        if not isinstance(self.resize_student, bool):
            raise ValueError(f"resize_student must be true or false, got {self.resize_student!r}")


@dataclass(frozen=True)
class CWDHyperParams:
    """The keywords of :class:`CWDLoss` (Shu et al., ICCV 2021)."""

    tau: float = 1.0
    loss_weight: float = 1.0

    def __post_init__(self) -> None:
        _check(self, positive=("tau",), non_negative=("loss_weight",))


@dataclass(frozen=True)
class MGDHyperParams:
    """The keywords of :class:`MGDLoss` (Yang et al., ECCV 2022)."""

    alpha_mgd: float = 2e-5
    lambda_mgd: float = 0.65

    def __post_init__(self) -> None:
        _check(self, non_negative=("alpha_mgd", "lambda_mgd"))
        if self.lambda_mgd > 1:
            raise ValueError(f"lambda_mgd is a probability in [0, 1], got {self.lambda_mgd}")


#: The paper's one-stage setting, :class:`MultiLevelFGD`'s default. The settings per detector
#: family are in :mod:`fgdistill.models.presets`.
ONE_STAGE_HPARAMS = FGDHyperParams(temperature=0.5, alpha=1e-3, beta=5e-4, gamma=5e-4, lambda_=5e-6)

#: The hyperparameter class of each method. Plain imitation (``mse``) is weighted by FGD's
#: global weight ``lambda_``, so that it is FGD with only a plain feature term.
HPARAMS: dict[str, type] = {
    "fgd": FGDHyperParams,
    "mse": FGDHyperParams,
    "pkd": PKDHyperParams,
    "cwd": CWDHyperParams,
    "mgd": MGDHyperParams,
}
METHODS: tuple[str, ...] = tuple(HPARAMS)
#: Methods without an align layer: student and teacher need the same channels per level.
SAME_CHANNELS: tuple[str, ...] = ("pkd", "cwd")

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


def _level_loss(method: str, h: Any, cs: int, ct: int) -> nn.Module:
    """One level's loss module for ``method`` with hyperparameters ``h``."""
    if method == "fgd":
        return FGDLoss(
            cs,
            ct,
            temperature=h.temperature,
            alpha=h.alpha,
            beta=h.beta,
            gamma=h.gamma,
            lambda_=h.lambda_,
        )
    if method == "mse":
        return FeatureImitationLoss(cs, ct, weight=h.lambda_)
    if method in SAME_CHANNELS and cs != ct:
        raise ValueError(
            f"{method} needs the same channels on both sides, got student {cs} and teacher "
            f"{ct}; fgd, mse and mgd align them with a 1x1 conv"
        )
    if method == "pkd":
        return PKDLoss(loss_weight=h.loss_weight, resize_student=h.resize_student)
    if method == "cwd":
        return CWDLoss(tau=h.tau, loss_weight=h.loss_weight)
    return MGDLoss(cs, ct, alpha_mgd=h.alpha_mgd, lambda_mgd=h.lambda_mgd)


class MultiLevelFGD(nn.Module):
    """One distillation loss per FPN level; returns named per-level terms and their total.

    FGD by default; ``method`` picks another (:data:`METHODS`), on the same levels, inputs and
    normalisation, so that methods are compared on the same footing.

    Args:
        levels: FPN level names, e.g. ``("p3", "p4", "p5", "p6", "p7")``.
        student_channels: student channels, one int for all levels or a mapping level -> int.
        teacher_channels: teacher channels, likewise.
        hparams: the method's hyperparameters (:data:`HPARAMS`), one for all levels or a
            mapping level -> hparams (default: :data:`ONE_STAGE_HPARAMS`, or the method's
            defaults for a method other than FGD).
        method: ``"fgd"`` (:class:`FGDLoss`), ``"mse"`` (:class:`FeatureImitationLoss`,
            weighted by each level's ``lambda_``: the baseline for ablations), ``"pkd"``,
            ``"cwd"`` (both need equal channels) or ``"mgd"``.
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
        hparams: Any = None,
        *,
        method: str = "fgd",
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
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        kind = HPARAMS[method]
        if hparams is None:
            hparams = ONE_STAGE_HPARAMS if kind is FGDHyperParams else kind()
        if normalize not in NORMALIZE_MODES:
            raise ValueError(f"normalize must be one of {NORMALIZE_MODES}, got {normalize!r}")
        s_ch = _per_level("student_channels", student_channels, levels, int)
        t_ch = _per_level("teacher_channels", teacher_channels, levels, int)
        hp = _per_level("hparams", hparams, levels, kind)
        self.levels = levels
        self.method = method
        self.normalize = normalize
        self.hparams: dict[str, Any] = {lv: hp[lv] for lv in levels}
        self.losses = nn.ModuleDict()
        for lv in levels:
            cs, ct = int(s_ch[lv]), int(t_ch[lv])  # type: ignore[call-overload]
            try:
                self.losses[lv] = _level_loss(method, self.hparams[lv], cs, ct)
            except ValueError as err:
                raise ValueError(f"level {lv}: {err}") from None

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
            boxes: N tensors ``FloatTensor[K_i, 4]``, xyxy in pixels of the input batch (FGD
                only; the other methods see no boxes).
            batch_shape: ``(H_in, W_in)`` of the input batch, padding included.

        Returns:
            ``(terms, total)``: ``terms`` keyed ``f"fgd/{level}/{term}"`` whatever the method
            (the prefix marks distillation terms): FGD's ``fg``, ``bg``, ``attention``,
            ``global``, or one term named after the method (``mse``, ``pkd``, ``cwd``,
            ``mgd``), already weighted; ``total`` is their 0-dim sum.

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
                if self.method in ("fgd", "mse"):
                    level_terms = self.losses[lv](s_map, t_map, boxes, batch_shape)
                else:
                    level_terms = {self.method: self.losses[lv](s_map, t_map)}
            except NonFiniteError as err:
                raise NonFiniteError(f"level {lv}: {err}") from err
            except ValueError as err:
                raise ValueError(f"level {lv}: {err}") from err
            for term, value in level_terms.items():
                terms[f"fgd/{lv}/{term}"] = value
        total = torch.stack(list(terms.values())).sum()
        return terms, total

    def extra_repr(self) -> str:
        return f"method={self.method!r}, normalize={self.normalize!r}"
