"""CWDLoss: parity with mmrazor's cases, divergence properties, input checks."""

from typing import Any

import pytest
import torch

from fgdistill.errors import CompatibilityError
from fgdistill.losses import CWDLoss

from ._kd_cases import check_case, kd_cases

F64 = torch.float64


@pytest.mark.parametrize("dtype", [F64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("case", kd_cases("cwd"))
def test_parity_with_reference(case: dict[str, Any], dtype: torch.dtype) -> None:
    check_case(case, dtype)


def manual_cwd(s: torch.Tensor, t: torch.Tensor, tau: float, weight: float) -> torch.Tensor:
    """From the definition, image by image and channel by channel (deliberately not vectorised)."""
    n, c = s.shape[:2]
    total = s.new_zeros(())
    for i in range(n):
        for j in range(c):
            p = torch.softmax(t[i, j].flatten() / tau, 0)
            q = torch.softmax(s[i, j].flatten() / tau, 0)
            total = total + (p * (p.log() - q.log())).sum()
    return weight * tau**2 * total / (n * c)


@pytest.mark.parametrize("tau", [0.5, 1.0, 3.0])
def test_matches_the_definition(tau: float) -> None:
    torch.manual_seed(0)
    s, t = torch.randn(3, 4, 5, 6, dtype=F64), torch.randn(3, 4, 5, 6, dtype=F64)
    out = CWDLoss(tau=tau, loss_weight=2.5)(s, t)
    torch.testing.assert_close(out, manual_cwd(s, t, tau, 2.5), rtol=1e-12, atol=0)


def test_zero_when_equal_and_positive_otherwise() -> None:
    torch.manual_seed(1)
    t = torch.randn(2, 5, 4, 7, dtype=F64)
    s = t.clone().requires_grad_(True)
    loss = CWDLoss(tau=2.0, loss_weight=10.0)
    same = loss(s, t)
    same.backward()
    assert float(same.detach()) == 0.0
    assert s.grad is not None and float(s.grad.abs().max()) < 1e-15
    for seed in range(5):
        torch.manual_seed(100 + seed)
        other = t + 0.01 * torch.randn_like(t)
        assert float(loss(other, t)) > 0
    # Only one channel of one image differs: still positive.
    other = t.clone()
    other[1, 3, 2, 5] += 1.0
    assert float(loss(other, t)) > 0


def test_ignores_an_offset_per_channel_and_image() -> None:
    torch.manual_seed(2)
    s, t = torch.randn(2, 4, 3, 5, dtype=F64), torch.randn(2, 4, 3, 5, dtype=F64)
    offset = torch.randn(2, 4, 1, 1, dtype=F64) * 5
    loss = CWDLoss(tau=0.7)
    torch.testing.assert_close(loss(s + offset, t), loss(s, t), rtol=1e-12, atol=0)
    torch.testing.assert_close(loss(s, t - offset), loss(s, t), rtol=1e-12, atol=0)
    # A scale changes the distributions' sharpness: not ignored.
    assert abs(float(loss(2 * s, t)) - float(loss(s, t))) > 1e-3


def test_teacher_takes_no_gradient() -> None:
    s = torch.randn(2, 3, 4, 4, requires_grad=True)
    t = torch.randn(2, 3, 4, 4, requires_grad=True)
    CWDLoss()(s, t).backward()
    assert t.grad is None and s.grad is not None


def test_input_errors_name_the_shapes() -> None:
    loss = CWDLoss()
    x = torch.randn(2, 4, 3, 5)
    with pytest.raises(CompatibilityError, match=r"teacher must be \[N, C, H, W\].*\(2, 4, 15\)"):
        loss(x, x.flatten(2))
    with pytest.raises(CompatibilityError, match=r"batch sizes differ, student 2 and teacher 1"):
        loss(x, x[:1])
    with pytest.raises(
        CompatibilityError, match=r"equal channel counts, got student 4 and teacher 6"
    ):
        loss(x, torch.randn(2, 6, 3, 5))
    with pytest.raises(
        CompatibilityError, match=r"spatial sizes differ, student \(3, 5\) and teacher \(3, 4\)"
    ):
        loss(x, torch.randn(2, 4, 3, 4))
    for bad in (0.0, -1.0, float("inf")):
        with pytest.raises(ValueError, match="tau"):
            CWDLoss(tau=bad)
    with pytest.raises(ValueError, match="loss_weight"):
        CWDLoss(loss_weight=float("nan"))
