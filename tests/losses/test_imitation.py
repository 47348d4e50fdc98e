import pytest
import torch

from fgdistill.losses import FeatureImitationLoss

BOXES = [torch.zeros(0, 4), torch.tensor([[0.0, 0.0, 8.0, 8.0]])]


def test_value_is_weighted_sum_of_squares_over_batch() -> None:
    loss = FeatureImitationLoss(4, 4, weight=0.5)
    assert loss.align is None
    s, t = torch.randn(2, 4, 3, 5, requires_grad=True), torch.randn(2, 4, 3, 5, requires_grad=True)
    out = loss(s, t, BOXES, (24, 40))
    assert list(out) == ["mse"] and out["mse"].shape == ()
    torch.testing.assert_close(out["mse"], 0.5 * ((s - t) ** 2).sum() / 2)
    out["mse"].backward()
    assert t.grad is None
    torch.testing.assert_close(s.grad, 0.5 * 2 * (s - t).detach() / 2)


def test_align_when_channels_differ() -> None:
    loss = FeatureImitationLoss(3, 6)
    assert isinstance(loss.align, torch.nn.Conv2d)
    s = torch.randn(2, 3, 4, 4)
    t = torch.randn(2, 6, 4, 4)
    out = loss(s, t, BOXES, (32, 32))
    expected = 5e-6 * ((loss.align(s) - t) ** 2).sum() / 2
    torch.testing.assert_close(out["mse"], expected)
    out["mse"].backward()
    assert loss.align.weight.grad is not None and loss.align.weight.grad.abs().sum() > 0


def test_zero_weight_and_validation() -> None:
    loss = FeatureImitationLoss(4, 4, weight=0.0)
    assert (
        loss(torch.randn(2, 4, 2, 2), torch.randn(2, 4, 2, 2), BOXES, (16, 16))["mse"].item() == 0
    )
    with pytest.raises(ValueError, match="spatial sizes differ"):
        loss(torch.randn(2, 4, 2, 2), torch.randn(2, 4, 2, 3), BOXES, (16, 16))
    with pytest.raises(ValueError, match="teacher has 5 channels"):
        loss(torch.randn(2, 4, 2, 2), torch.randn(2, 5, 2, 2), BOXES, (16, 16))
    with pytest.raises(ValueError, match="weight"):
        FeatureImitationLoss(4, 4, weight=-1.0)


def test_non_finite_input_is_named() -> None:
    loss = FeatureImitationLoss(4, 4, weight=1.0)
    student = torch.randn(2, 4, 2, 2)
    student[1, 0, 0, 0] = float("inf")
    with pytest.raises(ValueError, match="student contains NaN or Inf"):
        loss(student, torch.randn(2, 4, 2, 2), BOXES, (16, 16))
