"""One exception family so the CLI and server can turn every bad input into a one-line message."""


class FFEngineError(ValueError):
    """Base of every user-facing error: a ValueError whose message names the parameter and the allowed range."""


class ConfigError(FFEngineError):
    """A bad configuration value (page size, dtype, shape, policy parameter...)."""


class BudgetError(FFEngineError):
    """A page reservation or budget that cannot be honoured."""


class CheckpointError(FFEngineError):
    """A checkpoint whose keys or shapes do not match the model."""


class SnapshotError(FFEngineError):
    """A session snapshot that is malformed, of another format version, or of another model geometry."""
