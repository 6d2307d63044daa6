"""The built-in web view, in a real headless browser against a running ``fieldline demo``.

Debian's ``chromium`` driven by ``chromium-driver`` through Selenium (make setup installs both):
every page loads without console errors, charts are drawn with real data (series present,
coloured pixels on the canvas), a spike the simulator injects into one device shows up as a
marker on that device's chart while the page is open, without a reload. Screenshots go to
``build/test-artifacts`` (or ``$FIELDLINE_ARTIFACTS``); the README's picture is one of them.

The server's allow-list and credentials are checked against a real InfluxDB with auth enabled.
"""

from __future__ import annotations

import http.client
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

import orjson
import pytest

from bench.common import wait_until
from cloud.panels import PANELS, VARIABLE_NAMES, Params, render
from cloud.sinks.influx_v1 import InfluxV1Client
from fieldline.services import InfluxDB
from fieldline.view.server import ViewConfig, ViewServer

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = Path(os.environ.get("FIELDLINE_ARTIFACTS", ROOT / "build" / "test-artifacts"))
# the page opens 2 s after the demo prints its URL here (Chromium started first): 25 s leave room
FAULT_GATEWAY, FAULT_DEVICE, FAULT_AT_S = "gw-1", "gw-1-t0001", 25


def first_line(proc: subprocess.Popen[str], timeout_s: float) -> str:
    """The first line a command prints, or "" if it prints none within ``timeout_s``."""
    got: list[str] = []
    reader = threading.Thread(target=lambda: got.append(proc.stdout.readline()),  # type: ignore[union-attr]
                              daemon=True)
    reader.start()
    reader.join(timeout_s)
    return got[0] if got else ""


@dataclass
class Demo:
    url: str
    proc: subprocess.Popen[str]
    started: float
    log: Path


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Demo]:
    """``fieldline demo`` as a user runs it (headless, until interrupted), with a spike
    scheduled on one device ``FAULT_AT_S`` seconds into the live run."""
    work = tmp_path_factory.mktemp("demo")
    log = work / "demo.err"
    with log.open("w") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "fieldline.cli", "demo", "--headless", "--gateways", "2",
             "--devices", "10", "--backfill", "240", "--view-port", "0",
             "--workdir", str(work / "run"), "--fault", f"spike@{FAULT_DEVICE}+{FAULT_AT_S}"],
            stdout=subprocess.PIPE, stderr=err, text=True, cwd=ROOT)
    first = first_line(proc, 90)
    try:
        assert first, f"the demo printed nothing; stderr: {log.read_text()[-2000:]}"
        assert first.startswith("view: http://127.0.0.1:"), (
            f"the demo's first line is not the view's URL: {first!r}; "
            f"stderr: {log.read_text()[-2000:]}")
        yield Demo(first.split()[1], proc, time.monotonic(), log)
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    chromium = shutil.which("chromium")
    driver = shutil.which("chromedriver")
    if not chromium or not driver:
        pytest.fail("chromium and chromium-driver are not installed (make setup installs them)")
    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for a in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
              "--window-size=1400,1000", "--force-device-scale-factor=1"):
        opts.add_argument(a)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    d = webdriver.Chrome(service=Service(driver), options=opts)
    d.set_page_load_timeout(30)
    d.set_script_timeout(30)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    yield d
    d.quit()


def console_errors(d: Any) -> list[str]:
    return [e["message"] for e in d.get_log("browser") if e["level"] == "SEVERE"]


def open_page(d: Any, url: str) -> None:
    """A full load (not a hash change inside an open page), then its first update."""
    d.get("about:blank")
    d.get(url)
    wait_until(lambda: d.execute_script("return document.body.dataset.ready") == "1", 45,
               f"{url} to render", saw=lambda: d.find_element("id", "status").text)


