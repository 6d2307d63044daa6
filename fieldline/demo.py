"""``fieldline demo``: the whole platform on one machine, with a live terminal view.

Starts Mosquitto (one broker per gateway plus the cloud broker) and InfluxDB as child processes
on free loopback ports with temporary data directories (unless URLs are given), simulates a
fleet, runs one edge agent per gateway and one cloud worker in this process, and shows what flows.
The built-in web view (``fieldline.view``) is served on 127.0.0.1 and its URL printed first.
Ctrl-C (or ``--duration``) stops everything in order: simulator, agents (which flush), worker
(which writes what it holds), view, services.

``--fault spike@gw-1-t0001+40`` schedules a fault of the simulator's catalogue on one device,
40 s into the live run (interval faults last ``/SECONDS``, default 60): to watch it arrive.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from cloud.config import CloudConfig, InfluxConfig, check_http_url
from cloud.sinks.influx_v1 import InfluxV1Client
from cloud.worker import CloudWorker
from devices.mqtt import BrokerAddress, parse_broker_url
from edge.agent import EdgeAgent
from edge.config import EdgeConfig
from edge.engine import EngineConfig
from edge.eventtime import EventTimeSpec
from edge.windows import WindowSpec
from fieldline.services import InfluxDB, Mosquitto
from fieldline.view.server import ViewConfig, ViewServer
from simulators.faults import INTERVAL, FaultSpec
from simulators.fleet import FleetSimulator, FleetSpec
from simulators.process import PublisherProcess

log = logging.getLogger("fieldline.demo")


@dataclass(frozen=True, kw_only=True)
class DemoOptions:
    gateways: int = 3
    devices: int = 200
    duration_s: float | None = None
    headless: bool = False
    mqtt_url: str | None = None
    influx_url: str | None = None
    database: str = "fieldline"
    workdir: Path | None = None
    keep: bool = False
    backfill_s: int = 300
    window_s: int = 10
    seed: int = 1
    view: bool = True
    view_host: str = "127.0.0.1"
    view_port: int = 8080  # taken: any free port (the URL printed says which)
    faults: tuple[DemoFault, ...] = ()


@dataclass(frozen=True)
class DemoFault:
    """A fault of the simulator's catalogue on one device, ``at_s`` into the live run."""

    type: str
    device: str
    at_s: float = 30.0
    duration_s: float = 60.0

    @staticmethod
    def parse(text: str) -> DemoFault:
        """``TYPE@DEVICE[+SECONDS][/DURATION]``, e.g. ``spike@gw-1-t0001+40``."""
        kind, at, rest = text.partition("@")
        if not at or not rest:
            raise ValueError(f"--fault {text!r}: expected TYPE@DEVICE[+SECONDS][/DURATION]")
        rest, _, dur = rest.partition("/")
        device, _, when = rest.partition("+")
        try:
            f = DemoFault(kind, device, float(when or 30), float(dur or 60))
        except ValueError:
            raise ValueError(f"--fault {text!r}: SECONDS and DURATION are numbers") from None
        f.spec(0)  # the catalogue's own checks (known type, needed parameters)
        return f

    def spec(self, live_from_ms: int) -> FaultSpec:
        return FaultSpec(type=self.type, devices=(self.device,),
                         at_ms=live_from_ms + int(self.at_s * 1000),
                         duration_ms=int(self.duration_s * 1000) if self.type in INTERVAL else 0)


GATEWAY_COLUMNS = [
    ("gateway", "gateway", 8), ("msgs in", "messages_in", 9),
    ("accepted", "readings_accepted", 9), ("rejected", "rejected", 9),
    ("late rev", "late_revised", 9), ("late drop", "late_dropped", 9),
    ("windows", "windows_emitted", 8), ("batches", "batches_sent", 8),
    ("acked", "batches_acked", 8), ("open win", "open_windows", 9),
    ("wm lag s", "watermark_lag_ms", 9),
]


def _fmt(v: float) -> str:
    return f"{int(v):,}" if float(v).is_integer() else f"{v:,.1f}"


