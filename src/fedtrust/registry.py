"""One registry for every named component (STYLE.md "What fedtrust should do" 1).

Components register under a *kind* ("algorithm", "model", "dataset",
"partitioner", "objective", "score", ...) and a *name*:

>>> @register("partitioner", "iid")
... def iid(...): ...

``get(kind, name)`` returns the object or raises a one-line
:class:`~fedtrust.errors.ConfigError` that lists the valid names and the
nearest matches. Registries are written only at import time.
"""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Callable
from typing import Any, TypeVar

from fedtrust.errors import ConfigError

T = TypeVar("T")

_REGISTRIES: dict[str, dict[str, Any]] = {}

# Modules whose import registers components; imported lazily on first lookup
# so `import fedtrust` stays cheap.
_PROVIDERS: tuple[str, ...] = (
    "fedtrust.data.datasets",
    "fedtrust.data.domains",
    "fedtrust.data.fedbn",
    "fedtrust.data.partition",
    "fedtrust.models",
    "fedtrust.algorithms",
    "fedtrust.objectives",
    "fedtrust.objectives.ood",
    "fedtrust.objectives.adversarial",
    "fedtrust.ood.scores",
    "fedtrust.data.outliers",
    "fedtrust.robust.aggregators",
    "fedtrust.robust.attacks",
    "fedtrust.robust.backdoor",
    "fedtrust.evaluation.evaluators",
    "fedtrust.fl.executor",
    "fedtrust.fl.vectorized",
    "fedtrust.flower.executor",
)
_loaded = False


def _load_providers() -> None:
    global _loaded
    if not _loaded:
        _loaded = True
        for module in _PROVIDERS:
            importlib.import_module(module)


def register(kind: str, name: str) -> Callable[[T], T]:
    """Decorator registering ``obj`` as component ``name`` of ``kind``."""

    def decorator(obj: T) -> T:
        table = _REGISTRIES.setdefault(kind, {})
        if name in table and table[name] is not obj:
            raise ValueError(f"{kind} {name!r} is registered twice")
        table[name] = obj
        return obj

    return decorator


def names(kind: str) -> list[str]:
    """Sorted names registered under ``kind``."""
    _load_providers()
    return sorted(_REGISTRIES.get(kind, {}))


def kinds() -> list[str]:
    """Every kind that has at least one registered component."""
    _load_providers()
    return sorted(_REGISTRIES)


def get(kind: str, name: str) -> Any:
    """Look up ``name`` under ``kind``; unknown names raise a one-line ConfigError."""
    _load_providers()
    table = _REGISTRIES.get(kind, {})
    if name in table:
        return table[name]
    valid = sorted(table)
    close = difflib.get_close_matches(str(name), valid, n=3)
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    raise ConfigError(f"unknown {kind} {name!r}{hint}; valid: {', '.join(valid) or 'none registered'}")
