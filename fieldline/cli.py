"""The ``fieldline`` command.

    fieldline demo [--duration S] [--gateways N] [--devices N] [--headless] [--fault F]
    fieldline view --influx-url URL --database DB     (or --config cloud.toml)
    fieldline edge run --config gateway.toml
    fieldline edge install --gateway-id ID --cloud URL [--dry-run]   (and: edge uninstall)
    fieldline edge status [--config gateway.toml | --state-dir DIR] [--json]
    fieldline cloud run --config cloud.toml [--worker-id ID] [--member K/N]
    fieldline cloud bridge --config cloud.toml        (JetStream: the cloud broker into NATS)
    fieldline cloud status [--config cloud.toml | --state-dir DIR] [--worker-id ID] [--json]
    fieldline simulate --config fleet.toml
    fieldline replay --data DIR --nab FILE | --skab FILE | --csv FILE --broker URL
    fieldline grafana export DIR | push --url URL --token T --influx-url URL
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from devices.errors import ConfigError, FieldlineError

if TYPE_CHECKING:
    import asyncio


def _stop_event() -> asyncio.Event:
    import asyncio

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    return stop


def cmd_edge_install(args: argparse.Namespace) -> int:
    from edge.install import Installer, InstallOptions

    inst = Installer(InstallOptions(
        gateway_id=args.gateway_id, cloud=args.cloud, ca=args.ca, cert=args.cert, key=args.key,
        registry=args.registry, root=args.root, start=not args.no_start))
    n = inst.run(inst.install_plan(), dry_run=args.dry_run)
    if not args.dry_run:
        print(f"fieldline edge installed for gateway {args.gateway_id}: {n} steps changed "
              "something. Devices: mosquitto_passwd /etc/mosquitto/passwd <device-id>. "
              "The agent: fieldline edge status")
    return 0


def _status(args: argparse.Namespace, part: str, who: str,
            load: Callable[[Path], Any], judge: Callable[[Path | None], tuple[int, str]]) -> int:
    """`fieldline <part> status`: the state directory given (``--state-dir``) or the config's
    (a config that cannot be read is UNKNOWN, exit 3), then ``judge(state_dir)`` prints the
    verdict and gives the exit code."""
    from devices.status import UNKNOWN

    if args.state_dir is not None:
        state_dir: Path | None = args.state_dir
    else:
        try:
            state_dir = load(args.config).state_dir
        except PermissionError:
            print(f"UNKNOWN: {args.config}: permission denied ({who}'s config and state are "
                  f"its user's and root's: sudo fieldline {part} status)", file=sys.stderr)
            return UNKNOWN
        except (ConfigError, OSError) as exc:
            print(f"UNKNOWN: {args.config}: {exc}", file=sys.stderr)
            return UNKNOWN
    code, text = judge(state_dir)
    print(text)
    return code


def _status_source(p: argparse.ArgumentParser, config: str, config_help: str) -> None:
    """A status command's --config, or --state-dir in its place (a demo's, a copied one)."""
    g = p.add_mutually_exclusive_group()
    g.add_argument("--config", type=Path, default=Path(config), help=config_help)
    g.add_argument("--state-dir", type=Path, default=None,
                   help="read the status in this directory (the config is not read)")


def cmd_edge_status(args: argparse.Namespace) -> int:
    from edge.config import load_edge_config
    from edge.status import status_command

    return _status(args, "edge", "the agent", load_edge_config,
                   lambda state_dir: status_command(state_dir, as_json=args.json))


def cmd_edge_uninstall(args: argparse.Namespace) -> int:
    from edge.install import Installer, InstallOptions

    inst = Installer(InstallOptions(root=args.root, keep_data=args.keep_data,
                                    keep_config=args.keep_config, start=not args.no_start))
    inst.run(inst.uninstall_plan(), dry_run=args.dry_run)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    import asyncio

    from fieldline.demo import DemoOptions, run_demo

    headless = args.headless or args.duration is not None
    if headless:
        logging.basicConfig(level=logging.ERROR,
                            format="%(asctime)s %(levelname)s %(name)s %(message)s")
    opts = DemoOptions(gateways=args.gateways, devices=args.devices, duration_s=args.duration,
                       headless=headless, mqtt_url=args.mqtt_url, influx_url=args.influx_url,
                       database=args.database, workdir=args.workdir, keep=args.keep,
                       backfill_s=args.backfill, window_s=args.window, seed=args.seed,
                       view=not args.no_view, view_host=args.view_host,
                       view_port=args.view_port, faults=tuple(args.fault))
    return asyncio.run(run_demo(opts))


def _at_least(low: float, kind: type[int] | type[float] = int, *, above: bool = False,
              high: float | None = None) -> Callable[[str], float]:
    """An argparse type: a number of ``kind`` >= ``low`` (> with ``above``, <= ``high``), so a
    nonsensical flag fails at start naming itself instead of deep inside a run."""
    def parse(text: str) -> float:
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if (v <= low if above else v < low) or (high is not None and v > high) \
                or math.isnan(v):
            rel = "above" if above else "at least"
            rng = f"{rel} {low:g}" + (f" and at most {high:g}" if high is not None else "")
            raise argparse.ArgumentTypeError(f"must be {rng}, got {text}")
        return v
    return parse


def _speed(text: str) -> float | None:
    return None if text == "max" else _at_least(0, float, above=True)(text)


PORT = _at_least(0, high=65_535)


def _demo_fault(text: str) -> object:
    from fieldline.demo import DemoFault

    try:
        return DemoFault.parse(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def cmd_view(args: argparse.Namespace) -> int:
    from cloud.config import check_http_url, load_cloud_config
    from cloud.sinks.influx_v1 import InfluxV1Client
    from fieldline.view.server import ViewConfig, ViewServer

    if args.config:
        ix = load_cloud_config(args.config).influx
        if ix.version != 1 and not ix.token:
            raise ConfigError("influxdb.token", "the view reads InfluxDB 2.x/3.x through its "
                              "InfluxQL API, which needs a token", source=str(args.config))
        url, database = args.influx_url or ix.url, args.database or ix.database
        if ix.version != 1:
            database = args.database or ix.bucket or ix.database
        user, password, token = ix.username, ix.password, ix.token
    else:
        if not args.influx_url:
            raise ConfigError("--influx-url", "required (or --config cloud.toml)")
        url, database = args.influx_url, args.database or "fieldline"
        user = args.username
        password = os.environ.get("FIELDLINE_INFLUX_PASSWORD")
        token = os.environ.get("FIELDLINE_INFLUX_TOKEN")
    check_http_url(url, "--influx-url" if args.influx_url else "influxdb.url")
    client = InfluxV1Client(url, database, username=user, password=password, token=token)
    view = ViewServer(client, ViewConfig(host=args.host, port=args.port,
                                         refresh_s=args.refresh)).start()
    print(f"view: {view.url}  (InfluxDB database '{database}'; Ctrl-C stops)", flush=True)
    if not client.ping():
        print(f"warning: InfluxDB at {url} does not answer yet", file=sys.stderr)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    view.stop()
    return 0


def private_files() -> None:
    """State written by the agent and the worker (intake log, outbox, checkpoints, dedup and
    detector state) is readable by their user only, with or without systemd's UMask."""
    os.umask(0o077)


