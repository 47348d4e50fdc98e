"""The top-level API: the names users import, and the installed version."""

from __future__ import annotations

import importlib.metadata

import pytest

import fgdistill


def test_top_level_names() -> None:
    from fgdistill import Distiller, FGDLoss, MultiLevelFGD, build_detector, load_detector

    assert FGDLoss.__module__ == "fgdistill.losses.fgd"
    assert MultiLevelFGD.__module__ == "fgdistill.losses.multilevel"
    assert Distiller.__module__ == "fgdistill.models.distiller"
    assert build_detector.__module__ == load_detector.__module__ == "fgdistill.models.build"
    assert set(fgdistill.__all__) >= {"Distiller", "FGDLoss", "build_detector", "load_detector"}


def test_version_comes_from_the_installed_metadata() -> None:
    try:
        installed = importlib.metadata.version("fgdistill")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("fgdistill is not installed")
    assert fgdistill.__version__ == installed


def test_every_exported_name_exists() -> None:
    import fgdistill.data
    import fgdistill.losses
    import fgdistill.models

    for module in (fgdistill, fgdistill.data, fgdistill.losses, fgdistill.models):
        for name in module.__all__:
            assert hasattr(module, name), f"{module.__name__}.{name}"
