"""The dense part of the FGD loss: one autograd function over the student and teacher maps.

Everything FGD computes over the ``[N, C, H, W]`` maps reduces them to small statistics (per
channel, per position, or per image). :class:`DenseStats` computes those statistics and, in its
backward, writes ``dL/dS`` directly; everything downstream (softmaxes of the statistics, the
context transforms, the weighting of terms) is ordinary autograd on small tensors in
:mod:`fgdistill.losses.fgd`.

Two implementations of the same function:

* ``chunk > 0`` (eager, CPU and CUDA): each image is walked in blocks of ``chunk`` positions.
  Per block every reduction is a BLAS matrix-vector product on the block, and the temporaries
  (``|T|``, ``|S|``, ``(S - T)^2``, ``sign(S)``) live in one small scratch buffer that stays in
  cache. The forward makes two sweeps per image (the second needs the softmaxes over all
  positions that the first gathers), the backward one sweep that reads both maps and writes the
  gradient; the gradient is the only feature-sized allocation. On CUDA a block is a whole image.
* ``chunk == 0`` ("fused", used under ``torch.compile``): the same quantities as plain
  broadcast-and-reduce expressions over whole tensors, which inductor fuses into a few kernels.

Both are tested against each other and against the reference cases.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

__all__ = ["DenseSpec", "DenseStats", "default_chunk"]

#: Bytes of one ``[C, chunk]`` block on CPU: small enough that the block, its scratch and the
#: gradient block stay in cache, large enough to keep Python overhead low.
CPU_BLOCK_BYTES = 1024 * 1024


def default_chunk(shape: torch.Size | tuple[int, ...], itemsize: int, device: torch.device) -> int:
    """Positions per block for ``[N, C, P]`` maps in eager mode.

    (The fused whole-tensor path is not used in eager mode even for small maps: measured on CPU
    it is slower at every FPN level, its broadcast reductions being slow and allocating.)
    """
    _, channels, positions = shape
    if device.type != "cpu":
        return max(positions, 1)
    return max(64, min(positions, CPU_BLOCK_BYTES // max(channels * itemsize, 1)))


@dataclass(frozen=True)
class DenseSpec:
    """Which statistics to compute (Python constants, so tracing sees fixed control flow)."""

    fg: bool
    bg: bool
    attention: bool
    global_: bool
    temperature: float
    chunk: int  # positions per block; 0 = fused whole-tensor expressions

    @property
    def teacher_attention(self) -> bool:
        return self.fg or self.bg or self.attention

    @property
    def rows(self) -> int:
        """Number of per-position weight rows: fg, bg, then ones (global)."""
        return int(self.fg) + int(self.bg) + int(self.global_)


def _empty(like: Tensor) -> Tensor:
    return like.new_zeros(0)


class DenseStats(torch.autograd.Function):
    """Statistics of ``s`` and ``t`` (``[N, C, P]``, ``P = H*W``) needed by the FGD loss.

    Inputs: ``s`` (student after ``align``, takes a gradient), ``t`` (teacher, none), ``fg`` and
    ``bg`` masks ``[N, P]`` (empty when not needed), the student and teacher context masks'
    weights ``[C]`` and biases ``[1]``, and a :class:`DenseSpec`.

    Outputs (each an empty ``[0]`` tensor when the spec does not need it):

    * ``q [N, C, R]``: ``sum_p W_r[n, p] * D[n, c, p]^2``, ``D = s - t``, with rows ``W_r`` the fg
      and bg masks times the teacher's spatial attention, then ones;
    * ``sum_d [N, C]``: ``sum_p D``;
    * ``context_s``, ``context_t`` ``[N, C]``: ``sum_p softmax_p(w.x + b) * x`` for ``x = s, t``;
    * ``spatial_mean [N, P]``, ``channel_mean [N, C]``: means of ``|s|``;
    * ``teacher_spatial [N, P]``, ``teacher_channel [N, C]``: the teacher's attentions
      ``P * softmax(mean_c|t| / T)`` and ``C * softmax(mean_p|t| / T)`` (no gradient).

    Backward: ``dL/ds = 2 D (g_q @ W) + g_sum_d + g_ctx_s a_s^T + w_s g_logits_s^T
    + sign(s) (g_spatial / C + g_channel / P)``, where ``a_s`` is the context softmax and
    ``g_logits_s = a_s * (g_ctx_s . s - g_ctx_s . context_s)``; the mask weights get
    ``sum_p g_logits * x`` and the biases ``sum_p g_logits`` (zero up to rounding, as the softmax
    is shift invariant).
    """

    @staticmethod
    def forward(
        ctx: Any,
        s: Tensor,
        t: Tensor,
        fg: Tensor,
        bg: Tensor,
        w_s: Tensor,
        b_s: Tensor,
        w_t: Tensor,
        b_t: Tensor,
        spec: DenseSpec,
    ) -> tuple[Tensor, ...]:
        ctx.set_materialize_grads(False)
        impl = _forward_fused if spec.chunk == 0 else _forward_blocked
        out, saved = impl(s, t, fg, bg, w_s, b_s, w_t, b_t, spec)
        # every output its own tensor (unused ones are empty), so autograd can tell them apart
        out = tuple(x if x.numel() > 0 else s.new_zeros(0) for x in out)
        ctx.save_for_backward(s, t, w_s, *saved)
        ctx.spec = spec
        ctx.mark_non_differentiable(out[6], out[7], *(x for x in out[:6] if x.numel() == 0))
        return out

    @staticmethod
    def backward(ctx: Any, *grads: Tensor | None) -> tuple[Tensor | None, ...]:
        s, t, w_s, pix, a_s, a_t, context_s, context_t = ctx.saved_tensors
        spec: DenseSpec = ctx.spec
        g_q, g_sum_d, g_ctx_s, g_ctx_t, g_spatial, g_channel = grads[:6]
        if spec.rows == 0:
            g_q = None
        needs = ctx.needs_input_grad
        impl = _backward_fused if spec.chunk == 0 else _backward_blocked
        grad_s, grad_ws, grad_bs, grad_wt, grad_bt = impl(
            s, t, w_s, pix, a_s, a_t, context_s, context_t, spec,
            g_q, g_sum_d, g_ctx_s, g_ctx_t, g_spatial, g_channel,
            bool(needs[0]),
        )  # fmt: skip
        return (
            grad_s,
            None,
            None,
            None,
            grad_ws if needs[4] else None,
            grad_bs if needs[5] else None,
            grad_wt if needs[6] else None,
            grad_bt if needs[7] else None,
            None,
        )


# ---------------------------------------------------------------------------------------------
# Fused (whole-tensor) implementation: the reference formulation, and what inductor compiles.
# ---------------------------------------------------------------------------------------------
def _pixel_rows(
    fg: Tensor, bg: Tensor, teacher_spatial: Tensor, spec: DenseSpec, like: Tensor
) -> Tensor:
    n, _, p = like.shape
    rows = []
    if spec.fg:
        rows.append(fg * teacher_spatial)
    if spec.bg:
        rows.append(bg * teacher_spatial)
    if spec.global_:
        rows.append(like.new_ones(n, p))
    return torch.stack(rows, dim=1) if rows else like.new_zeros(n, 0, p)


def _forward_fused(
    s: Tensor,
    t: Tensor,
    fg: Tensor,
    bg: Tensor,
    w_s: Tensor,
    b_s: Tensor,
    w_t: Tensor,
    b_t: Tensor,
    spec: DenseSpec,
) -> tuple[tuple[Tensor, ...], tuple[Tensor, ...]]:
    c, p = s.shape[1], s.shape[2]
    e = _empty(s)
    q = sum_d = ctx_s = ctx_t = u_s = v_s = as_t = ac_t = a_s = a_t = e
    if spec.teacher_attention:
        mag = t.abs()
        as_t = p * torch.softmax(mag.mean(dim=1) / spec.temperature, dim=1)
        ac_t = c * torch.softmax(mag.mean(dim=2) / spec.temperature, dim=1)
    pix = _pixel_rows(fg, bg, as_t, spec, s)
    if spec.rows:
        d2 = torch.square(s - t)
        q = torch.stack([(d2 * pix[:, r, None, :]).sum(dim=2) for r in range(spec.rows)], 2)
    if spec.attention:
        mag = s.abs()
        u_s, v_s = mag.mean(dim=1), mag.mean(dim=2)
    if spec.global_:
        sum_d = (s - t).sum(dim=2)
        a_s = torch.softmax((s * w_s[None, :, None]).sum(dim=1) + b_s, dim=1)
        a_t = torch.softmax((t * w_t[None, :, None]).sum(dim=1) + b_t, dim=1)
        ctx_s = (s * a_s[:, None, :]).sum(dim=2)
        ctx_t = (t * a_t[:, None, :]).sum(dim=2)
    return (q, sum_d, ctx_s, ctx_t, u_s, v_s, as_t, ac_t), (pix, a_s, a_t, ctx_s, ctx_t)


def _backward_fused(
    s: Tensor,
    t: Tensor,
    w_s: Tensor,
    pix: Tensor,
    a_s: Tensor,
    a_t: Tensor,
    context_s: Tensor,
    context_t: Tensor,
    spec: DenseSpec,
    g_q: Tensor | None,
    g_sum_d: Tensor | None,
    g_ctx_s: Tensor | None,
    g_ctx_t: Tensor | None,
    g_spatial: Tensor | None,
    g_channel: Tensor | None,
    need_s: bool,
) -> tuple[Tensor | None, ...]:
    c, p = s.shape[1], s.shape[2]
    grad_ws = grad_bs = grad_wt = grad_bt = None
    g_ls: Tensor | None = None
    if g_ctx_s is not None:
        pooled = (s * g_ctx_s[:, :, None]).sum(dim=1)
        g_ls = a_s * (pooled - (g_ctx_s * context_s).sum(dim=1, keepdim=True))
        grad_ws = (s * g_ls[:, None, :]).sum(dim=2).sum(dim=0)  # per image first: fuses
        grad_bs = g_ls.sum().reshape(1)
    if g_ctx_t is not None:
        pooled_t = (t * g_ctx_t[:, :, None]).sum(dim=1)
        g_lt = a_t * (pooled_t - (g_ctx_t * context_t).sum(dim=1, keepdim=True))
        grad_wt = (t * g_lt[:, None, :]).sum(dim=2).sum(dim=0)
        grad_bt = g_lt.sum().reshape(1)
    if not need_s:
        return None, grad_ws, grad_bs, grad_wt, grad_bt

    grad = torch.zeros_like(s)
    if g_q is not None:
        weight = g_q[:, :, 0, None] * pix[:, None, 0, :]
        for r in range(1, spec.rows):
            weight = weight + g_q[:, :, r, None] * pix[:, None, r, :]
        grad = grad + 2.0 * (s - t) * weight
    if g_sum_d is not None:
        grad = grad + g_sum_d[:, :, None]
    if g_ctx_s is not None and g_ls is not None:
        grad = grad + g_ctx_s[:, :, None] * a_s[:, None, :] + w_s[None, :, None] * g_ls[:, None, :]
    if g_spatial is not None or g_channel is not None:
        scale = torch.zeros_like(s[:, :1, :1])
        if g_spatial is not None:
            scale = scale + (g_spatial / c)[:, None, :]
        if g_channel is not None:
            scale = scale + (g_channel / p)[:, :, None]
        grad = grad + torch.sign(s) * scale
    return grad, grad_ws, grad_bs, grad_wt, grad_bt


# ---------------------------------------------------------------------------------------------
# Blocked (eager) implementation.
# ---------------------------------------------------------------------------------------------
def _blocks(p: int, chunk: int) -> list[tuple[int, int]]:
    return [(p0, min(p0 + chunk, p)) for p0 in range(0, p, chunk)]


def _forward_blocked(
    s: Tensor,
    t: Tensor,
    fg: Tensor,
    bg: Tensor,
    w_s: Tensor,
    b_s: Tensor,
    w_t: Tensor,
    b_t: Tensor,
    spec: DenseSpec,
) -> tuple[tuple[Tensor, ...], tuple[Tensor, ...]]:
    """Two sweeps per image over cache-sized blocks.

    Sweep 1 gathers everything a softmax over positions needs (``mean_c |t|``, the context
    logits) plus the other per-block reductions; the softmaxes are then taken exactly over the
    whole image; sweep 2 (in reverse order, to reuse what sweep 1 left in cache) makes the
    softmax-weighted sums. The scratch block holds ``|t|``, ``|s|`` and ``(s - t)^2`` in turn.
    """
    n, c, p = s.shape
    chunk = min(spec.chunk, p)
    blocks = _blocks(p, chunk)
    tau = spec.temperature
    e = _empty(s)
    inv_c = s.new_full((c,), 1.0 / c)
    ones = s.new_ones(chunk)
    scratch = s.new_empty(c * chunk)

    u_t = s.new_empty(n, p) if spec.teacher_attention else e
    v_t = s.new_zeros(n, c) if spec.teacher_attention else e
    u_s = s.new_empty(n, p) if spec.attention else e
    v_s = s.new_zeros(n, c) if spec.attention else e
    sum_d = s.new_zeros(n, c) if spec.global_ else e
    logits_s = s.new_empty(n, p) if spec.global_ else e
    logits_t = s.new_empty(n, p) if spec.global_ else e
    q = s.new_zeros(n, spec.rows, c)
    ctx_s = s.new_zeros(n, c) if spec.global_ else e
    ctx_t = s.new_zeros(n, c) if spec.global_ else e
    as_t = s.new_empty(n, p) if spec.teacher_attention else e
    a_s = s.new_empty(n, p) if spec.global_ else e
    a_t = s.new_empty(n, p) if spec.global_ else e
    pix = s.new_empty(n, spec.rows, p)

    for i in range(n):
        for p0, p1 in blocks:
            s_c, t_c = s[i, :, p0:p1], t[i, :, p0:p1]
            buf = scratch[: c * (p1 - p0)].view(c, p1 - p0)
            one = ones[: p1 - p0]
            if spec.teacher_attention:
                torch.abs(t_c, out=buf)
                torch.mv(buf.t(), inv_c, out=u_t[i, p0:p1])
                v_t[i].addmv_(buf, one)
            if spec.attention:
                torch.abs(s_c, out=buf)
                torch.mv(buf.t(), inv_c, out=u_s[i, p0:p1])
                v_s[i].addmv_(buf, one)
            if spec.global_:
                sum_d[i].addmv_(s_c, one).addmv_(t_c, one, alpha=-1.0)
                torch.mv(s_c.t(), w_s, out=logits_s[i, p0:p1])
                torch.mv(t_c.t(), w_t, out=logits_t[i, p0:p1])

        r = 0
        if spec.teacher_attention:
            torch.softmax(u_t[i] / tau, dim=0, out=as_t[i]).mul_(p)
            for needed, mask in ((spec.fg, fg), (spec.bg, bg)):
                if needed:
                    torch.mul(mask[i], as_t[i], out=pix[i, r])
                    r += 1
        if spec.global_:
            pix[i, r].fill_(1.0)
            torch.softmax(logits_s[i] + b_s, dim=0, out=a_s[i])
            torch.softmax(logits_t[i] + b_t, dim=0, out=a_t[i])

        if spec.rows or spec.global_:
            for p0, p1 in reversed(blocks):
                s_c, t_c = s[i, :, p0:p1], t[i, :, p0:p1]
                if spec.rows:
                    buf = scratch[: c * (p1 - p0)].view(c, p1 - p0)
                    torch.ops.aten.mse_loss.out(s_c, t_c, 0, out=buf)  # (s - t)^2
                    for row in range(spec.rows):
                        q[i, row].addmv_(buf, pix[i, row, p0:p1])
                if spec.global_:
                    ctx_s[i].addmv_(s_c, a_s[i, p0:p1])
                    ctx_t[i].addmv_(t_c, a_t[i, p0:p1])

    ac_t = c * torch.softmax(v_t / (p * tau), dim=1) if spec.teacher_attention else e
    if spec.attention:
        v_s = v_s / p
    out = (q.transpose(1, 2), sum_d, ctx_s, ctx_t, u_s, v_s, as_t, ac_t)
    return out, (pix, a_s, a_t, ctx_s, ctx_t)


def _backward_blocked(
    s: Tensor,
    t: Tensor,
    w_s: Tensor,
    pix: Tensor,
    a_s: Tensor,
    a_t: Tensor,
    context_s: Tensor,
    context_t: Tensor,
    spec: DenseSpec,
    g_q: Tensor | None,
    g_sum_d: Tensor | None,
    g_ctx_s: Tensor | None,
    g_ctx_t: Tensor | None,
    g_spatial: Tensor | None,
    g_channel: Tensor | None,
    need_s: bool,
) -> tuple[Tensor | None, ...]:
    n, c, p = s.shape
    chunk = min(spec.chunk, p)
    grad = torch.empty_like(s) if need_s else None
    grad_ws = s.new_zeros(c) if g_ctx_s is not None else None
    grad_wt = s.new_zeros(c) if g_ctx_t is not None else None
    g_ls_all = s.new_empty(n, p) if g_ctx_s is not None else None
    g_lt_all = s.new_empty(n, p) if g_ctx_t is not None else None
    scratch = s.new_empty(c * chunk)
    ones = s.new_ones(chunk)
    q_weight = 2.0 * g_q if g_q is not None else None  # [N, C, R]
    dot_s = (g_ctx_s * context_s).sum(dim=1) if g_ctx_s is not None else None
    dot_t = (g_ctx_t * context_t).sum(dim=1) if g_ctx_t is not None else None
    spatial = g_spatial / c if g_spatial is not None else None
    channel = (g_channel / p).unsqueeze(1) if g_channel is not None else None
    # Columns of the low-rank part of dL/ds: [g_sum_d, g_ctx_s, w_s] against [1, a_s, g_logits_s]
    cols: list[Tensor] = []
    if g_sum_d is not None:
        cols.append(g_sum_d)
    if g_ctx_s is not None:
        cols += [g_ctx_s, w_s.expand(n, c)]
    left = torch.stack(cols, dim=2) if cols else None  # [N, C, k]

    for i in range(n):
        for p0 in range(0, p, chunk):
            p1 = min(p0 + chunk, p)
            width = p1 - p0
            s_c, t_c = s[i, :, p0:p1], t[i, :, p0:p1]
            rows: list[Tensor] = []
            if g_sum_d is not None:
                rows.append(ones[:width])
            if g_ctx_s is not None and dot_s is not None and g_ls_all is not None:
                g_ls = g_ls_all[i, p0:p1]
                torch.mv(s_c.t(), g_ctx_s[i], out=g_ls)
                g_ls.sub_(dot_s[i]).mul_(a_s[i, p0:p1])
                rows += [a_s[i, p0:p1], g_ls]
                if grad_ws is not None:
                    grad_ws.addmv_(s_c, g_ls)
            if g_ctx_t is not None and dot_t is not None and g_lt_all is not None:
                g_lt = g_lt_all[i, p0:p1]
                torch.mv(t_c.t(), g_ctx_t[i], out=g_lt)
                g_lt.sub_(dot_t[i]).mul_(a_t[i, p0:p1])
                if grad_wt is not None:
                    grad_wt.addmv_(t_c, g_lt)
            if grad is None:
                continue
            g_c = grad[i, :, p0:p1]
            buf = scratch[: c * width].view(c, width)
            if q_weight is not None:
                torch.mm(q_weight[i], pix[i, :, p0:p1], out=buf)
                torch.sub(s_c, t_c, out=g_c).mul_(buf)
            else:
                g_c.zero_()
            if left is not None:
                g_c.addmm_(left[i], torch.stack(rows))
            if spatial is not None or channel is not None:
                sign = torch.sign(s_c, out=buf)
                if spatial is not None:
                    g_c.addcmul_(sign, spatial[i, p0:p1])
                if channel is not None:
                    g_c.addcmul_(sign, channel[i].t())
    grad_bs = g_ls_all.sum().reshape(1) if g_ls_all is not None else None
    grad_bt = g_lt_all.sum().reshape(1) if g_lt_all is not None else None
    return grad, grad_ws, grad_bs, grad_wt, grad_bt