INK_JS = """
const [sel, kind] = arguments;
let n = 0;
for (const el of document.querySelectorAll(sel)) {
  for (const c of el.querySelectorAll('canvas')) {
    const px = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
    for (let i = 0; i < px.length; i += 4) {
      const [r, g, b, a] = [px[i], px[i + 1], px[i + 2], px[i + 3]];
      if (a < 120) continue;
      if (kind === 'red' ? (r > 180 && g < 90 && b < 90)
                         : (Math.max(r, g, b) - Math.min(r, g, b) > 60)) n++;
    }
  }
}
return n;
"""


def ink(d: Any, selector: str, kind: str = "colour") -> int:
    """Saturated pixels drawn on the canvases under ``selector``: series and markers, not the
    grey grid or black axis labels."""
    n: int = d.execute_script(INK_JS, selector, kind)
    return n


def chart_with_data(d: Any, selector: str, timeout_s: float = 45) -> None:
    wait_until(lambda: d.execute_script(
        "const e = document.querySelector(arguments[0]);"
        "return e && Number(e.dataset.points || 0) > 0 && e.querySelector('canvas') !== null;",
        selector), timeout_s, f"a chart with data at {selector}",
        saw=lambda: d.find_element("id", "status").text)
    assert ink(d, selector) > 200, f"{selector}: canvas has no series drawn"


def marker_count(d: Any) -> int:
    n = d.execute_script(
        "const e = document.querySelector('[data-metric] .chart');"
        "return e && e.dataset.anomalies !== undefined ? Number(e.dataset.anomalies) : -1;")
    return int(n)


def test_injected_spike_appears_as_a_marker_while_the_page_is_open(demo: Demo,
                                                                  browser: Any) -> None:
    d = browser
    open_page(d, f"{demo.url}#/device/{FAULT_GATEWAY}/{FAULT_DEVICE}")
    chart_with_data(d, "[data-metric] .chart")
    load_id = d.execute_script("return window.fieldline.loadId")
    before = marker_count(d)
    red_before = ink(d, "[data-metric] .chart", "red")
    refreshes = int(d.execute_script("return window.fieldline.refreshes"))
    opened_s = time.monotonic() - demo.started
    # the spike is published FAULT_AT_S into the live run; its window closes ~12 s later
    wait_until(lambda: marker_count(d) > before, FAULT_AT_S + 120,
               "the injected spike's anomaly marker", saw=lambda: (marker_count(d), before))
    took_s = time.monotonic() - demo.started
    assert d.execute_script("return window.fieldline.loadId") == load_id, "the page reloaded"
    assert int(d.execute_script("return window.fieldline.refreshes")) > refreshes
    assert ink(d, "[data-metric] .chart", "red") > red_before, "no red marker drawn"
    rows = d.execute_script("return [...document.querySelectorAll('#t-anomalies tbody tr')]"
                            ".map(r => r.textContent)")
    assert any("spike" in r for r in rows), rows
    d.save_screenshot(str(ARTIFACTS / "view-device.png"))
    print(f"page opened {opened_s:.0f} s after the demo's URL, marker at {took_s:.0f} s "
          f"(spike scheduled {FAULT_AT_S} s into the live run)")
    assert console_errors(d) == []


