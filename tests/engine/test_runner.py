"""Runner helpers: the FGD hyper-parameters a config asks for, and what they refuse."""

from __future__ import annotations

import pytest

from fgdistill.engine.config import DistillConfig, TrainConfig
from fgdistill.engine.runner import _fgd_hparams
from fgdistill.errors import ConfigError

LEVELS = ("p3", "p4")


def _cfg(**distill: object) -> TrainConfig:
    return TrainConfig(distill=DistillConfig(teacher_checkpoint="t.pt", **distill))  # type: ignore[arg-type]


def test_overrides_reach_their_levels() -> None:
    got = _fgd_hparams(
        _cfg(hparams={"alpha": 2e-3}, level_hparams={"p4": {"beta": 1e-4}}), LEVELS, "retinanet"
    )
    assert got["p3"].alpha == got["p4"].alpha == 2e-3
    assert got["p4"].beta == 1e-4 and got["p3"].beta != 1e-4


@pytest.mark.parametrize(
    ("distill", "match"),
    [
        ({"hparams": {"alpha": -1.0}}, r"distill\.hparams: alpha must be >= 0, got -1"),
        ({"hparams": {"temperature": 0.0}}, r"distill\.hparams: temperature must be > 0"),
        ({"level_hparams": {"p4": {"gamma": -1.0}}}, r"distill\.level_hparams\.p4: gamma"),
        ({"hparams": {"alpa": 1.0}}, r"distill\.hparams: unknown key 'alpa'"),
    ],
)
def test_bad_values_name_the_key(distill: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        _fgd_hparams(_cfg(**distill), LEVELS, "retinanet")
