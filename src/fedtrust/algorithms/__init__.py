"""Federated algorithms, one file each, registered under ``"algorithm"``."""

from fedtrust.algorithms import (  # noqa: F401  (import registers)
    ditto, fedavg, fedavg_ft, fedbabu, fedbn, fedetf, fedloge, fedper, fedprox, fedrep, fedrod, flip, heterofl, isbc, rna_moments, splitmix,
)
