"""The error a sweep raises when it cannot start or go on; its message says what to do."""


class SweepError(RuntimeError):
    """A sweep that cannot start or go on; the message says what to do."""
