"""Federated algorithms, one file each, registered under ``"algorithm"``."""

from fedtrust.algorithms import fedavg, fedprox  # noqa: F401  (import registers)
