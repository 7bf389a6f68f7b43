"""The exception hierarchy. Every error a user can cause derives from :class:`ExoLabError`;
its message names the problem and the fix, and the CLI prints it without a traceback."""
from __future__ import annotations


class ExoLabError(Exception):
    """Base class of every exo-lab error meant for a user."""


class ConfigError(ExoLabError):
    """config.yaml is missing, malformed or inconsistent."""


class ModelError(ExoLabError):
    """A model id or folder cannot be resolved, read or loaded."""


class PlanError(ExoLabError):
    """The model does not fit the cluster's memory (the message gives the numbers)."""


class ClusterError(ExoLabError):
    """An engine died, did not answer in time, or the cluster is not in a usable state."""


class RequestError(ExoLabError):
    """A generation request has invalid parameters (bad sampling values, context overflow)."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


class QueueFull(ClusterError):
    """Every KV slot is taken and the waiting queue is at its limit: try again shortly (the API
    answers 429 with Retry-After)."""

    def __init__(self, message: str, retry_after_s: float = 1.0):
        super().__init__(message)
        self.retry_after_s = retry_after_s
