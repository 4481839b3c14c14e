"""The vectorised executor: a round's clients train together (``executor=vectorized``).

Clients whose :class:`~fedtrust.fl.protocol.LocalTraining` share an
architecture (same parameter names and shapes), trainable set, loss, optimizer
spec, batch size and augmentation form a group. A group's parameters, BN
buffers and optimizer states are stacked along a leading client axis and one
``torch.func.vmap`` of ``grad_and_value`` over ``functional_call`` computes
every client's step at once, each on its own minibatch from its own indices.

Unequal client sizes and step counts are handled by masking: at step t only
clients that still have a batch take part, and clients whose batch at step t
has a different size (the last, partial batch of an epoch) run as their own
sub-group, so BN batch statistics are exactly those of the sequential
trainer. Every client draws batches and augmentation from its own generator
in the same order as the sequential trainer, so both executors give the same
result up to float tolerance.

A client may train several plans on one batch schedule (``local_training``
returns a list: Split-Mix's base nets). Each (client, plan) is a job, grouped by
its plan's shape, so clients training different subsets of the same bases still
train together; every job of a client reads the client's one schedule.

An algorithm whose client is not declarative (``local_training`` returns None)
runs through the sequential path; the run log says so once.
"""

from __future__ import annotations

import math

from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad_and_value, vmap

from fedtrust.data.augment import concat_draws
from fedtrust.fl.executor import ClientStore, Executor, Replies
from fedtrust.fl.local import ClientSchedule, assemble_batch, check_shared_schedule, client_schedule, plan_list
from fedtrust.fl.protocol import Algorithm
from fedtrust.data.types import ImageSet
from fedtrust.fl.types import ClientContext, LocalTraining, Message, TrainResult
from fedtrust.fl.sampling import client_generator, seed_global_rngs
from fedtrust.fl.stacked_optim import StackedOptimizer
from fedtrust.registry import register


class _LossModule(nn.Module):
    """Wraps (model, loss) so ``functional_call`` can swap in one client's tensors."""

    def __init__(self, model: nn.Module, loss: Callable[..., Tensor]) -> None:
        super().__init__()
        self.model = model
        self.loss = loss

    def forward(self, params: dict[str, Tensor], batch: dict[str, Tensor], ref: dict[str, Tensor]) -> Tensor:
        return self.loss(self.model, params, batch, ref)


def _group_key(plan: LocalTraining) -> tuple:
    shapes = tuple((k, tuple(v.shape), v.dtype) for k, v in plan.init.items())
    return (id(plan.model), shapes, plan.trainable, plan.loss, plan.optimizer, plan.batch_size, plan.augment,
            tuple(sorted(plan.ref)), plan.views, plan.outliers is None, plan.outlier_ratio,
            plan.optimizer_state is None, tuple(sorted(plan.grad_mask or {})))


@dataclass
class _Client:
    """One (client, plan) job of a group: its plan, the client's data indices and its drawn schedule."""

    cid: int
    plan: LocalTraining
    indices: Tensor
    schedule: ClientSchedule
    generator: torch.Generator
    slot: int = 0
    """Which of the client's plans this job trains (Split-Mix: which base net)."""

    @property
    def batches(self) -> list[Tensor]:
        return self.schedule.batches