def test_every_page_loads_without_console_errors_and_draws_real_data(demo: Demo,
                                                                     browser: Any) -> None:
    d = browser
    base = demo.url

    open_page(d, f"{base}#/")
    chart_with_data(d, "#c-fleet_mean_by_site")
    wait_until(lambda: d.execute_script(
        "return document.querySelectorAll('#tree .dev').length") >= 20, 30,
        "20 devices in the fleet tree")
    chips = d.execute_script(
        "return [...document.querySelectorAll('#tree .dev')].map(e => e.dataset.device)")
    assert FAULT_DEVICE in chips
    sites = d.execute_script("return [...document.querySelectorAll('#tree .site')]"
                             ".map(e => e.dataset.site)")
    assert len(sites) == 2
    badge = d.execute_script(
        "const e = document.querySelector(`#tree .dev[data-device='${arguments[0]}'] .badge`);"
        "return e ? Number(e.textContent) : 0;", FAULT_DEVICE)
    assert badge >= 1, "the device with the injected spike shows no anomaly count"
    d.save_screenshot(str(ARTIFACTS / "view-fleet.png"))
    assert console_errors(d) == []

    open_page(d, f"{base}#/anomalies")
    chart_with_data(d, "#c-anomalies_by_site")
    rows = d.execute_script("return [...document.querySelectorAll('#t-anomalies tbody tr')]"
                            ".map(r => r.textContent)")
    assert any(FAULT_DEVICE in r and "spike" in r for r in rows), rows
    d.save_screenshot(str(ARTIFACTS / "view-anomalies.png"))
    assert console_errors(d) == []

    open_page(d, f"{base}#/health")
    for key in ("edge_accepted", "edge_watermark_lag", "cloud_lag", "cloud_written",
                "edge_outbox"):
        chart_with_data(d, f"#c-{key}")
    law_rows = ("return [...document.querySelectorAll('#t-laws tbody tr')]"
                ".map(r => r.textContent)")
    wait_until(lambda: bool(d.execute_script(law_rows)), 30, "the ledger's laws")
    laws = d.execute_script(law_rows)
    assert len(laws) == 2, laws
    assert all(r.count("holds") == 2 for r in laws), laws
    d.save_screenshot(str(ARTIFACTS / "view-health.png"))
    assert console_errors(d) == []

    # a second device, reached by clicking it in the fleet tree
    open_page(d, f"{base}#/")
    wait_until(lambda: d.execute_script("return document.querySelectorAll('#tree .dev').length")
               >= 20, 30, "the fleet tree")
    d.execute_script("document.querySelector(\"#tree .dev[data-device='gw-2-h0002']\").click()")
    wait_until(lambda: d.execute_script("return document.body.dataset.page") == "device"
               and d.execute_script("return document.body.dataset.ready") == "1", 30,
               "the device page after a click")
    chart_with_data(d, "[data-metric] .chart")
    assert console_errors(d) == []


