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

How it is computed: all dense terms come from ``D = S - T``. A custom autograd function reduces
``D``, ``|S|`` and ``S`` to a few small statistics (per channel and per position) in a handful of
passes, and the rest of the loss is ordinary autograd on those small tensors. Its backward builds
``dL/dS`` as a short sum of broadcast products, in place, so the eager path needs a few passes over
the features instead of the dozens of temporaries autograd would keep. The global term uses
``sum((D + delta)^2) = sum(D^2) + 2*sum(delta * sum_hw D) + H*W*sum(delta^2)`` where ``delta``
is the per-channel difference of the two context transforms; in float32 the *value* of that
expansion can lose a few digits when ``delta`` nearly cancels the channel mean of ``D``, the
gradient does not.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from fgdistill.losses.attention import abs_means, attention_from_means
from fgdistill.losses.masks import fgd_masks

__all__ = ["TERMS", "ContextBlock", "FGDLoss", "check_loss_inputs"]

logger = logging.getLogger(__name__)

TERMS: tuple[str, ...] = ("fg", "bg", "attention", "global")


def _is_compiling() -> bool:
    compiler = getattr(torch, "compiler", None)
    return bool(compiler is not None and compiler.is_compiling())


def _check_finite_cpu(name: str, x: Tensor) -> None:
    """Raise if a CPU tensor holds NaN or Inf. Skipped on other devices and while compiling.

    A plain sum is finite whenever every element is (barring overflow), and it reads the tensor
    once without writing a temporary; only when it is not finite do we look element by element.
    On CUDA this check would need a host synchronisation, which the loss promises not to do, so
    non-finite CUDA inputs simply give a non-finite loss.
    """
    if x.device.type != "cpu" or _is_compiling() or x.numel() == 0:
        return
    if not bool(torch.isfinite(x.sum())) and not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} contains NaN or Inf values")


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

    Finiteness of the feature maps and boxes is checked for CPU tensors only (see
    :func:`_check_finite_cpu`): on CUDA it would cost a host synchronisation.
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
    _check_finite_cpu("student", student)
    _check_finite_cpu("teacher", teacher)


