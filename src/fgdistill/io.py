"""Small file helpers shared by the whole package: atomic writes and JSON-lines logs.

Every file a run leaves behind (checkpoints, ``stage.json``, results, logs rewritten on resume) is
written through :func:`atomic_write`: a crash leaves the old file or the new one, never half of
one, and two writers never share a temporary file.
"""

from __future__ import annotations

import errno
import functools
import json
import logging
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from fgdistill.errors import DataError, StorageError

__all__ = [
    "atomic_write",
    "atomic_write_text",
    "is_disk_full",
    "read_jsonl",
    "remove_temporaries",
    "write_json",
]

logger = logging.getLogger(__name__)


def atomic_write(
    path: str | Path, write: Callable[[IO[bytes]], Any], *, fsync: bool = False
) -> Path:
    """Call ``write`` on a unique temporary file beside ``path``, then rename it over ``path``.

    Args:
        path: the file to (re)place; its folder is created if needed.
        write: writes the whole content to the binary file object it is given.
        fsync: flush the file and its folder to disk before and after the rename (checkpoints:
            a power cut then leaves the old file or the new one too).

    Returns:
        ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            if fsync:
                fh.flush()
                os.fsync(fh.fileno())
        # mkstemp makes the file readable by its owner only; give it the usual mode
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        if is_disk_full(exc):
            raise StorageError(
                f"{path}: No space left on device (writing {path.name}); free some space "
                "and run again"
            ) from None
        raise
    if fsync:
        _fsync_dir(path.parent)
    return path


def is_disk_full(exc: BaseException) -> bool:
    """True for an error of a full disk or quota (``ENOSPC``, ``EDQUOT``), also when wrapped."""
    while exc is not None:
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]
    return False


def remove_temporaries(folder: str | Path) -> list[Path]:
    """Remove the temporary files that :func:`atomic_write` left in ``folder`` when killed.

    Only ``.NAME.*.tmp`` files directly in ``folder``; call it only while no other process
    writes there (with the work dir's lock held). Returns the removed files.
    """
    removed = []
    size = 0
    for tmp in Path(folder).glob(".*.tmp"):
        try:
            if tmp.is_file():
                size += tmp.stat().st_size
                tmp.unlink()
                removed.append(tmp)
        except OSError as exc:  # pragma: no cover - e.g. a read-only folder
            logger.warning("%s: cannot remove a leftover temporary file (%s)", tmp, exc.strerror)
    if removed:
        logger.info(
            "%s: removed %d temporary file(s) (%.1f MB) left by interrupted writes",
            folder,
            len(removed),
            size / 1e6,
        )
    return removed


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically (:func:`atomic_write`)."""
    data = text.encode("utf-8")
    return atomic_write(path, lambda fh: fh.write(data))


def write_json(path: str | Path, data: Any) -> Path:
    """Write ``data`` as indented JSON atomically; NaN and infinities become ``null``.

    Python's ``json`` would write ``NaN``, which is not JSON: ``jq`` and JavaScript refuse it.
    """
    return atomic_write_text(path, json.dumps(_finite(data), indent=2, default=str) + "\n")


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """The records of a JSON-lines file (``log.jsonl``), one JSON object per line.

    Blank lines are skipped; so is a truncated last line (a run still writing, or killed in a
    write), with a warning. Any other line that is not a JSON object is an error.

    Raises:
        DataError: naming the file and the line.
    """
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror})") from None
    records: list[dict[str, Any]] = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            if number == len(lines):
                logger.warning("%s: skipping truncated last line %d", path, number)
                continue
            raise DataError(f"{path}, line {number}: not valid JSON ({exc.msg})") from None
        if not isinstance(record, dict):
            raise DataError(f"{path}, line {number}: expected a JSON object")
        records.append(record)
    return records


def _finite(obj: Any) -> Any:
    """``obj`` with every non-finite float replaced by ``None``."""
    if isinstance(obj, float):
        return obj if obj == obj and abs(obj) != float("inf") else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_finite(v) for v in obj]
    return obj


@functools.cache
def _umask() -> int:
    """The process's umask, read once (reading it means setting it for a moment)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _fsync_dir(folder: Path) -> None:
    """Flush a folder's entries (the rename) to disk where the platform allows it."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