def test_a_fleet_of_hundreds_of_devices_shows_the_ones_that_need_attention(
        influx_db: InfluxV1Client, browser: Any) -> None:
    """A gateway of 400 devices lists its 6 that need attention (anomalies first, then skewed
    clocks, then silence) and folds the healthy ones away until asked; a gateway whose every
    device went silent says so instead of listing them; a small gateway shows all; the filter
    finds any device; an open fold stays open across refreshes; and a panel that fails (the
    site means, here) says so in its place while the tree is still drawn."""
    d = browser
    now = int(time.time() * 1000) // 10_000 * 10_000
    lines = []
    plan = [("big", 400, "s1"), ("down", 150, "s1"), ("small", 5, "s2"), ("tiny", 2, "s10"),
            ("slow", 3, "s2")]
    for gw, n, site in plan:
        for i in range(n):
            dev = f"{gw}-d{i:04d}"
            old = gw == "down" or i in (10, 20, 30)  # silent: its last window 10 min ago
            # slow: battery sensors heard from every 5 minutes, last 4 minutes ago, and their
            # gateway, reporting, says none is silent: the window's age alone does not judge
            t = now - (240_000 if gw == "slow" else 600_000 if old else 10_000)
            lines.append(f"aggregates,gateway={gw},site={site},device={dev},metric=t,window=10s,"
                         f"unit=C count=10i,sum=200,mean=20,min=19,max=21,p95=21 {t}")
    lines += [f"sites,gateway=big,site=s1,metric=t,window=10s devices=397i,readings=3970i,"
              f"sum=79400,min=19,max=21 {now - 10_000}"]
    for dev, n in (("big-d0100", 2), ("big-d0200", 5)):
        lines += [f"anomalies,gateway=big,site=s1,device={dev},metric=t,window=10s,detector=spike "
                  f"score=2,direction=1i,message=\"x\" {now - 10_000 * (k + 1)}" for k in range(n)]
    lines += [f"devices,gateway=big,device={dev} skew_ms={ms}i {now - 5_000}"
              for dev, ms in (("big-d0300", 2500), ("big-d0301", -1800))]
    lines += [f"pipeline,component=edge,gateway=slow devices_silent=0,devices_skewed=0 "
              f"{now - 5_000}"]
    # a site-wide incident: more alerts than the alerts table holds (its newest 200)
    lines += [f"alerts,gateway=big,site=s1,device=big-d{i:04d},metric=t,window=10s,source=rule,"
              f"name=hot state=\"open\",open=true,opened={now}i {now - 10_000 - i}"
              for i in range(250)]
    # one open for three days (before the page's range: open all the same), one resolved
    old = now - 3 * 86_400_000
    lines += [f"alerts,gateway=big,site=s1,device=big-d0398,metric=t,window=10s,source=detector,"
              f"name=novelty state=\"open\",open=true,opened={old}i {old}",
              f"alerts,gateway=big,site=s1,device=big-d0399,metric=t,window=10s,source=detector,"
              f"name=novelty state=\"resolved\",open=false,opened={now}i {now - 60_000}"]
    influx_db.write_lines(lines)
    view = ViewServer(influx_db, ViewConfig(port=0, refresh_s=1.0)).start()
    try:
        open_page(d, view.url + "#/")
        chips = ("return [...document.querySelectorAll("
                 "`#tree [data-gateway='${arguments[0]}'] .dev`)].map(e => e.dataset.device)")
        assert d.execute_script(chips, "big") == [
            "big-d0200", "big-d0100", "big-d0300", "big-d0301", "big-d0010", "big-d0020",
            "big-d0030"]
        fold = "return document.querySelector(`[data-gateway='${arguments[0]}'] details`)"
        assert d.execute_script(fold + ".dataset.healthy", "big") == "393"
        assert d.execute_script(fold + ".open", "big") is False
        assert d.execute_script(chips, "down") == []
        text = d.execute_script(
            "return document.querySelector(\"[data-gateway='down']\").textContent")
        assert "is the gateway or its uplink down?" in text
        assert "150 silent devices" in text
        assert d.execute_script(chips, "small") == [f"small-d{i:04d}" for i in range(5)]
        stats = d.execute_script("return Object.fromEntries([...document.querySelectorAll('.stat')]"
                                 ".map(e => [e.dataset.stat, e.querySelector('b').textContent]))")
        assert stats["devices online"] == "407", stats
        assert d.execute_script(chips, "slow") == [f"slow-d{i:04d}" for i in range(3)]
        assert not d.execute_script(
            "return [...document.querySelectorAll(\"[data-gateway='slow'] .dev.silent\")].length")
        sites = d.execute_script("return [...document.querySelectorAll('#tree .site')]"
                                 ".map(e => e.dataset.site)")
        assert sites == ["s1", "s2", "s10"]  # in natural order
        assert stats["devices silent"] == "153", stats
        assert stats["anomalous windows"] == "7", stats
        assert stats["alerts open"] == "251", stats  # exact: more than the alerts table holds

        d.execute_script(fold + ".querySelector('summary').click()", "big")
        assert len(d.execute_script(chips, "big")) == 7 + 393
        refreshes = int(d.execute_script("return window.fieldline.refreshes"))
        wait_until(lambda: int(d.execute_script("return window.fieldline.refreshes"))
                   >= refreshes + 2, 30, "two refreshes")
        assert d.execute_script(fold + ".open", "big") is True
        assert len(d.execute_script(chips, "big")) == 400

        d.execute_script("const f = document.getElementById('fleet-filter');"
                         "f.value = 'D012'; f.dispatchEvent(new Event('input'));")
        found = d.execute_script("return [...document.querySelectorAll('#tree .dev')]"
                                 ".map(e => e.dataset.device)")
        assert found == [f"{gw}-d012{i}" for gw in ("big", "down") for i in range(10)]
        d.execute_script("const f = document.getElementById('fleet-filter');"
                         "f.value = ''; f.dispatchEvent(new Event('input'));")
        assert d.execute_script("return window.fieldline.nextAt") >= 0  # paced refreshes are on

        # the site means' query fails (as InfluxDB timing out on it would): the rest is drawn
        d.execute_script("const f = window.fetch; window.fetch = (u, o) => String(u)"
                         ".includes('fleet_mean_by_site') ? Promise.resolve(new Response("
                         "JSON.stringify({error: 'InfluxDB timed out'}), {status: 502}))"
                         " : f(u, o);")
        wait_until(lambda: "update failed" in d.find_element("id", "status").text, 30,
                   "the failure reported", saw=lambda: d.find_element("id", "status").text)
        assert "Mean by site and metric: InfluxDB timed out" in d.find_element("id", "status").text
        assert "failed" in d.find_element("id", "c-fleet_mean_by_site").text
        assert len(d.execute_script(chips, "big")) == 400
        assert d.execute_script(chips, "small") == [f"small-d{i:04d}" for i in range(5)]
        assert console_errors(d) == []
    finally:
        view.stop()


