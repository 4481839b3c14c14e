"""Flower adapters: any fedtrust algorithm as a Flower ServerApp + ClientApp.

| module | what |
| --- | --- |
| ``records`` | fedtrust ``Message`` <-> Flower records (arrays + config records, no pickle) |
| ``app_config`` | a fedtrust config <-> a Flower run config (``[tool.flwr.app.config]``) |
| ``client_app`` | the ClientApp: one SuperNode = one fedtrust client (node-config ``partition-id``) |
| ``server_app`` | the ServerApp side: client discovery, one round's exchange, the deployable ServerApp |
| ``executor`` | ``executor=flower``: the round loop on Flower's simulation engine or a deployment's Grid |
| ``app`` | ``server_app`` / ``client_app`` that ``flwr run`` loads; ``write_app`` (``fedtrust flower-app``) |

Flower is the optional extra ``fedtrust[flower]``. This package and
``executor`` import without it; everything else needs it, and
:func:`require_flower` turns its absence into one line saying what to install.
"""

from __future__ import annotations

import importlib.util

from fedtrust.errors import ConfigError

INSTALL_HINT = "pip install 'fedtrust[flower]'"
LOGGER = "flwr.fedtrust"
"""fedtrust's log on Flower: a child of Flower's logger, so its lines appear wherever Flower's do."""


def flower_available() -> bool:
    """True when ``flwr`` can be imported."""
    try:
        return importlib.util.find_spec("flwr") is not None
    except (ImportError, ValueError):  # e.g. sys.modules["flwr"] is None: imports of it are blocked
        return False


def require_flower(what: str = "executor=flower") -> None:
    """Raise a one-line :class:`ConfigError` when Flower is not installed."""
    if not flower_available():
        raise ConfigError(f"{what} needs Flower: {INSTALL_HINT}")
