import pytest

from fgdistill.losses import FGDHyperParams
from fgdistill.models import ARCHS
from fgdistill.models.presets import DEFAULT_LEVELS, PRESETS


def test_presets_follow_the_released_configs() -> None:
    assert set(PRESETS) == set(ARCHS) == set(DEFAULT_LEVELS)
    assert PRESETS["retinanet"] == FGDHyperParams(0.5, 1e-3, 5e-4, 5e-4, 5e-6)
    assert PRESETS["faster_rcnn"] == FGDHyperParams(0.5, 5e-5, 2.5e-5, 5e-5, 5e-7)
    assert PRESETS["mask_rcnn"] == PRESETS["faster_rcnn"]
    assert PRESETS["reppoints"] == FGDHyperParams(0.5, 1.6e-3, 8e-4, 8e-4, 8e-6)
    assert PRESETS["fcos"] == FGDHyperParams(0.8, 1.6e-3, 8e-4, 8e-4, 8e-6)
    assert DEFAULT_LEVELS["retinanet"] == ("p3", "p4", "p5", "p6", "p7")
    assert DEFAULT_LEVELS["fcos"] == DEFAULT_LEVELS["reppoints"] == DEFAULT_LEVELS["retinanet"]
    assert DEFAULT_LEVELS["faster_rcnn"] == ("p2", "p3", "p4", "p5")
    assert DEFAULT_LEVELS["mask_rcnn"] == DEFAULT_LEVELS["faster_rcnn"]


def test_every_method_has_a_preset_for_every_family() -> None:
    from fgdistill.losses.multilevel import HPARAMS, CWDHyperParams, MGDHyperParams, PKDHyperParams
    from fgdistill.models.presets import preset

    for method, kind in HPARAMS.items():
        for family in ARCHS:
            levels, hparams = preset(method, family)
            assert isinstance(hparams, kind) and levels, (method, family)
    # the published settings (mmrazor's detection configs)
    assert preset("pkd", "retinanet") == (("p3", "p4", "p5", "p6"), PKDHyperParams(10.0))
    assert preset("pkd", "faster_rcnn") == (DEFAULT_LEVELS["faster_rcnn"], PKDHyperParams(6.0))
    assert preset("cwd", "retinanet") == (DEFAULT_LEVELS["retinanet"], CWDHyperParams(1.0, 10.0))
    assert preset("mgd", "retinanet") == (DEFAULT_LEVELS["retinanet"], MGDHyperParams(2e-5, 0.65))
    assert preset("mse", "reppoints") == preset("fgd", "reppoints")
    with pytest.raises(KeyError, match="unknown method 'kd'"):
        preset("kd", "retinanet")
