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
``D^2``, ``|S|`` and ``S`` to a few small statistics (per channel and per position), and the rest
of the loss is ordinary autograd on those small tensors. Its backward builds ``dL/dS`` as a short
sum of broadcast products, in place, so the eager path makes about ten passes over a feature map
instead of the dozens of temporaries autograd would keep. In eager mode the reductions are
matrix-vector products (BLAS gemv, several times faster than ``Tensor.sum`` on CPU); under
``torch.compile`` they are written as broadcast-and-sum so that inductor fuses them into a few
kernels. Both paths compute the same thing and are tested against each other. The global term uses
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
import torch.nn.functional as F
from torch import Tensor, nn

from fgdistill.losses.attention import attention_from_means
from fgdistill.losses.masks import fgd_masks

__all__ = ["TERMS", "ContextBlock", "FGDLoss", "check_loss_inputs"]

logger = logging.getLogger(__name__)

TERMS: tuple[str, ...] = ("fg", "bg", "attention", "global")


def _is_compiling() -> bool:
    compiler = getattr(torch, "compiler", None)
    return bool(compiler is not None and compiler.is_compiling())


# ---------------------------------------------------------------------------------------------
# Reductions. ``fused=False`` (eager): BLAS matrix-vector products, one per image and weight row;
# ``fused=True`` (under torch.compile): broadcast-and-sum, which inductor fuses without
# materialising the product.
# ---------------------------------------------------------------------------------------------
def _reduce_positions(mat: Tensor, rows: Tensor, fused: bool) -> Tensor:
    """``out[n, c, r] = sum_p mat[n, c, p] * rows[n, r, p]``: ``[N,C,P] x [N,R,P] -> [N,C,R]``."""
    if fused:
        return torch.stack(
            [(mat * rows[:, r, None, :]).sum(dim=2) for r in range(rows.shape[1])], 2
        )
    return torch.stack(
        [
            torch.stack([torch.mv(mat[i], rows[i, r]) for r in range(rows.shape[1])], dim=1)
            for i in range(mat.shape[0])
        ]
    )


def _reduce_channels(mat: Tensor, weights: Tensor, fused: bool) -> Tensor:
    """``out[n, p] = sum_c weights[n, c] * mat[n, c, p]``: ``[N, C, P] x [N, C] -> [N, P]``."""
    if fused:
        return (mat * weights[:, :, None]).sum(dim=1)
    return torch.stack([torch.mv(mat[i].t(), weights[i]) for i in range(mat.shape[0])])


def _sum_positions(mat: Tensor, fused: bool) -> Tensor:
    """``sum_p mat``: ``[N, C, P] -> [N, C]`` (one gemv over all images in eager mode)."""
    if fused:
        return mat.sum(dim=2)
    n, c, p = mat.shape
    return torch.mv(mat.reshape(n * c, p), mat.new_ones(p)).reshape(n, c)


def _abs_means_of(magnitude: Tensor, fused: bool) -> tuple[Tensor, Tensor]:
    """``(mean_c [N, P], mean_p [N, C])`` of ``magnitude = |F|``, ``[N, C, P]``."""
    n, c, p = magnitude.shape
    if fused:
        return magnitude.mean(dim=1), magnitude.mean(dim=2)
    return (
        _reduce_channels(magnitude, magnitude.new_full((n, c), 1.0 / c), False),
        _sum_positions(magnitude, False) / p,
    )


