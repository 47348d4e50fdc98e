"""Shared settings for the model tests."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _one_thread(one_thread: None) -> None:
    """Every model test runs single-threaded (the suite's ``one_thread`` fixture)."""
