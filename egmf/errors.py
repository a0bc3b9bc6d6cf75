"""Every error type of the project, each for one kind of problem; the message says what, where and the fix.

Entry points turn a ConfigError into exit code 2: a configuration or input
problem found before training started. Everything else that escapes is a
failure (exit code 1) with a traceback.
"""


class ConfigError(ValueError):
    """A configuration or input problem found before training; the message lists every problem found."""


class DataError(ValueError):
    """Bad input data or shards. The message says what is wrong, where, and how to fix it."""


class ModelPathError(ValueError):
    """The model directory is missing, incomplete or not a causal LM."""


class CheckpointError(ValueError):
    """A checkpoint folder that is incomplete or not a checkpoint."""


class TarFormatError(ValueError):
    """The bytes are not a readable tar archive (bad header, truncated data)."""


class NonFiniteLossError(RuntimeError):
    """Too many non-finite losses in a row: the run is diverging."""