def _check_finite_cpu(name: str, x: Tensor) -> None:
    """Raise ``ValueError`` if a CPU tensor holds NaN or Inf (no-op on other devices)."""
    if x.device.type == "cpu" and not _is_compiling() and not bool(torch.isfinite(x).all()):
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
    up in the result; only then are the maps scanned, and a ``ValueError`` names the culprit. This
    keeps the common path free of an extra pass over the features. On CUDA, and while compiling,
    nothing is checked: reading a value would synchronise with the device, so non-finite CUDA
    inputs give a non-finite loss, which the trainer sees.
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

    def pool(self, feat: Tensor, *, fused: bool | None = None) -> Tensor:
        """Attention-pooled context.

        Args:
            feat: ``FloatTensor[N, C, H, W]``.
            fused: reduction style (default: fused while compiling, BLAS otherwise).

        Returns:
            ``FloatTensor[N, C]``, ``sum_hw softmax_hw(mask(F)) * F``.
        """
        fused = _is_compiling() if fused is None else fused
        n, c, h, w = feat.shape
        flat = feat.reshape(n, c, h * w)
        weight, bias = self.mask_vector()
        logits = _reduce_channels(flat, weight.expand(n, c), fused) + bias
        attn = torch.softmax(logits, dim=1)  # [N, HW]
        return _reduce_positions(flat, attn.unsqueeze(1), fused).squeeze(2)

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


class _Workspace:
    """A feature-sized scratch buffer shared by one forward and its backward (eager path only).

    Kept out of autograd's sight on purpose: it holds no value the backward needs, only memory to
    write into, so the eager path allocates one scratch buffer per level and call instead of one
    per temporary (fresh large allocations page-fault and dominate the cost on CPU).
    """

    def __init__(self, like: Tensor) -> None:
        self.like = like
        self.buffer: Tensor | None = None

    def get(self) -> Tensor:
        if self.buffer is None:
            self.buffer = torch.empty_like(self.like)
        return self.buffer

    def release(self) -> None:
        self.buffer = None


