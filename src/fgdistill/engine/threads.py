"""How many CPU threads a run uses: the cores no other process keeps busy.

PyTorch starts as many intra-op threads as the machine has cores. On a machine another job
shares, two threads fighting that job over two cores are slower than one (measured: one thread
beat two by 1.10-1.17x on a 2-core machine running another training). :func:`fit_threads` picks
the free cores once, at the start of a command.
"""

from __future__ import annotations

import logging
import os
import statistics
import time
from pathlib import Path

import torch

from fgdistill.data.synth import usable_cores

__all__ = ["busy_cores", "fit_threads"]

logger = logging.getLogger(__name__)


def busy_cores(samples: int = 9, interval_s: float = 0.02) -> int | None:
    """Threads of other processes running now: the median of ``samples`` readings.

    Reads ``procs_running`` of ``/proc/stat`` (Linux; ``None`` elsewhere), which counts the
    reading thread too; one is taken off for it.
    """
    stat = Path("/proc/stat")
    readings: list[int] = []
    for i in range(samples):
        try:
            lines = stat.read_text().splitlines()
        except OSError:
            return None
        running = [int(line.split()[1]) for line in lines if line.startswith("procs_running")]
        if not running:
            return None
        readings.append(max(0, running[0] - 1))
        if i + 1 < samples:
            time.sleep(interval_s)
    return int(statistics.median(readings))


def fit_threads(threads: int | None = None) -> int:
    """Set PyTorch's intra-op thread count and return it.

    Args:
        threads: the count to use; ``None`` picks the free cores (usable cores minus those other
            processes keep busy, at least 1), unless ``OMP_NUM_THREADS`` is set (torchrun sets it
            for several processes per machine), which is then left as it is.
    """
    if threads is not None:
        if threads < 1:
            from fgdistill.errors import ConfigError

            raise ConfigError(f"--threads: expected a count >= 1, got {threads}")
        torch.set_num_threads(threads)
        return threads
    if os.environ.get("OMP_NUM_THREADS"):
        return torch.get_num_threads()
    cores = min(usable_cores(), torch.get_num_threads())
    busy = busy_cores()
    free = cores if busy is None else max(1, cores - busy)
    if free < cores:
        logger.info(
            "%d of %d cores are busy with other processes: using %d thread(s)",
            cores - free,
            cores,
            free,
        )
    torch.set_num_threads(free)
    return free
