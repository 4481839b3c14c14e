"""Errors that fedtrust reports to users as one line.

Every error a user can cause (bad config, missing data, unknown name, shape
mismatch) is a :class:`FedTrustError`. The CLI prints ``error: <message>``
and exits with status 2, without a traceback.
"""

from __future__ import annotations


class FedTrustError(Exception):
    """A user-facing error whose message is one line saying what is wrong and what is expected."""


class ConfigError(FedTrustError):
    """A configuration key, type or value is invalid."""


class DataError(FedTrustError):
    """A data set is missing or malformed, or a partition cannot be built."""


class CheckpointError(FedTrustError):
    """A checkpoint is missing, corrupt, or belongs to a different config."""


class DivergenceError(FedTrustError):
    """Training diverged: the server model, the clients' updates or the model's outputs hold NaN/Inf."""
