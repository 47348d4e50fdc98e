"""Runner helpers: the distillation levels and hyper-parameters a config asks for, and what
they refuse."""

from __future__ import annotations

import pytest

from fgdistill.engine.config import DistillConfig, TrainConfig
from fgdistill.engine.runner import _method_settings
from fgdistill.errors import ConfigError
from fgdistill.losses.multilevel import PKDHyperParams

LEVELS = ["p3", "p4"]


def _cfg(**distill: object) -> TrainConfig:
    distill.setdefault("levels", LEVELS)
    return TrainConfig(distill=DistillConfig(teacher_checkpoint="t.pt", **distill))  # type: ignore[arg-type]


def test_overrides_reach_their_levels() -> None:
    levels, got = _method_settings(
        _cfg(hparams={"alpha": 2e-3}, level_hparams={"p4": {"beta": 1e-4}}), "retinanet"
    )
    assert levels == LEVELS
    assert got["p3"].alpha == got["p4"].alpha == 2e-3
    assert got["p4"].beta == 1e-4 and got["p3"].beta != 1e-4


def test_other_methods_take_their_preset_and_overrides() -> None:
    levels, got = _method_settings(_cfg(method="pkd", levels=None), "faster_rcnn")
    assert levels == ["p2", "p3", "p4", "p5"] and got["p2"] == PKDHyperParams(loss_weight=6.0)
    _, got = _method_settings(_cfg(method="pkd", hparams={"loss_weight": 2.0}), "retinanet")
    assert got["p3"] == PKDHyperParams(loss_weight=2.0)


@pytest.mark.parametrize(
    ("distill", "match"),
    [
        ({"hparams": {"alpha": -1.0}}, r"distill\.hparams: alpha must be >= 0, got -1"),
        ({"hparams": {"temperature": 0.0}}, r"distill\.hparams: temperature must be > 0"),
        ({"level_hparams": {"p4": {"gamma": -1.0}}}, r"distill\.level_hparams\.p4: gamma"),
        (
            {"hparams": {"alpa": 1.0}},
            r"distill\.hparams: unknown key 'alpa' for method 'fgd'; did you mean 'alpha'\?",
        ),
        (
            {"method": "cwd", "level_hparams": {"p3": {"alpha": 1.0}}},
            r"distill\.level_hparams\.p3: unknown key 'alpha' for method 'cwd'; valid: tau",
        ),
        ({"method": "mgd", "hparams": {"lambda_mgd": 2.0}}, r"lambda_mgd is a probability"),
        ({"level_hparams": {"p7": {"alpha": 1.0}}}, r"level\(s\) \['p7'\] are not distilled"),
        ({"preset": "yolo"}, r"distill\.preset: unknown preset 'yolo'"),
    ],
)
def test_bad_values_name_the_key(distill: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        _method_settings(_cfg(**distill), "retinanet")
