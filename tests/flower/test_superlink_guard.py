"""The operator-only layer in front of the SuperLink (fedtrust.flower.superlink_guard), as an ASGI app.

Driven with hand-made ASGI scopes and a stub inner app that records what reached it, so every rule is
checked on its own: who counts as the operator (loopback by default, given networks, IPv4-mapped IPv6),
what is open to everyone (only the Fleet API and the health check), and what a refusal looks like.
The real SuperLink behind it is exercised in test_deployment.py.
"""

from __future__ import annotations

import asyncio
import json

import pytest

from fedtrust.errors import ConfigError
from fedtrust.flower.superlink_guard import LOOPBACK, OperatorOnly, parse_operators


class Inner:
    """An ASGI app that answers 200 and remembers the paths it was asked for."""

    def __init__(self) -> None:
        self.paths: list[str] = []
        self.lifespan = 0

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "lifespan":
            self.lifespan += 1
            return
        self.paths.append(scope["path"])
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})


def call(guard: OperatorOnly, path: str, host: str | None) -> tuple[int, bytes]:
    sent: list[dict] = []

    async def receive():
        return {"type": "http.request", "body": b""}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "path": path, "client": (host, 50000) if host is not None else None}
    asyncio.run(guard(scope, receive, send))
    return sent[0]["status"], b"".join(m.get("body", b"") for m in sent[1:])


@pytest.fixture
def guard() -> tuple[OperatorOnly, Inner]:
    inner = Inner()
    return OperatorOnly(inner, parse_operators([*LOOPBACK, "10.1.0.0/16"])), inner


@pytest.mark.parametrize("path", ["/v1/control/register-supernode", "/v1/control/start-run", "/v1/runtime/pull-messages",
                                  "/docs", "/openapi.json", "/v1/fleetX", "/v1/fleet"])
def test_a_stranger_reaches_nothing_but_the_fleet_api(guard, path: str) -> None:
    """Rules out a guard that blocks only /v1/control (the Runtime API would still run apps), one that matches
    the Fleet prefix without its slash (/v1/fleetX), and one that lets the API docs leak the routes."""
    g, inner = guard
    status, body = call(g, path, "203.0.113.7")
    assert status == 403 and "only the operator" in json.loads(body)["detail"]
    assert inner.paths == []


@pytest.mark.parametrize("path", ["/v1/fleet/activate-node", "/v1/fleet/pull-messages", "/health"])
def test_a_stranger_reaches_the_fleet_api_and_health(guard, path: str) -> None:
    g, inner = guard
    assert call(g, path, "203.0.113.7")[0] == 200 and inner.paths == [path]


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.2", "::1", "::ffff:127.0.0.1", "10.1.200.3", "::ffff:10.1.0.9"])
def test_operators_reach_every_api(guard, host: str) -> None:
    """Loopback (any 127/8 address, ::1, and v4 loopback as an IPv4-mapped IPv6 peer, which dual-stack
    sockets report) and the given network are the operator."""
    g, inner = guard
    assert call(g, "/v1/control/register-supernode", host)[0] == 200
    assert inner.paths == ["/v1/control/register-supernode"]


@pytest.mark.parametrize("host", ["10.2.0.1", "::ffff:10.2.0.1", "fe80::1", "not-an-ip", None])
def test_everyone_else_is_refused(guard, host) -> None:
    """Addresses outside the networks, names (a Unix socket peer), and no peer at all are not the operator."""
    g, inner = guard
    assert call(g, "/v1/control/list-runs", host)[0] == 403 and inner.paths == []


def test_lifespan_passes_through(guard) -> None:
    """The SuperLink starts its gRPC servers and SuperExec in the ASGI lifespan: the guard must not eat it."""
    g, inner = guard

    async def receive():
        return {"type": "lifespan.startup"}

    async def send(message):
        pass

    asyncio.run(g({"type": "lifespan"}, receive, send))
    assert inner.lifespan == 1


@pytest.mark.parametrize("bad", ["my-host.example", "10.0.0.1:9092", "10.0.0.0/33", ""])
def test_operator_addresses_are_checked(bad: str) -> None:
    with pytest.raises(ConfigError, match="is not an IP address or network"):
        parse_operators([bad])
