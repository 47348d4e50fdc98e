"""PKDLoss: parity with mmrazor's cases, Pearson-correlation properties, resizing, input checks."""

from typing import Any

import pytest
import torch
import torch.nn.functional as F

from fgdistill.errors import CompatibilityError, NonFiniteError
from fgdistill.losses import PKDLoss

from ._kd_cases import check_case, kd_cases

F64 = torch.float64


@pytest.mark.parametrize("dtype", [F64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("case", kd_cases("pkd"))
def test_parity_with_reference(case: dict[str, Any], dtype: torch.dtype) -> None:
    check_case(case, dtype)


def manual_pkd(s: torch.Tensor, t: torch.Tensor, weight: float) -> torch.Tensor:
    """Straight from the definition, channel by channel (a reference, not vectorised on purpose)."""
    total = s.new_zeros(())
    for c in range(s.shape[1]):
        a, b = s[:, c].reshape(-1), t[:, c].reshape(-1)
        a = (a - a.mean()) / (a.std() + 1e-6)
        b = (b - b.mean()) / (b.std() + 1e-6)
        total = total + ((a - b) ** 2).sum()
    return weight * total / s.numel() / 2


def test_is_one_minus_pearson_correlation() -> None:
    """mean((S_n - T_n)^2) / 2 = (M - 1) / M * mean_c(1 - r_c) with M = N*H*W (up to the 1e-6)."""
    torch.manual_seed(0)
    s = torch.randn(2, 5, 4, 6, dtype=F64)
    t = 0.7 * s + 0.5 * torch.randn(2, 5, 4, 6, dtype=F64)
    m = s.shape[0] * s.shape[2] * s.shape[3]
    r = torch.stack(
        [
            torch.corrcoef(torch.stack([s[:, c].flatten(), t[:, c].flatten()]))[0, 1]
            for c in range(5)
        ]
    )
    expected = 3.0 * (m - 1) / m * (1 - r).mean()
    torch.testing.assert_close(PKDLoss(loss_weight=3.0)(s, t), expected, rtol=1e-5, atol=0)


@pytest.mark.parametrize("side", ["student", "teacher"])
def test_invariant_to_per_channel_scale_and_offset(side: str) -> None:
    torch.manual_seed(1)
    s = torch.randn(2, 6, 5, 7, dtype=F64)
    t = s + torch.randn(2, 6, 5, 7, dtype=F64)
    scale = torch.rand(1, 6, 1, 1, dtype=F64) * 4.5 + 0.5  # positive, 0.5 to 5
    offset = torch.randn(1, 6, 1, 1, dtype=F64) * 10
    loss = PKDLoss(loss_weight=2.0)
    base = loss(s, t)
    moved = loss(s * scale + offset, t) if side == "student" else loss(s, t * scale + offset)
    assert base > 0.1
    # Only the 1e-6 added to the standard deviation breaks the invariance.
    torch.testing.assert_close(moved, base, rtol=1e-5, atol=0)
    # A negative scale flips the correlation: not invariant.
    flipped = loss(-s, t) if side == "student" else loss(s, -t)
    assert flipped > base + 0.1


def test_zero_for_an_affine_copy_and_teacher_takes_no_gradient() -> None:
    torch.manual_seed(2)
    t = torch.randn(2, 4, 3, 5, dtype=F64, requires_grad=True)
    s = (3 * t.detach() - 1).requires_grad_(True)
    loss = PKDLoss()(s, t)
    assert abs(float(loss.detach())) < 1e-10
    loss.backward()
    assert t.grad is None and s.grad is not None


@pytest.mark.parametrize("resize_student", [True, False])
def test_resizes_the_chosen_map_bilinearly(resize_student: bool) -> None:
    torch.manual_seed(3)
    small = torch.randn(2, 4, 5, 6, dtype=F64)
    large = torch.randn(2, 4, 10, 13, dtype=F64)
    loss = PKDLoss(loss_weight=6.0, resize_student=resize_student)
    # Student small, teacher large: with resize_student the student is brought up to 10x13.
    out = loss(small, large)
    if resize_student:
        expected = manual_pkd(
            F.interpolate(small, size=(10, 13), mode="bilinear", align_corners=False), large, 6.0
        )
    else:
        expected = manual_pkd(
            small, F.interpolate(large, size=(5, 6), mode="bilinear", align_corners=False), 6.0
        )
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=0)
    # A difference in width only also triggers the resize (mmrazor compared heights only).
    wide = torch.randn(2, 4, 5, 9, dtype=F64)
    out = loss(small, wide)
    if resize_student:
        expected = manual_pkd(F.interpolate(small, size=(5, 9), mode="bilinear"), wide, 6.0)
    else:
        expected = manual_pkd(small, F.interpolate(wide, size=(5, 6), mode="bilinear"), 6.0)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=0)


def test_gradient_flows_through_the_resize() -> None:
    torch.manual_seed(4)
    s = torch.randn(1, 3, 4, 4, dtype=F64, requires_grad=True)
    t = torch.randn(1, 3, 8, 8, dtype=F64)
    assert torch.autograd.gradcheck(lambda x: PKDLoss(2.0)(x, t), (s,))


def test_half_input_is_computed_in_float32() -> None:
    torch.manual_seed(5)
    s, t = torch.randn(2, 4, 3, 5), torch.randn(2, 4, 3, 5)
    out = PKDLoss()(s.half(), t.half())
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, PKDLoss()(s.half().float(), t.half().float()))


def test_input_errors_name_the_shapes() -> None:
    loss = PKDLoss()
    x = torch.randn(2, 4, 3, 3)
    with pytest.raises(CompatibilityError, match=r"student must be \[N, C, H, W\].*\(4, 3, 3\)"):
        loss(x[0], x)
    with pytest.raises(CompatibilityError, match=r"batch sizes differ, student 2 and teacher 3"):
        loss(x, torch.randn(3, 4, 3, 3))
    with pytest.raises(
        CompatibilityError, match=r"equal channel counts, got student 4 and teacher 8"
    ):
        loss(x, torch.randn(2, 8, 3, 3))
    with pytest.raises(CompatibilityError, match=r"N\*H\*W >= 2.*\(1, 4, 1, 1\)"):
        loss(torch.randn(1, 4, 1, 1), torch.randn(1, 4, 1, 1))
    with pytest.raises(CompatibilityError, match="floating point"):
        loss(x.long(), x)
    with pytest.raises(ValueError, match="loss_weight"):
        PKDLoss(loss_weight=-1.0)
    bad = x.clone()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(NonFiniteError, match="teacher contains NaN"):
        loss(x, bad)
