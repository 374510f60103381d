"""User-facing errors: each carries one line saying what is wrong and how to fix it."""


class DataFlexError(Exception):
    """Base of every error caused by user input (config or data); printed as one line, no traceback."""


class ConfigError(DataFlexError):
    """Bad or inconsistent configuration."""


class DataError(DataFlexError):
    """Bad input data (missing file, malformed line, missing column, empty after filtering...)."""


class CheckpointError(DataFlexError):
    """A checkpoint that is truncated, corrupt or from another model."""
