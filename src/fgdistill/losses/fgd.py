"""FGD loss for one FPN level, faithful to the authors' released code and fast.

Yang et al., "Focal and Global Knowledge Distillation for Detectors", CVPR 2022. With ``S`` the
student map (after the optional 1x1 ``align`` conv), ``T`` the teacher map, ``N`` the batch size,
the level's loss is ``alpha*fg + beta*bg + gamma*attention + lambda_*global`` where

* ``fg = sum(M_fg * A_s^T * A_c^T * (S - T)^2) / N`` and ``bg`` the same with ``M_bg``
  (masks from :func:`~fgdistill.losses.masks.fgd_masks`, teacher attentions from
  :mod:`~fgdistill.losses.attention`);
* ``attention = sum|A_c^S - A_c^T| / N + sum|A_s^S - A_s^T| / N``;
* ``global = sum((R_s(S) - R_t(T))^2) / N`` with the GcBlock-style context module
  ``R(F) = F + transform(sum_hw softmax_hw(mask(F)) * F)``, one per side.

Where this differs from the released code: boxes are scaled by the padded input batch size (the
released code used the unpadded image size on a padded map), masks are built without Python loops,
and the dense part has a hand-written backward. Every term is a sum divided by the batch size only,
as in the released code (not the paper's per-pixel normalisation).

How it is computed: all dense terms come from ``D = S - T``, ``|S|``, ``|T|``, ``S`` and
``T``, reduced to a few small statistics (per channel, per position) by one custom autograd
function (:class:`fgdistill.losses._dense.DenseStats`); the rest of the loss is ordinary autograd
on those small tensors. Its backward writes ``dL/dS`` directly as a short sum of broadcast
products. In eager mode it walks each image in cache-sized blocks with BLAS matrix-vector
reductions, so each map is read from memory a couple of times instead of the dozens of
temporaries autograd would keep; under ``torch.compile`` it uses whole-tensor broadcast
expressions that inductor fuses. The global term uses ``sum((D + delta)^2) = sum(D^2)
+ 2*sum(delta * sum_hw D) + H*W*sum(delta^2)`` where ``delta`` is the per-channel difference of
the two context transforms; in float32 the *value* of that expansion can lose a few digits when
``delta`` nearly cancels the channel mean of ``D``, the gradient does not.

Memory: besides the gradient, the eager path keeps only small per-image statistics between
forward and backward (and a scratch block of about 1 MiB), so the loss adds little to a training
step's peak memory.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fgdistill.errors import NonFiniteError
from fgdistill.losses._dense import DenseSpec, DenseStats, default_chunk
from fgdistill.losses._pair import check_channels
from fgdistill.losses.attention import attention_from_means
from fgdistill.losses.masks import fgd_masks

__all__ = ["TERMS", "ContextBlock", "FGDLoss", "check_loss_inputs"]

logger = logging.getLogger(__name__)

TERMS: tuple[str, ...] = ("fg", "bg", "attention", "global")


def _is_compiling() -> bool:
    compiler = getattr(torch, "compiler", None)
    return bool(compiler is not None and compiler.is_compiling())


def _check_finite_cpu(name: str, x: Tensor) -> None:
    """Raise :class:`~fgdistill.errors.NonFiniteError` (a ``ValueError``) if a CPU tensor holds
    NaN or Inf (no-op on other devices)."""
    if x.device.type == "cpu" and not _is_compiling() and not bool(torch.isfinite(x).all()):
        hint = (
            "in training: the run diverged; a lower optim.lr, optim.grad_clip or "
            "distill.fgd_warmup_iters may help"
            if name == "student"
            else "the teacher is frozen: its checkpoint or the input images hold NaN or Inf"
        )
        raise NonFiniteError(f"{name} contains NaN or Inf values ({hint})")


def check_loss_inputs(
    student: Tensor,
    teacher: Tensor,
    boxes: Sequence[Tensor],
    batch_shape: tuple[int, int],
    student_channels: int,
    teacher_channels: int,
) -> None:
    """Validate the arguments of a feature-distillation loss; raise ``ValueError`` naming the fault.

    Args:
        student: ``FloatTensor[N, Cs, H, W]``.
        teacher: ``FloatTensor[N, Ct, H, W]``.
        boxes: N tensors ``[K_i, 4]``, xyxy in pixels of the input batch.
        batch_shape: ``(H_in, W_in)`` of the input batch, padding included.
        student_channels: expected ``Cs``.
        teacher_channels: expected ``Ct``.

    Only shapes, types and (for CPU tensors) the boxes' values are checked here; none of it reads
    a CUDA tensor's values, so nothing synchronises. The feature maps' values are checked by
    :func:`check_finite_result` once the loss is computed, which costs no extra pass.
    """
    for name, x in (("student", student), ("teacher", teacher)):
        if not isinstance(x, Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 4:
            raise ValueError(f"{name} must be [N, C, H, W] (rank 4), got shape {tuple(x.shape)}")
        if not x.is_floating_point():
            raise ValueError(f"{name} must be floating point, got {x.dtype}")
    if student.shape[0] != teacher.shape[0]:
        raise ValueError(
            f"batch sizes differ: student has {student.shape[0]}, teacher {teacher.shape[0]}"
        )
    if student.shape[2:] != teacher.shape[2:]:
        raise ValueError(
            f"spatial sizes differ: student {tuple(student.shape[2:])}, "
            f"teacher {tuple(teacher.shape[2:])}"
        )
    if student.shape[1] != student_channels:
        raise ValueError(
            f"student has {student.shape[1]} channels, the loss was built for {student_channels}"
        )
    if teacher.shape[1] != teacher_channels:
        raise ValueError(
            f"teacher has {teacher.shape[1]} channels, the loss was built for {teacher_channels}"
        )
    if student.device != teacher.device:
        raise ValueError(f"student is on {student.device} but teacher on {teacher.device}")
    if isinstance(boxes, Tensor) or not isinstance(boxes, Sequence):
        raise ValueError("boxes must be a list of N tensors [K_i, 4]")
    if len(boxes) != student.shape[0]:
        raise ValueError(f"got {len(boxes)} box tensors for a batch of {student.shape[0]} images")
    for i, b in enumerate(boxes):
        if not isinstance(b, Tensor):
            raise ValueError(f"boxes[{i}] must be a torch.Tensor, got {type(b).__name__}")
        if b.dim() != 2 or b.shape[1] != 4:
            raise ValueError(f"boxes[{i}] must have shape [K, 4], got {tuple(b.shape)}")
        if b.is_floating_point():
            _check_finite_cpu(f"boxes[{i}]", b)
    try:
        in_h, in_w = batch_shape
    except (TypeError, ValueError):
        raise ValueError(f"batch_shape must be a pair (H_in, W_in), got {batch_shape!r}") from None
    if not (in_h > 0 and in_w > 0):
        raise ValueError(f"batch_shape must be positive, got {batch_shape!r}")


def check_finite_result(values: Sequence[Tensor], student: Tensor, teacher: Tensor) -> None:
    """On CPU, if a computed loss value is not finite, find the input that made it so.

    Every loss value sums over all of its inputs' elements, so a NaN or Inf in a feature map shows
    up in the result; only then are the maps scanned, and a ``NonFiniteError`` names the
    culprit. This keeps the common path free of an extra pass over the features. On CUDA, and
    while compiling, nothing is checked: reading a value would synchronise with the device, so
    non-finite CUDA inputs give a non-finite loss, which the trainer sees.
    """
    if student.device.type != "cpu" or _is_compiling() or not values:
        return
    if bool(torch.isfinite(torch.stack([v.detach() for v in values])).all()):
        return
    _check_finite_cpu("student", student)
    _check_finite_cpu("teacher", teacher)


class ContextBlock(nn.Module):
    """GcBlock-style global context, ``transform(sum_hw softmax_hw(mask(F)) * F)``.

    Parameter layout follows the released code: ``mask`` is a 1x1 ``Conv2d(C, 1)``, ``transform``
    is ``Sequential(Conv2d(C, C//2, 1), LayerNorm([C//2, 1, 1]), ReLU, Conv2d(C//2, C, 1))``.
    ``mask`` is Kaiming-normal (fan-in) with zero bias and the last conv is zero-initialised, so
    the block adds nothing at the start of training. The convs act on ``[N, C, 1, 1]`` context
    vectors, so :meth:`channel_add` applies them as the equivalent linear layers (much faster
    than 1x1 convolutions on a 1x1 map).
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        if channels < 2:
            raise ValueError(f"context block needs at least 2 channels, got {channels}")
        hidden = channels // 2
        self.mask = nn.Conv2d(channels, 1, kernel_size=1)
        self.transform = nn.Sequential(
            nn.Conv2d(channels, hidden, kernel_size=1),
            nn.LayerNorm([hidden, 1, 1]),
            nn.ReLU(),
            nn.Conv2d(hidden, channels, kernel_size=1),
        )
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Kaiming-normal fan-in for ``mask``, zeros for the last conv (as mmcv's helpers do)."""
        nn.init.kaiming_normal_(self.mask.weight, a=0, mode="fan_in", nonlinearity="relu")
        last = self.transform[-1]
        assert isinstance(last, nn.Conv2d)
        nn.init.zeros_(last.weight)
        for bias in (self.mask.bias, last.bias):
            if bias is not None:
                nn.init.zeros_(bias)

    def mask_vector(self) -> tuple[Tensor, Tensor]:
        """The mask conv as ``(weight [C], bias [1])``."""
        weight = self.mask.weight.reshape(-1)
        bias = self.mask.bias if self.mask.bias is not None else weight.new_zeros(1)
        return weight, bias

    def pool(self, feat: Tensor) -> Tensor:
        """Attention-pooled context.

        Args:
            feat: ``FloatTensor[N, C, H, W]``.

        Returns:
            ``FloatTensor[N, C]``, ``sum_hw softmax_hw(mask(F)) * F``.
        """
        n, c, h, w = feat.shape
        flat = feat.reshape(n, c, h * w)
        weight, bias = self.mask_vector()
        attn = torch.softmax((flat * weight[None, :, None]).sum(dim=1) + bias, dim=1)  # [N, HW]
        return (flat * attn[:, None, :]).sum(dim=2)

    def channel_add(self, context: Tensor) -> Tensor:
        """``transform(context)``: ``FloatTensor[N, C]`` to ``FloatTensor[N, C]``."""
        conv0, norm, _, conv3 = self.transform
        assert isinstance(conv0, nn.Conv2d) and isinstance(conv3, nn.Conv2d)
        assert isinstance(norm, nn.LayerNorm)
        c = context.shape[1]
        hidden = conv0.out_channels
        x = F.linear(context, conv0.weight.reshape(hidden, c), conv0.bias)
        norm_w = norm.weight.reshape(hidden) if norm.weight is not None else None
        norm_b = norm.bias.reshape(hidden) if norm.bias is not None else None
        x = F.relu(F.layer_norm(x, (hidden,), norm_w, norm_b, norm.eps))
        return F.linear(x, conv3.weight.reshape(c, hidden), conv3.bias)

    def forward(self, feat: Tensor) -> Tensor:
        """``R(F) = F + transform(context(F))``: ``[N, C, H, W]`` to ``[N, C, H, W]``."""
        n, c = feat.shape[:2]
        return feat + self.channel_add(self.pool(feat)).reshape(n, c, 1, 1)


class FGDLoss(nn.Module):
    """FGD distillation loss for one feature level.

    Args:
        student_channels: ``Cs``, channels of the student map.
        teacher_channels: ``Ct``, channels of the teacher map. When they differ, a 1x1
            ``align`` conv (with bias) maps the student to ``Ct`` channels.
        temperature: attention temperature ``t`` (0.5; FCOS uses 0.8).
        alpha: weight of the foreground term.
        beta: weight of the background term.
        gamma: weight of the attention term.
        lambda_: weight of the global (relation) term.

    A term whose weight is 0 is not computed: it is returned as a zero tensor, and the parameters
    it alone uses get no gradient.

    Parameters are laid out as in the released code: ``align`` (only when ``Cs != Ct``),
    ``student_context`` and ``teacher_context`` (:class:`ContextBlock`). The teacher map never
    takes a gradient; the teacher-side context block is trained with the student.

    Half-precision inputs are upcast to float32 (sums of squares overflow float16), and autocast
    is disabled inside the loss. On CUDA the loss reads no value back to the host.
    """

    def __init__(
        self,
        student_channels: int,
        teacher_channels: int,
        *,
        temperature: float = 0.5,
        alpha: float = 1e-3,
        beta: float = 5e-4,
        gamma: float = 1e-3,
        lambda_: float = 5e-6,
    ) -> None:
        super().__init__()
        check_channels(student_channels, teacher_channels)
        if teacher_channels < 2:
            raise ValueError(f"teacher_channels must be at least 2, got {teacher_channels}")
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        for name, weight in (
            ("alpha", alpha),
            ("beta", beta),
            ("gamma", gamma),
            ("lambda_", lambda_),
        ):
            if not weight >= 0:
                raise ValueError(f"{name} must be >= 0, got {weight}")
        self.student_channels = student_channels
        self.teacher_channels = teacher_channels
        self.temperature = float(temperature)
        self.alpha = float(alpha)
        self.beta = float(beta)
        self.gamma = float(gamma)
        self.lambda_ = float(lambda_)
        self.align: nn.Conv2d | None = (
            nn.Conv2d(student_channels, teacher_channels, kernel_size=1)
            if student_channels != teacher_channels
            else None
        )
        self.student_context = ContextBlock(teacher_channels)
        self.teacher_context = ContextBlock(teacher_channels)

    def extra_repr(self) -> str:
        return (
            f"student_channels={self.student_channels}, teacher_channels={self.teacher_channels}, "
            f"temperature={self.temperature}, alpha={self.alpha}, beta={self.beta}, "
            f"gamma={self.gamma}, lambda_={self.lambda_}"
        )

    def forward(
        self,
        student: Tensor,
        teacher: Tensor,
        boxes: Sequence[Tensor],
        batch_shape: tuple[int, int],
    ) -> dict[str, Tensor]:
        """Weighted FGD terms for one level.

        Args:
            student: ``FloatTensor[N, Cs, H, W]``, the student's feature map.
            teacher: ``FloatTensor[N, Ct, H, W]``, the teacher's map on the same padded batch
                (detached here: it never takes a gradient).
            boxes: N tensors ``FloatTensor[K_i, 4]``, xyxy in pixels of the input batch; ``K_i``
                may be 0.
            batch_shape: ``(H_in, W_in)`` of the input batch, padding included.

        Returns:
            ``{"fg", "bg", "attention", "global"}``, each a 0-dim tensor already multiplied by
            its weight.

        Raises:
            ValueError: wrong ranks, batch, spatial or channel sizes, box shapes, or (CPU only,
                see :func:`check_finite_result`) NaN or Inf values.
        """
        check_loss_inputs(
            student, teacher, boxes, batch_shape, self.student_channels, self.teacher_channels
        )
        with torch.autocast(device_type=student.device.type, enabled=False):
            chunk = 0 if _is_compiling() else None
            out = self._terms(student, teacher.detach(), boxes, batch_shape, chunk)
        check_finite_result(list(out.values()), student, teacher)
        return out

    def _terms(
        self,
        student: Tensor,
        teacher: Tensor,
        boxes: Sequence[Tensor],
        batch_shape: tuple[int, int],
        chunk: int | None = None,
    ) -> dict[str, Tensor]:
        """The terms; ``chunk``: positions per block (None: by device; 0: fused expressions)."""
        dtype = torch.promote_types(student.dtype, torch.float32)
        s = student.to(dtype)
        if self.align is not None:
            s = self.align(s)
        n, c, h, w = s.shape
        p = h * w
        s = s.reshape(n, c, p)
        t = teacher.to(dtype).reshape(n, c, p)
        zero = s.new_zeros(())
        spec = DenseSpec(
            fg=self.alpha > 0,
            bg=self.beta > 0,
            attention=self.gamma > 0,
            global_=self.lambda_ > 0,
            temperature=self.temperature,
            chunk=default_chunk(s.shape, s.element_size(), s.device) if chunk is None else chunk,
        )
        if not (spec.teacher_attention or spec.global_):
            return dict.fromkeys(TERMS, zero)

        fg_mask = bg_mask = s.new_zeros(0)
        if spec.fg or spec.bg:
            with torch.no_grad():
                fg_mask, bg_mask = fgd_masks(
                    boxes, (h, w), batch_shape, dtype=dtype, device=s.device
                )
            fg_mask, bg_mask = fg_mask.reshape(n, p), bg_mask.reshape(n, p)
        w_s, b_s = self.student_context.mask_vector()
        w_t, b_t = self.teacher_context.mask_vector()
        q, sum_d, ctx_s, ctx_t, u_s, v_s, t_spatial, t_channel = DenseStats.apply(
            s, t, fg_mask, bg_mask, w_s, b_s, w_t, b_t, spec
        )

        out: dict[str, Tensor] = {}
        row = 0
        for name, needed, weight in (("fg", spec.fg, self.alpha), ("bg", spec.bg, self.beta)):
            if needed:
                out[name] = weight * (q[:, :, row] * t_channel).sum() / n
                row += 1
            else:
                out[name] = zero
        if spec.attention:
            s_spatial, s_channel = attention_from_means(u_s.reshape(n, h, w), v_s, self.temperature)
            att = (s_channel - t_channel).abs().sum() + (
                s_spatial.reshape(n, p) - t_spatial
            ).abs().sum()
            out["attention"] = self.gamma * att / n
        else:
            out["attention"] = zero
        if spec.global_:
            delta = self.student_context.channel_add(ctx_s) - self.teacher_context.channel_add(
                ctx_t
            )  # [N, C]
            total_sq = q[:, :, row].sum() + 2.0 * (delta * sum_d).sum() + p * delta.square().sum()
            out["global"] = self.lambda_ * total_sq / n
        else:
            out["global"] = zero
        return out
