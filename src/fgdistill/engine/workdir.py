"""Guarding a training work dir: one process at a time, no silent overwrite, no silent change.

* :func:`lock_work_dir` holds an exclusive ``flock`` on ``WORK_DIR/.fgdistill.lock`` for as
  long as a command writes there. The kernel drops the lock when the process ends, however it
  ends (``kill -9`` included), so a lock file left by a dead process is simply taken over.
* :func:`check_fresh_start` refuses to start a run afresh over a finished or interrupted one
  (``--overwrite`` allows it).
* :func:`config_changes` lists what a resumed run's config changes from the run's own
  ``config.yaml``; :func:`check_resume_config` refuses changes that alter the run
  (``--allow-config-change`` allows them).
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Collection, Iterator, Mapping
from pathlib import Path
from typing import Any

from fgdistill.errors import WorkDirError

__all__ = [
    "LOCK_NAME",
    "RUN_ALTERING",
    "check_fresh_start",
    "check_resume_config",
    "config_changes",
    "lock_work_dir",
]

logger = logging.getLogger(__name__)

LOCK_NAME = ".fgdistill.lock"

#: config keys (dotted prefixes) whose change alters what a run computes
RUN_ALTERING: tuple[str, ...] = ("model", "data", "optim", "distill", "seed", "amp")

#: keys under those prefixes that do not alter the weights (evaluation and loading only)
RUN_NEUTRAL: tuple[str, ...] = ("data.eval_batch_size", "data.num_workers")

#: files that mark a work dir as holding a finished or interrupted run
RUN_FILES: tuple[str, ...] = ("last.pt", "best.pt", "model.pt", "student.pt")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # pragma: no cover - someone else's process
        return True
    return True


@contextlib.contextmanager
def lock_work_dir(work_dir: str | Path, command: str = "fgdistill") -> Iterator[Path]:
    """Hold the work dir's lock while the block runs; the folder is created.

    Raises:
        WorkDirError: another process holds the lock (its pid and command are named), or the
            work dir is a file.
    """
    folder = Path(work_dir)
    if folder.exists() and not folder.is_dir():
        raise WorkDirError(f"{folder}: the work dir is a file, not a folder")
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX: no locking
        yield folder
        return
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            raise WorkDirError(
                f"{folder}: in use by another fgdistill process ({holder}); wait for it to "
                "finish, or use another --work-dir"
            ) from None
        previous = _read_holder(fd)
        pid = _holder_pid(fd)
        if pid is not None and pid != os.getpid() and not _pid_alive(pid):
            logger.info(
                "%s: taking over the lock left by %s, which is no longer running", folder, previous
            )
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} {command} {time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode(), 0)
        try:
            yield folder
        finally:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)  # a clean exit leaves no holder behind
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def _read_holder(fd: int) -> str:
    try:
        text = os.pread(fd, 512, 0).decode("utf-8", "replace").strip()
    except OSError:  # pragma: no cover
        text = ""
    if not text:
        return "pid unknown"
    pid, _, rest = text.partition(" ")
    return f"pid {pid}, {rest}" if rest else f"pid {pid}"


def _holder_pid(fd: int) -> int | None:
    try:
        return int(os.pread(fd, 64, 0).split()[0])
    except (OSError, ValueError, IndexError):
        return None


def check_fresh_start(
    work_dir: str | Path, *, overwrite: bool, keep: Collection[Path] = (), resume: bool = False
) -> None:
    """Refuse a fresh start in a work dir holding an earlier run's checkpoints or weights.

    ``keep`` are this run's own inputs (a teacher in the same folder): they do not count.

    Raises:
        WorkDirError: naming the files and ``--overwrite`` (and ``--resume`` where it applies).
    """
    if overwrite:
        return
    folder = Path(work_dir)
    kept = {p.name for p in keep if p.parent == folder.resolve()}
    found = [n for n in RUN_FILES if n not in kept and (folder / n).is_file()]
    if not found:
        return
    hint = "; continue it with --resume" if "last.pt" in found and not resume else ""
    raise WorkDirError(
        f"{folder}: holds an earlier run ({', '.join(found)}); starting afresh would delete "
        f"it. Pass --overwrite to replace it{hint}, or use another --work-dir"
    )


def _flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(data, Mapping):
        out: dict[str, Any] = {}
        for key, value in data.items():
            out.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
        if not data and prefix:
            out[prefix] = {}
        return out
    return {prefix: data}


def config_changes(
    old: Mapping[str, Any], new: Mapping[str, Any], *, altering_only: bool = True
) -> list[tuple[str, Any, Any]]:
    """``(dotted key, old value, new value)`` for every setting that differs, sorted by key.

    With ``altering_only`` just the keys under :data:`RUN_ALTERING` that are not in
    :data:`RUN_NEUTRAL` (a new ``log_interval`` or ``eval_batch_size`` does not alter a run).
    """
    a, b = _flatten(old), _flatten(new)
    missing = object()
    changes = []
    for key in sorted(set(a) | set(b)):
        va, vb = a.get(key, missing), b.get(key, missing)
        if va == vb:
            continue
        if altering_only and (
            not any(key == p or key.startswith(p + ".") for p in RUN_ALTERING)
            or any(key == p or key.startswith(p + ".") for p in RUN_NEUTRAL)
        ):
            continue
        changes.append((key, None if va is missing else va, None if vb is missing else vb))
    return changes


def check_resume_config(
    old: Mapping[str, Any] | None,
    new: Mapping[str, Any],
    *,
    source: str | Path,
    allow: bool,
) -> list[tuple[str, Any, Any]]:
    """Compare a resumed run's config with the run's own; refuse changes unless ``allow``.

    Returns the changes (logged as a warning when allowed).

    Raises:
        WorkDirError: listing the changed keys with their old and new values and naming
            ``--allow-config-change``.
    """
    if old is None:
        return []
    changes = config_changes(old, new)
    if not changes:
        return []
    listing = "; ".join(f"{k}: {va!r} -> {vb!r}" for k, va, vb in changes[:8])
    if len(changes) > 8:
        listing += f"; and {len(changes) - 8} more"
    if not allow:
        raise WorkDirError(
            f"resume: the config differs from the run's own ({source}) in {listing}. Resuming "
            "with a changed model, data, optimizer, schedule or seed is not the same run: undo "
            "the change, pass --allow-config-change to continue anyway, or start a new run in "
            "another --work-dir"
        )
    logger.warning("resume: continuing with a changed config (%s)", listing)
    return changes
