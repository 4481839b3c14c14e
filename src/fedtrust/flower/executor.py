"""``executor=flower``: fedtrust's round loop with clients running as Flower ClientApps.

The loop is :meth:`Executor.run` unchanged (sample with ``sample_clients``,
``configure``, execute, ``aggregate``, callbacks after every round), so
metrics, checkpoints, progress and resume behave as on the sequential
executor. What differs is where it runs and how a round's clients execute:

- **simulation** (``fedtrust run executor=flower``): :meth:`FlowerExecutor.run`
  starts Flower's simulation engine with one virtual SuperNode per client; the
  loop runs inside its ServerApp (a thread of this process, so callbacks see
  the run directory as usual) and each client's ``client_update`` runs in the
  ClientApp on a Ray worker;
- **deployment** (``flwr run APP LINK``): the app's ServerApp binds the
  deployment's Grid with :func:`bind_grid` and calls ``fedtrust.run``; the
  executor finds the bound Grid and runs the loop on it.

:meth:`FlowerExecutor.execute` is :func:`~fedtrust.flower.server_app.exchange`:
a client whose node raises or does not answer within the round timeout
(``faults.round_timeout``, else ``flower.round-timeout``) is logged, recorded in
the round's ``failed`` metrics and left out of that round's aggregation, as on
the in-process executors (a round where every client raised a genuine error stops
the run with a one-line :class:`FedTrustError`).

A client's persistent state lives in its node's ``context.state`` and never
reaches the server: the server-side ``ClientStore`` stays as given (empty).
So a personalized algorithm's clients are evaluated where their state lives:
:meth:`FlowerExecutor.evaluate_clients` (the evaluation setup's
``client_evaluator``) sends the server state to every client's node in an
``evaluate`` message, and the node scores the predictors built with its own
state on its local test set and replies only the accuracies; the metrics then
equal the sequential executor's. A client whose node fails to answer is
logged and has no score (None) in that evaluation. A resumed run starts new
nodes; the checkpoint cannot hold what the server never saw, so each node keeps
its client state on its own disk as well (:mod:`fedtrust.flower.node_state`) and
a new node reads back the version from before the round it is first asked for.

This module imports without Flower; constructing the executor without it is a
one-line :class:`~fedtrust.errors.ConfigError` saying what to install.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from fedtrust.errors import FedTrustError
from fedtrust.fl.executor import Callback, ClientData, ClientStore, Executor, Replies
from fedtrust.fl.faults import Faults
from fedtrust.fl.sampling import Sampler, sample_clients
from fedtrust.robust.attacks import Attack
from fedtrust.fl.protocol import Algorithm, Message
from fedtrust.flower import LOGGER, require_flower
from fedtrust.registry import register

if TYPE_CHECKING:
    from flwr.app import Context
    from flwr.clientapp import ClientApp
    from flwr.serverapp import Grid

    from fedtrust.evaluation import ClientScores
    from fedtrust.flower.app_config import FlowerSettings
    from fedtrust.runner.config import RunConfig

log = logging.getLogger(LOGGER)


def _never() -> bool:
    return False


@dataclass(frozen=True)
class GridBinding:
    """A Grid to run rounds on, the adapter settings, and whether the surrounding run has stopped."""

    grid: Grid
    settings: FlowerSettings
    stopped: Callable[[], bool] = _never


_BOUND: contextvars.ContextVar[GridBinding | None] = contextvars.ContextVar("fedtrust_flower_grid", default=None)


@contextlib.contextmanager
def bind_grid(grid: Grid, settings: FlowerSettings) -> Iterator[None]:
    """Within this block, a :class:`FlowerExecutor` runs its rounds on ``grid`` instead of simulating.

    A context variable (scoped to the block and thread), so the ServerApp can
    call ``fedtrust.run`` unchanged.
    """
    token = _BOUND.set(GridBinding(grid, settings))
    try:
        yield
    finally:
        _BOUND.reset(token)


class _DropRunSimulationDeprecation(logging.Filter):
    """fedtrust calls Flower's in-process simulation entry point on purpose; hide its deprecation notice."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "`run_simulation` function is deprecated" not in record.getMessage()