def render(agents: list[EdgeAgent], worker: CloudWorker, pub: PublisherProcess | None,
           opts: DemoOptions, influx_url: str, elapsed_s: float, final: bool = False,
           view: ViewServer | None = None, status: str | None = None) -> str:
    lines = []
    if view is not None and not final:
        lines.append(f"view: {view.url}")
    if status is not None and not final:
        lines.append(status)
    head = "fieldline demo summary" if final else "fieldline demo (Ctrl-C stops everything)"
    lines.append(f"{head}: {opts.gateways} gateways x {opts.devices} devices, "
                 f"{opts.window_s}s windows, running {int(elapsed_s)}s")
    if pub is not None:
        catching = " (catching up the backfill)" if pub.behind_ms > 2000 else ""
        lines.append(f"simulator: {pub.published:,} readings published, "
                     f"{pub.faults:,} faults injected, behind schedule "
                     f"{pub.behind_ms / 1000:.1f}s{catching}")
    lines.append("")
    lines.append(" ".join(f"{h:>{w}}" for h, _, w in GATEWAY_COLUMNS))
    totals: dict[str, float] = {}
    for a in agents:
        s = a.stats()
        row = []
        for h, k, w in GATEWAY_COLUMNS:
            if k == "gateway":
                row.append(f"{a.config.gateway:>{w}}")
                continue
            v = s.get(k, 0)
            if k == "watermark_lag_ms":
                v = round(v / 1000, 1)
            else:
                totals[k] = totals.get(k, 0) + v
            row.append(f"{_fmt(v):>{w}}")
            del h
        lines.append(" ".join(row))
    lines.append(" ".join(
        f"{'total':>{w}}" if k == "gateway" else
        f"{_fmt(totals.get(k, 0)) if k != 'watermark_lag_ms' else '':>{w}}"
        for _, k, w in GATEWAY_COLUMNS))
    c = worker.stats()
    lines.append("")
    lines.append(f"cloud: {c['batches_in']:,.0f} batches ({c['duplicate_batches']:,.0f} duplicate,"
                 f" {c['rejected_messages']:,.0f} bad), {c['results_in']:,.0f} window results, "
                 f"{c['anomalies']:,.0f} anomalous windows, {c['alerts_opened']:,.0f} alerts "
                 f"opened ({c['alerts_resolved']:,.0f} resolved), "
                 f"{c['unknown_device_results']:,.0f} unknown")
    lines.append(f"influxdb: {c['points_written']:,.0f} points written, "
                 f"{c['points_rejected']:,.0f} refused, {c['write_errors']:,.0f} write errors, "
                 f"{c['buffered_points']:,.0f} buffered")
    lines.append(f"end-to-end lag (edge publish -> InfluxDB): p50 {c['lag_p50_ms']:,.0f} ms, "
                 f"p99 {c['lag_p99_ms']:,.0f} ms; live window end -> InfluxDB p50 "
                 f"{c['freshness_p50_ms'] / 1000:,.1f} s")
    lines.append("")
    if final and not opts.influx_url:
        where = (f"its data is in {opts.workdir}" if opts.workdir else
                 "its data is kept, see below" if opts.keep else
                 "its data is deleted; --keep keeps it")
        hint = ("; to watch the fleet, run `fieldline demo` without --duration and open the "
                "view's URL" if opts.duration_s is not None else "")
        lines.append(f"data: the demo's InfluxDB stopped with it ({where}){hint}")
        return "\n".join(lines)
    lines.append(f"data: {influx_url}  database '{opts.database}'  (try: influx -port "
                 f"{influx_url.rsplit(':', 1)[-1]} -database {opts.database} -execute "
                 f"'SELECT * FROM alerts LIMIT 5')")
    lines.append("grafana: provision deploy/grafana/ (data source, 'fieldline fleet' dashboard, "
                 "alert rules) with FIELDLINE_INFLUX_URL set to the URL above, or run "
                 "`fieldline grafana push --url http://GRAFANA:3000 --token TOKEN "
                 f"--influx-url {influx_url} --database {opts.database}`")
    return "\n".join(lines)


