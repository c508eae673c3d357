"""Errors that carry a message for the user.

The CLI prints `str(error)` and exits non-zero; a traceback is shown only with `--debug`.
Each message names the problem and, where there is one, the fix.
"""

import errno


class SlimcError(Exception):
    """Base class: any error a user can act on."""


class ConfigError(SlimcError):
    """The YAML config or a command-line override is invalid."""


class ModelLoadError(SlimcError):
    """The model path, its files or its family cannot be used."""


class UnsupportedModelError(ModelLoadError):
    """The model's architecture has no frontend."""


class TraceError(SlimcError):
    """A block could not be traced into an fx graph, or the graph disagrees with the block."""


class PassError(SlimcError):
    """A pass failed, including the equivalence check of a function-preserving pass."""


class ExportError(SlimcError):
    """An output could not be written or failed its read-back check."""


class DataError(SlimcError):
    """Calibration or evaluation data is missing or unusable."""


class MissingExtraError(SlimcError):
    """What was asked for needs an optional part of slimc (an extra such as `slimc[onnx]`) that is not installed."""


# OSErrors a user fixes (space, permissions), not a bug in slimc.
SPACE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
PERMISSION_ERRNOS = frozenset({errno.EACCES, errno.EPERM, errno.EROFS})


def describe_os_error(error: OSError, path: object = None) -> str | None:
    """A message naming the path and the fix for an OSError the user can act on (full disk, no permission),
    else None. `path` stands in when the error names no file (a failed write reports none)."""
    where = error.filename if error.filename is not None else path
    place = f" {where}" if where is not None else ""
    if error.errno in SPACE_ERRNOS:
        return f"no space left writing{place} ({error.strerror}); free disk space or write somewhere else"
    if error.errno in PERMISSION_ERRNOS:
        return (f"cannot access{place} ({error.strerror}); make it readable/writable for this user, "
                "or use another location")
    return None