@register("executor", "vectorized")
class VectorizedExecutor(Executor):
    """Trains the clients of a round together with ``torch.func.vmap``."""

    name = "vectorized"

    def __init__(self, *args: Any, group_bytes: int | None | str = "auto", **kwargs: Any) -> None:
        """``group_bytes``: the most bytes of client state (parameters and buffers) stacked in one
        vmapped group; larger groups train in chunks. ``"auto"``: :func:`default_group_bytes`."""
        super().__init__(*args, **kwargs)
        self.group_bytes = default_group_bytes(self.device) if group_bytes == "auto" else group_bytes
        self._warned = False

    def execute(self, messages: dict[int, Message], round: int, store: ClientStore) -> Replies:
        seed_global_rngs(client_generator(self.seed, round, 2**31).initial_seed())  # dropout under vmap
        replies: dict[int, Message] = {}
        errors: dict[int, BaseException] = {}
        groups: dict[tuple, list[_Client]] = defaultdict(list)
        contexts: dict[int, ClientContext] = {}
        plans: dict[int, LocalTraining | list[LocalTraining]] = {}
        general: dict[int, tuple[Message, ImageSet, Message, ClientContext]] = {}
        for c in sorted(messages):
            ctx = contexts[c] = self.client_context(c, round)
            try:
                plan = self.runtime.plan(messages[c], store.get(c), ctx)
            except Exception as e:  # noqa: BLE001 - this client's failure: recorded, left out of the round
                errors[c] = e
                continue
            if plan is None:
                general[c] = (messages[c], self.data.client(c), store.get(c), ctx)
                continue
            plans[c] = plan
            for job in self._jobs(c, plan_list(plan), ctx):
                groups[_group_key(job.plan)].append(job)
        if general:  # the general path: client programs in lock-step (FLIP's inversions batched), else alone
            self._warn_fallback()
            done, failed = self.runtime.run_together(general)
            errors.update(failed)
            for c, (reply, state) in done.items():
                store.set(c, state)
                replies[c] = reply
        results: dict[tuple[int, int], TrainResult] = {}
        for members in groups.values():
            for chunk in chunked(members, clients_per_group(members[0].plan, self.group_bytes)):
                results.update(self._train_group(chunk))
        for c, plan in plans.items():  # the context whose generator trained the client, as on the sequential path
            done = [results[(c, j)] for j in range(len(plan_list(plan)))]
            reply, state = self.runtime.finish(messages[c], done if isinstance(plan, list) else done[0],
                                               store.get(c), contexts[c])
            store.set(c, state)
            replies[c] = reply
        return Replies(replies, errors=errors)

    def _warn_fallback(self) -> None:
        if not self._warned and has_program(self.algorithm):
            self._warned = True
            self.log(f"algorithm {self.algorithm.name!r} trains by a client program: the round's programs run "
                     "in lock-step, their requests (FLIP's inversions) batched across clients")
        elif not self._warned:
            self._warned = True
            self.log(f"some clients of algorithm {self.algorithm.name!r} have no declarative local training "
                     "(or an attack changes their data): they run one after another (sequential path)")

    # ------------------------------------------------------------------ one group

    def _jobs(self, c: int, plans: list[LocalTraining], ctx: ClientContext) -> list[_Client]:
        """One job per plan of client ``c``, all on the client's one schedule (batches and augmentation
        draws, made up front from its generator exactly as the sequential trainer makes them)."""
        idx = self.data.indices[c]
        schedule = client_schedule(check_shared_schedule(plans), len(idx), ctx.generator, self.data.train.x.shape[-1])
        return [_Client(c, plan, idx, schedule, ctx.generator, j) for j, plan in enumerate(plans)]

    def _train_group(self, clients: list[_Client]) -> dict[tuple[int, int], TrainResult]:
        plan = clients[0].plan
        model = plan.model.to(self.device).train()
        param_names = [n for n, _ in model.named_parameters()]
        trainable = set(plan.trainable)

        def stack(tensors: list[Tensor]) -> Tensor:  # plans may hold CPU (message) and device tensors
            return torch.stack([t.to(self.device) for t in tensors])

        params = {k: stack([cl.plan.init[k] for cl in clients]) for k in param_names if k in trainable}
        frozen = {k: stack([cl.plan.init[k] for cl in clients]) for k in param_names if k not in trainable}
        buffers = {k: stack([cl.plan.init[k] for cl in clients]) for k, _ in model.named_buffers()}
        ref = {k: stack([cl.plan.ref[k] for cl in clients]) for k in plan.ref}
        optimizer = StackedOptimizer(plan.optimizer, params, len(clients))
        for i, cl in enumerate(clients):
            if cl.plan.optimizer_state:
                optimizer.load_row(i, cl.plan.optimizer_state)
        loss_sum = torch.zeros(len(clients), device=self.device)
        masks = {k: stack([cl.plan.grad_mask[k] for cl in clients])
                 for k in (plan.grad_mask or {})}
        step_fn = _step_function(_LossModule(model, plan.loss))

        for t in range(max(len(cl.batches) for cl in clients)):
            by_size: dict[int, list[int]] = defaultdict(list)
            for i, cl in enumerate(clients):
                if t < len(cl.batches):
                    by_size[len(cl.batches[t])].append(i)
            for rows in by_size.values():
                batch = self._batch([clients[i] for i in rows], t)
                whole = len(rows) == len(clients)
                sel = None if whole else torch.tensor(rows, device=self.device)
                pick = (lambda d: d) if whole else (lambda d: {k: v[sel] for k, v in d.items()})  # noqa: E731
                bufs = pick(buffers)
                grads, losses = step_fn(pick(params), pick(frozen), bufs, pick(ref), batch)
                for k, m in pick(masks).items():
                    grads[k] = grads[k] * m.to(grads[k].dtype)
                if not whole:
                    for k, v in bufs.items():
                        buffers[k][sel] = v
                factor = None
                if plan.optimizer.milestones:  # each row's lr at its own step t of its own total
                    factor = torch.tensor([plan.optimizer.lr_factor(t, len(clients[i].batches)) for i in rows],
                                          dtype=torch.float64)
                optimizer.step(grads, sel, factor)
                loss_sum.index_add_(0, torch.tensor(rows, device=self.device), losses.detach())
        return self._results(clients, params, frozen, buffers, loss_sum, optimizer)

    def _batch(self, clients: Sequence[_Client], t: int) -> dict[str, Tensor]:
        """The step-``t`` batches of ``clients``, stacked: every entry is (clients, B, ...)."""
        plan, train = clients[0].plan, self.data.train
        idx = torch.stack([cl.indices[cl.batches[t].to(cl.indices.device)] for cl in clients])
        outliers = None
        if plan.outliers is not None:
            outliers = torch.cat([cl.plan.outliers[cl.schedule.outlier_batches[t].to(cl.plan.outliers.device)]
                                  for cl in clients])
        per_client = [cl.schedule.draws[t] for cl in clients]
        draws = {k: concat_draws([d[k] for d in per_client]) for k in per_client[0]}
        batch = assemble_batch(train.x[idx.flatten()], train.y[idx], outliers, plan.views, plan.augment, draws,
                               self.algorithm.ctx.normalize)
        m = len(clients)
        return {k: v if k == "y" else v.view(m, -1, *v.shape[1:]) for k, v in batch.items()}

    def _results(self, clients: list[_Client], params: dict[str, Tensor], frozen: dict[str, Tensor],
                 buffers: dict[str, Tensor], loss_sum: Tensor,
                 optimizer: StackedOptimizer) -> dict[tuple[int, int], TrainResult]:
        losses = loss_sum.cpu().tolist()
        stacked = {k: v.detach().cpu() for k, v in (buffers | frozen | params).items()}  # one copy off the device
        out = {}
        for i, cl in enumerate(clients):
            state = {k: stacked[k][i].clone() for k in cl.plan.init}
            n = len(cl.batches)
            kept = None if cl.plan.optimizer_state is None else optimizer.row_state(i)
            out[(cl.cid, cl.slot)] = TrainResult(state=state, num_examples=len(cl.indices), steps=n,
                                                 mean_loss=losses[i] / n if n else float("nan"), optimizer_state=kept)
        return out


