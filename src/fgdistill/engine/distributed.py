"""Multi-process helpers for ``torchrun`` and DistributedDataParallel.

``torchrun --nproc_per_node=8 -m fgdistill.cli.main distill CONFIG`` sets ``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK`` and ``MASTER_ADDR``/``MASTER_PORT``; :func:`init_from_env` reads
them and starts the process group: NCCL when the run uses CUDA, gloo on CPU. Without those
variables everything here degrades to a single process (rank 0 of 1).

Only rank 0 writes files (checkpoints, logs, configs); the others compute and take part in
collectives. :func:`wrap_ddp` wraps only the trainable module: for distillation that is the
:class:`~fgdistill.models.Distiller`, whose parameters are the student and the FGD modules; the
frozen teacher is held outside its parameters and is never synchronised.
"""

from __future__ import annotations

import logging
import os
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

__all__ = [
    "all_gather_object",
    "barrier",
    "cleanup",
    "collective_device",
    "get_rank",
    "get_world_size",
    "init_from_env",
    "is_distributed",
    "is_main",
    "reduce_mean",
    "wrap_ddp",
]

logger = logging.getLogger(__name__)


def is_distributed() -> bool:
    """True when a process group is initialised with more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def get_rank() -> int:
    """This process's rank (0 without a process group)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return 0


def get_world_size() -> int:
    """Number of processes (1 without a process group)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def is_main() -> bool:
    """True on rank 0, the only process that writes files and prints progress."""
    return get_rank() == 0


def init_from_env(device: str = "auto", timeout_s: float = 1800.0) -> torch.device:
    """Initialise the process group from torchrun's environment and pick this rank's device.

    Args:
        device: ``"auto"`` (CUDA when available), ``"cuda"`` or ``"cpu"``.
        timeout_s: collective timeout.

    Returns:
        The device this process trains on (``cuda:LOCAL_RANK`` or ``cpu``).
    """
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        from fgdistill.errors import ConfigError

        raise ConfigError("device: 'cuda' requested but no CUDA device is available")
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if use_cuda else "gloo"
        dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s))
        logger.info(
            "process group: backend %s, rank %d of %d", backend, get_rank(), get_world_size()
        )
    return dev


def cleanup() -> None:
    """Destroy the process group if one was started."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    """Wait for every rank (no-op in a single process)."""
    if is_distributed():
        dist.barrier()


def all_gather_object(obj: Any) -> list[Any]:
    """Gather a picklable object from every rank; ``[obj]`` in a single process."""
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * get_world_size()
    dist.all_gather_object(out, obj)
    return out


def wrap_ddp(module: nn.Module, device: torch.device) -> nn.Module:
    """Wrap ``module`` in DistributedDataParallel when running distributed, else return it.

    ``module`` must be the trainable part only (a detector, or a Distiller whose teacher is not
    among its parameters). ``find_unused_parameters`` is on because detection heads may leave
    parameters unused in a step (e.g. a mask head on images without instances).
    """
    if not is_distributed():
        return module
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(module, device_ids=device_ids, find_unused_parameters=True)


def reduce_mean(values: dict[str, float]) -> dict[str, float]:
    """Average a dict of floats over ranks (for logging); identity in a single process."""
    if not is_distributed() or not values:
        return dict(values)
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=collective_device())
    dist.all_reduce(t)
    t /= get_world_size()
    return {k: float(v) for k, v in zip(keys, t.tolist(), strict=True)}


def collective_device() -> torch.device:
    """The device a tensor must be on for the process group's collectives.

    NCCL reduces CUDA tensors only (this rank's current device); gloo reduces CPU tensors.
    """
    if is_distributed() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