def cmd_edge_run(args: argparse.Namespace) -> int:
    from edge.memory import (
        allow_tls_libraries,
        compact_malloc,
        defer_imports,
        refuse_tls_libraries,
    )

    # OpenSSL stays out of the process unless a broker is mqtts:// (edge/memory.py): refused
    # before the config's imports could load it, allowed again if the config asks for TLS;
    # paho's proxy lookup (urllib.request) loads only if it runs
    refused = refuse_tls_libraries()
    defer_imports()
    from edge.config import load_edge_config

    private_files()
    try:
        cfg = load_edge_config(args.config)
    finally:
        allow_tls_libraries()
    if cfg.compact_malloc:
        compact_malloc()
    if not (cfg.intake_broker.tls or cfg.uplink_broker.tls) and refused:
        refuse_tls_libraries()
        logging.getLogger("fieldline.edge").info(
            "no broker uses TLS: running without OpenSSL (ssl, _hashlib)")
    import asyncio

    from devices.mqtt import usable_tls
    from devices.settings import usable_dir
    from edge.agent import STATE_DIRS, STATE_FILES, EdgeAgent

    usable_tls(cfg.intake_broker, "intake", str(args.config))
    usable_tls(cfg.uplink_broker, "uplink", str(args.config))
    if cfg.state_dir is not None:
        usable_dir(cfg.state_dir, "gateway.state_dir", str(args.config), lock=".lock",
                   files=STATE_FILES, dirs=STATE_DIRS)
    agent = EdgeAgent(cfg)

    async def main() -> None:
        stop = _stop_event()
        # SIGHUP (a reload, a log rotation's habit) would end the agent without its clean
        # stop; it has nothing to read again while running: say so, and run on
        asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, lambda: logging.getLogger(
            "fieldline.edge").warning("SIGHUP: the agent reads its config only at start; "
                                      "restart it (systemctl restart fieldline-edge) to apply "
                                      "changes"))
        await agent.run(stop)

    asyncio.run(main())
    return 0