# ---- the server: allow-listed queries, credentials kept ------------------------------------

def _get(url: str, path: str, method: str = "GET") -> tuple[int, bytes]:
    u = urlsplit(url)
    conn = http.client.HTTPConnection(u.hostname or "127.0.0.1", u.port, timeout=20)
    try:
        conn.request(method, path)
        r = conn.getresponse()
        return r.status, r.read()
    finally:
        conn.close()


def test_server_runs_only_its_panels_and_never_hands_out_credentials(tmp_path: Path) -> None:
    ix = InfluxDB(tmp_path / "influxdb", auth=True).start()
    try:
        user, password = "viewer-admin", "s3cret-Pa55"
        InfluxV1Client(ix.url, "fleet").query(
            f"CREATE USER \"{user}\" WITH PASSWORD '{password}' WITH ALL PRIVILEGES",
            database="")
        client = InfluxV1Client(ix.url, "fleet", username=user, password=password)
        client.create_database()
        now = int(time.time() * 1000) // 10_000 * 10_000
        lines = []
        for dev in ("d.1", "dx1", "a/b"):
            for k in range(5):
                lines.append(f"aggregates,gateway=g1,site=s1,device={dev},metric=temperature,"
                             f"window=10s,unit=degC count=10i,mean={20 + k},min=19,max={22 + k},"
                             f"p95=21,rev=0i {now - k * 10_000}")
        client.write_lines(lines)
        with pytest.raises(Exception, match=r"401|auth"):
            InfluxV1Client(ix.url, "fleet").query("SHOW MEASUREMENTS")

        view = ViewServer(client, ViewConfig(port=0)).start()
        try:
            url = view.url
            bodies = []
            for path in ("/", "/static/view.js", "/static/vendor/uPlot.iife.min.js",
                         "/api/meta", "/api/variable/device",
                         "/api/panel/fleet_devices?range=15m"):
                status, body = _get(url, path)
                assert status == 200, (path, body[:200])
                bodies.append(body)
            fleet = orjson.loads(bodies[-1])
            devices = {s["tags"]["device"] for q in fleet["queries"] for s in q["series"]}
            assert devices == {"d.1", "dx1", "a/b"}

            def device_rows(dev: str) -> set[str]:
                status, body = _get(url, f"/api/panel/device_metric?range=15m&gateway=g1"
                                         f"&device={quote(dev, safe='')}")
                assert status == 200, body
                doc = orjson.loads(body)
                bodies.append(body)
                return {str(len(s["values"])) for q in doc["queries"] for s in q["series"]}

            assert device_rows("d.1") == {"5"}  # the dot is not a wildcard: dx1 stays out
            assert device_rows("a/b") == {"5"}
            assert device_rows("x' OR 1=1") == set()
            assert device_rows(".*") == set()  # a value is a value, not a pattern

            for path, want in (("/api/panel/nope", 404), ("/api/query?q=DROP+DATABASE+fleet", 404),
                               ("/api/panel/alerts?range=2y", 400),
                               ("/api/panel/alerts?device=%01", 400),
                               ("/static/../server.py", 404), ("/etc/passwd", 404)):
                status, body = _get(url, path)
                assert status == want, (path, status, body[:200])
                bodies.append(body)
            assert _get(url, "/api/meta", "POST")[0] == 405
            assert _get(url, "/api/panel/alerts", "DELETE")[0] == 405
            client.query("SHOW DATABASES")  # still there

            ix.stop()  # InfluxDB gone: an error, without saying where InfluxDB is
            status, body = _get(url, "/api/panel/fleet_devices?range=5m")
            assert status == 502, body
            bodies.append(body)
            for body in bodies:
                for secret in (password, user, f":{ix.port}", "Basic "):
                    assert secret.encode() not in body, (secret, body[:300])
        finally:
            view.stop()
    finally:
        ix.stop()