def _step_function(module: _LossModule) -> Callable[..., tuple[dict[str, Tensor], Tensor]]:
    """vmap over clients of (∇_params loss, loss) for one minibatch each."""

    def loss_of(params: dict[str, Tensor], frozen: dict[str, Tensor], buffers: dict[str, Tensor],
                ref: dict[str, Tensor], batch: dict[str, Tensor]) -> Tensor:
        tensors = {f"model.{k}": v for k, v in (params | frozen | buffers).items()}
        return functional_call(module, tensors, (params, batch, ref))

    return vmap(grad_and_value(loss_of), randomness="different")


def is_declarative(algorithm: Algorithm) -> bool:
    """True when the algorithm states its local training declaratively (so it can be vectorised):
    its class says so (``declarative``), not merely that it overrides ``local_training``."""
    return bool(type(algorithm).declarative)


def has_program(algorithm: Algorithm) -> bool:
    """True when the algorithm writes its general client path as a program of batchable requests
    (:meth:`~fedtrust.fl.protocol.Algorithm.client_program` overridden; FLIP)."""
    return type(algorithm).client_program is not Algorithm.client_program


CPU_GROUP_BYTES = 16 * 2**20
"""On a CPU, the most client state stacked in one vmapped group: half a last-level cache.

Measured in benchmarks/results/speed.md (digits ``cnn``, 0.4 MB per client, 2-core EPYC with a
32 MiB L3): vectorising 10 or 50 clients (4 or 19 MB stacked) is faster than one client after
another; 100 clients (38 MB) is not, and 50 CIFAR ``cnn2`` clients (430 MB) are 2.6x slower,
because every vmapped operator then streams all clients' weights (and gradients, and optimizer
state) through memory where the sequential trainer keeps one client's in cache from forward
to optimizer step.
"""
MIN_CPU_GROUP = 4
"""``executor=auto`` on a CPU vectorises only when this many clients fit in one group: with
chunks of 3 CIFAR ``cnn2`` clients the vectorised executor is still 1.2x slower than sequential."""


