"""The teacher of a distillation run: its detector and its label space.

A teacher checkpoint with its own build arguments (``model.yaml`` beside it, or a training
checkpoint's ``model_spec``; ``fgdistill convert torchvision`` writes one) is rebuilt from them, so
a torchvision COCO teacher (91 classes, labels = COCO category ids) needs no
``distill.teacher.num_classes`` override. Without one, the config's ``distill.teacher`` section
says how to build it, as before. When the teacher's label space (``categories.json`` beside it)
differs from the student's, inheriting the teacher's heads leaves out the class-specific layers.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

from torch import nn

from fgdistill.engine.config import DistillConfig, detector_kwargs
from fgdistill.engine.inference import load_categories
from fgdistill.errors import CheckpointError
from fgdistill.models import build_detector, load_detector, load_state_dict_checked
from fgdistill.models.checkpoint import find_model_spec, load_checkpoint, state_dict_of
from fgdistill.models.distiller import class_specific_prefixes

__all__ = ["inherit_exclusions", "load_teacher"]

logger = logging.getLogger(__name__)


def load_teacher(dc: DistillConfig, num_classes: int) -> tuple[nn.Module, list[dict[str, Any]]]:
    """The frozen-to-be teacher of ``dc.teacher_checkpoint`` and its categories (``[]``: unknown).

    Rebuilt from the checkpoint's own spec when it has one (the config's ``distill.teacher``
    section is then only checked against it: a different arch or backbone is logged), else
    built from ``distill.teacher`` with ``num_classes`` where it leaves them unset.

    Raises:
        CheckpointError: the file is missing or unreadable, or its weights do not fit.
    """
    path = dc.teacher_checkpoint
    checkpoint = load_checkpoint(path)
    try:
        spec = find_model_spec(path, checkpoint)
    except CheckpointError:
        spec = None
    if spec is not None:
        teacher = load_detector(path)
        said = detector_kwargs(dc.teacher, num_classes)
        differ = [k for k in ("arch", "backbone") if said.get(k) != spec.get(k)]
        if differ:
            logger.warning(
                "teacher %s: built as its own spec says (%s), not as distill.teacher (%s)",
                path,
                ", ".join(f"{k}={spec.get(k)}" for k in differ),
                ", ".join(f"{k}={said.get(k)}" for k in differ),
            )
    else:
        teacher = build_detector(**detector_kwargs(dc.teacher, num_classes))
        state = state_dict_of(checkpoint, source=str(path))
        load_state_dict_checked(teacher, state, source=str(path), strict=True)
    return teacher, load_categories(path, checkpoint)


def inherit_exclusions(
    student: nn.Module,
    teacher_categories: Sequence[Mapping[str, Any]],
    student_categories: Sequence[Mapping[str, Any]],
) -> tuple[str, ...]:
    """The student's class-specific prefixes when the two label spaces differ, else ``()``.

    Label spaces are the ``[{"id", "name"}]`` lists in label order; an unknown one (``[]``) is
    taken to be the student's, as before.
    """
    if not teacher_categories or not student_categories:
        return ()

    def plain(cats: Sequence[Mapping[str, Any]]) -> list[tuple[int, str]]:
        return [(int(c["id"]), str(c.get("name", c["id"]))) for c in cats]

    if plain(teacher_categories) == plain(student_categories):
        return ()
    prefixes = class_specific_prefixes(student)
    logger.warning(
        "the teacher's label space (%d labels) differs from the student's (%d): not inheriting "
        "the class-specific layers %s",
        len(teacher_categories),
        len(student_categories),
        ", ".join(p.rstrip(".") for p in prefixes),
    )
    return prefixes