def test_every_panel_renders_for_any_parameter_values() -> None:
    odd = {"site": "s 1", "gateway": "g/1", "metric": "a|b", "device": "d$(x)", "window": "1m"}
    for key, p in PANELS.items():
        for q in p.queries:
            for values in ({}, odd):
                text = render(q.text, Params.parse({"range": "1h", **values}))
                assert not re.search(r"(?<!\\)\$[A-Za-z_]", text), (key, text)
                assert text.startswith(("SELECT", "SHOW")), key
    assert set(odd) == set(VARIABLE_NAMES)


def test_fieldline_view_command_serves_a_database(influx_db: InfluxV1Client) -> None:
    """`fieldline view --config deploy/cloud.toml` (the shipped file, InfluxDB URL overridden):
    prints its URL first, serves the page and the panels, stops on Ctrl-C."""
    now = int(time.time() * 1000) // 10_000 * 10_000
    influx_db.write_lines([f"aggregates,gateway=g1,site=s1,device=d1,metric=humidity,window=10s,"
                           f"unit=pct count=3i,mean=40,min=39,max=41,p95=41,rev=0i {now}"])
    proc = subprocess.Popen(
        [sys.executable, "-m", "fieldline.cli", "view", "--config",
         str(ROOT / "deploy" / "cloud.toml"), "--influx-url", influx_db.url, "--database",
         influx_db.database, "--port", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        first = first_line(proc, 30)
        assert first, "fieldline view printed nothing"
        assert first.startswith("view: http://127.0.0.1:"), first
        url = first.split()[1]
        status, page = _get(url, "/")
        assert status == 200
        assert b"view.js" in page
        status, body = _get(url, "/api/panel/fleet_devices?range=5m")
        assert status == 200
        devices = [s["tags"]["device"] for q in orjson.loads(body)["queries"]
                   for s in q["series"]]
        assert devices == ["d1"]
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(20) == 0, proc.stderr.read() if proc.stderr else ""


def test_shipped_view_unit_runs_a_command_the_cli_accepts() -> None:
    import configparser
    import shlex

    from fieldline.cli import build_parser

    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.read_string((ROOT / "deploy" / "systemd" / "fieldline-view.service").read_text())
    argv = shlex.split(parser["Service"]["ExecStart"])
    assert argv[0].endswith("/fieldline")
    args = build_parser().parse_args(argv[1:])
    assert args.command == "view"
    assert args.host == "127.0.0.1"
    assert args.config == Path("/etc/fieldline/cloud.toml")