class _DenseStats(torch.autograd.Function):
    """Reduce the student map to the small statistics the FGD loss needs, with a fused backward.

    Inputs: ``s`` and ``t`` ``[N, C, P]`` (``P = H*W``; ``t`` takes no gradient), ``pix``
    ``[N, R, P]`` per-position weights (rows: fg and/or bg mask times teacher spatial attention,
    and/or ones; no gradient), the student context mask's weight ``[C]`` and bias ``[1]``,
    ``t_sum = sum_p t`` ``[N, C]``, flags, and a :class:`_Workspace` (``None`` when fused).
    Outputs (each empty ``[0]`` when not needed):

    * ``q [N, C, R]``: ``sum_p pix[n, r, p] * D[n, c, p]^2`` with ``D = s - t``;
    * ``sum_d [N, C]``: ``sum_p D`` (global term);
    * ``context [N, C]``: ``sum_p softmax_p(w.s + b) * s`` (global term);
    * ``spatial_mean [N, P]`` and ``channel_mean [N, C]``: means of ``|s|`` (attention term).

    The backward is ``dL/ds = 2 D (g_q @ pix) + [g_sum_d, g_context, w] @ [1, a, g_logits]
    + sign(s) (g_spatial / C + g_channel / P)``, with ``a`` the softmax and ``g_logits`` its
    input's gradient. Nothing of the features' size is saved for the backward: ``D`` and
    ``sign(s)`` are recomputed into the workspace.
    """

    @staticmethod
    def forward(
        ctx: Any,
        s: Tensor,
        t: Tensor,
        pix: Tensor,
        mask_w: Tensor,
        mask_b: Tensor,
        t_sum: Tensor,
        need_global: bool,
        need_attention: bool,
        workspace: _Workspace | None,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        ctx.set_materialize_grads(False)
        fused = workspace is None
        n, c, p = s.shape
        q, sum_d, context = s.new_zeros(0), s.new_zeros(0), s.new_zeros(0)
        spatial_mean, channel_mean, attn = s.new_zeros(0), s.new_zeros(0), s.new_zeros(0)
        if pix.shape[1] > 0:
            if workspace is None:
                q = _reduce_positions(torch.square(s - t), pix, True)
            else:  # (s - t)^2 in one pass, into the workspace
                sq = torch.ops.aten.mse_loss.out(s, t, 0, out=workspace.get())
                q = _reduce_positions(sq, pix, False)
        if need_global:
            logits = _reduce_channels(s, mask_w.expand(n, c), fused) + mask_b
            attn = torch.softmax(logits, dim=1)  # [N, P]
            both = _reduce_positions(s, torch.stack([attn, s.new_ones(n, p)], dim=1), fused)
            context = both[:, :, 0]
            sum_d = both[:, :, 1] - t_sum
        if need_attention:
            magnitude = s.abs() if workspace is None else torch.abs(s, out=workspace.get())
            spatial_mean, channel_mean = _abs_means_of(magnitude, fused)
        ctx.save_for_backward(s, t, pix, mask_w, attn, context)
        ctx.workspace = workspace
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
    ) -> tuple[Tensor | None, ...]:
        s, t, pix, mask_w, attn, context = ctx.saved_tensors
        workspace: _Workspace | None = ctx.workspace
        fused = workspace is None
        n, c, p = s.shape
        if g_q is not None and pix.shape[1] == 0:
            g_q = None

        # The rank-k part [g_sum_d, g_context, w] @ [1, a, g_logits] and the mask's gradients.
        cols: list[Tensor] = []  # [N, C] factors
        rows: list[Tensor] = []  # [N, P] factors
        grad_w = grad_b = None
        if g_sum_d is not None:
            cols.append(g_sum_d)
            rows.append(s.new_ones(n, p))
        if g_context is not None:
            # context = s @ a, a = softmax(w.s + b): d/ds = g_ctx a^T + w (dL/dlogits)^T
            pooled = _reduce_channels(s, g_context, fused)  # [N, P]
            g_logits = attn * (pooled - (g_context * context).sum(dim=1, keepdim=True))
            cols += [g_context, mask_w.expand(n, c)]
            rows += [attn, g_logits]
            if ctx.needs_input_grad[3]:
                per_image = _reduce_positions(s, g_logits.unsqueeze(1), fused)  # [N, C, 1]
                grad_w = per_image.sum(dim=(0, 2)).reshape(mask_w.shape)
            if ctx.needs_input_grad[4]:
                grad_b = g_logits.sum().reshape(1)

        grad: Tensor | None = None
        if not ctx.needs_input_grad[0]:
            pass
        elif workspace is None:
            grad = _fused_grad(s, t, pix, g_q, cols, rows, g_spatial, g_channel)
        else:
            grad = _eager_grad(s, t, pix, g_q, cols, rows, g_spatial, g_channel, workspace.get())
            workspace.release()  # a retained graph's next backward allocates again
        return grad, None, None, grad_w, grad_b, None, None, None, None


def _eager_grad(
    s: Tensor,
    t: Tensor,
    pix: Tensor,
    g_q: Tensor | None,
    cols: list[Tensor],
    rows: list[Tensor],
    g_spatial: Tensor | None,
    g_channel: Tensor | None,
    scratch: Tensor,
) -> Tensor:
    """``dL/ds`` written into one new buffer with in-place BLAS and pointwise ops."""
    c, p = s.shape[1], s.shape[2]
    grad = torch.empty_like(s)
    written = False
    if g_q is not None:
        torch.bmm(2.0 * g_q, pix, out=grad)  # the per-element weight of D
        grad.mul_(torch.sub(s, t, out=scratch))
        written = True
    if cols:
        left, right = torch.stack(cols, dim=2), torch.stack(rows, dim=1)
        if written:
            grad.baddbmm_(left, right)
        else:
            torch.bmm(left, right, out=grad)
        written = True
    if g_spatial is not None or g_channel is not None:
        sign = torch.sign(s, out=scratch)
        for factor in (
            None if g_spatial is None else (g_spatial / c).unsqueeze(1),
            None if g_channel is None else (g_channel / p).unsqueeze(2),
        ):
            if factor is None:
                continue
            if written:
                grad.addcmul_(sign, factor)
            else:
                torch.mul(sign, factor, out=grad)
                written = True
    if not written:
        grad.zero_()
    return grad


