"""Exceptions raised by fgdistill.

Every error a user can cause (bad data, bad config, bad checkpoint, incompatible models) is an
:class:`FgdistillError`. The command line catches these and prints their message without a
traceback. They also derive from :class:`ValueError` so that library callers can catch them the
ordinary way.
"""

from __future__ import annotations


class FgdistillError(ValueError):
    """Base class for every user-facing error in fgdistill."""


class DataError(FgdistillError):
    """A dataset file, annotation or image is missing or malformed."""


class ConfigError(FgdistillError):
    """A configuration file or override is invalid."""


class CheckpointError(FgdistillError):
    """A checkpoint is missing, corrupt, or does not fit the model."""


class CompatibilityError(FgdistillError):
    """A teacher and a student cannot be paired for distillation."""


class NonFiniteError(FgdistillError):
    """A feature map or a loss became NaN or infinite: training diverged, or the input is bad."""


class NonFiniteLossError(NonFiniteError):
    """A loss term became NaN or infinite; the run stops before the bad update is applied."""


class ExportError(FgdistillError):
    """A detector cannot be exported, or its exported file does not compute what it computes."""


class StorageError(FgdistillError):
    """A file could not be written: the disk is full, or the folder is not writable."""


class WorkDirError(FgdistillError):
    """A work dir is in use by another process, holds a finished run, or belongs to another
    config."""
