import math

import pytest
import torch

from fgdistill.losses import channel_attention, spatial_attention
from fgdistill.losses.attention import abs_means, attention_from_means


def test_shapes_and_normalisation() -> None:
    feat = torch.randn(3, 5, 4, 6, dtype=torch.float64)
    a_s = spatial_attention(feat, 0.5)
    a_c = channel_attention(feat, 0.5)
    assert a_s.shape == (3, 4, 6)
    assert a_c.shape == (3, 5)
    torch.testing.assert_close(a_s.sum(dim=(1, 2)), torch.full((3,), 24.0, dtype=torch.float64))
    torch.testing.assert_close(a_c.sum(dim=1), torch.full((3,), 5.0, dtype=torch.float64))
    assert (a_s > 0).all() and (a_c > 0).all()


def test_hand_computed_values() -> None:
    # One image, 2 channels, 1x2 map. |F| = [[1, 3], [1, 1]] (channel x position).
    feat = torch.tensor([[[[1.0, -3.0]], [[-1.0, 1.0]]]], dtype=torch.float64)
    t = 0.5
    # spatial mean over channels: [1, 2]; softmax([2, 4]) times H*W = 2
    e = math.exp(2.0)
    expected_s = torch.tensor([[[2 / (1 + e), 2 * e / (1 + e)]]], dtype=torch.float64)
    torch.testing.assert_close(spatial_attention(feat, t), expected_s)
    # channel mean over positions: [2, 1]; softmax([4, 2]) times C = 2
    expected_c = torch.tensor([[2 * e / (1 + e), 2 / (1 + e)]], dtype=torch.float64)
    torch.testing.assert_close(channel_attention(feat, t), expected_c)


def test_sign_invariance_and_constant_map() -> None:
    feat = torch.randn(2, 3, 4, 4)
    torch.testing.assert_close(spatial_attention(feat, 0.7), spatial_attention(-feat, 0.7))
    flat = torch.full((1, 4, 3, 3), -2.0)
    torch.testing.assert_close(spatial_attention(flat, 0.5), torch.ones(1, 3, 3))
    torch.testing.assert_close(channel_attention(flat, 0.5), torch.ones(1, 4))


def test_lower_temperature_is_sharper() -> None:
    feat = torch.randn(1, 8, 5, 5)
    assert spatial_attention(feat, 0.2).max() > spatial_attention(feat, 2.0).max()
    assert channel_attention(feat, 0.2).max() > channel_attention(feat, 2.0).max()


def test_means_path_matches_public_functions() -> None:
    feat = torch.randn(2, 6, 3, 7, dtype=torch.float64)
    a_s, a_c = attention_from_means(*abs_means(feat), 0.8)
    torch.testing.assert_close(a_s, spatial_attention(feat, 0.8))
    torch.testing.assert_close(a_c, channel_attention(feat, 0.8))


@pytest.mark.parametrize(
    ("feat", "temperature", "match"),
    [
        (torch.zeros(2, 3, 4), 0.5, "rank|\\[N, C, H, W\\]"),
        (torch.zeros(1, 2, 3, 3, dtype=torch.int64), 0.5, "floating point"),
        (torch.zeros(1, 2, 3, 3), 0.0, "temperature"),
        (torch.zeros(1, 2, 3, 3), -1.0, "temperature"),
    ],
)
def test_invalid_inputs(feat: torch.Tensor, temperature: float, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        spatial_attention(feat, temperature)
    with pytest.raises(ValueError, match=match):
        channel_attention(feat, temperature)
