// fieldline's built-in view: fleet, device, anomalies and pipeline health, refreshed in place.
// Every number comes from /api/panel/<key>: panels defined once in cloud/panels.py, the same
// ones the Grafana dashboards are generated from. Charts: uPlot (vendored, no CDN).
"use strict";
(() => {
  const state = {
    meta: null, range: "1h", route: null, charts: new Map(), timer: null, busy: false,
    refreshes: 0, loadId: Math.random().toString(36).slice(2), windowSpec: null,
    fleetTree: null, fleetFilter: "", fleetOpen: new Set(), nextAt: 0,
  };
  window.fieldline = state; // read by the browser tests: loadId survives only without reload

  const PALETTE = ["#2563eb", "#dc2626", "#059669", "#d97706", "#7c3aed", "#0891b2",
                   "#db2777", "#65a30d", "#9333ea", "#ea580c", "#0f766e", "#4b5563"];
  const color = i => PALETTE[i % PALETTE.length];

  function h(tag, attrs = {}, ...kids) {
    const e = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs)) {
      if (v === undefined || v === null) continue;
      if (k === "class") e.className = v;
      else if (k === "text") e.textContent = v;
      else e.setAttribute(k, v);
    }
    for (const c of kids) if (c !== null && c !== undefined) e.append(c);
    return e;
  }

  async function api(path, params = {}) {
    const q = new URLSearchParams({ range: state.range });
    for (const [k, v] of Object.entries(params)) if (v) q.set(k, v);
    const r = await fetch(`api/${path}?${q}`, { cache: "no-store" });
    const body = await r.json();
    if (!r.ok) throw new Error(body.error || r.statusText);
    return body;
  }
  const panel = (key, params) => api(`panel/${encodeURIComponent(key)}`, params);
  const def = key => {
    for (const s of state.meta.sections) for (const p of s.panels) if (p.key === key) return p;
    throw new Error(`no panel ${key}`);
  };

  // ---- data shapes ------------------------------------------------------------------------
  function rowsOf(res) {
    const out = [];
    for (const q of res.queries) for (const s of q.series) {
      for (const v of s.values) {
        const o = { ...(s.tags || {}) };
        s.columns.forEach((c, i) => { o[c] = v[i]; });
        out.push(o);
      }
    }
    return out;
  }

  function lines(res) {
    const all = [];
    const times = new Set();
    for (const q of res.queries) for (const s of q.series) {
      const tag = Object.values(s.tags || {}).filter(Boolean).join(" ");
      for (let c = 1; c < s.columns.length; c++) {
        const label = [tag, (s.columns.length > 2 || !tag) ? s.columns[c] : ""]
          .filter(Boolean).join(" ");
        const pts = new Map();
        for (const v of s.values) if (v[c] !== null) { pts.set(v[0], v[c]); times.add(v[0]); }
        if (pts.size) all.push({ label, pts, zero: [...pts.values()].every(v => v === 0) });
      }
    }
    // many series (rejects by reason): the ones that stayed 0 all along would only crowd it
    const shown = all.length > 6 && all.some(l => !l.zero) ? all.filter(l => !l.zero) : all;
    const xs = [...times].sort((a, b) => a - b);
    return {
      labels: shown.map(l => l.label),
      data: [xs.map(t => t / 1000), ...shown.map(l => xs.map(t => (l.pts.has(t) ? l.pts.get(t) : null)))],
    };
  }

  // ---- formatting -------------------------------------------------------------------------
  function num(v, unit) {
    if (v === null || v === undefined || Number.isNaN(v)) return "";
    if (typeof v !== "number") return String(v);
    if (unit === "ms") return Math.abs(v) >= 10000 ? `${(v / 1000).toFixed(1)} s` : `${Math.round(v)} ms`;
    if (unit === "percentunit") return `${(100 * v).toFixed(Math.abs(v) >= 0.1 || v === 0 ? 0 : 1)} %`;
    if (unit === "reqps") {
      const a = Math.abs(v);
      return `${a >= 100 ? Math.round(v).toLocaleString() : a >= 1 || a === 0 ? v.toFixed(1) : v.toPrecision(2)}/s`;
    }
    if (Number.isInteger(v)) return v.toLocaleString();
    return Math.abs(v) >= 100 ? v.toFixed(1) : v.toPrecision(4);
  }
  const clock = ms => new Date(ms).toLocaleTimeString();
  const stamp = ms => new Date(ms).toLocaleString();

  // ---- charts -----------------------------------------------------------------------------
  function thresholdHook(thresholds) {
    return u => {
      for (const t of thresholds) {
        const y = u.valToPos(t.value, "y", true);
        if (!Number.isFinite(y) || y < u.bbox.top || y > u.bbox.top + u.bbox.height) continue;
        const ctx = u.ctx;
        ctx.save();
        ctx.strokeStyle = t.color === "red" ? "#dc2626" : "#d97706";
        ctx.setLineDash([4, 4]);
        ctx.beginPath();
        ctx.moveTo(u.bbox.left, y);
        ctx.lineTo(u.bbox.left + u.bbox.width, y);
        ctx.stroke();
        ctx.restore();
      }
    };
  }

  function place(el, key, sig, opts, data) {
    const width = Math.max(280, el.clientWidth - 2);
    const old = state.charts.get(key);
    if (old && old.sig === sig && old.width === width && old.el === el) {
      old.u.setData(data);
      return old.u;
    }
    if (old) old.u.destroy();
    el.textContent = "";
    const u = new uPlot({ ...opts, width }, data, el);
    state.charts.set(key, { u, sig, width, el });
    return u;
  }

  function lineChart(el, key, res, p) {
    const s = lines(res);
    el.dataset.series = String(s.labels.length);
    el.dataset.points = String(s.data[0].length);
    if (!s.labels.length) {
      const old = state.charts.get(key);
      if (old) { old.u.destroy(); state.charts.delete(key); }
      el.replaceChildren(h("div", { class: "empty", text: "no data in this range yet" }));
      return;
    }
    const opts = {
      height: 210,
      scales: { x: { time: true } },
      axes: [{}, { size: 64, values: (u, vals) => vals.map(v => num(v, p.unit)) }],
      series: [{}, ...s.labels.map((label, i) => ({
        label, stroke: color(i), width: 1.5, spanGaps: true, points: { show: false },
        value: (u, v) => num(v, p.unit),
      }))],
      hooks: { draw: [thresholdHook(p.thresholds)] },
    };
    place(el, key, s.labels.join("|"), opts, s.data);
  }

  function bandChart(el, key, metric, rows, anomalies) {
    rows.sort((a, b) => a.time - b.time);
    const xs = rows.map(r => r.time / 1000);
    const col = c => rows.map(r => (r[c] === undefined ? null : r[c]));
    const data = [xs, col("min"), col("max"), col("mean"), col("p95")];
    const marks = anomalies.filter(a => a.metric === metric || a.metric === "(device)");
    const revised = rows.filter(r => r.rev > 0);
    el.dataset.points = String(xs.length);
    el.dataset.anomalies = String(marks.length);
    el.dataset.revisions = String(revised.length);
    const markerHook = u => {
      const ctx = u.ctx;
      ctx.save();
      for (const r of revised) {
        const x = u.valToPos(r.time / 1000, "x", true);
        const y = u.valToPos(r.mean, "y", true);
        ctx.strokeStyle = "#d97706";
        ctx.lineWidth = 2;
        ctx.beginPath();
        ctx.arc(x, y, 4, 0, 2 * Math.PI);
        ctx.stroke();
      }
      for (const a of marks) {
        const at = rows.find(r => r.time === a.time);
        const v = a.value !== null && a.value !== undefined ? a.value : (at ? at.mean : null);
        if (v === null) continue;
        const x = u.valToPos(a.time / 1000, "x", true);
        const y = u.valToPos(v, "y", true);
        ctx.fillStyle = "#dc2626";
        ctx.strokeStyle = "#fff";
        ctx.lineWidth = 1.5;
        ctx.beginPath();
        ctx.arc(x, y, 5.5, 0, 2 * Math.PI);
        ctx.fill();
        ctx.stroke();
      }
      ctx.restore();
    };
    const unit = rows.length && rows[0].unit ? ` (${rows[0].unit})` : "";
    const opts = {
      height: 240,
      scales: {
        x: { time: true },
        // room for anomaly markers drawn at the flagged value
        y: { range: (u, lo, hi) => {
          const vals = marks.map(a => a.value).filter(v => typeof v === "number");
          const a = Math.min(lo, ...vals);
          const b = Math.max(hi, ...vals);
          const pad = (b - a) * 0.08 || 1;
          return [a - pad, b + pad];
        } },
      },
      axes: [{}, { size: 64, label: metric + unit }],
      series: [
        {},
        { label: "min", stroke: "rgba(37,99,235,0.35)", width: 1, points: { show: false }, spanGaps: true },
        { label: "max", stroke: "rgba(37,99,235,0.35)", width: 1, points: { show: false }, spanGaps: true },
        { label: "mean", stroke: "#1d4ed8", width: 2, points: { show: false }, spanGaps: true },
        { label: "p95", stroke: "#7c3aed", width: 1.5, dash: [6, 4], points: { show: false }, spanGaps: true },
      ],
      bands: [{ series: [2, 1], fill: "rgba(37,99,235,0.12)" }],
      hooks: { draw: [markerHook] },
    };
    place(el, key, `band|${metric}|${marks.map(a => a.time).join(",")}|${revised.map(r => r.time).join(",")}`, opts, data);
  }

  // ---- tables -----------------------------------------------------------------------------
  function table(rows, columns, opts = {}) {
    if (!rows.length) return h("div", { class: "empty", text: opts.empty || "nothing in this range" });
    const head = h("tr", {}, ...columns.map(c => h("th", { class: c.num ? "num" : "", text: c.label || c.key })));
    const body = rows.slice(0, opts.limit || 300).map(r => h("tr", {}, ...columns.map(c => {
      const v = r[c.key];
      if (c.render) return h("td", { class: c.num ? "num" : "" }, c.render(v, r));
      return h("td", { class: c.num ? "num" : (c.msg ? "msg" : ""), text: c.num ? num(v) : (v ?? "") });
    })));
    return h("div", { class: "tablewrap" }, h("table", {}, h("thead", {}, head), h("tbody", {}, ...body)));
  }
  const devLink = (v, r) => (r.gateway ? h("a", { href: `#/device/${encodeURIComponent(r.gateway)}/${encodeURIComponent(v)}`, text: v }) : v);
  const timeCol = { key: "time", label: "time", render: v => stamp(v) };

  function card(p, body, wide) {
    return h("section", { class: "card" + (wide ? " wide" : ""), "data-panel": p.key },
      h("h2", { text: p.title }), p.description ? h("div", { class: "desc", text: p.description }) : null, body);
  }

  // ---- pages ------------------------------------------------------------------------------
  const pages = {};

  // A gateway with more devices than this shows the ones that need attention (silent, with
  // anomalies, with a skewed clock) and folds the healthy ones away: 10,000 chips redrawn every
  // few seconds are neither readable nor cheap. The filter finds any device by name.
  const SHOW_ALL = 120;
  // site-2 before site-10, dev-9 before dev-10
  const natural = new Intl.Collator(undefined, { numeric: true, sensitivity: "base" });
  const byName = (a, b) => natural.compare(a[0], b[0]);
  const MAX_CHIPS = 300;
  const SILENT_LISTED = 50;  // the most silent devices a gateway's report names (edge/agent.py)
  const REPORT_FRESH_MS = 120000;  // a gateway's report this recent vouches for its devices

  function chip(gw, d) {
    return h("a", {
      class: "dev" + (d.silent ? " silent" : ""), "data-device": d.device,
      href: `#/device/${encodeURIComponent(gw)}/${encodeURIComponent(d.device)}`,
      title: `last window ${stamp(d.time)}; ${d.readings} readings in it` +
        (d.skew !== null && d.skew !== undefined ? `; clock offset ${d.skew} ms` : ""),
    }, d.device, d.anomalies ? h("span", { class: "badge", text: String(d.anomalies) }) : null,
    d.skew ? h("span", { class: "skew", text: `${d.skew > 0 ? "+" : ""}${num(d.skew, "ms")}` }) : null);
  }

  function chips(gw, devices, limit, more) {
    const box = h("div", { class: "devices" }, ...devices.slice(0, limit).map(d => chip(gw, d)));
    if (devices.length > limit) box.append(h("span", { class: "more", text: `… ${num(devices.length - limit)} more${more}` }));
    return box;
  }

  function gatewayBlock(gw, devices) {
    const silent = devices.filter(d => d.silent).length;
    const anomalous = devices.filter(d => d.anomalies).length;
    const head = h("h3", { text: [`gateway ${gw} · ${num(devices.length)} devices`,
      silent ? `${num(silent)} silent` : "", anomalous ? `${num(anomalous)} with anomalies` : ""]
      .filter(Boolean).join(" · ") });
    const block = h("div", { class: "gateway", "data-gateway": gw }, head);
    const needle = state.fleetFilter;
    if (needle) {
      const hits = devices.filter(d => d.device.toLowerCase().includes(needle));
      block.dataset.matches = String(hits.length);
      block.append(hits.length ? chips(gw, hits, MAX_CHIPS, ": narrow the filter") : h("div", { class: "desc", text: "no device matches" }));
      return block;
    }
    if (devices.length <= SHOW_ALL) {
      block.append(chips(gw, devices, SHOW_ALL, ""));
      return block;
    }
    const needs = d => d.silent || d.anomalies || d.skew;
    // the most pressing first: anomalies, then clocks, then silence
    const rank = d => (d.anomalies ? 0 : d.skew ? 1 : 2);
    let attention = devices.filter(needs).sort((a, b) => rank(a) - rank(b) || (b.anomalies - a.anomalies));
    let healthy = devices.filter(d => !needs(d));
    let label = `${num(healthy.length)} healthy devices`;
    if (silent === devices.length) {  // the gateway, or its uplink, rather than its devices
      block.append(h("div", { class: "desc warn", text: "no device of this gateway sent a window in " +
        `the last ${Math.round(state.meta.silent_after_s)} s: is the gateway or its uplink down?` }));
      healthy = attention.filter(d => !d.anomalies && !d.skew);
      attention = attention.filter(d => d.anomalies || d.skew);
      label = `${num(healthy.length)} silent devices`;
    }
    block.append(attention.length ? chips(gw, attention, MAX_CHIPS, ": use the filter")
      : h("div", { class: "desc", text: silent === devices.length ? "" : "every device reporting, no anomaly, no clock offset" }));
    const fold = h("details", { class: "healthy", "data-healthy": String(healthy.length) },
      h("summary", { text: label }));
    const fill = () => { if (fold.open && fold.children.length === 1) fold.append(chips(gw, healthy, 2000, ": use the filter")); };
    if (state.fleetOpen.has(gw)) fold.open = true;
    fold.addEventListener("toggle", () => {
      if (fold.open) state.fleetOpen.add(gw); else state.fleetOpen.delete(gw);
      fill();
    });
    fill();
    block.append(fold);
    return block;
  }

  function drawTree() {
    const tree = state.fleetTree;
    if (!tree) return;
    const out = [];
    for (const [siteName, gws] of [...tree.entries()].sort(byName)) {
      const sect = h("div", { class: "site", "data-site": siteName }, h("h2", { text: `site ${siteName}` }));
      for (const [gw, devices] of [...gws.entries()].sort(byName)) sect.append(gatewayBlock(gw, devices));
      out.push(sect);
    }
    document.getElementById("tree").replaceChildren(...(out.length ? out : [h("div", { class: "empty", text: "no device has sent a window in this range yet" })]));
  }

  // Every panel of a page is fetched at once; one that fails (InfluxDB slow on a large fleet)
  // says so in its own place and the others are still drawn.
  async function settled(keys) {
    const res = await Promise.allSettled(keys.map(k => panel(k)));
    const errors = [];
    const got = keys.map((k, i) => {
      if (res[i].status === "fulfilled") return res[i].value;
      errors.push(`${def(k).title}: ${res[i].reason.message}`);
      return null;
    });
    return { got, errors };
  }
  function failed(el, errors) {
    el.replaceChildren(h("div", { class: "err", text: `failed: ${errors.join("; ")}` }));
  }
  function chartOrError(key, res, errors) {
    const el = document.getElementById(`c-${key}`);
    if (res) lineChart(el, key, res, def(key));
    else { state.charts.get(key)?.u.destroy(); state.charts.delete(key); failed(el, errors.filter(e => e.startsWith(def(key).title))); }
  }

  pages.fleet = {
    title: "Fleet",
    build(main) {
      const filter = h("input", { id: "fleet-filter", type: "search", placeholder: "find a device", value: state.fleetFilter });
      filter.addEventListener("input", () => { state.fleetFilter = filter.value.trim().toLowerCase(); drawTree(); });
      main.append(h("h1", { text: "Fleet" }), h("div", { class: "stats", id: "fleet-stats" }),
        h("section", { class: "card wide", id: "fleet-tree", "data-panel": "fleet_devices" },
          h("h2", { text: "Sites → gateways → devices" }),
          h("div", { class: "desc", text: "green: a window within the last " +
            `${Math.round(state.meta.silent_after_s)} s, or its gateway, reporting, does not count it silent ` +
            "(each device judged against its own pace); grey: silent. Red badge: anomalous windows in range; " +
            `orange: clock offset reported by the edge. Gateways of more than ${SHOW_ALL} devices show ` +
            "the ones that need attention first. Click a device for its charts." }),
          h("div", { class: "controls" }, filter),
          h("div", { id: "tree" })));
      const grid = h("div", { class: "grid" });
      for (const key of ["fleet_silent", "fleet_mean_by_site"]) grid.append(card(def(key), h("div", { class: "chart", id: `c-${key}` })));
      main.append(h("br"), grid);
    },
    async update() {
      const { got, errors } = await settled(["fleet_devices", "fleet_anomalies", "fleet_clocks",
        "alerts_open", "fleet_silent", "fleet_mean_by_site"]);
      const [devs, anom, clocks, alerts, silent, site] = got;
      if (devs) {
        const now = devs.now;
        const anomRows = anom ? rowsOf(anom) : [];
        const count = new Map(anomRows.map(r => [`${r.gateway}/${r.device}`, r.anomalies]));
        const clk = new Map((clocks ? rowsOf(clocks) : []).map(r => [`${r.gateway}/${r.device}`, r]));
        // a gateway that reported lately names its silent devices itself (judged against each
        // device's own pace: a sensor heard from every 5 minutes is not silent between its
        // readings), as long as its report can list them all; the others are judged by their
        // newest window's age
        const reported = new Map();
        for (const r of silent ? rowsOf(silent) : []) {
          const was = reported.get(r.gateway);
          if (r.silent !== null && r.silent !== undefined && (!was || r.time > was.time)) reported.set(r.gateway, r);
        }
        const vouched = gw => {
          const g = reported.get(gw);
          return g !== undefined && now - g.time < REPORT_FRESH_MS && g.silent <= SILENT_LISTED;
        };
        const tree = new Map();
        let online = 0;
        let quiet = 0;
        for (const r of rowsOf(devs)) {
          const id = `${r.gateway}/${r.device}`;
          const c = clk.get(id);
          const edgeSilent = c && c.silent === true && now - c.time < 60000;
          const isSilent = edgeSilent || (!vouched(r.gateway) && (now - r.time) / 1000 > state.meta.silent_after_s);
          if (isSilent) quiet++; else online++;
          if (!tree.has(r.site)) tree.set(r.site, new Map());
          const gws = tree.get(r.site);
          if (!gws.has(r.gateway)) gws.set(r.gateway, []);
          gws.get(r.gateway).push({ ...r, silent: isSilent, anomalies: count.get(id) || 0, skew: c ? c["clock offset ms"] : null });
        }
        for (const gws of tree.values()) for (const devices of gws.values()) devices.sort((a, b) => natural.compare(a.device, b.device));
        // every alert open now, whenever it opened (by source)
        const openAlerts = alerts ? rowsOf(alerts).reduce((s, r) => s + (r.open || 0), 0) : null;
        const anomalous = anom ? anomRows.reduce((s, r) => s + r.anomalies, 0) : null;
        document.getElementById("fleet-stats").replaceChildren(
          ...[["sites", tree.size], ["gateways", [...tree.values()].reduce((s, g) => s + g.size, 0)],
            ["devices online", online], ["devices silent", quiet], ["anomalous windows", anomalous],
            ["alerts open", openAlerts]].map(([k, v]) => h("div", { class: "stat", "data-stat": k },
            h("b", { text: v === null ? "?" : num(v) }), h("span", { text: k }))));
        state.fleetTree = tree;
        drawTree();
      } else {
        failed(document.getElementById("tree"), errors);
      }
      chartOrError("fleet_silent", silent, errors);
      chartOrError("fleet_mean_by_site", site, errors);
      if (errors.length) throw new Error(errors.join("; "));
    },
  };

  pages.device = {
    title: "Device",
    async build(main, gateway, device) {
      const windows = (await api("variable/window")).values;
      if (!state.windowSpec || !windows.includes(state.windowSpec)) state.windowSpec = windows[0] || "";
      const sel = h("select", { id: "window-spec" }, ...windows.map(w => h("option", { value: w, text: w })));
      sel.value = state.windowSpec;
      sel.addEventListener("change", () => { state.windowSpec = sel.value; refresh(); });
      main.append(h("h1", { text: `${device}`, "data-device": device }),
        h("div", { class: "controls" }, h("span", { text: `gateway ${gateway}` }),
          h("label", { text: "window " }, sel), h("a", { href: "#/", text: "← fleet" })),
        h("div", { class: "legend-note" }, "mean (line), min–max band, p95 (dashed);",
          h("span", { class: "mk", style: "background:#dc2626" }), "anomaly",
          h("span", { class: "mk", style: "border:2px solid #d97706" }), "revised window"),
        h("div", { id: "metrics", "data-panel": "device_metric" }));
      const grid = h("div", { class: "grid" });
      grid.append(card(def("device_anomalies"), h("div", { id: "t-anomalies" })),
        card(def("device_revisions"), h("div", { id: "t-revisions" })));
      main.append(h("br"), grid);
    },
    async update(gateway, device) {
      const args = { gateway, device, window: state.windowSpec };
      const [m, an, rv] = await Promise.all([panel("device_metric", args),
        panel("device_anomalies", { gateway, device }), panel("device_revisions", args)]);
      const anomalies = rowsOf(an);
      const byMetric = new Map();
      for (const r of rowsOf(m)) {
        if (!byMetric.has(r.metric)) byMetric.set(r.metric, []);
        byMetric.get(r.metric).push(r);
      }
      const box = document.getElementById("metrics");
      if (!byMetric.size) box.replaceChildren(h("div", { class: "empty", text: "no windows of this device in range" }));
      for (const [metric, rows] of [...byMetric.entries()].sort()) {
        let c = box.querySelector(`[data-metric="${CSS.escape(metric)}"]`);
        if (!c) {
          box.querySelector(".empty")?.remove();
          c = h("section", { class: "card wide", "data-metric": metric }, h("h2", { text: metric }), h("div", { class: "chart" }));
          box.append(c);
        }
        bandChart(c.querySelector(".chart"), `band-${metric}`, metric, rows, anomalies);
      }
      document.getElementById("t-anomalies").replaceChildren(table(anomalies, [timeCol, { key: "metric" },
        { key: "detector" }, { key: "direction" }, { key: "score", num: true }, { key: "value", num: true },
        { key: "reference", num: true }, { key: "message", msg: true }], { empty: "no anomalies in range" }));
      document.getElementById("t-revisions").replaceChildren(table(rowsOf(rv), [timeCol, { key: "metric" },
        { key: "window" }, { key: "rev", num: true }, { key: "count", num: true }, { key: "mean", num: true }],
        { empty: "no window of this device was revised in range" }));
    },
  };

  pages.anomalies = {
    title: "Anomalies",
    build(main) {
      main.append(h("h1", { text: "Anomalies and alerts" }));
      const grid = h("div", { class: "grid" });
      grid.append(card(def("alerts"), h("div", { id: "t-alerts" }), true),
        card(def("anomalies"), h("div", { id: "t-anomalies" }), true),
        card(def("alerts_by_source"), h("div", { class: "chart", id: "c-alerts_by_source" })),
        card(def("anomalies_by_site"), h("div", { class: "chart", id: "c-anomalies_by_site" })));
      main.append(grid);
    },
    async update() {
      const [al, an, bySource, bySite] = await Promise.all([panel("alerts"), panel("anomalies"),
        panel("alerts_by_source"), panel("anomalies_by_site")]);
      document.getElementById("t-alerts").replaceChildren(table(rowsOf(al), [timeCol,
        { key: "device", render: devLink }, { key: "metric" }, { key: "source" }, { key: "name" },
        { key: "state" }, { key: "level" }, { key: "severity", num: true },
        { key: "message", msg: true }], { empty: "no alert in range" }));
      document.getElementById("t-anomalies").replaceChildren(table(rowsOf(an), [timeCol,
        { key: "device", render: devLink }, { key: "metric" }, { key: "detector" },
        { key: "direction" }, { key: "score", num: true }, { key: "value", num: true },
        { key: "reference", num: true }, { key: "message", msg: true }], { empty: "no anomalous window in range" }));
      lineChart(document.getElementById("c-alerts_by_source"), "alerts_by_source", bySource, def("alerts_by_source"));
      lineChart(document.getElementById("c-anomalies_by_site"), "anomalies_by_site", bySite, def("anomalies_by_site"));
    },
  };

  const HEALTH_CHARTS = ["edge_accepted", "edge_rejects", "edge_late", "edge_watermark_lag",
    "cloud_lag", "edge_outbox", "cloud_written", "edge_memory"];

  pages.health = {
    title: "Pipeline health",
    build(main) {
      main.append(h("h1", { text: "Pipeline health" }));
      const ledger = h("div", { class: "grid" },
        card(def("ledger_balance"), h("div", { id: "t-laws" }), true),
        card(def("ledger_gateways"), h("div", { id: "t-ledger" }), true));
      const grid = h("div", { class: "grid" });
      for (const key of HEALTH_CHARTS) grid.append(card(def(key), h("div", { class: "chart", id: `c-${key}` })));
      main.append(ledger, h("br"), grid, h("br"),
        h("div", { class: "grid" }, card(def("ledger_devices"), h("div", { id: "t-ledger-devices" }), true)));
    },
    async update() {
      const keys = ["ledger_balance", "ledger_gateways", "ledger_devices", ...HEALTH_CHARTS];
      const res = await Promise.all(keys.map(k => panel(k)));
      const got = Object.fromEntries(keys.map((k, i) => [k, res[i]]));
      const laws = state.meta.laws;
      const lawCell = v => (v === 0 ? h("span", { class: "holds", text: "holds" })
        : h("span", { class: "broken", text: v === null || v === undefined ? "no report" : `off by ${num(v)}` }));
      document.getElementById("t-laws").replaceChildren(
        h("div", { class: "desc" }, ...laws.map(l => h("div", { text: `${l.hop}: ${l.total} = ${l.parts.join(" + ")}` }))),
        table(rowsOf(got.ledger_balance), [{ key: "gateway" },
          ...laws.map(l => ({ key: l.hop, render: lawCell }))], { empty: "no ledger report in range" }));
      const ledgerCols = ["readings_received", "readings_accepted", "rejected", "late_dropped", "duplicates",
        "readings_gap", "broker_dropped", "windows_emitted", "windows_acked", "windows_shed", "windows_pending",
        "results_written"];
      document.getElementById("t-ledger").replaceChildren(table(rowsOf(got.ledger_gateways),
        [{ key: "gateway" }, ...ledgerCols.map(k => ({ key: k, label: k.replace(/_/g, " "), num: true }))]));
      document.getElementById("t-ledger-devices").replaceChildren(table(rowsOf(got.ledger_devices),
        [{ key: "gateway" }, { key: "device", render: devLink }, { key: "received", num: true },
          { key: "accepted", num: true }, { key: "rejected", num: true }, { key: "late", num: true },
          { key: "duplicates", num: true }, { key: "windows", num: true }], { limit: 200 }));
      for (const key of HEALTH_CHARTS) lineChart(document.getElementById(`c-${key}`), key, got[key], def(key));
    },
  };

  // ---- routing and refresh ----------------------------------------------------------------
  function parseRoute() {
    const parts = location.hash.replace(/^#\/?/, "").split("/").filter(Boolean).map(decodeURIComponent);
    const name = parts[0] || "fleet";
    return pages[name] ? { name, args: parts.slice(1) } : { name: "fleet", args: [] };
  }

  function setStatus(text, bad) {
    const s = document.getElementById("status");
    s.textContent = text;
    s.classList.toggle("error", !!bad);
  }

  // A page whose update takes long (a large fleet on a busy InfluxDB) is refreshed less often:
  // at most a third of the time goes to it, whatever refresh_s says.
  function tick() {
    if (Date.now() >= state.nextAt) refresh();
  }

  async function refresh() {
    if (state.busy || !state.route) return;
    state.busy = true;
    const route = state.route;
    const began = Date.now();
    try {
      await pages[route.name].update(...route.args);
      state.nextAt = began + Math.max(0, 3 * (Date.now() - began) - state.meta.refresh_s * 1000);
      if (route !== state.route) return;
      state.refreshes += 1;
      document.body.dataset.refreshes = String(state.refreshes);
      document.body.dataset.ready = "1";
      setStatus(`updated ${clock(Date.now())}`);
    } catch (e) {
      setStatus(`update failed: ${e.message}`, true);
    } finally {
      state.busy = false;
    }
  }

  async function show() {
    state.route = parseRoute();
    for (const c of state.charts.values()) c.u.destroy();
    state.charts.clear();
    document.body.dataset.page = state.route.name;
    document.body.dataset.ready = "0";
    for (const a of document.querySelectorAll("nav a")) a.classList.toggle("active", a.dataset.page === state.route.name);
    const main = document.getElementById("main");
    main.replaceChildren();
    document.title = `${pages[state.route.name].title} · fieldline`;
    try {
      await pages[state.route.name].build(main, ...state.route.args);
    } catch (e) {
      setStatus(`failed: ${e.message}`, true);
      return;
    }
    await refresh();
  }

  async function start() {
    state.meta = await api("meta");
    document.getElementById("database").textContent = state.meta.database;
    const sel = document.getElementById("range");
    for (const r of state.meta.ranges) sel.append(h("option", { value: r, text: r }));
    const saved = sessionStorage.getItem("fieldline-range");
    state.range = state.meta.ranges.includes(saved) ? saved : "1h";
    sel.value = state.range;
    sel.addEventListener("change", () => { state.range = sel.value; sessionStorage.setItem("fieldline-range", sel.value); refresh(); });
    window.addEventListener("hashchange", show);
    let resizeTimer = null;
    window.addEventListener("resize", () => { clearTimeout(resizeTimer); resizeTimer = setTimeout(refresh, 200); });
    state.timer = setInterval(tick, state.meta.refresh_s * 1000);
    await show();
  }

  start().catch(e => setStatus(`failed to start: ${e.message}`, true));
})();
