"""Metrics: accuracy (overall, per class, per class group, per client)."""

from fedtrust.metrics.accuracy import (
    ClientAccuracy,
    accuracy,
    client_accuracy,
    global_client_accuracy,
    group_accuracy,
    local_test_indices,
    per_class_accuracy,
)

__all__ = [
    "ClientAccuracy",
    "accuracy",
    "client_accuracy",
    "global_client_accuracy",
    "group_accuracy",
    "local_test_indices",
    "per_class_accuracy",
]