def _check_influxdb(url: str, source: str) -> None:
    """A URL that answers HTTP but not as InfluxDB (another service's port, a proxy's page)
    fails at start naming the key; one where nothing answers yet, or only a server error (a
    proxy's 502/503 while InfluxDB is down), is fine: InfluxDB may start after the worker, or
    be restarted under it; the worker retries, and acknowledges nothing meanwhile."""
    from cloud.sinks.influx_v1 import InfluxV1Client

    client = InfluxV1Client(url, "-", timeout_s=5.0)
    try:
        version = client.server_version()
    finally:
        client.close()
    if version == "":
        raise ConfigError("influxdb.url", f"{url} answers HTTP, but not as InfluxDB (its /ping "
                          "names no X-Influxdb-Version): another service, or a proxy?",
                          source=source)
    if version is None:
        logging.getLogger("fieldline.cloud").warning(
            "InfluxDB at %s does not answer yet (or answers only with a server error): writing "
            "starts when it does", url)


def cmd_cloud_run(args: argparse.Namespace) -> int:
    import asyncio

    from cloud.config import load_cloud_config
    from cloud.worker import CloudWorker, state_files
    from devices.mqtt import usable_tls, usable_tls_files

    private_files()
    cfg = load_cloud_config(args.config)
    if args.member or args.worker_id:
        from dataclasses import replace

        from cloud.config import parse_member

        if args.member and cfg.jetstream is None:
            raise ConfigError("--member", "needs [engine] kind = \"jetstream\" in the config")
        if args.member and cfg.jetstream is not None:
            cfg = replace(cfg, jetstream=replace(cfg.jetstream,
                                                 member=parse_member(args.member, "--member")))
        if args.worker_id:
            cfg = replace(cfg, worker_id=args.worker_id)
    if cfg.jetstream is None:
        usable_tls(cfg.broker, "ingest", str(args.config))
    else:  # the worker reads NATS only: the broker's files may be on the bridge's host alone
        js = cfg.jetstream
        usable_tls_files("engine", str(args.config), js.ca_file, js.cert_file, js.key_file)
    _check_influxdb(cfg.influx.url, str(args.config))
    if cfg.state_dir is not None:
        from devices.settings import usable_dir

        # workers of one JetStream cluster may share a directory (their state is in NATS),
        # each under its own name; a single worker's dedup and detector files are its alone
        usable_dir(cfg.state_dir, "worker.state_dir", str(args.config),
                   lock=f".lock-{cfg.worker_id}" if cfg.jetstream is not None else ".lock",
                   files=state_files(cfg.worker_id))
    worker = CloudWorker(cfg)
    worker.rules_source = lambda: load_cloud_config(args.config).rules  # read again at SIGHUP

    async def main() -> None:
        stop = _stop_event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, worker.request_reload)
        await worker.run(stop)

    asyncio.run(main())
    return 0