CPU_MAX_PIXELS = 16 * 16
"""``executor=auto`` on a CPU vectorises only inputs of at most this many pixels (H·W) a channel.

Measured (one torch thread, 100 clients, 10 a round; issue 16's notes): on 8×8 digits vectorising is
1.3–1.7× faster (benchmarks/results/speed.md); on 28×28 MNIST one client at a time is faster, FedAvg ``cnn``
about 12 vs 14 s a round and Split-Mix's 8 bases of width 1/8 on MNIST domains 6.5 vs 11.5 s
(benchmarks/results/hetero_width.md), as on 32×32 CIFAR-10 ``cnn2`` (3.3 vs 4.9 s, speed.md §2b): a vmapped
convolution is a grouped one, and on a CPU those are slower than one client's batched convolution once the
feature maps are large. GUESS: 16×16 splits the two measured sizes."""


def default_group_bytes(device: torch.device | str) -> int | None:
    """The vectorised executor's group budget on ``device``: :data:`CPU_GROUP_BYTES` on a CPU, none elsewhere."""
    return CPU_GROUP_BYTES if torch.device(device).type == "cpu" else None


def state_bytes(state: dict[str, Tensor] | nn.Module) -> int:
    """Bytes of a state dict's tensors (a module's parameters and buffers)."""
    tensors = state.state_dict().values() if isinstance(state, nn.Module) else state.values()
    return sum(t.numel() * t.element_size() for t in tensors)


def clients_per_group(plan: LocalTraining, group_bytes: int | None) -> int | None:
    """How many clients of ``plan``'s shape fit in ``group_bytes`` (at least one); None: no limit."""
    if group_bytes is None:
        return None
    return max(1, group_bytes // max(1, state_bytes(plan.init)))


def chunked(items: list, size: int | None) -> list[list]:
    """``items`` in consecutive chunks of at most ``size`` (one chunk when ``size`` is None)."""
    if size is None or size >= len(items):
        return [items]
    return [items[i:i + size] for i in range(0, len(items), size)]


def choose_executor(algorithm: Algorithm, clients_per_round: int, device: torch.device | str = "cpu",
                    input_shape: tuple[int, ...] | None = None) -> str:
    """``executor=auto``: vectorised when clients train declaratively and several train per
    round, and, on a CPU, :data:`MIN_CPU_GROUP` clients' state fits in
    :data:`CPU_GROUP_BYTES` (bigger models train faster one client at a time there, see
    :data:`CPU_GROUP_BYTES`) and the input (C, H, W) has at most :data:`CPU_MAX_PIXELS` pixels a
    channel (None: not checked). Sequential otherwise. :func:`executor_choice` says why.
    """
    return executor_choice(algorithm, clients_per_round, device, input_shape)[0]


def executor_choice(algorithm: Algorithm, clients_per_round: int, device: torch.device | str = "cpu",
                    input_shape: tuple[int, ...] | None = None) -> tuple[str, str]:
    """:func:`choose_executor`'s pick and the reason, for the run log."""
    if clients_per_round < 2:
        return "sequential", "one client per round"
    if has_program(algorithm):
        if torch.device(device).type == "cpu":  # measured: benchmarks/results/backdoor.md, "Inversion speed"
            return "sequential", (f"{algorithm.name} trains by client programs, whose batched requests are no "
                                  "faster than one client at a time on a CPU")
        return "vectorized", (f"{algorithm.name} trains by client programs: the {clients_per_round} clients of a "
                              "round run in lock-step, their requests batched")
    if not is_declarative(algorithm):
        return "sequential", f"{algorithm.name} has no declarative local training"
    budget = default_group_bytes(device)
    if budget is not None and input_shape is not None and math.prod(input_shape[-2:]) > CPU_MAX_PIXELS:
        h, w = input_shape[-2:]
        return "sequential", (f"{h}x{w} inputs: on a CPU one client at a time is faster than vmapped "
                              f"convolutions above {CPU_MAX_PIXELS} pixels")
    per_client = state_bytes(algorithm.template)
    mib = lambda b: f"{b / 2**20:.1f} MiB"  # noqa: E731
    if budget is not None and MIN_CPU_GROUP * per_client > budget:
        return "sequential", (f"{mib(per_client)} of model state per client: fewer than {MIN_CPU_GROUP} "
                              f"fit the {mib(budget)} CPU group budget, where one client at a time is faster")
    where = f"up to {budget // per_client} per group on the CPU" if budget is not None else f"all at once on {device}"
    return "vectorized", f"{clients_per_round} clients per round train together, {where}"