def _fused_grad(
    s: Tensor,
    t: Tensor,
    pix: Tensor,
    g_q: Tensor | None,
    cols: list[Tensor],
    rows: list[Tensor],
    g_spatial: Tensor | None,
    g_channel: Tensor | None,
) -> Tensor | None:
    """``dL/ds`` as one broadcast expression (for inductor to fuse into a single kernel)."""
    c, p = s.shape[1], s.shape[2]
    grad: Tensor | None = None

    def add(term: Tensor) -> None:
        nonlocal grad
        grad = term if grad is None else grad + term

    if g_q is not None:
        weight = sum(g_q[:, :, r, None] * pix[:, None, r, :] for r in range(pix.shape[1]))
        assert isinstance(weight, Tensor)
        add(2.0 * (s - t) * weight)
    for col, row in zip(cols, rows, strict=True):
        add(col[:, :, None] * row[:, None, :])
    if g_spatial is not None or g_channel is not None:
        scale = torch.zeros_like(s[:, :1, :1])
        if g_spatial is not None:
            scale = scale + (g_spatial / c)[:, None, :]
        if g_channel is not None:
            scale = scale + (g_channel / p)[:, :, None]
        add(torch.sign(s) * scale)
    return grad


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
            ValueError: wrong ranks, batch, spatial or channel sizes, box shapes, or (CPU only,
                see :func:`check_finite_result`) NaN or Inf values.
        """
        check_loss_inputs(
            student, teacher, boxes, batch_shape, self.student_channels, self.teacher_channels
        )
        with torch.autocast(device_type=student.device.type, enabled=False):
            out = self._terms(student, teacher.detach(), boxes, batch_shape, _is_compiling())
        check_finite_result(list(out.values()), student, teacher)
        return out

    def _terms(
        self,
        student: Tensor,
        teacher: Tensor,
        boxes: Sequence[Tensor],
        batch_shape: tuple[int, int],
        fused: bool,
    ) -> dict[str, Tensor]:
        dtype = torch.promote_types(student.dtype, torch.float32)
        s = student.to(dtype)
        if self.align is not None:
            s = self.align(s)
        n, c, h, w = s.shape
        p = h * w
        s = s.reshape(n, c, p)
        t = teacher.to(dtype).reshape(n, c, p)
        zero = s.new_zeros(())
        need_fg, need_bg = self.alpha > 0, self.beta > 0
        need_attention, need_global = self.gamma > 0, self.lambda_ > 0
        if not (need_fg or need_bg or need_attention or need_global):
            return dict.fromkeys(TERMS, zero)

        with torch.no_grad():
            workspace = None if fused else _Workspace(s)
            t_spatial = t_channel = zero
            if need_fg or need_bg or need_attention:
                t_abs = t.abs() if workspace is None else torch.abs(t, out=workspace.get())
                t_spatial_mean, t_channel_mean = _abs_means_of(t_abs, fused)
                del t_abs
                t_spatial, t_channel = attention_from_means(
                    t_spatial_mean.reshape(n, h, w), t_channel_mean, self.temperature
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
            t_sum = _sum_positions(t, fused) if need_global else s.new_zeros(0)

        mask_w, mask_b = self.student_context.mask_vector()
        q, sum_d, context, s_spatial_mean, s_channel_mean = _DenseStats.apply(
            s, t, pix, mask_w, mask_b, t_sum, need_global, need_attention, workspace
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
            t_context = self.teacher_context.pool(t.reshape(n, c, h, w), fused=fused)
            delta = self.student_context.channel_add(context) - self.teacher_context.channel_add(
                t_context
            )  # [N, C]
            total_sq = q[:, :, col].sum() + 2.0 * (delta * sum_d).sum() + p * delta.square().sum()
            out["global"] = self.lambda_ * total_sq / n
        else:
            out["global"] = zero
        return out