async def run_demo(opts: DemoOptions) -> int:
    if opts.mqtt_url:  # before anything starts: a bad flag costs nothing
        parse_broker_url(opts.mqtt_url, "--mqtt-url")
    if opts.influx_url:
        check_http_url(opts.influx_url, "--influx-url")
    workdir = opts.workdir or Path(tempfile.mkdtemp(prefix="fieldline-demo-"))
    workdir.mkdir(parents=True, exist_ok=True)
    if not opts.headless:
        logging.basicConfig(filename=workdir / "demo.log", level=logging.INFO, force=True,
                            format="%(asctime)s %(levelname)s %(name)s %(message)s")
    services: list[Mosquitto | InfluxDB] = []
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    agents: list[EdgeAgent] = []
    pub: PublisherProcess | None = None
    view: ViewServer | None = None
    try:
        spec = FleetSpec(
            gateways=opts.gateways, devices_per_gateway=opts.devices, seed=opts.seed,
            topic_template="{gateway}/devices/{device}/readings",
            spike_fraction=1 / 3000, spike_after_ms=int(opts.window_s * 1000 * 22),
            spike_spacing_ms=300_000, disorder_fraction=0.05, late_fraction=0.001,
            straggler_fraction=0.002, straggler_delay_ms=int(opts.window_s * 1000 * 1.5),
            late_delay_ms=opts.window_s * 1000 * 6, malformed_fraction=0.0005,
            out_of_range_fraction=0.0005,
            faults=tuple(f.spec(opts.backfill_s * 1000) for f in opts.faults),
        )
        gw_ids = spec.gateway_ids()
        print(f"starting services in {workdir} ...", file=sys.stderr)
        gw_brokers: dict[str, BrokerAddress] = {}
        if opts.mqtt_url:
            shared = parse_broker_url(opts.mqtt_url, "--mqtt-url")
            gw_brokers = dict.fromkeys(gw_ids, shared)
            cloud_broker = shared
        else:
            for gw in gw_ids:
                b = Mosquitto(workdir / f"mosquitto-{gw}").start()
                services.append(b)
                gw_brokers[gw] = b.address
            cb = Mosquitto(workdir / "mosquitto-cloud").start()
            services.append(cb)
            cloud_broker = cb.address
        if opts.influx_url:
            influx_url = opts.influx_url
        else:
            ix = InfluxDB(workdir / "influxdb").start()
            services.append(ix)
            influx_url = ix.url

        if opts.view:
            view = _start_view(opts, influx_url, created=not opts.influx_url)
            print(f"view: {view.url}  (the fleet live in a browser; Ctrl-C stops the demo)",
                  flush=True)
        start_ms = time.time_ns() // 1_000_000 - opts.backfill_s * 1000
        registry_path = workdir / "devices.csv"
        FleetSimulator(spec, start_ms).registry().to_csv(registry_path)
        engine = EngineConfig(
            windows=(WindowSpec(size_ms=opts.window_s * 1000),
                     WindowSpec(size_ms=opts.window_s * 6000)),
            time=EventTimeSpec(out_of_orderness_ms=2000,
                               allowed_lateness_ms=opts.window_s * 1000 * 3,
                               idle_timeout_ms=30_000))
        for gw in gw_ids:
            agents.append(EdgeAgent(EdgeConfig(
                gateway=gw, intake_broker=gw_brokers[gw], uplink_broker=cloud_broker,
                topics=[f"{gw}/devices/+/readings"], device_topic_level=2, engine=engine,
                registry_path=registry_path, state_dir=workdir / "state" / gw,
                flush_on_stop=True, health_interval_ms=2000)))
        worker = CloudWorker(CloudConfig(
            worker_id="demo", broker=cloud_broker, registry_path=registry_path,
            influx=InfluxConfig(url=influx_url, database=opts.database), health_interval_ms=2000,
            state_dir=workdir / "state" / "cloud"))
        # what an operator runs beside the real thing works beside the demo too
        me = _own_command()
        status = (f"status: {me} edge status --state-dir {workdir / 'state' / gw_ids[0]}"
                  f"  |  {me} cloud status --state-dir {workdir / 'state' / 'cloud'}")
        # the backfill's windows end minutes before they reach InfluxDB by design: the summary's
        # window end -> InfluxDB is that of the live windows
        worker.freshness_since_ms = start_ms + opts.backfill_s * 1000

        worker_stop = asyncio.Event()
        agent_stop = asyncio.Event()
        tasks = [asyncio.create_task(worker.run(worker_stop), name="cloud-worker")]
        tasks += [asyncio.create_task(a.run(agent_stop), name=f"edge-{a.config.gateway}")
                  for a in agents]
        await _wait_connected(agents, worker)
        pub = PublisherProcess(spec, gw_brokers, start_ms, duration_s=opts.duration_s,
                               truth_path=workdir / "truth.jsonl")
        pub.start()
        if opts.headless:
            print(status, file=sys.stderr, flush=True)
        t0 = time.monotonic()
        while not stop.is_set() and not pub.finished:
            if not opts.headless:
                sys.stdout.write("\x1b[H\x1b[2J" + render(agents, worker, pub, opts, influx_url,
                                                          time.monotonic() - t0, view=view,
                                                          status=status)
                                 + "\n")
                sys.stdout.flush()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 1.0)
        print("\nstopping: simulator, edge agents, cloud worker, services ...", file=sys.stderr)
        await asyncio.to_thread(pub.stop)
        # let the agents take what their brokers still hold for them before they stop
        deadline = time.monotonic() + 20
        while (sum(a.pipeline.counters["messages_in"] for a in agents) < pub.published
               and time.monotonic() < deadline):
            await asyncio.sleep(0.2)
        agent_stop.set()
        await asyncio.gather(*tasks[1:])
        emitted = sum(a.pipeline.counters["windows_emitted"] for a in agents)
        deadline = time.monotonic() + 15
        while worker.stats()["results_written"] < emitted and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
        worker_stop.set()
        await tasks[0]
        print(render(agents, worker, pub, opts, influx_url, time.monotonic() - t0, final=True,
                     view=view))
        return 0
    finally:
        if pub is not None:
            pub.stop()
        if view is not None:
            view.stop()
        for s in reversed(services):
            s.stop()
        if not opts.keep and opts.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
        elif opts.keep:
            print(f"kept {workdir}", file=sys.stderr)


