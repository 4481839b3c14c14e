"""``fedtrust flower-superlink``: Flower's SuperLink with everything but the Fleet API closed to all but the operator.

Why: from flwr 1.42 on, the SuperLink serves its Fleet API (SuperNodes), Control API (the ``flwr`` CLI:
register SuperNode keys, start and stop runs, read their logs) and Runtime API (the ServerApp and its
SuperExec) over one HTTPS port, and the open-source Control API has no authentication (account login is a
Flower Enterprise feature). TLS only proves the SuperLink's identity to whoever connects; the CA certificate
every SuperNode holds is no secret. So anyone who can reach the SuperLink's port could register their own
SuperNode key (``--enable-supernode-auth`` then lets that node in), or start a run of their own app, whose
ClientApp code the SuperNodes would execute.

What this does: it starts Flower's own SuperLink (same arguments, same process) with one ASGI layer in
front of it. A request from an operator address (default: loopback, i.e. the SuperLink's own machine, where
its ServerApp and SuperExec run too) passes unchanged; from any other address, only ``/v1/fleet/...`` (what a
SuperNode uses, behind Flower's SuperNode authentication) and ``/health`` pass, and everything else gets
``403``. The peer address is the TCP connection's (uvicorn's ``X-Forwarded-For`` handling trusts only
loopback proxies), so a remote client cannot claim to be the operator.

It relies on where flwr 1.42 builds the SuperLink's web app (``flwr.superlink.main.create_app``, looked up
at call time by ``flower-superlink``); on a flwr without it (older versions serve the Control API on its own
port, ``--control-api-address``: bind that to 127.0.0.1 instead) it refuses with one line.
"""

from __future__ import annotations

import ipaddress
import json
import sys
from collections.abc import Awaitable, Callable, Iterable, MutableMapping, Sequence
from typing import Any

from fedtrust.errors import ConfigError

OPEN_PREFIXES = ("/v1/fleet/",)
OPEN_PATHS = ("/health",)
LOOPBACK = ("127.0.0.0/8", "::1/128")

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_operators(addresses: Iterable[str]) -> list[Network]:
    """Addresses or CIDR networks (``10.1.2.3``, ``10.1.0.0/16``, ``::1``); a one-line error for anything else."""
    nets = []
    for text in addresses:
        try:
            nets.append(ipaddress.ip_network(text.strip(), strict=False))
        except ValueError:
            raise ConfigError(f"--operator {text!r} is not an IP address or network (e.g. 10.0.0.5 or "
                              "10.0.0.0/24); host names are not accepted, they can change") from None
    return nets


class OperatorOnly:
    """ASGI layer: non-operator peers reach only the Fleet API and the health check (module docstring)."""

    def __init__(self, app: Callable[[Scope, Receive, Send], Awaitable[None]], operators: Sequence[Network]) -> None:
        self.app = app
        self.operators = list(operators)

    def is_operator(self, host: str | None) -> bool:
        if not host:
            return False
        try:
            addr = ipaddress.ip_address(host.split("%")[0])
        except ValueError:  # a Unix socket path or a name: not an address we can vouch for
            return False
        if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
            addr = addr.ipv4_mapped
        return any(addr in net for net in self.operators)

    @staticmethod
    def is_open(path: str) -> bool:
        return path in OPEN_PATHS or path.startswith(OPEN_PREFIXES)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] in ("http", "websocket") and not self.is_open(scope.get("path", "")):
            client = scope.get("client")
            if not self.is_operator(client[0] if client else None):
                await self._refuse(scope, send)
                return
        await self.app(scope, receive, send)

    @staticmethod
    async def _refuse(scope: Scope, send: Send) -> None:
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})
            return
        body = json.dumps({"detail": "fedtrust flower-superlink: only the operator may use this API "
                                     "(see --operator)"}).encode()
        await send({"type": "http.response.start", "status": 403,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


def run_guarded_superlink(flower_args: Sequence[str], operators: Sequence[Network]) -> None:
    """Run ``flower-superlink FLOWER_ARGS`` in this process with :class:`OperatorOnly` in front (blocks)."""
    try:
        import flwr.superlink.main as superlink_main
        from flwr.superlink.cli.flower_superlink import flower_superlink
    except ImportError as e:
        raise ConfigError(f"fedtrust flower-superlink needs flwr >= 1.42 (the SuperLink's web app); {e}. On an "
                          "older flwr, bind the Control API to the SuperLink's machine: "
                          "--control-api-address 127.0.0.1:9093") from None
    if not hasattr(superlink_main, "create_app"):
        raise ConfigError("fedtrust flower-superlink: this flwr has no flwr.superlink.main.create_app; "
                          "bind its Control API with --control-api-address 127.0.0.1:9093 instead")
    build = superlink_main.create_app

    def create_guarded_app(*args: Any, **kwargs: Any) -> OperatorOnly:
        return OperatorOnly(build(*args, **kwargs), operators)

    superlink_main.create_app = create_guarded_app
    sys.argv = ["flower-superlink", *flower_args]
    flower_superlink()
