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
