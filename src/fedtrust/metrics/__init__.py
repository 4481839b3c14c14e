"""Metrics: accuracy (overall, per class, per class group) and the clients' local test sets."""

from fedtrust.metrics.accuracy import accuracy, group_accuracy, local_test_indices, per_class_accuracy

__all__ = ["accuracy", "group_accuracy", "local_test_indices", "per_class_accuracy"]
