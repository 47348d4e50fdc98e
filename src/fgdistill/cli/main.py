"""The ``fgdistill`` command line: parses arguments and calls the library.

Each group of sub-commands lives in its own module with a ``register(subparsers)`` function; the
list below is explicit, so nothing is registered by import side effects.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
import traceback
from collections.abc import Sequence

from fgdistill.errors import FgdistillError
from fgdistill.io import is_disk_full

# Modules that add sub-commands, in the order they appear in ``--help``.
_COMMAND_MODULES: tuple[str, ...] = (
    "fgdistill.cli.data_cmds",
    "fgdistill.cli.train_cmds",
    "fgdistill.cli.convert_cmds",
    "fgdistill.cli.viz_cmds",
    "fgdistill.cli.bench_cmds",
    "fgdistill.cli.export_cmds",
)


def build_parser() -> argparse.ArgumentParser:
    """Build the top-level parser with every sub-command registered."""
    parser = argparse.ArgumentParser(
        prog="fgdistill",
        description="Focal and Global Distillation (FGD) for torchvision object detectors.",
    )
    parser.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="log debug messages, and show the traceback of an unexpected error",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in _COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the process exit code.

    User errors (:class:`~fgdistill.errors.FgdistillError`, missing files) print one line on
    stderr and exit with code 2, never a bare traceback. Any other error is unexpected (a bug,
    or a failure of the system): it prints its type and message and the temporary file its
    traceback was written to, and exits with code 1; with ``-v`` the traceback is printed too.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
    )
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        if hasattr(args, "threads"):
            from fgdistill.engine.threads import fit_threads

            fit_threads(args.threads)
        return int(args.func(args) or 0)
    except (
        FgdistillError,
        FileNotFoundError,
        FileExistsError,
        PermissionError,
        IsADirectoryError,
        NotADirectoryError,
    ) as exc:
        print(f"error: {user_message(exc)}", file=sys.stderr)
        return 2
    except OSError as exc:
        if not is_disk_full(exc):
            return _unexpected(exc, verbose=args.verbose)
        where = f" ({exc.filename})" if getattr(exc, "filename", None) else ""
        print(
            f"error: No space left on device{where}; free some space and run again",
            file=sys.stderr,
        )
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # the last resort: no bare traceback unless asked for
        return _unexpected(exc, verbose=args.verbose)


def _unexpected(exc: BaseException, *, verbose: bool) -> int:
    """Report an error fgdistill does not know of (traceback to a file); exit code 1."""
    if verbose:
        traceback.print_exc()
    where = _save_traceback()
    print(
        f"error: unexpected {type(exc).__name__}: {user_message(exc)}\n"
        f"(not an input error fgdistill knows of; the traceback is in {where}: "
        "please report it if it looks like a bug)",
        file=sys.stderr,
    )
    return 1


def _save_traceback() -> str:
    """Write the exception being handled, with its traceback, to a new temporary file."""
    import tempfile

    try:
        with tempfile.NamedTemporaryFile(
            "w", prefix="fgdistill-error-", suffix=".txt", delete=False, encoding="utf-8"
        ) as out:
            traceback.print_exc(file=out)
        return out.name
    except OSError:
        return "nowhere (no temporary file could be written; run again with -v)"


def user_message(exc: BaseException) -> str:
    """The message of ``exc``; for an error re-raised from a DataLoader worker, the worker's own.

    PyTorch re-raises a worker's exception with the worker's whole traceback as its message;
    the original message is the text after the traceback's last line's ``module.Type: ``.
    """
    text = str(exc)
    if text.startswith("Caught ") and "\nOriginal Traceback" in text:
        cls = type(exc)
        name = (
            cls.__qualname__
            if cls.__module__ == "builtins"
            else f"{cls.__module__}.{cls.__qualname__}"
        )
        at = text.rfind(f"\n{name}: ")
        if at >= 0:
            return text[at + len(name) + 3 :].strip()
    return text


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
