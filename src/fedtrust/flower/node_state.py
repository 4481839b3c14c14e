"""A Flower node's client state on its own disk, so it survives a resumed run (new nodes, empty contexts).

The node keeps its client's persistent state (FLIP's inversion cache, FedLoGe's
local head, Ditto's personal model) in ``context.state`` and never sends it. A
resumed run starts new nodes, so the node also writes that state after every
round it trains, one file per round, ``<folder>/round-<r>.safetensors``, each
written atomically with its checksum (:func:`~fedtrust.runner.checkpoint.write_verified`).
A node whose context holds no state reads back the newest version from before
the round it is asked for: after a resume from the server checkpoint of round R,
the first message a client gets is for a round after R, and the version it reads
is the one an uninterrupted run would hold then; versions from rounds the
killed run did past R are replaced as the resumed run redoes them.

It keeps the last ``keep`` versions (``checkpoint_every + 1``: enough to reach
back to the server's last checkpoint). The folder is the node-config key
``state-dir`` (``<state-dir>/client-<k>``), else, in a simulation, the run
directory's ``nodes/client-<k>``; a deployment's SuperNode without ``state-dir``
keeps its state in memory only, as before.
"""

from __future__ import annotations

import re
from pathlib import Path

from fedtrust.errors import CheckpointError
from fedtrust.fl.types import Message
from fedtrust.runner.checkpoint import read_verified, write_verified

_VERSION = re.compile(r"round-(\d+)\.safetensors")
_PREFIX = "client/state/"


class NodeStateFiles:
    """The versions of one client's state in ``folder`` (see the module docstring)."""

    def __init__(self, folder: Path, keep: int = 2) -> None:
        self.folder = Path(folder)
        self.keep = max(keep, 1)

    def versions(self) -> dict[int, Path]:
        """``{round: file}`` of the versions on disk, oldest first."""
        if not self.folder.is_dir():
            return {}
        found = {int(m.group(1)): p for p in self.folder.iterdir() if (m := _VERSION.fullmatch(p.name))}
        return dict(sorted(found.items()))

    def latest_before(self, round: int) -> Message | None:
        """The newest state written in a round before ``round`` (None: none); an unsound file is a
        one-line :class:`~fedtrust.errors.CheckpointError` naming it."""
        older = [r for r in self.versions() if r < round]
        if not older:
            return None
        tensors, meta = read_verified(self.versions()[older[-1]])
        arrays = {k[len(_PREFIX):]: v for k, v in tensors.items() if k.startswith(_PREFIX)}
        if meta.get("round") != older[-1]:
            raise CheckpointError(f"node state {str(self.versions()[older[-1]])!r} says round {meta.get('round')!r}")
        return Message(arrays, meta.get("meta", {}))

    def write(self, round: int, state: Message) -> None:
        """Keep ``state`` as the version of ``round``; drop versions of later rounds (a killed run's
        future, now redone) and all but the newest ``keep``."""
        self.folder.mkdir(parents=True, exist_ok=True)
        for r, path in self.versions().items():
            if r > round:
                path.unlink(missing_ok=True)
        tensors = {_PREFIX + k: v for k, v in state.arrays.items()}
        write_verified(self.folder / f"round-{round:06d}.safetensors", tensors, {"round": round, "meta": state.meta})
        stale = list(self.versions())[: -self.keep]
        for r in stale:
            self.versions()[r].unlink(missing_ok=True)
