"""Shape checks shared by the one-level PKD, CWD and MGD losses.

They read shapes, dtypes and devices only, never a tensor's values, so they cost nothing and never
synchronise with a CUDA device. Every fault raises :class:`~fgdistill.errors.CompatibilityError`
(a ``ValueError``) whose message names the shapes involved.
"""

from __future__ import annotations

import math

from torch import Tensor

from fgdistill.errors import CompatibilityError

__all__ = ["check_channels", "check_feature_pair", "check_weight"]


def check_feature_pair(
    loss: str,
    student: Tensor,
    teacher: Tensor,
    *,
    same_channels: bool,
    same_size: bool,
) -> None:
    """Check that ``student`` ``[N, Cs, H, W]`` and ``teacher`` ``[N, Ct, H', W']`` fit a loss.

    Args:
        loss: the loss's name, for the messages (``"PKD"``...).
        student: the student's feature map.
        teacher: the teacher's feature map.
        same_channels: require ``Cs == Ct``.
        same_size: require ``(H, W) == (H', W')``.

    Raises:
        CompatibilityError: not tensors, not floating point, not rank 4, empty, on different
            devices, or with batch sizes (always), channel counts or spatial sizes (when asked)
            that differ.
    """
    for name, x in (("student", student), ("teacher", teacher)):
        if not isinstance(x, Tensor):
            raise CompatibilityError(
                f"{loss}: {name} must be a torch.Tensor, got {type(x).__name__}"
            )
        if x.dim() != 4:
            raise CompatibilityError(
                f"{loss}: {name} must be [N, C, H, W] (rank 4), got shape {tuple(x.shape)}"
            )
        if not x.is_floating_point():
            raise CompatibilityError(f"{loss}: {name} must be floating point, got {x.dtype}")
        if x.numel() == 0:
            raise CompatibilityError(f"{loss}: {name} is empty, shape {tuple(x.shape)}")
    shapes = f"student {tuple(student.shape)}, teacher {tuple(teacher.shape)}"
    if student.shape[0] != teacher.shape[0]:
        raise CompatibilityError(
            f"{loss}: batch sizes differ, student {student.shape[0]} and teacher "
            f"{teacher.shape[0]} ({shapes})"
        )
    if same_channels and student.shape[1] != teacher.shape[1]:
        raise CompatibilityError(
            f"{loss} needs equal channel counts, got student {student.shape[1]} and teacher "
            f"{teacher.shape[1]} ({shapes}); it has no align layer, so use FGD or MGD, or an "
            "FPN of the teacher's width"
        )
    if same_size and student.shape[2:] != teacher.shape[2:]:
        raise CompatibilityError(
            f"{loss}: spatial sizes differ, student {tuple(student.shape[2:])} and teacher "
            f"{tuple(teacher.shape[2:])} ({shapes})"
        )
    if student.device != teacher.device:
        raise CompatibilityError(
            f"{loss}: student is on {student.device} but teacher on {teacher.device}"
        )


def check_weight(name: str, value: float, *, positive: bool = False) -> float:
    """``value`` as a float if it is finite and ``>= 0`` (``> 0`` with ``positive``), else
    ``ValueError`` naming ``name``."""
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, got {value!r}") from None
    if not math.isfinite(out) or out < 0 or (positive and out == 0):
        raise ValueError(f"{name} must be finite and {'>' if positive else '>='} 0, got {value!r}")
    return out


def check_channels(student_channels: object, teacher_channels: object) -> None:
    """Raise ``ValueError`` unless both channel counts are positive ints."""
    for name, value in (
        ("student_channels", student_channels),
        ("teacher_channels", teacher_channels),
    ):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
