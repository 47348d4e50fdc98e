"""The distiller: a student detector, a frozen teacher, and one FGD loss per FPN level.

Focal and Global Distillation (Yang et al., "Focal and Global Knowledge Distillation for
Detectors", CVPR 2022). One training step of :class:`Distiller`:

1. The student runs as usual, ``student(images, targets)``, computing its own detection losses.
   Two forward hooks, registered for that call only and always removed, capture what its
   transform produced (the resized, normalised, padded batch and the rescaled boxes) and what its
   backbone produced (the FPN levels). Nothing is kept on the module afterwards.
2. The teacher's backbone and FPN run on that same padded batch, ``images.tensors``, in eval mode
   and without gradients. The teacher never runs its own transform, which would draw its own
   random size.
3. The FGD loss gets the student's and teacher's levels, the transformed boxes (xyxy, pixels of
   the padded batch) and the padded batch shape ``(H_in, W_in)``.

Where this differs from the authors' released code (mmdetection based): boxes are scaled by the
padded batch size, not the unpadded image size; and inheriting the teacher's neck and head
(``inherit_teacher=True``) happens last in the constructor, after every initialisation, so
nothing can overwrite the copied weights.

The teacher is kept outside the module's registry of children: ``parameters()``,
``state_dict()``, an optimizer and DDP see only the student and the FGD modules. It still moves
with ``.to()``/``.cuda()``/``.half()`` and stays in eval mode whatever ``train()`` is called with.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torchvision.models.detection import FCOS, FasterRCNN, MaskRCNN, RetinaNet

from fgdistill.errors import CompatibilityError, ConfigError
from fgdistill.losses import MultiLevelFGD
from fgdistill.models.build import SPEC_ATTR
from fgdistill.models.levels import LevelInfo, backbone_levels
from fgdistill.models.presets import PRESETS, preset

__all__ = [
    "INHERIT_PREFIXES",
    "DistillBatch",
    "Distiller",
    "InheritReport",
    "class_specific_prefixes",
    "detector_family",
    "inherit_weights",
]

logger = logging.getLogger(__name__)

#: State-dict prefixes of the parts copied by ``inherit_teacher=True``: the FPN (neck), the
#: heads of one-stage (``head``) and two-stage (``rpn``, ``roi_heads``) detectors, and RepPoints'
#: learned moment transfer, which the head's points are trained against (it is part of the head
#: in mmdetection, whose students inherit everything but the backbone). The backbone body is
#: never copied.
INHERIT_PREFIXES: tuple[str, ...] = (
    "backbone.fpn.",
    "head.",
    "rpn.",
    "roi_heads.",
    "moment_transfer",
)

#: State-dict prefixes of the class-specific layers of each family: those whose outputs are one
#: per class, which mean nothing in another label space (inheriting skips them then).
CLASS_SPECIFIC_PREFIXES: dict[str, tuple[str, ...]] = {
    "retinanet": ("head.classification_head.cls_logits.",),
    "fcos": ("head.classification_head.cls_logits.",),
    "reppoints": ("head.cls_out.",),
    "faster_rcnn": ("roi_heads.box_predictor.",),
    "mask_rcnn": ("roi_heads.box_predictor.", "roi_heads.mask_predictor.mask_fcn_logits."),
}

_LEVEL_RE = re.compile(r"p[1-9]\d*")


def detector_family(model: nn.Module) -> str | None:
    """The detector family of ``model`` (a key of ``PRESETS``), or None when unknown.

    Read from the build arguments recorded by ``build_detector``, else from the class.
    """
    spec = getattr(model, SPEC_ATTR, None)
    if isinstance(spec, dict) and spec.get("arch") in PRESETS:
        return str(spec["arch"])
    if isinstance(model, MaskRCNN):
        return "mask_rcnn"
    if isinstance(model, FasterRCNN):
        return "faster_rcnn"
    if isinstance(model, RetinaNet):
        return "retinanet"
    if isinstance(model, FCOS):
        return "fcos"
    if any(cls.__name__ == "RepPoints" for cls in type(model).__mro__):
        return "reppoints"
    return None


def class_specific_prefixes(model: nn.Module) -> tuple[str, ...]:
    """State-dict prefixes of ``model``'s class-specific layers (empty for an unknown family)."""
    family = detector_family(model)
    return CLASS_SPECIFIC_PREFIXES.get(family, ()) if family else ()


