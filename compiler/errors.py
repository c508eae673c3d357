"""Errors that carry a message for the user.

The CLI prints `str(error)` and exits non-zero; a traceback is shown only with `--debug`.
Each message names the problem and, where there is one, the fix.
"""


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
