"""Shared fixtures for the loss tests."""

from __future__ import annotations

import importlib.util
from types import ModuleType

import pytest

from ._cases import ROOT


@pytest.fixture(scope="session")
def loop_reference() -> ModuleType:
    """``benchmarks/loss_speed.py`` as a module (it holds the box-by-box reference port)."""
    path = ROOT / "benchmarks" / "loss_speed.py"
    spec = importlib.util.spec_from_file_location("fgd_loss_speed_benchmark", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
