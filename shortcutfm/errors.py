"""Errors that stop a command with a one-line message (the CLI prints it on stderr and exits with status 2).

Each module keeps its own specific exceptions (``ConfigError``, ``DataError``, ``CacheError``,
``CheckpointError`` are ``ValueError``/``RuntimeError`` subclasses; ``WriteError`` is an ``OSError``); the ones
here are the run-time stops that belong to no single input.
"""

from __future__ import annotations

__all__ = ["RunStopped", "NonFiniteError", "ExistingRunError"]


class RunStopped(RuntimeError):
    """A run cannot go on; the message says where it stopped, what was kept, and what to do."""


class NonFiniteError(RunStopped):
    """The loss or the gradients became NaN or infinite; the message names the step and the last checkpoint."""


class ExistingRunError(RunStopped):
    """A fresh run was started in a folder that holds another run's checkpoints or model."""