def _own_command() -> str:
    """``fieldline`` as the user can type it: the bare name when it is on the PATH as this
    installation's, else the path of this installation's (e.g. ``.venv/bin/fieldline``)."""
    here = Path(sys.executable).parent / "fieldline"
    if not here.exists() or shutil.which("fieldline") == str(here):
        return "fieldline"
    try:
        return str(here.relative_to(Path.cwd()))
    except ValueError:
        return str(here)


def _start_view(opts: DemoOptions, influx_url: str, *, created: bool) -> ViewServer:
    client = InfluxV1Client(influx_url, opts.database)
    if created:  # the worker creates it too; the view may be opened before the worker starts
        client.create_database()
    cfg = ViewConfig(host=opts.view_host, port=opts.view_port)
    try:
        return ViewServer(client, cfg).start()
    except OSError as exc:
        if opts.view_port == 0:
            raise
        log.warning("view port %d taken (%s): using a free port", opts.view_port, exc)
        return ViewServer(client, ViewConfig(host=opts.view_host, port=0)).start()


async def _wait_connected(agents: list[EdgeAgent], worker: CloudWorker,
                          timeout_s: float = 15.0) -> None:
    deadline = time.monotonic() + timeout_s
    src = worker.source
    while time.monotonic() < deadline:
        ok = all(a.intake.subscribed.is_set() and a.uplink.connected.is_set() for a in agents)
        ready = getattr(src, "connected", None)
        if ok and (ready is None or ready.is_set()):
            return
        await asyncio.sleep(0.05)
    raise RuntimeError("edge agents or cloud worker did not connect to their brokers")
