"""Client programs: a client update written as a generator of batchable requests.

Some client updates cannot be a declarative :class:`~fedtrust.fl.types.LocalTraining` (FLIP's hardening
interleaves trigger inversions, data-dependent choices and model steps), yet most of their time goes to
work that has the same shape on every client (an inversion: hundreds of small steps on one model). Such an
algorithm may write its update as a *program*: a generator that ``yield``-s a :class:`Request`, receives
its result, and finally ``return``-s ``(reply, new_client_state)``.

:func:`run_programs` runs the programs of several clients in lock-step. At each tick it takes every running
program's pending request, groups the requests by :meth:`Request.batch_key`, solves each group with one
call of the request type's :meth:`Request.solve_batch` (the vectorised executor's win: one ``vmap``-ed
computation for the round's clients), sends each program its result and advances it to its next request.
A single client (sequential executor, Flower) runs through the same function with one program, so every
executor runs the same code; results differ between a batch and a lone solve only by floating-point
summation order (the batch's ``vmap``).

Each program must take its randomness only from its own client's generator and keep its own model copy:
programs interleave, so shared mutable state (an algorithm's template model, the global RNG) would make a
client's result depend on the others.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Generator, Hashable
from typing import Any, Protocol

ClientProgram = Generator["Request", Any, Any]
"""A client's update: yields requests, is sent their results, returns its final value."""


class Request(Protocol):
    """A unit of work a program waits for; requests with equal keys are solved together."""

    def batch_key(self) -> Hashable:
        """Requests with equal keys can go into one :meth:`solve_batch` call."""
        ...

    @classmethod
    def solve_batch(cls, requests: list[Any]) -> list[Any]:
        """The results of ``requests`` (equal keys), in their order."""
        ...


def run_programs(programs: dict[int, ClientProgram]) -> dict[int, Any]:
    """Run client programs in lock-step, batching their pending requests; each program's return value.

    Groups are solved in order of their first member's client id, and programs resume in client order, so
    the run is deterministic.
    """
    done: dict[int, Any] = {}
    pending: dict[int, Any] = {}
    for c in sorted(programs):
        _advance(programs, c, None, pending, done, first=True)
    while pending:
        groups: dict[Hashable, list[int]] = defaultdict(list)
        for c in sorted(pending):
            groups[(type(pending[c]), pending[c].batch_key())].append(c)
        results: dict[int, Any] = {}
        for (kind, _), members in groups.items():
            solved = kind.solve_batch([pending[c] for c in members])
            if len(solved) != len(members):
                raise RuntimeError(f"{kind.__name__}.solve_batch returned {len(solved)} results for "
                                   f"{len(members)} requests")
            results.update(zip(members, solved))
        for c in sorted(results):
            del pending[c]
            _advance(programs, c, results[c], pending, done, first=False)
    return done


def run_program(program: ClientProgram) -> Any:
    """Run one program alone (each request solved as a batch of one); its return value."""
    return run_programs({0: program})[0]


def _advance(programs: dict[int, ClientProgram], c: int, value: Any, pending: dict[int, Any],
             done: dict[int, Any], first: bool) -> None:
    try:
        pending[c] = next(programs[c]) if first else programs[c].send(value)
    except StopIteration as stop:
        done[c] = stop.value
