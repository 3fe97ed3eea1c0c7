"""Errors a user sees. Every message says what was expected, what was found and what to do next."""

from __future__ import annotations


class ScannerError(Exception):
    """Base class of every error the scanner reports to a user (CLI exit 2..4, never a traceback)."""

    #: short machine-readable category used in reports and in the ``scanner_errors_total`` metric
    category: str = "error"


class ConfigError(ScannerError):
    """A setting, flag or environment variable has an invalid value."""

    category = "config"


class DatasetError(ScannerError):
    """Unknown dataset, too few images for the requested shots, empty OOD folder..."""

    category = "dataset"


class CheckpointError(ScannerError):
    """A checkpoint cannot be read, or its shapes do not match the backbone."""

    category = "checkpoint"


class UnsafeFileError(ScannerError):
    """A file would need to import code outside the allow-list to load. It was never executed."""

    category = "unsafe"

    def __init__(self, message: str, globals_found: list[str] | None = None) -> None:
        super().__init__(message)
        self.globals_found = list(globals_found or [])


class BackboneError(ScannerError):
    """The backbone a checkpoint needs is missing, or its content hash does not match."""

    category = "backbone"


class DetectionError(ScannerError):
    """The detector cannot run on this input (pool too small, NaNs, failing forward...)."""

    category = "detection"
