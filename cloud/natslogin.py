"""The logins of the NATS cluster as shipped (deploy/nats/nats-server.conf): one for its clients
(the bridge and the workers), one for the routes between its nodes.

nats-server reads them from its environment, which its unit takes from ``/etc/fieldline/nats.env``
(``fieldline cloud nats-env`` writes it, the same file for the three nodes). The routes carry the
route login in their URLs, which a configuration cannot assemble from variables, so the file holds
them whole (``NATS_ROUTES``)."""

from __future__ import annotations

import os
import secrets
from collections.abc import Sequence
from pathlib import Path

from devices.errors import ConfigError

USER = "fieldline"
ROUTE_USER = "route"
CLIENT_PORT = 4222
ROUTE_PORT = 6222
ENV_FILE = Path("/etc/fieldline/nats.env")


def new_password() -> str:
    """A password nats-server's configuration reads as a string and a URL carries as it is."""
    return "fl" + secrets.token_hex(20)


def _host(node: str) -> str:
    if not node or any(c in node for c in "/@[]:, "):
        raise ConfigError("--nodes", "name each node by its host (its ports are the shipped "
                          f"{CLIENT_PORT} and {ROUTE_PORT}); got {node!r}")
    return node


def node_env(routes: Sequence[str], password: str, route_password: str) -> dict[str, str]:
    """The variables the shipped configuration reads (with ``NATS_SERVER_NAME``, which the unit
    sets): ``routes`` as host:port of every node's route listener, itself included (a node
    ignores the route to itself)."""
    urls = [f"nats-route://{ROUTE_USER}:{route_password}@{r}" for r in routes]
    return {"NATS_PASSWORD": password, "NATS_ROUTE_PASSWORD": route_password,
            "NATS_ROUTES": f"[{','.join(urls)}]"}


def env_text(env: dict[str, str]) -> str:
    lines = ["# read by fieldline-nats.service (EnvironmentFile): the logins of the NATS cluster,",
             "# the same file on every node. Keep it 0600: it lets its reader into the stream.",
             *(f"{k}={v}" for k, v in env.items())]
    return "\n".join(lines) + "\n"


def read_env(path: Path) -> dict[str, str]:
    """KEY=value lines, as systemd's EnvironmentFile reads this file."""
    out = {}
    for line in path.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.partition("=")
            out[key.strip()] = value.strip()
    return out


def servers_line(nodes: Sequence[str], password: str) -> str:
    """``[engine] servers`` for cloud.toml, with the clients' login."""
    return "servers = [" + ", ".join(
        f'"nats://{USER}:{password}@{_host(n)}:{CLIENT_PORT}"' for n in nodes) + "]"


def write_env(path: Path, nodes: Sequence[str]) -> str:
    """Writes ``path`` (0600, never over an existing one: its passwords are in use) with new
    passwords for the cluster of ``nodes``; returns the servers line for cloud.toml."""
    if not nodes:
        raise ConfigError("--nodes", "name the cluster's nodes, e.g. nats-1,nats-2,nats-3")
    routes = [f"{_host(n)}:{ROUTE_PORT}" for n in nodes]
    password = new_password()
    text = env_text(node_env(routes, password, new_password()))
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise ConfigError("--out", f"{path} exists: the cluster's logins are in it (remove it "
                          "to make new ones, then restart every node and client)") from None
    with os.fdopen(fd, "w") as out:
        out.write(text)
    return servers_line(nodes, password)