@register("executor", "flower")
class FlowerExecutor(Executor):
    """Clients run as Flower ClientApps (simulation engine, or a deployment's SuperNodes)."""

    name = "flower"

    def __init__(self, algorithm: Algorithm, data: ClientData, seed: int, device: torch.device,
                 num_sampled: int, log: Callable[[str], None] | None = None, config: RunConfig | None = None,
                 attack: Attack | None = None, sampler: Sampler = sample_clients, faults: Faults | None = None) -> None:
        require_flower()
        super().__init__(algorithm, data, seed, device, num_sampled, log, attack, sampler, faults)
        self.config = config
        """The run's config: a simulation hands it to the ClientApps, which rebuild algorithm and data from it."""
        self._binding: GridBinding | None = None
        self._nodes: dict[int, int] = {}
        self._round = 0
        """The last round executed: evaluation (a callback after it) tags its messages with it."""

    # ---- the round loop --------------------------------------------------
    def run(self, state: Message, store: ClientStore, start_round: int, rounds: int,
            callbacks: Sequence[Callback] = (), should_stop: Callable[[], bool] | None = None) -> Message:
        """Rounds ``start_round + 1 … rounds`` on the bound Grid, else on Flower's simulation engine."""
        binding = _BOUND.get()
        if binding is not None:
            return self._run_on_grid(binding, state, store, start_round, rounds, callbacks, should_stop)
        if self.config is None:
            raise FedTrustError("executor=flower needs the run config to simulate; build it with build_federation")
        from fedtrust.flower.client_app import make_client_app
        from fedtrust.runner.config import config_to_dict

        return self.simulate(make_client_app(config_to_dict(self.config)), state, store, start_round, rounds,
                             callbacks, should_stop)

    def simulate(self, client_app: ClientApp, state: Message, store: ClientStore, start_round: int, rounds: int,
                 callbacks: Sequence[Callback] = (), should_stop: Callable[[], bool] | None = None,
                 settings: FlowerSettings | None = None) -> Message:
        """Run the rounds on Flower's simulation engine with ``client_app`` on one virtual node per client."""
        from flwr.serverapp import ServerApp
        from flwr.simulation import run_simulation

        from fedtrust.flower.app_config import FlowerSettings

        settings = settings or FlowerSettings()
        engine_down = threading.Event()  # lets the ServerApp thread stop waiting if the engine dies (or Ctrl-C)
        final: list[Message] = []
        server = ServerApp()

        @server.main()
        def main(grid: Grid, context: Context) -> None:
            binding = GridBinding(grid, settings, engine_down.is_set)
            final.append(self._run_on_grid(binding, state, store, start_round, rounds, callbacks, should_stop))

        quiet = _DropRunSimulationDeprecation()
        flwr_log = logging.getLogger("flwr")
        flwr_log.addFilter(quiet)
        try:
            run_simulation(server, client_app, num_supernodes=len(self.data), backend_config=self._backend_config())
        finally:
            engine_down.set()
            flwr_log.removeFilter(quiet)
        if not final:
            raise FedTrustError("the Flower simulation ended before its ServerApp finished the rounds")
        return final[0]

    def _run_on_grid(self, binding: GridBinding, state: Message, store: ClientStore, start_round: int, rounds: int,
                     callbacks: Sequence[Callback], should_stop: Callable[[], bool] | None) -> Message:
        from fedtrust.flower.server_app import discover_clients

        self._binding = binding
        try:
            self._nodes = discover_clients(binding.grid, len(self.data), binding.settings.join_timeout,
                                           binding.stopped)
            return super().run(state, store, start_round, rounds, callbacks, should_stop)
        finally:
            self._binding, self._nodes = None, {}

    # ---- one round's clients --------------------------------------------
    def execute(self, messages: dict[int, Message], round: int, store: ClientStore) -> Replies:
        """Send the round's messages through the Grid; failed clients are logged and left out."""
        from fedtrust.flower.server_app import exchange

        if self._binding is None:
            raise FedTrustError("FlowerExecutor.execute runs only inside run(): no Flower Grid is bound")
        self._round = round
        replies, failed = exchange(self._binding.grid, self._nodes, messages, round, self._round_timeout(),
                                   self.device, self._binding.stopped)
        for client, reason in failed.items():
            log.warning("round %d: client %d failed (%s)", round, client, reason)
        if failed and replies:
            log.warning("round %d: %d of %d clients replied", round, len(replies), len(messages))
        return Replies(replies, failed)

    def _round_timeout(self) -> float:
        """``faults.round_timeout`` when the config sets it, else the adapter's ``flower.round-timeout``."""
        configured = self.config.faults.round_timeout if self.config is not None else None
        return configured if configured is not None else self._binding.settings.round_timeout

    # ---- personalized evaluation on the nodes ---------------------------
    def evaluate_clients(self, state: Message, clients: Sequence[int]) -> dict[int, ClientScores | None]:
        """Each client's personalized scores, computed on its node with the state it keeps there.

        The evaluation setup's ``client_evaluator`` on Flower (``build_federation``
        wires it): :func:`~fedtrust.flower.server_app.score_clients` within the
        round timeout. A client that fails is logged and scored None; if all fail,
        a one-line :class:`FedTrustError`.
        """
        from fedtrust.flower.server_app import score_clients

        if self._binding is None:
            raise FedTrustError("FlowerExecutor.evaluate_clients runs only inside run(): no Flower Grid is bound")
        if not clients:
            return {}
        scores, failed = score_clients(self._binding.grid, self._nodes, state, clients, self._round,
                                       self._round_timeout(), self._binding.stopped)
        for client, reason in failed.items():
            log.warning("evaluation after round %d: client %d failed (%s); its personalized scores are None",
                        self._round, client, reason)
        if not scores:
            first = next(iter(failed.items()))
            raise FedTrustError(f"evaluation after round {self._round}: all {len(clients)} clients failed; "
                                f"client {first[0]}: {first[1]}")
        return {c: scores.get(c) for c in clients}

    def _backend_config(self) -> dict[str, Any]:
        """Ray resources: one CPU per virtual client (clients share the GPU when training on CUDA)."""
        cpus = os.cpu_count() or 1
        gpus = 1.0 / cpus if self.device.type == "cuda" else 0.0
        return {"client_resources": {"num_cpus": 1, "num_gpus": gpus},
                "init_args": {"logging_level": "ERROR", "log_to_driver": True}}