@dataclass(frozen=True)
class InheritReport:
    """What :func:`inherit_weights` copied from the teacher into the student, and what it skipped.

    Attributes:
        copied: state-dict keys copied.
        wrong_shape: keys present in both with different shapes: key -> (teacher, student) shape.
        not_in_student: teacher keys (under the inherited prefixes) the student lacks.
        not_in_teacher: student keys (under the inherited prefixes) the teacher lacks; they keep
            their own initialisation.
    """

    copied: tuple[str, ...] = ()
    wrong_shape: Mapping[str, tuple[tuple[int, ...], tuple[int, ...]]] = field(default_factory=dict)
    not_in_student: tuple[str, ...] = ()
    not_in_teacher: tuple[str, ...] = ()
    excluded: tuple[str, ...] = ()
    """teacher keys left out on purpose (the class-specific layers of another label space)"""

    def describe(self) -> str:
        """One line: counts, and the first skipped keys of each kind."""

        def first(keys: Sequence[str]) -> str:
            return ", ".join(keys[:5]) + (" ..." if len(keys) > 5 else "")

        parts = [f"copied {len(self.copied)} tensors from the teacher"]
        if self.excluded:
            parts.append(
                f"skipped {len(self.excluded)} class-specific tensors of another label space "
                f"({first(self.excluded)})"
            )
        if self.wrong_shape:
            parts.append(
                f"skipped {len(self.wrong_shape)} of another shape "
                f"({first(list(self.wrong_shape))})"
            )
        if self.not_in_student:
            parts.append(
                f"{len(self.not_in_student)} not in the student ({first(self.not_in_student)})"
            )
        if self.not_in_teacher:
            parts.append(
                f"{len(self.not_in_teacher)} student tensors not in the teacher "
                f"({first(self.not_in_teacher)})"
            )
        return "; ".join(parts)


def inherit_weights(
    student: nn.Module,
    teacher: nn.Module,
    prefixes: Sequence[str] = INHERIT_PREFIXES,
    *,
    exclude: Sequence[str] = (),
) -> InheritReport:
    """Copy the teacher's tensors under ``prefixes`` into the student where names and shapes match.

    The student's backbone body is untouched (it is not under any default prefix). Copying is
    in place, without gradients, converting device and dtype to the student's. Keys under
    ``exclude`` (e.g. :func:`class_specific_prefixes` when the label spaces differ) are not
    copied and are listed in ``report.excluded``.
    """
    prefix_tuple = tuple(prefixes)
    exclude_tuple = tuple(exclude)
    excluded: list[str] = []
    own = student.state_dict()
    theirs = teacher.state_dict()
    copied: list[str] = []
    wrong_shape: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {}
    not_in_student: list[str] = []
    with torch.no_grad():
        for key, value in theirs.items():
            if not key.startswith(prefix_tuple):
                continue
            if exclude_tuple and key.startswith(exclude_tuple):
                excluded.append(key)
                continue
            if key not in own:
                not_in_student.append(key)
            elif own[key].shape != value.shape:
                wrong_shape[key] = (tuple(value.shape), tuple(own[key].shape))
            else:
                own[key].copy_(value)
                copied.append(key)
    not_in_teacher = [
        k
        for k in own
        if k.startswith(prefix_tuple)
        and k not in theirs
        and not (exclude_tuple and k.startswith(exclude_tuple))
    ]
    return InheritReport(
        tuple(copied),
        wrong_shape,
        tuple(not_in_student),
        tuple(not_in_teacher),
        tuple(excluded),
    )


