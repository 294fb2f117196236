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


class RetryLater(FFEngineError):
    """A refusal that carries ``retry_after`` (seconds): when asking again may succeed."""

    def __init__(self, message: str, retry_after: float):
        super().__init__(message)
        self.retry_after = float(retry_after)

    def __reduce__(self):  # crosses processes (a Ray or Serve call) with its retry_after
        return type(self), (self.args[0], self.retry_after)


class Overloaded(RetryLater):
    """The admission queue is full. ``retry_after`` (seconds) estimates when a slot frees up.  Here (not in the
    serving contract) because the engine's scheduler raises it and the engine sits below the serving layer."""


class UnknownStream(FFEngineError):
    """No stream with that id (never submitted, or forgotten after its retention period)."""
