from __future__ import annotations

import sys
from collections.abc import Iterator

import pytest
import torch

from fgdistill.engine import threads
from fgdistill.errors import ConfigError


@pytest.fixture(autouse=True)
def _restore_threads() -> Iterator[None]:
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_an_explicit_count_is_set_and_a_bad_one_named() -> None:
    assert threads.fit_threads(3) == 3 and torch.get_num_threads() == 3
    with pytest.raises(ConfigError, match="--threads"):
        threads.fit_threads(0)


def test_busy_cores_of_other_processes_are_left_to_them(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(threads, "usable_cores", lambda: 4)
    torch.set_num_threads(4)
    monkeypatch.setattr(threads, "busy_cores", lambda: 1)
    assert threads.fit_threads() == 3 and torch.get_num_threads() == 3
    torch.set_num_threads(4)
    monkeypatch.setattr(threads, "busy_cores", lambda: 9)
    assert threads.fit_threads() == 1
    torch.set_num_threads(4)
    monkeypatch.setattr(threads, "busy_cores", lambda: None)  # no /proc/stat: every core
    assert threads.fit_threads() == 4


def test_omp_num_threads_is_left_as_set(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setattr(threads, "busy_cores", lambda: 0)
    torch.set_num_threads(2)
    assert threads.fit_threads() == 2


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/stat")
def test_busy_cores_reads_the_running_count() -> None:
    busy = threads.busy_cores(samples=3, interval_s=0.0)
    assert busy is not None and busy >= 0