@dataclass
class DistillBatch:
    """What one training forward of :class:`Distiller` saw and produced.

    Attributes:
        losses: the student's own detection losses, name -> 0-dim tensor.
        student_features: level -> ``FloatTensor[N, Cs, H_l, W_l]`` (with gradient).
        teacher_features: level -> ``FloatTensor[N, Ct, H_l, W_l]`` (no gradient).
        boxes: N tensors ``FloatTensor[K_i, 4]``, xyxy in pixels of the padded batch.
        batch_shape: ``(H_in, W_in)`` of the padded batch.
        image_sizes: ``(h, w)`` of each image after resizing, before padding.
        detections: the student's detections (eval mode only), else None.
    """

    losses: dict[str, Tensor]
    student_features: dict[str, Tensor]
    teacher_features: dict[str, Tensor]
    boxes: list[Tensor]
    batch_shape: tuple[int, int]
    image_sizes: list[tuple[int, int]]
    detections: list[dict[str, Tensor]] | None = None


@dataclass
class _Captured:
    transform_calls: int = 0
    backbone_calls: int = 0
    padded: Tensor | None = None
    image_sizes: list[tuple[int, int]] = field(default_factory=list)
    boxes: list[Tensor] | None = None
    features: Mapping[str, Tensor] | None = None


@contextmanager
def _capture(student: nn.Module) -> Iterator[_Captured]:
    """Hooks on ``student.transform`` and ``student.backbone`` for the duration of the block."""
    captured = _Captured()

    def on_transform(module: nn.Module, args: Any, output: Any) -> None:
        image_list, targets = output
        captured.transform_calls += 1
        captured.padded = image_list.tensors
        captured.image_sizes = [(int(h), int(w)) for h, w in image_list.image_sizes]
        if targets is not None:
            # copies: nothing downstream may change the boxes FGD sees
            captured.boxes = [t["boxes"].detach().clone() for t in targets]

    def on_backbone(module: nn.Module, args: Any, output: Any) -> None:
        captured.backbone_calls += 1
        captured.features = output

    transform, backbone = student.get_submodule("transform"), student.get_submodule("backbone")
    handles = [
        transform.register_forward_hook(on_transform),
        backbone.register_forward_hook(on_backbone),
    ]
    try:
        yield captured
    finally:
        for handle in handles:
            handle.remove()


def _resize_boxes(
    images: Sequence[Tensor],
    targets: Sequence[dict[str, Tensor]] | None,
    sizes: Sequence[tuple[int, int]],
) -> list[Tensor]:
    """Boxes scaled from each image's size to its resized size (no targets: no boxes).

    For students whose transform drops the targets in eval mode; torchvision's transform scales
    boxes the same way (``resize_boxes``).
    """
    if targets is None:
        return [image.new_zeros(0, 4) for image in images]
    out = []
    for image, target, (h, w) in zip(images, targets, sizes, strict=True):
        ratio_h, ratio_w = h / image.shape[-2], w / image.shape[-1]
        scale = torch.tensor([ratio_w, ratio_h, ratio_w, ratio_h], device=image.device)
        out.append(target["boxes"].detach().to(scale.dtype) * scale)
    return out


def _check_normalisation(student: nn.Module, teacher: nn.Module) -> None:
    """The teacher sees the student's normalised batch, so both must normalise alike."""
    s_tf, t_tf = student.get_submodule("transform"), teacher.get_submodule("transform")
    for attr in ("image_mean", "image_std"):
        s_val, t_val = getattr(s_tf, attr, None), getattr(t_tf, attr, None)
        if s_val is not None and t_val is not None and list(s_val) != list(t_val):
            raise CompatibilityError(
                f"student and teacher normalise images differently ({attr} {list(s_val)} vs "
                f"{list(t_val)}); the teacher runs on the student's normalised batch"
            )


def _first_tensor(module: nn.Module) -> Tensor | None:
    tensors: list[Tensor] = [*module.parameters(), *module.buffers()]
    floats = [t for t in tensors if t.is_floating_point()]
    return floats[0] if floats else None