class ContextBlock(nn.Module):
    """GcBlock-style global context, ``transform(sum_hw softmax_hw(mask(F)) * F)``.

    Parameter layout follows the released code: ``mask`` is a 1x1 ``Conv2d(C, 1)``, ``transform``
    is ``Sequential(Conv2d(C, C//2, 1), LayerNorm([C//2, 1, 1]), ReLU, Conv2d(C//2, C, 1))``.
    ``mask`` is Kaiming-normal (fan-in) with zero bias and the last conv is zero-initialised, so
    the block adds nothing at the start of training.
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

    def pool(self, feat: Tensor) -> Tensor:
        """Attention-pooled context.

        Args:
            feat: ``FloatTensor[N, C, H, W]``.

        Returns:
            ``FloatTensor[N, C]``, ``sum_hw softmax_hw(mask(F)) * F``.
        """
        n, c, h, w = feat.shape
        flat = feat.reshape(n, c, h * w)
        logits = torch.matmul(self.mask.weight.reshape(1, c), flat).squeeze(1)
        if self.mask.bias is not None:
            logits = logits + self.mask.bias
        weights = torch.softmax(logits, dim=1)  # [N, HW]
        return torch.bmm(flat, weights.unsqueeze(2)).squeeze(2)

    def channel_add(self, context: Tensor) -> Tensor:
        """``transform(context)``: ``FloatTensor[N, C]`` to ``FloatTensor[N, C]``."""
        n, c = context.shape
        out: Tensor = self.transform(context.reshape(n, c, 1, 1))
        return out.reshape(n, c)

    def forward(self, feat: Tensor) -> Tensor:
        """``R(F) = F + transform(context(F))``: ``[N, C, H, W]`` to ``[N, C, H, W]``."""
        n, c = feat.shape[:2]
        return feat + self.channel_add(self.pool(feat)).reshape(n, c, 1, 1)


class _DenseStats(torch.autograd.Function):
    """Reduce the student map to the small statistics the FGD loss needs, with a fused backward.

    Inputs: ``s`` and ``t`` ``[N, C, P]`` (``P = H*W``; ``t`` takes no gradient), ``pix``
    ``[N, R, P]`` per-position weights (rows: fg and/or bg weight times teacher spatial attention,
    and/or ones; no gradient), the student context mask's weight ``[C]`` and bias ``[1]``, and two
    flags. Outputs (each empty ``[0]`` when not requested):

    * ``q [N, C, R]``: ``sum_p pix[n, r, p] * D[n, c, p]^2`` with ``D = s - t``;
    * ``sum_d [N, C]``: ``sum_p D`` (global term);
    * ``context [N, C]``: ``sum_p softmax_p(w.s + b) * s`` (global term);
    * ``spatial_mean [N, P]`` and ``channel_mean [N, C]``: means of ``|s|`` (attention term).

    The backward writes ``dL/ds`` into one buffer: ``2 * D * (g_q @ pix)`` then, in place, the
    low-rank part ``[g_sum_d, g_context, w] @ [1, a, g_logits]`` and the attention part
    ``sign(s) * (g_spatial / C + g_channel / P)``.
    """

    @staticmethod
    def forward(
        ctx: Any,
        s: Tensor,
        t: Tensor,
        pix: Tensor,
        mask_w: Tensor,
        mask_b: Tensor,
        need_global: bool,
        need_attention: bool,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        ctx.set_materialize_grads(False)
        c = s.shape[1]

        def empty() -> Tensor:
            return s.new_zeros(0)

        d = torch.sub(s, t)
        q = empty()
        if pix.shape[1] > 0:
            d2 = torch.square(d)
            q = torch.bmm(d2, pix.transpose(1, 2))  # [N, C, R]
            del d2
        sum_d, context, weights = empty(), empty(), s.new_zeros(0)
        if need_global:
            sum_d = d.sum(dim=2)
            logits = torch.matmul(mask_w.reshape(1, c), s).squeeze(1) + mask_b  # [N, P]
            weights = torch.softmax(logits, dim=1)
            context = torch.bmm(s, weights.unsqueeze(2)).squeeze(2)  # [N, C]
        spatial_mean, channel_mean = empty(), empty()
        if need_attention:
            magnitude = torch.abs(s)
            spatial_mean = magnitude.mean(dim=1)
            channel_mean = magnitude.mean(dim=2)
            del magnitude
        ctx.save_for_backward(s, d, pix, mask_w, weights, context)
        ctx.need_global = need_global
        ctx.need_attention = need_attention
        outputs = (q, sum_d, context, spatial_mean, channel_mean)
        ctx.mark_non_differentiable(*(x for x in outputs if x.dim() == 1 and x.numel() == 0))
        return outputs

    @staticmethod
    def backward(
        ctx: Any,
        g_q: Tensor | None,
        g_sum_d: Tensor | None,
        g_context: Tensor | None,
        g_spatial: Tensor | None,
        g_channel: Tensor | None,
    ) -> tuple[Tensor | None, None, None, Tensor | None, Tensor | None, None, None]:
        s, d, pix, mask_w, weights, context = ctx.saved_tensors
        n, c, p = s.shape
        grad: Tensor | None = None
        if g_q is not None and pix.shape[1] > 0:
            grad = torch.bmm(2.0 * g_q, pix)  # [N, C, P]
            grad.mul_(d)

        cols: list[Tensor] = []  # [N, C] factors
        rows: list[Tensor] = []  # [N, P] factors
        grad_w = grad_b = None
        if g_sum_d is not None:
            cols.append(g_sum_d)
            rows.append(s.new_ones(n, p))
        if g_context is not None:
            # context = s @ a, a = softmax(w.s + b): d/ds = g_ctx a^T + w (dL/dlogits)^T
            pooled = torch.bmm(g_context.unsqueeze(1), s).squeeze(1)  # [N, P] = g_ctx . s
            g_logits = weights * (pooled - (g_context * context).sum(dim=1, keepdim=True))
            cols.append(g_context)
            rows.append(weights)
            cols.append(mask_w.reshape(1, c).expand(n, c))
            rows.append(g_logits)
            if ctx.needs_input_grad[3]:
                grad_w = torch.bmm(s, g_logits.unsqueeze(2)).sum(dim=0).reshape(mask_w.shape)
            if ctx.needs_input_grad[4]:
                grad_b = g_logits.sum().reshape(1)
        if cols:
            left = torch.stack(cols, dim=2)  # [N, C, k]
            right = torch.stack(rows, dim=1)  # [N, k, P]
            grad = torch.bmm(left, right) if grad is None else grad.baddbmm_(left, right)

        if g_spatial is not None or g_channel is not None:
            sign = torch.sign(s)
            if grad is None:
                grad = torch.zeros_like(s)
            if g_spatial is not None:
                grad.addcmul_(sign, (g_spatial / c).unsqueeze(1))
            if g_channel is not None:
                grad.addcmul_(sign, (g_channel / p).unsqueeze(2))
        if grad is not None and not ctx.needs_input_grad[0]:
            grad = None
        return grad, None, None, grad_w, grad_b, None, None


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
    is disabled inside the loss.
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
        for name, value in (
            ("student_channels", student_channels),
            ("teacher_channels", teacher_channels),
        ):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
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
            ValueError: wrong ranks, batch, spatial or channel sizes, box shapes, or (CPU only)
                non-finite values.
        """
        check_loss_inputs(
            student, teacher, boxes, batch_shape, self.student_channels, self.teacher_channels
        )
        with torch.autocast(device_type=student.device.type, enabled=False):
            return self._terms(student, teacher.detach(), boxes, batch_shape)

    def _terms(
        self,
        student: Tensor,
        teacher: Tensor,
        boxes: Sequence[Tensor],
        batch_shape: tuple[int, int],
    ) -> dict[str, Tensor]:
        dtype = torch.promote_types(student.dtype, torch.float32)
        student = student.to(dtype)
        teacher = teacher.to(dtype)
        s = self.align(student) if self.align is not None else student
        n, c, h, w = s.shape
        p = h * w
        zero = s.new_zeros(())
        need_fg, need_bg = self.alpha > 0, self.beta > 0
        need_attention, need_global = self.gamma > 0, self.lambda_ > 0
        if not (need_fg or need_bg or need_attention or need_global):
            return dict.fromkeys(TERMS, zero)

        with torch.no_grad():
            t_spatial_mean, t_channel_mean = abs_means(teacher)
            t_spatial, t_channel = attention_from_means(
                t_spatial_mean, t_channel_mean, self.temperature
            )
            rows: list[Tensor] = []
            if need_fg or need_bg:
                fg_mask, bg_mask = fgd_masks(
                    boxes, (h, w), batch_shape, dtype=dtype, device=s.device
                )
                if need_fg:
                    rows.append((fg_mask * t_spatial).reshape(n, p))
                if need_bg:
                    rows.append((bg_mask * t_spatial).reshape(n, p))
            if need_global:
                rows.append(s.new_ones(n, p))
            pix = torch.stack(rows, dim=1) if rows else s.new_zeros(n, 0, p)

        mask = self.student_context.mask
        q, sum_d, context, s_spatial_mean, s_channel_mean = _DenseStats.apply(
            s.reshape(n, c, p),
            teacher.reshape(n, c, p),
            pix,
            mask.weight.reshape(c),
            mask.bias,
            need_global,
            need_attention,
        )

        out: dict[str, Tensor] = {}
        col = 0
        for name, needed, weight in (("fg", need_fg, self.alpha), ("bg", need_bg, self.beta)):
            if needed:
                out[name] = weight * (q[:, :, col] * t_channel).sum() / n
                col += 1
            else:
                out[name] = zero
        if need_attention:
            s_spatial, s_channel = attention_from_means(
                s_spatial_mean.reshape(n, h, w), s_channel_mean, self.temperature
            )
            att = (s_channel - t_channel).abs().sum() + (s_spatial - t_spatial).abs().sum()
            out["attention"] = self.gamma * att / n
        else:
            out["attention"] = zero
        if need_global:
            delta = self.student_context.channel_add(context) - self.teacher_context.channel_add(
                self.teacher_context.pool(teacher)
            )  # [N, C]
            total_sq = q[:, :, col].sum() + 2.0 * (delta * sum_d).sum() + p * delta.square().sum()
            out["global"] = self.lambda_ * total_sq / n
        else:
            out["global"] = zero
        return out
