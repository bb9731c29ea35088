"""Errors of a training run that are neither config nor data errors (importable without Lightning)."""


class NonFiniteError(RuntimeError):
    """Training produced a non-finite loss or gradient; the message names the epoch, step and task(s)."""