class Distiller(nn.Module):
    """Student detector + frozen teacher + :class:`~fgdistill.losses.MultiLevelFGD`.

    FGD by default; ``method`` picks PKD, CWD, MGD or plain imitation on the same levels and
    footing. The teacher may be another kind of detector than the student (e.g. a RepPoints
    teacher for a RetinaNet student) as long as the distilled levels exist on both sides with
    the same strides; PKD and CWD also need the same channels per level.

    Train mode: ``distiller(images, targets)`` returns the student's loss dict plus the weighted
    FGD terms keyed ``"fgd/{level}/{term}"`` (not their total), so a trainer sums the dict once.
    Eval mode: it is the student, ``distiller(images)`` returns the student's detections.

    Args:
        student: a torchvision-contract detector with ``transform`` and ``backbone`` (any of
            :func:`~fgdistill.models.build_detector`'s).
        teacher: another such detector; only its backbone + FPN runs. Its parameters are set to
            ``requires_grad=False``, it is put in eval mode and moved to the student's device.
        levels: FPN levels to distil, e.g. ``["p3", "p4", "p5"]``. Default: the preset's
            (:func:`~fgdistill.models.presets.preset`; FGD: P3-P7 one-stage, P2-P5 two-stage).
        hparams: the method's hyperparameters (e.g. one
            :class:`~fgdistill.losses.FGDHyperParams`) or a mapping level -> hparams. Default:
            the preset's, the published configs' settings.
        inherit_teacher: copy the teacher's FPN and head weights into the student where names
            and shapes match (see :attr:`inherit_report`), after every other initialisation.
            ``inherit_exclude``: state-dict prefixes not inherited, e.g.
            :func:`class_specific_prefixes` of the student when the two label spaces differ.
        method: ``"fgd"``, ``"mse"`` (the plain feature-imitation baseline), ``"pkd"``,
            ``"cwd"`` or ``"mgd"``.
        split_regions: ``True`` (FGD): foreground (inside the boxes) and background are weighted
            apart, by ``alpha`` and ``beta``. ``False``: the ablation that distils every pixel as
            one region, with the background weight ``beta`` (the loss sees no boxes).
        normalize: ``"none"`` (the released code) or ``"teacher_rms"``: each level's maps are
            divided by the root mean square of the teacher's map before the loss, so that the
            terms do not grow with the teacher's feature scale (see
            :class:`~fgdistill.losses.MultiLevelFGD`).
        family: the student's detector family (a key of ``PRESETS``); default: from the student.

    Raises:
        CompatibilityError: the pair cannot be distilled (a level missing on either side,
            different strides, different input normalisation); the message names the levels.
        ConfigError: bad ``levels``, ``hparams``, ``method``, ``normalize`` or ``family``.
    """

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module,
        *,
        levels: Sequence[str] | None = None,
        hparams: Any = None,
        inherit_teacher: bool = False,
        method: str = "fgd",
        split_regions: bool = True,
        normalize: str = "none",
        family: str | None = None,
        inherit_exclude: Sequence[str] = (),
    ) -> None:
        super().__init__()
        if student is teacher:
            raise CompatibilityError("the teacher and the student are the same module")
        for role, model in (("student", student), ("teacher", teacher)):
            for part in ("transform", "backbone"):
                if not isinstance(getattr(model, part, None), nn.Module):
                    raise CompatibilityError(
                        f"the {role} ({type(model).__name__}) has no `{part}` module; the "
                        "distiller needs torchvision's detector layout"
                    )
        _check_normalisation(student, teacher)
        if family is None:
            family = detector_family(student)
        if family is not None and family not in PRESETS:
            raise ConfigError(f"unknown detector family {family!r}; choose one of {list(PRESETS)}")
        if (levels is None or hparams is None) and family is None:
            raise ConfigError(
                f"cannot tell the detector family of {type(student).__name__}; pass family=... "
                f"(one of {list(PRESETS)}) or both levels and hparams"
            )
        preset_levels: Sequence[str] = ()
        preset_hparams: Any = None
        if family is not None:
            try:
                preset_levels, preset_hparams = preset(method, family)
            except KeyError as exc:
                raise ConfigError(str(exc.args[0])) from None
        if levels is None:
            levels = preset_levels
        if isinstance(levels, str):
            raise ConfigError(f"levels must be a list of level names, got the string {levels!r}")
        levels = tuple(levels)
        bad = [lvl for lvl in levels if not isinstance(lvl, str) or not _LEVEL_RE.fullmatch(lvl)]
        if bad or not levels:
            raise ConfigError(f"levels must be names like 'p3' (stride 2**3); got {list(levels)}")
        if hparams is None:
            hparams = preset_hparams

        self.student = student
        # Outside the registry of children: not in parameters(), state_dict() or DDP.
        self._teacher: tuple[nn.Module] = (teacher,)
        self.family = family
        s_levels = backbone_levels(student)
        t_levels = backbone_levels(teacher)
        self._check_pair(levels, s_levels, t_levels)
        self._student_keys = {lvl: s_levels[lvl].key for lvl in levels}
        self._teacher_keys = {lvl: t_levels[lvl].key for lvl in levels}
        try:
            self.fgd = MultiLevelFGD(
                levels,
                {lvl: s_levels[lvl].channels for lvl in levels},
                {lvl: t_levels[lvl].channels for lvl in levels},
                hparams,
                method=method,
                normalize=normalize,
            )
        except ValueError as exc:
            if "channels" in str(exc):
                raise CompatibilityError(f"cannot distil this pair with {method}: {exc}") from exc
            raise ConfigError(f"cannot build the {method} loss: {exc}") from exc
        self._fgd_weight_scale = 1.0
        self.split_regions = bool(split_regions)

        reference = _first_tensor(student)
        if reference is not None:
            self.fgd.to(device=reference.device, dtype=reference.dtype)
            teacher.to(device=reference.device)
        teacher.requires_grad_(False)
        teacher.eval()
        self.train(student.training)

        # Last, after every initialisation, so nothing overwrites the inherited weights.
        self.inherit_report: InheritReport | None = None
        if inherit_teacher:
            report = inherit_weights(student, teacher, exclude=inherit_exclude)
            self.inherit_report = report
            log = logger.warning if not report.copied else logger.info
            log("inheriting the teacher's neck and heads: %s", report.describe())
        logger.info(
            "distilling %s levels %s (%s), student %s, teacher %s",
            method,
            list(levels),
            family or "custom",
            type(student).__name__,
            type(teacher).__name__,
        )

    @staticmethod
    def _check_pair(
        levels: tuple[str, ...],
        s_levels: Mapping[str, LevelInfo],
        t_levels: Mapping[str, LevelInfo],
    ) -> None:
        for role, have in (("student", s_levels), ("teacher", t_levels)):
            missing = [lvl for lvl in levels if lvl not in have]
            if missing:
                both = [lvl for lvl in levels if lvl in s_levels and lvl in t_levels]
                hint = f"; pass levels={both} to distil the common ones" if both else ""
                raise CompatibilityError(
                    f"the {role} has no FPN level(s) {missing} to distil (it has "
                    f"{list(have)}; distilling {list(levels)}){hint}"
                )
        strides = {
            lvl: (s_levels[lvl].stride, t_levels[lvl].stride)
            for lvl in levels
            if s_levels[lvl].stride != t_levels[lvl].stride
        }
        if strides:
            raise CompatibilityError(
                "student and teacher strides differ at level(s) "
                + ", ".join(f"{lvl} (student {s}, teacher {t})" for lvl, (s, t) in strides.items())
            )

    # -- the teacher ---------------------------------------------------------------------------

    @property
    def teacher(self) -> nn.Module:
        """The frozen teacher (not a registered child)."""
        return self._teacher[0]

    @property
    def levels(self) -> tuple[str, ...]:
        """The distilled FPN levels."""
        return tuple(self.fgd.levels)

    def train(self, mode: bool = True) -> Distiller:
        """Set the student and FGD modules' mode; the teacher stays in eval mode."""
        super().train(mode)
        self.teacher.eval()
        return self

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> Distiller:
        super()._apply(fn, recurse)
        self.teacher._apply(fn, recurse)
        return self

    # -- FGD weight scale ----------------------------------------------------------------------

    @property
    def fgd_weight_scale(self) -> float:
        """Multiplier on every FGD term (1.0 = the configured weights), e.g. for a warm-up."""
        return self._fgd_weight_scale

    @fgd_weight_scale.setter
    def fgd_weight_scale(self, value: float) -> None:
        value = float(value)
        if not (value >= 0.0 and value != float("inf")):
            raise ConfigError(f"fgd_weight_scale must be finite and >= 0, got {value}")
        self._fgd_weight_scale = value

    # -- forward -------------------------------------------------------------------------------

    def forward_features(
        self,
        images: Sequence[Tensor],
        targets: Sequence[dict[str, Tensor]] | None = None,
    ) -> DistillBatch:
        """Run the student and the teacher's backbone on the same padded batch.

        In train mode the student computes its losses (``targets`` required); in eval mode its
        detections, which is what pictures of features and attention need.

        Args:
            images: N tensors ``FloatTensor[3, H_i, W_i]`` in 0-1, as for the student.
            targets: N dicts with ``boxes`` (``FloatTensor[K_i, 4]``, xyxy, image pixels),
                ``labels`` (and ``masks`` for Mask R-CNN).

        Returns:
            a :class:`DistillBatch` with the student's losses (or detections), both sides'
            levels, and the boxes in pixels of the padded batch.
        """
        images = list(images)
        target_list = None if targets is None else list(targets)
        training = self.student.training
        if training and target_list is None:
            raise ValueError("training a distiller needs targets")
        teacher = self.teacher
        teacher.eval()
        with _capture(self.student) as captured:
            out = self.student(images, target_list)
        if captured.transform_calls != 1 or captured.backbone_calls != 1:
            raise CompatibilityError(
                f"the student ran its transform {captured.transform_calls} and its backbone "
                f"{captured.backbone_calls} time(s) in one forward; the distiller needs exactly one"
            )
        assert captured.padded is not None and captured.features is not None
        boxes = captured.boxes
        if boxes is None:
            if training:
                raise CompatibilityError(
                    "the student's transform returned no targets in train mode"
                )
            boxes = _resize_boxes(images, target_list, captured.image_sizes)
        padded = captured.padded
        with torch.no_grad():
            t_out = teacher.get_submodule("backbone")(padded)
        student_feats = {lvl: captured.features[key] for lvl, key in self._student_keys.items()}
        teacher_feats = {lvl: t_out[key] for lvl, key in self._teacher_keys.items()}
        for lvl in self._student_keys:
            s_hw, t_hw = student_feats[lvl].shape[-2:], teacher_feats[lvl].shape[-2:]
            if s_hw != t_hw:
                raise CompatibilityError(
                    f"level {lvl}: student map {tuple(s_hw)} and teacher map {tuple(t_hw)} differ "
                    f"in size on the same {tuple(padded.shape[-2:])} batch"
                )
        return DistillBatch(
            losses=dict(out) if training else {},
            student_features=student_feats,
            teacher_features=teacher_feats,
            boxes=boxes,
            batch_shape=(int(padded.shape[-2]), int(padded.shape[-1])),
            image_sizes=captured.image_sizes,
            detections=None if training else list(out),
        )

    def forward(
        self,
        images: Sequence[Tensor],
        targets: Sequence[dict[str, Tensor]] | None = None,
    ) -> Any:
        """Train mode: student losses + FGD terms (dict of 0-dim tensors); eval: detections.

        Args:
            images: N tensors ``FloatTensor[3, H_i, W_i]`` in 0-1.
            targets: N dicts with ``boxes`` ``FloatTensor[K_i, 4]`` (xyxy) and ``labels``
                ``Int64Tensor[K_i]``; needed in train mode.
        """
        if not self.training:
            return self.student(images, targets)
        if targets is None:
            raise ValueError("training a distiller needs targets")
        batch = self.forward_features(images, targets)
        boxes = batch.boxes
        if not self.split_regions:
            boxes = [b[:0] for b in boxes]
        terms, _total = self.fgd(
            batch.student_features, batch.teacher_features, boxes, batch.batch_shape
        )
        scale = self._fgd_weight_scale
        if scale != 1.0:
            terms = {name: value * scale for name, value in terms.items()}
        return {**batch.losses, **terms}

    # -- saving --------------------------------------------------------------------------------

    def student_state_dict(self) -> dict[str, Tensor]:
        """The student's plain state dict: loadable into ``build_detector(...)`` as it is."""
        return dict(self.student.state_dict())

    def extra_repr(self) -> str:
        return (
            f"levels={list(self.levels)}, family={self.family!r}, "
            f"teacher={type(self.teacher).__name__} (frozen, not a child)"
        )
