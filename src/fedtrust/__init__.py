"""fedtrust: trustworthy federated learning in one library.

``fedtrust.run(config)`` runs a job and returns a :class:`RunResult`; the
``fedtrust`` command is a thin layer over it.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"


def run(*args: Any, **kwargs: Any) -> Any:
    """Run a federated job; see :func:`fedtrust.runner.run.run`."""
    from fedtrust.runner.run import run as _run

    return _run(*args, **kwargs)


__all__ = ["run", "__version__"]