def cmd_cloud_status(args: argparse.Namespace) -> int:
    from cloud.config import load_cloud_config
    from cloud.status import status_command

    return _status(args, "cloud", "the worker", load_cloud_config,
                   lambda state_dir: status_command(state_dir, worker=args.worker_id,
                                                    as_json=args.json))


def cmd_cloud_bridge(args: argparse.Namespace) -> int:
    import asyncio

    from cloud.bridge import Bridge
    from cloud.config import load_cloud_config
    from cloud.status import bridge_id, status_path
    from devices.mqtt import usable_tls, usable_tls_files

    cfg = load_cloud_config(args.config)
    if cfg.jetstream is None:
        raise ConfigError("engine.kind", "the bridge needs [engine] kind = \"jetstream\"")
    usable_tls(cfg.broker, "ingest", str(args.config))
    js = cfg.jetstream
    usable_tls_files("engine", str(args.config), js.ca_file, js.cert_file, js.key_file)
    if cfg.state_dir is not None:  # its status file, beside the workers' (no lock: shared)
        from devices.settings import usable_dir

        usable_dir(cfg.state_dir, "worker.state_dir", str(args.config),
                   files=(status_path(cfg.state_dir, bridge_id(cfg.worker_id)).name,))
    bridge = Bridge(cfg.broker, list(js.servers), nats_tls=js.tls,
                    nats_cert=js.certificate(logging.getLogger("fieldline.cloud.bridge")),
                    client_id=bridge_id(cfg.worker_id), state_dir=cfg.state_dir,
                    status_interval_ms=cfg.health_interval_ms)

    async def main() -> None:
        await bridge.run(_stop_event())

    asyncio.run(main())
    return 0


def cmd_cloud_nats_env(args: argparse.Namespace) -> int:
    from cloud.natslogin import write_env

    nodes = [n.strip() for n in args.nodes.split(",") if n.strip()]
    line = write_env(args.out, nodes)
    print(f"wrote {args.out} (0600): copy it to /etc/fieldline/nats.env on each of "
          f"{', '.join(nodes)}, then start fieldline-nats there", file=sys.stderr)
    print("[engine] servers for cloud.toml (the workers' and the bridge's login):",
          file=sys.stderr)
    print(line)
    return 0


def cmd_simulate(args: argparse.Namespace) -> int:
    from simulators.config import load_sim_config
    from simulators.fleet import FleetSimulator
    from simulators.publisher import FleetPublisher

    cfg = load_sim_config(args.config)
    start = time.time_ns() // 1_000_000 - cfg.backfill_ms
    try:
        index, count = (int(x) for x in args.shard.split("/"))
    except ValueError:
        raise ConfigError("--shard", f"must be I/N, e.g. 0/4; got {args.shard!r}") from None
    try:
        sim = FleetSimulator(cfg.spec, start, shard=(index, count))
    except ValueError as exc:
        raise ConfigError("--shard", str(exc)) from None
    if cfg.registry_path:
        sim.registry().to_csv(cfg.registry_path)
        print(f"registry of {len(sim.device_ids)} devices written to {cfg.registry_path}")
    if args.registry_only:
        if not cfg.registry_path:
            raise ConfigError("output.registry", "is required with --registry-only")
        return 0
    if cfg.truth_path:
        cfg.truth_path.write_text("")
    pub = FleetPublisher(sim, cfg.brokers, qos=cfg.qos, truth_path=cfg.truth_path)
    stop = threading.Event()
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    duration = args.duration if args.duration is not None else (
        cfg.duration_ms / 1000 if cfg.duration_ms else None)
    runner = threading.Thread(target=pub.run_realtime, args=(stop, duration), daemon=True)
    runner.start()
    t0 = time.monotonic()
    last = 0
    try:
        while runner.is_alive():
            runner.join(1.0)
            n = pub.published
            el = time.monotonic() - t0
            c = pub.counters
            sys.stderr.write(f"\r{len(sim.device_ids):,} devices  {n:,} published  "
                             f"{n - last:,} msg/s  behind {pub.behind_ms / 1000:.1f}s  "
                             f"faults {len(sim.truth):,}  refused {c['refused']:,}  "
                             f"reconnects {c['reconnects']}  {int(el)}s   ")
            last = n
    finally:
        stop.set()
        runner.join()
        # what is still on its way gets the time to be acknowledged (run_realtime waits 5 s;
        # a busy machine can need longer): what is not acknowledged by then is said below
        pub.flush(30.0)
        c = pub.counters
        pub.close()
        if cfg.truth_path:
            print(f"\nground truth: {cfg.truth_path}")
    print(f"\npublished {pub.published} readings from {len(sim.device_ids)} devices, "
          f"{len(sim.truth)} faults injected, max {pub.max_behind_ms / 1000:.1f} s behind; "
          f"broker acknowledged {c['acked']}, refused {c['refused']}, "
          f"{c['reconnects']} reconnects ({c['resent']} re-sent)"
          + (f"; {c['in_flight']} never acknowledged (may not have arrived)"
             if c["in_flight"] else ""))
    if pub.error:
        print(f"stopped early: {pub.error}", file=sys.stderr)
        return 1
    return 0


