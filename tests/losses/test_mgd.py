"""MGDLoss: parity with mmrazor's cases, parameter layout, the mask, input checks."""

from typing import Any

import pytest
import torch
import torch.nn.functional as F

from fgdistill.errors import CompatibilityError
from fgdistill.losses import MGDLoss

from ._kd_cases import check_case, kd_cases

F64 = torch.float64


@pytest.mark.parametrize("dtype", [F64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("case", kd_cases("mgd"))
def test_parity_with_reference(case: dict[str, Any], dtype: torch.dtype) -> None:
    check_case(case, dtype)


@pytest.mark.parametrize("case", kd_cases("mgd"))
def test_parameter_keys_match_the_reference(case: dict[str, Any]) -> None:
    loss = MGDLoss(**case["config"])
    state = loss.state_dict()
    assert list(state) == list(case["state_dict"])
    for key, value in case["state_dict"].items():
        assert state[key].shape == value.shape, key


def random_loss(cs: int, ct: int, seed: int = 0, **kw: float) -> MGDLoss:
    torch.manual_seed(seed)
    return MGDLoss(cs, ct, **kw).to(F64)


def manual_mgd(loss: MGDLoss, s: torch.Tensor, t: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """From the definition with functional convolutions."""
    if loss.align is not None:
        s = F.conv2d(s, loss.align.weight, loss.align.bias)
    g0, g2 = loss.generation[0], loss.generation[2]
    assert isinstance(g0, torch.nn.Conv2d) and isinstance(g2, torch.nn.Conv2d)
    hidden = F.relu(F.conv2d(s * keep, g0.weight, g0.bias, padding=1))
    g = F.conv2d(hidden, g2.weight, g2.bias, padding=1)
    return loss.alpha_mgd * ((g - t) ** 2).sum() / s.shape[0]


@pytest.mark.parametrize(("cs", "ct"), [(5, 5), (3, 7)])
def test_matches_the_definition(cs: int, ct: int) -> None:
    loss = random_loss(cs, ct, alpha_mgd=1e-2)
    assert (loss.align is None) == (cs == ct)
    torch.manual_seed(1)
    s, t = torch.randn(2, cs, 6, 5, dtype=F64), torch.randn(2, ct, 6, 5, dtype=F64)
    keep = (torch.rand(2, 1, 6, 5, dtype=F64) > 0.4).to(F64)
    torch.testing.assert_close(loss(s, t, keep), manual_mgd(loss, s, t, keep), rtol=1e-12, atol=0)
    ones = torch.ones(2, 1, 6, 5, dtype=F64)
    torch.testing.assert_close(loss(s, t, ones), manual_mgd(loss, s, t, ones), rtol=1e-12, atol=0)
    # A boolean mask means the same as its 0/1 float.
    torch.testing.assert_close(loss(s, t, keep.bool()), loss(s, t, keep), rtol=0, atol=0)


def test_identity_generator_with_nothing_masked_is_summed_mse() -> None:
    """Generation convs set to pass-through (the first one's bias lifts the input over the ReLU,
    the second's takes it back): the loss is then plain ``alpha * sum((S - T)^2) / N``."""
    loss = random_loss(3, 3, alpha_mgd=0.5)
    lift = 100.0
    with torch.no_grad():
        for index, bias in ((0, lift), (2, -lift)):
            conv = loss.generation[index]
            assert isinstance(conv, torch.nn.Conv2d)
            conv.weight.zero_()
            conv.weight[:, :, 1, 1] = torch.eye(3, dtype=F64)
            conv.bias.fill_(bias)
    torch.manual_seed(8)
    s = torch.randn(2, 3, 4, 6, dtype=F64, requires_grad=True)
    t = torch.randn(2, 3, 4, 6, dtype=F64)
    out = loss(s, t, torch.ones(2, 1, 4, 6, dtype=F64))
    torch.testing.assert_close(out, 0.5 * ((s - t) ** 2).sum() / 2, rtol=1e-12, atol=0)
    out.backward()
    assert s.grad is not None
    torch.testing.assert_close(s.grad, 0.5 * (s - t).detach(), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(("cs", "ct"), [(4, 4), (4, 6)])
def test_no_gradient_reaches_masked_student_positions(cs: int, ct: int) -> None:
    loss = random_loss(cs, ct, seed=2, alpha_mgd=1.0)
    torch.manual_seed(3)
    s = torch.randn(3, cs, 7, 8, dtype=F64, requires_grad=True)
    t = torch.randn(3, ct, 7, 8, dtype=F64)
    keep = (torch.rand(3, 1, 7, 8, dtype=F64) > 0.5).to(F64)
    loss(s, t, keep).backward()
    assert s.grad is not None
    masked = (keep == 0).expand_as(s)
    assert bool(masked.any()) and bool((~masked).any())
    assert bool((s.grad[masked] == 0).all()), "masked positions must get exactly zero gradient"
    assert float(s.grad[~masked].abs().mean()) > 1e-6
    # Every parameter is trained; the teacher is not.
    for name, p in loss.named_parameters():
        assert p.grad is not None and float(p.grad.abs().sum()) > 0, name


def test_everything_masked_gives_a_loss_independent_of_the_student() -> None:
    loss = random_loss(4, 4, seed=4)
    t = torch.randn(2, 4, 5, 5, dtype=F64)
    zeros = torch.zeros(2, 1, 5, 5, dtype=F64)
    a = loss(torch.randn(2, 4, 5, 5, dtype=F64), t, zeros)
    b = loss(torch.randn(2, 4, 5, 5, dtype=F64) * 10, t, zeros)
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_random_mask_masks_with_probability_lambda() -> None:
    loss = random_loss(2, 2, lambda_mgd=0.65)
    torch.manual_seed(5)
    feat = torch.randn(4, 2, 64, 64, dtype=F64)
    keep = loss.random_keep(feat)
    assert keep.shape == (4, 1, 64, 64) and keep.dtype == F64 and keep.device == feat.device
    assert set(keep.unique().tolist()) <= {0.0, 1.0}
    assert abs(float((keep == 0).double().mean()) - 0.65) < 0.02
    # With keep=None the loss draws such a mask: seeded draws agree with an explicit mask.
    s, t = feat[:, :2].clone(), torch.randn(4, 2, 64, 64, dtype=F64)
    torch.manual_seed(6)
    drawn = loss(s, t)
    torch.manual_seed(6)
    explicit = loss(s, t, loss.random_keep(s))
    torch.testing.assert_close(drawn, explicit, rtol=0, atol=0)
    # lambda 0 keeps everything; lambda 1 masks everything.
    all_kept = random_loss(2, 2, lambda_mgd=0.0)
    assert bool((all_kept.random_keep(feat) == 1).all())
    assert bool((random_loss(2, 2, lambda_mgd=1.0).random_keep(feat) == 0).all())


def test_half_input_is_computed_in_float32() -> None:
    torch.manual_seed(7)
    loss = MGDLoss(3, 5)
    s, t = torch.randn(2, 3, 4, 4), torch.randn(2, 5, 4, 4)
    keep = torch.ones(2, 1, 4, 4)
    out = loss(s.half(), t.half(), keep)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, loss(s.half().float(), t.half().float(), keep))


def test_input_errors_name_the_shapes() -> None:
    loss = MGDLoss(4, 6)
    s, t = torch.randn(2, 4, 3, 5), torch.randn(2, 6, 3, 5)
    with pytest.raises(
        CompatibilityError, match=r"student has 6 channels \(shape \(2, 6, 3, 5\)\)"
    ):
        loss(t, t)
    with pytest.raises(CompatibilityError, match=r"teacher has 4 channels .* built for 6"):
        loss(s, s)
    with pytest.raises(CompatibilityError, match=r"spatial sizes differ, student \(3, 5\)"):
        loss(s, torch.randn(2, 6, 4, 5))
    with pytest.raises(CompatibilityError, match=r"batch sizes differ, student 2 and teacher 3"):
        loss(s, torch.randn(3, 6, 3, 5))
    with pytest.raises(CompatibilityError, match=r"rank 4"):
        loss(s[None], t)
    with pytest.raises(
        CompatibilityError, match=r"keep must have shape \(2, 1, 3, 5\).*\(2, 4, 3, 5\)"
    ):
        loss(s, t, torch.ones(2, 4, 3, 5))
    with pytest.raises(ValueError, match="student_channels"):
        MGDLoss(0, 4)
    with pytest.raises(ValueError, match="lambda_mgd"):
        MGDLoss(4, 4, lambda_mgd=1.5)
    with pytest.raises(ValueError, match="alpha_mgd"):
        MGDLoss(4, 4, alpha_mgd=-1e-5)
