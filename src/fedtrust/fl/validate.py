"""Update validation: every reply is checked before any aggregator sees it (DESIGN "Extension points").

A reply is rejected, with a one-line reason, when it

* has no valid sample weight (``meta["num_examples"]`` a number >= 0);
* lacks a key, or carries an extra one, compared with the round's reference key set;
* has an array whose shape or dtype differs from the reference (or from the server
  state's entry of the same name);
* holds NaN or Inf;
* moves the server state's floating entries by more than ``max_update_norm`` (L2 over
  all of them together), when that bound is set.

A reply's reference key set is what the algorithm expects of it
(``Algorithm.reply_spec(message)``, for algorithms whose clients reply different
parts: Split-Mix's bases), else the most common (key, shape, dtype) signature
among the round's replies that holds the fewest keys the server state lacks (so
several replies with the same renamed key cannot outvote the sound ones), ties going
to the signature of the lowest client id;
entries that also live in the server state must match it whatever the majority
says, so a lone malformed reply is caught even in a round of two.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping

import torch

from fedtrust.fl.types import Message

Signature = tuple[tuple[str, tuple[int, ...], torch.dtype], ...]
ReplySpec = Mapping[str, tuple[tuple[int, ...], torch.dtype]]
"""The entries a reply must hold: key → (shape, dtype); a −1 in a shape matches any size (a client's own
sample count, IS&BC's features)."""


def _signature(reply: Message) -> Signature:
    return tuple(sorted((k, tuple(v.shape), v.dtype) for k, v in reply.arrays.items()))


def _weight_problem(reply: Message) -> str | None:
    w = reply.meta.get("num_examples")
    if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or w < 0:
        return f"no valid sample weight meta['num_examples'] (got {w!r}); expected a number >= 0"
    return None


def _shape_problem(reply: Message, reference: Mapping[str, tuple[tuple[int, ...], torch.dtype]],
                   state: Message) -> str | None:
    missing = sorted(set(reference) - set(reply.arrays))
    if missing:
        return f"missing key {missing[0]!r}"
    extra = sorted(set(reply.arrays) - set(reference))
    if extra:
        return f"unexpected key {extra[0]!r}"
    for k, v in sorted(reply.arrays.items()):
        shape, dtype = reference[k]
        own = state.arrays.get(k)
        if own is not None:
            shape, dtype = tuple(own.shape), own.dtype
        if len(v.shape) != len(shape) or any(want not in (-1, got) for want, got in zip(shape, v.shape)):
            want = "(" + ", ".join("any" if d == -1 else str(d) for d in shape) + ("," if len(shape) == 1 else "") + ")"
            return f"key {k!r} has shape {tuple(v.shape)}; expected {want}"
        if v.dtype != dtype:
            return f"key {k!r} has dtype {v.dtype}; expected {dtype}"
    return None


NONFINITE = "holds NaN or Inf"
"""The words of a rejection for non-finite values (the runner's divergence check looks for them)."""


def _finite_problem(reply: Message) -> str | None:
    for k, v in sorted(reply.arrays.items()):
        if v.is_floating_point() and not bool(torch.isfinite(v).all()):
            return f"key {k!r} {NONFINITE}"
    return None


def update_norm(reply: Message, state: Message) -> float:
    """L2 norm of ``reply − state`` over the floating entries both hold (the client's update)."""
    total = 0.0
    for k, v in reply.arrays.items():
        own = state.arrays.get(k)
        if own is not None and v.is_floating_point():
            total += float(((v.double() - own.double().to(v.device)) ** 2).sum())
    return math.sqrt(total)


def validate_replies(state: Message, replies: Mapping[int, Message], max_update_norm: float | None = None,
                     specs: Mapping[int, ReplySpec | None] | None = None) -> tuple[dict[int, Message], dict[int, str]]:
    """``(valid replies, {client id: reason})`` of a round's replies, in client-id order; ``specs[c]``,
    when given, is what client c's reply must hold (else the round's majority signature)."""
    order = sorted(replies)
    rejected: dict[int, str] = {}
    for c in order:
        problem = _weight_problem(replies[c])
        if problem:
            rejected[c] = problem
    candidates = [c for c in order if c not in rejected]
    if candidates:
        counts = Counter(_signature(replies[c]) for c in candidates)
        first = {}
        for c in candidates:
            first.setdefault(_signature(replies[c]), c)

        def rank(sig: Signature) -> tuple[int, int, int]:  # fewest keys the server does not know, most replies
            return sum(k not in state.arrays for k, _, _ in sig), -counts[sig], first[sig]

        majority = min(counts, key=rank)
        majority_ref = {k: (shape, dtype) for k, shape, dtype in majority}
        for c in candidates:
            spec = (specs or {}).get(c)
            reference = {k: (tuple(shape), dtype) for k, (shape, dtype) in spec.items()} if spec is not None \
                else majority_ref
            problem = _shape_problem(replies[c], reference, state) or _finite_problem(replies[c])
            if problem is None and max_update_norm is not None:
                norm = update_norm(replies[c], state)
                if norm > max_update_norm:
                    problem = f"update norm {norm:.4g} exceeds defense.max_update_norm={max_update_norm:g}"
            if problem:
                rejected[c] = problem
    valid = {c: replies[c] for c in order if c not in rejected}
    return valid, rejected