def cmd_replay(args: argparse.Namespace) -> int:
    from devices.catalog import Catalog
    from devices.mqtt import parse_broker_url
    from simulators.publisher import FleetPublisher
    from simulators.replay import (
        ReplaySimulator,
        catalog_report,
        load_csv,
        load_nab,
        load_skab,
        shift_to,
    )

    broker = parse_broker_url(args.broker, "--broker")
    data = Path(args.data) if args.data else None
    if (args.nab or args.skab) and (data is None or not data.is_dir()):
        raise ConfigError("--data", f"not a directory: {data}")
    recs = []
    try:
        if data is not None:
            recs += [load_nab(data / "nab", f) for f in args.nab]
            recs += [load_skab(data / "skab", f) for f in args.skab]
        recs += [load_csv(Path(f), time_column=args.time_column) for f in args.csv]
    except (OSError, KeyError, ValueError) as exc:
        raise ConfigError("--nab/--skab/--csv", str(exc)) from None
    if not recs or not all(r.rows for r in recs):
        raise ConfigError("--nab/--skab/--csv", "name at least one file with rows to replay")
    catalog = Catalog()
    max_past_ms = 400 * 86_400_000
    topic = "devices/{device}/readings"
    if args.gateway_config:
        from edge.config import load_edge_config

        ecfg = load_edge_config(args.gateway_config)
        catalog, max_past_ms = ecfg.catalog, ecfg.max_past_ms
        topic = ecfg.topics[0].replace("+", "{device}").replace("#", "{device}")
    notes, declare = catalog_report(recs, catalog)
    for line in notes:
        print(f"  {line}")
    if declare:
        print("  to declare them (gateway.toml and cloud.toml):\n"
              + "\n".join("    " + x for x in declare.splitlines()))
    now = time.time_ns() // 1_000_000
    if args.event_time == "now":  # each recording its own device: each moved to just before now
        recs = [r.moved(shift_to([r], now)) for r in recs]
    first = min(t for r in recs for t, _ in r.rows)
    if first < EPOCH_2020:
        print("  event times before 2020 are rejected by every gateway (bad_timestamp): "
              "use --event-time now", file=sys.stderr)
    elif now - first > max_past_ms:
        print(f"  the oldest readings are {(now - first) / 86_400_000:,.0f} days old; the "
              f"gateway rejects beyond validate.max_past ({max_past_ms / 86_400_000:,.0f} "
              "days) as clock_past", file=sys.stderr)
    speed: float | None = args.speed
    sim = ReplaySimulator(recs, now, speed=speed, gateway=args.gateway, topic_template=topic)
    truth = Path(args.truth) if args.truth else None
    if truth:
        truth.write_text("")
    pub = FleetPublisher(sim, {args.gateway: broker}, truth_path=truth)
    stop = threading.Event()
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    span = max(r.rows[-1][0] for r in recs) - min(r.rows[0][0] for r in recs)
    took = "as fast as the broker takes them" if speed is None else (
        f"{span / speed / 1000:,.0f} s at {speed:g}x")
    print(f"replaying {len(recs)} file(s) as {[r.device for r in recs]}, event times "
          f"{'as recorded' if args.event_time == 'recorded' else 'moved by whole weeks to end now'}"
          f": {took}")
    if speed is None:
        runner = threading.Thread(target=pub.run_fast, args=(sim.remaining_ticks(),),
                                  daemon=True)
    else:
        duration = sim.remaining_ticks() * sim.spec.interval_ms / 1000
        runner = threading.Thread(target=pub.run_realtime, args=(stop, duration), daemon=True)
    runner.start()
    try:
        while runner.is_alive():
            runner.join(1.0)
            sys.stderr.write(f"\r{pub.published:,} messages published, behind "
                             f"{pub.behind_ms / 1000:.1f}s   ")
    finally:
        stop.set()
        runner.join()
        pub.flush(10.0)
        pub.close()
    c = pub.counters
    print(f"\npublished {pub.published:,} messages (broker acknowledged {c['acked']:,}, "
          f"refused {c['refused']:,}); ground truth: {truth or '(not written)'}")
    return 0 if sim.finished and not pub.error else 1


