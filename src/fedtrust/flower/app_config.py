"""A fedtrust config as a Flower run config, and back.

Flower's run config (``[tool.flwr.app.config]`` of an app's ``pyproject.toml``,
overridable with ``flwr run --run-config``) is a flat mapping of dotted keys to
bool, int, float or str. fedtrust keys live under ``fedtrust.`` with their
usual dotted names (``fedtrust.data.alpha``), so ``flwr run APP LINK
--run-config "fedtrust.rounds=5 fedtrust.data.alpha=0.1"`` overrides them as
``fedtrust run`` would. Values TOML cannot hold (None, lists) travel as YAML
strings (``"null"``, ``"[0.9, 0.999]"``) and a string value is read as YAML,
exactly like a ``key=value`` override on the fedtrust command line. Settings of
the Flower adapter itself live under ``flower.`` (:class:`FlowerSettings`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from fedtrust.errors import ConfigError
from fedtrust.runner.config import RunConfig, build_config, config_to_dict, parse_override, set_dotted

FEDTRUST = "fedtrust"
FLOWER = "flower"


@dataclass(frozen=True)
class FlowerSettings:
    """How the ServerApp talks to the nodes (run-config keys ``flower.round-timeout`` …)."""

    round_timeout: float = 3600.0
    """Seconds to wait for a round's replies; a client without a reply by then failed that round."""
    join_timeout: float = 300.0
    """Seconds to wait until a SuperNode has joined for every partition-id 0 … num_clients − 1."""

    def to_table(self) -> dict[str, float]:
        """The ``[tool.flwr.app.config.flower]`` table of these settings."""
        return {name: getattr(self, attr) for attr, name in self._names().items()}

    @classmethod
    def _names(cls) -> dict[str, str]:
        return {f.name: f.name.replace("_", "-") for f in fields(cls)}

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any]) -> FlowerSettings:
        """The settings in a (flat) run config; an unknown ``flower.*`` key or a bad value is a one-line error."""
        keys = {f"{FLOWER}.{name}": attr for attr, name in cls._names().items()}
        for key in sorted(run_config):
            if key.startswith(FLOWER + ".") and key not in keys:
                raise ConfigError(f"unknown run-config key {key!r}; valid: {', '.join(keys)}")
        values = {}
        for key, attr in keys.items():
            value = run_config.get(key)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                raise ConfigError(f"run-config key {key!r} must be a number of seconds > 0 (got {value!r})")
            values[attr] = float(value)
        return cls(**values)


def _toml_value(value: Any) -> Any:
    """``value`` as TOML can hold it, such that :func:`_config_value` gives it back."""
    if isinstance(value, dict):
        return {k: _toml_value(v) for k, v in value.items()} if value else "{}"
    if isinstance(value, (bool, int, float)):
        return value
    if isinstance(value, str):
        return value if _config_value(value) == value else json.dumps(value)
    return json.dumps(value)  # None, lists: YAML flow style is a superset of JSON


def _config_value(raw: Any) -> Any:
    """A run-config value as a fedtrust config value: strings are read as YAML, like CLI overrides."""
    return parse_override(f"v={raw}")[1] if isinstance(raw, str) else raw


def config_table(cfg: RunConfig) -> dict[str, Any]:
    """The nested ``[tool.flwr.app.config]`` table of ``cfg`` (fedtrust keys under ``fedtrust``)."""
    tree = config_to_dict(cfg)
    table = {FEDTRUST: {k: _toml_value(v) for k, v in tree.items()}, FLOWER: FlowerSettings().to_table()}
    back = build_config(config_tree(flatten(table)))
    if config_to_dict(back) != tree:
        raise ConfigError("this config cannot be written as a Flower run config without changing it")
    return table


def flatten(table: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested tables → dotted keys, as Flower flattens ``[tool.flwr.app.config]``."""
    out: dict[str, Any] = {}
    for k, v in table.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def config_tree(run_config: Mapping[str, Any]) -> dict[str, Any]:
    """The fedtrust config tree held in a (flat) Flower run config."""
    tree: dict[str, Any] = {}
    prefix = FEDTRUST + "."
    for key, raw in run_config.items():
        if key.startswith(prefix):
            set_dotted(tree, key[len(prefix):], _config_value(raw))
    if not tree:
        raise ConfigError(f"the Flower run config holds no '{prefix}*' keys; write the app with `fedtrust flower-app`")
    return tree


def config_from_run_config(run_config: Mapping[str, Any], overrides: list[str] | None = None) -> RunConfig:
    """The validated fedtrust config of a Flower run (one-line ConfigError naming a bad key)."""
    return build_config(config_tree(run_config), overrides)


__all__ = ["FEDTRUST", "FLOWER", "FlowerSettings", "config_table", "config_tree", "config_from_run_config",
           "flatten"]