EPOCH_2020 = 1_577_836_800_000


def cmd_grafana_export(args: argparse.Namespace) -> int:
    from cloud.dashboards import export

    try:
        written = export(Path(args.dir))
    except OSError as exc:
        raise ConfigError("dir", f"cannot write the provisioning files there: {exc}") from None
    for p in written:
        print(p)
    return 0


def cmd_grafana_push(args: argparse.Namespace) -> int:
    from grafana_client.client import GrafanaClientError

    from cloud.config import check_http_url
    from cloud.dashboards import push

    check_http_url(args.url, "--url")
    check_http_url(args.influx_url, "--influx-url")
    cred: str | tuple[str, str] | None = args.token
    if args.user:
        cred = (args.user, args.password or "")
    try:
        result = push(args.url, credential=cred, influx_url=args.influx_url,
                      database=args.database, influx_token=args.influx_token)
    except (OSError, GrafanaClientError) as exc:  # unreachable, refused, not authorised
        raise FieldlineError(f"grafana push to {args.url} failed: {exc}") from None
    print(f"data source {result['datasource']}; dashboard: {result['dashboard']}; "
          f"alert rules: {result['alert_rules']}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fieldline", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--log-level", default="INFO")
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("demo", help="run the whole platform locally with a simulated fleet")
    d.add_argument("--duration", type=_at_least(0, float, above=True), default=None,
                   help="seconds to run headless, then print a summary (default: until Ctrl-C)")
    d.add_argument("--gateways", type=_at_least(1), default=3)
    d.add_argument("--devices", type=_at_least(1), default=200, help="devices per gateway")
    d.add_argument("--headless", action="store_true", help="no live view")
    d.add_argument("--mqtt-url", help="use this broker for everything instead of starting one")
    d.add_argument("--influx-url", help="use this InfluxDB 1.x instead of starting one")
    d.add_argument("--database", default="fieldline")
    d.add_argument("--workdir", type=Path, help="keep services' data here (default: temp dir)")
    d.add_argument("--keep", action="store_true", help="keep the temporary directory")
    d.add_argument("--backfill", type=_at_least(0), default=300,
                   help="seconds of history the fleet publishes at start (detectors warm up)")
    d.add_argument("--window", type=_at_least(1), default=10, help="window size in seconds")
    d.add_argument("--seed", type=int, default=1)
    d.add_argument("--no-view", action="store_true", help="do not serve the web view")
    d.add_argument("--view-host", default="127.0.0.1")
    d.add_argument("--view-port", type=PORT, default=8080,
                   help="the web view's port (taken: any free one; 0: any free one)")
    d.add_argument("--fault", type=_demo_fault, action="append", default=[],
                   metavar="TYPE@DEVICE[+S][/DUR]",
                   help="inject a fault on one device S seconds into the live run, e.g. "
                        "spike@gw-1-t0001+40 (repeatable)")
    d.set_defaults(func=cmd_demo)

    v = sub.add_parser("view", help="serve the read-only web view of a fieldline InfluxDB")
    v.add_argument("--config", type=Path, help="read [influxdb] from this cloud.toml")
    v.add_argument("--influx-url", help="InfluxDB 1.x URL (or 2.x with a DBRP mapping)")
    v.add_argument("--database", help="database (default: fieldline)")
    v.add_argument("--username", help="InfluxDB user; the password from "
                                      "FIELDLINE_INFLUX_PASSWORD, a token from "
                                      "FIELDLINE_INFLUX_TOKEN")
    v.add_argument("--host", default="127.0.0.1",
                   help="address to serve on (default 127.0.0.1: this machine only)")
    v.add_argument("--port", type=PORT, default=8080)
    v.add_argument("--refresh", type=_at_least(0, float, above=True), default=5.0,
                   help="seconds between updates")
    v.set_defaults(func=cmd_view)

    e = sub.add_parser("edge", help="the gateway agent").add_subparsers(dest="sub", required=True)
    er = e.add_parser("run", help="run the edge agent")
    er.add_argument("--config", required=True, type=Path)
    er.set_defaults(func=cmd_edge_run)
    es = e.add_parser("status", help="is the agent on this gateway running, and what needs "
                                     "attention (exit 0 ok, 1 warning, 2 critical, 3 unknown)")
    _status_source(es, "/etc/fieldline/gateway.toml",
                   "the agent's config (default: where `edge install` puts it)")
    es.add_argument("--json", action="store_true", help="the verdict and the agent's status")
    es.set_defaults(func=cmd_edge_status)
    ei = e.add_parser("install", help="install the agent on this gateway (idempotent): user, "
                                      "config, Mosquitto drop-in, ACL and user, systemd unit")
    ei.add_argument("--gateway-id", required=True)
    ei.add_argument("--cloud", required=True, metavar="URL",
                    help="the cloud broker, mqtts://host:8883 (or mqtt:// on a trusted network)")
    ei.add_argument("--ca", type=Path, help="CA certificate of the cloud broker (mqtts)")
    ei.add_argument("--cert", type=Path, help="this gateway's client certificate (mqtts)")
    ei.add_argument("--key", type=Path, help="this gateway's private key (mqtts)")
    ei.add_argument("--registry", type=Path, help="devices.csv (default: no registry)")
    for sp in (ei, e.add_parser("uninstall", help="remove what install did")):
        sp.add_argument("--dry-run", action="store_true", help="print every step, do nothing")
        sp.add_argument("--root", type=Path, default=Path("/"),
                        help="install below this directory (an image; systemd left alone)")
        sp.add_argument("--no-start", action="store_true",
                        help="do not call systemctl (daemon-reload, restart, enable)")
        sp.set_defaults(func=cmd_edge_install if sp is ei else cmd_edge_uninstall)
    e.choices["uninstall"].add_argument(
        "--keep-data", action="store_true",
        help="keep /var/lib/fieldline (its outbox may hold results the cloud has not confirmed)")
    e.choices["uninstall"].add_argument("--keep-config", action="store_true",
                                        help="keep /etc/fieldline")

    c = sub.add_parser("cloud", help="the cloud worker").add_subparsers(dest="sub", required=True)
    cr = c.add_parser("run", help="run a cloud worker")
    cr.add_argument("--config", required=True, type=Path)
    cr.add_argument("--member", default=None,
                    help="k/N: serve partitions p with p %% N == k (JetStream engine); start a "
                         "second worker with the same k as its hot standby")
    cr.add_argument("--worker-id", default=None, help="overrides worker.id")
    cr.set_defaults(func=cmd_cloud_run)
    cs = c.add_parser("status", help="are the cloud workers of this machine running, and what "
                                     "needs attention (exit 0 ok, 1 warning, 2 critical, 3 "
                                     "unknown)")
    _status_source(cs, "/etc/fieldline/cloud.toml",
                   "the workers' config (default: where deploy/systemd reads it)")
    cs.add_argument("--worker-id", default=None,
                    help="this worker only (default: every worker whose status is in "
                         "worker.state_dir)")
    cs.add_argument("--json", action="store_true", help="the verdicts and the workers' status")
    cs.set_defaults(func=cmd_cloud_status)
    cb = c.add_parser("bridge", help="forward the cloud broker's uplink into NATS JetStream "
                                     "and the workers' acks back")
    cb.add_argument("--config", required=True, type=Path)
    cb.set_defaults(func=cmd_cloud_bridge)
    cn = c.add_parser("nats-env", help="new logins for the NATS cluster (scale-out): write the "
                                       "nodes' environment file and print cloud.toml's servers")
    cn.add_argument("--nodes", default="nats-1,nats-2,nats-3",
                    help="the nodes' hosts, comma-separated (default: %(default)s, as "
                         "deploy/nats/nats-server.conf's routes)")
    cn.add_argument("--out", type=Path, default=Path("nats.env"),
                    help="the file to write, never over an existing one (default: %(default)s)")
    cn.set_defaults(func=cmd_cloud_nats_env)

    s = sub.add_parser("simulate", help="publish a simulated fleet")
    s.add_argument("--config", required=True, type=Path)
    s.add_argument("--duration", type=_at_least(0, float, above=True), default=None)
    s.add_argument("--registry-only", action="store_true",
                   help="write the fleet's device registry (output.registry) and exit")
    s.add_argument("--shard", default="0/1",
                   help="I/N: publish only gateways g with g %% N == I (split a fleet across "
                        "processes; together the shards publish exactly the whole fleet)")
    s.set_defaults(func=cmd_simulate)

    r = sub.add_parser("replay", help="replay recorded data (NAB, SKAB, any CSV) as devices")
    r.add_argument("--data", help="the data directory holding nab/ and skab/ (for --nab, --skab)")
    r.add_argument("--nab", action="append", default=[],
                   help="a NAB file relative to nab/data, e.g. "
                        "realKnownCause/machine_temperature_system_failure.csv")
    r.add_argument("--skab", action="append", default=[],
                   help="a SKAB file relative to skab/data, e.g. valve1/0.csv")
    r.add_argument("--csv", action="append", default=[],
                   help="any CSV: a time column and value columns (one device per file)")
    r.add_argument("--time-column", help="the CSV's time column, if not named like a time")
    r.add_argument("--broker", required=True, help="the gateway broker, mqtt://host:port")
    r.add_argument("--gateway", default="replay-1")
    r.add_argument("--gateway-config",
                   help="the gateway's config: its topic and catalog are checked first")
    r.add_argument("--speed", type=_speed, default=None,
                   help="data seconds per real second (300: 5-minute samples every second), "
                        "or max: as fast as the broker takes them, then exit (a backfill)")
    r.add_argument("--event-time", choices=("now", "recorded"), default="now",
                   help="now: each recording's times moved by whole weeks to end just before "
                        "now (weekday and time of day kept); recorded: as in the file")
    r.add_argument("--truth", help="write the labels (in event time) to this JSONL file")
    r.set_defaults(func=cmd_replay)

    g = sub.add_parser("grafana", help="dashboards").add_subparsers(dest="sub", required=True)
    ge = g.add_parser("export", help="write provisioning files")
    ge.add_argument("dir")
    ge.set_defaults(func=cmd_grafana_export)
    gp = g.add_parser("push", help="create/update data source, dashboard and alert rules in "
                                   "a Grafana")
    gp.add_argument("--url", required=True)
    gp.add_argument("--token")
    gp.add_argument("--user")
    gp.add_argument("--password")
    gp.add_argument("--influx-url", required=True)
    gp.add_argument("--database", default="fieldline")
    gp.add_argument("--influx-token")
    gp.set_defaults(func=cmd_grafana_push)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command != "demo":
        logging.basicConfig(level=getattr(logging, str(args.log_level).upper(), logging.INFO),
                            format="%(asctime)s %(levelname)s %(name)s %(message)s")
    try:
        rc: int = args.func(args)
        return rc
    except ConfigError as exc:
        print(f"fieldline: configuration error: {exc}", file=sys.stderr)
        return 2
    except FieldlineError as exc:
        print(f"fieldline: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        with contextlib.suppress(Exception):
            print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
