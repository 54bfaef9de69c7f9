"""The admin status page: one self-contained HTML document that renders /topology and /history
every second: clusters, instances, endpoints with live charts (statements/s, p99), the drills
(last switchover, active faults) and a timeline of events."""

from __future__ import annotations

# Rules of this page: no external resources (the CSP forbids them), no innerHTML with data
# from the server (names and errors go in as text nodes), and it keeps working when a fetch
# fails (the last good view stays, dimmed, under a banner). Charts are SVG built with the DOM;
# every chart and event mark carries a data- attribute the browser test reads.
STATUS_PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>endpoint_proxy status</title>
<style>
  :root {
    --bg: #f4f6f9; --card: #ffffff; --ink: #1b2330; --muted: #6a7585; --line: #e1e6ee;
    --green: #1a7f46; --green-bg: #e3f5ea; --amber: #9a6200; --amber-bg: #fdf1d8;
    --red: #b42318; --red-bg: #fde7e5; --blue: #1d4fd8; --blue-bg: #e4ebfd; --grey-bg: #eceff3;
  }
  * { box-sizing: border-box; }
  body { margin: 0; background: var(--bg); color: var(--ink);
         font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, "DejaVu Sans", sans-serif; }
  header { display: flex; align-items: center; gap: 12px; padding: 12px 24px;
           background: #17202e; color: #fff; }
  header h1 { font-size: 18px; margin: 0; font-weight: 600; letter-spacing: .2px; }
  header .sub { color: #aab4c3; }
  header .right { margin-left: auto; display: flex; align-items: center; gap: 8px; color: #cdd5e0; }
  .dot { width: 10px; height: 10px; border-radius: 50%; background: #888; display: inline-block; }
  .dot.ok { background: #3ccf7a; } .dot.bad { background: #ff5a4f; }
  main { padding: 20px 24px; max-width: 1400px; }
  .banner { display: none; margin-bottom: 16px; padding: 10px 14px; border-radius: 8px;
            background: var(--red-bg); color: var(--red); font-weight: 600; }
  .stale .cluster { opacity: .55; }
  .cluster { background: var(--card); border: 1px solid var(--line); border-radius: 10px;
             padding: 16px 18px; margin-bottom: 20px; box-shadow: 0 1px 2px rgba(20,30,50,.05); }
  .cluster-head { display: flex; align-items: center; flex-wrap: wrap; gap: 10px; margin-bottom: 14px; }
  .cluster-head h2 { margin: 0; font-size: 20px; }
  .writer-box { margin-left: auto; font-size: 15px; }
  .writer-box b { font-size: 17px; }
  .badge { display: inline-block; padding: 1px 9px; border-radius: 999px; font-size: 12px; font-weight: 600;
           text-transform: lowercase; white-space: nowrap; background: var(--grey-bg); color: var(--muted); }
  .b-green { background: var(--green-bg); color: var(--green); }
  .b-amber { background: var(--amber-bg); color: var(--amber); }
  .b-red { background: var(--red-bg); color: var(--red); }
  .b-blue { background: var(--blue-bg); color: var(--blue); }
  h3 { font-size: 12px; text-transform: uppercase; letter-spacing: .6px; color: var(--muted);
       margin: 14px 0 8px; font-weight: 600; }
  .instances { display: grid; grid-template-columns: repeat(auto-fill, minmax(250px, 1fr)); gap: 12px; }
  .inst { border: 1px solid var(--line); border-radius: 8px; padding: 10px 12px; background: #fbfcfd; }
  .inst.writer { border-color: #8fb0f5; background: #f6f9ff; box-shadow: inset 3px 0 0 var(--blue); }
  .inst.down { border-color: #f1b3ad; }
  .inst-top { display: flex; align-items: baseline; gap: 8px; }
  .inst-name { font-size: 16px; font-weight: 700; }
  .addr { color: var(--muted); font-family: ui-monospace, "DejaVu Sans Mono", monospace; font-size: 12px; }
  .badges { display: flex; gap: 6px; margin: 6px 0; flex-wrap: wrap; }
  .kv { display: grid; grid-template-columns: auto 1fr; gap: 1px 10px; font-size: 13px; }
  .kv dt { color: var(--muted); } .kv dd { margin: 0; font-variant-numeric: tabular-nums; }
  .err { margin-top: 6px; color: var(--red); font-size: 12px; word-break: break-word; }
  table { border-collapse: collapse; width: 100%; }
  th, td { text-align: left; padding: 6px 10px; border-bottom: 1px solid var(--line); vertical-align: middle; }
  th { font-size: 12px; color: var(--muted); font-weight: 600; }
  td.mono { font-family: ui-monospace, "DejaVu Sans Mono", monospace; font-size: 12px; }
  .chip { display: inline-block; padding: 0 8px; margin: 0 4px 2px 0; border-radius: 6px;
          background: var(--grey-bg); font-size: 13px; }
  .chip.w { background: var(--blue-bg); color: var(--blue); font-weight: 600; }
  .none { color: var(--red); font-weight: 600; }
  .empty { color: var(--muted); padding: 30px 0; }
  .drills { display: flex; flex-wrap: wrap; gap: 8px 18px; align-items: center; margin: -4px 0 8px;
            font-size: 13px; color: var(--muted); }
  .drills b { color: var(--ink); }
  .fault { display: inline-block; padding: 1px 9px; border-radius: 999px; background: var(--amber-bg);
           color: var(--amber); font-weight: 600; font-size: 12px; margin-right: 6px; }
  td.chart { width: 210px; padding-top: 4px; padding-bottom: 2px; }
  .chart-box { display: flex; align-items: center; gap: 8px; }
  .chart-box svg { width: 140px; height: 34px; background: #f7f9fc; border: 1px solid var(--line);
                   border-radius: 4px; flex: none; }
  .chart-val { font-variant-numeric: tabular-nums; font-size: 13px; white-space: nowrap; min-width: 60px; }
  .timeline svg { width: 100%; height: 46px; background: #f7f9fc; border: 1px solid var(--line);
                  border-radius: 6px; }
  .events { list-style: none; margin: 8px 0 0; padding: 0; font-size: 13px; max-height: 190px; overflow: auto; }
  .events li { display: flex; gap: 10px; padding: 2px 0; border-bottom: 1px dashed var(--line); }
  .events .t { color: var(--muted); font-variant-numeric: tabular-nums; white-space: nowrap; }
  .events .d { word-break: break-word; }
  .legend { font-size: 12px; color: var(--muted); display: flex; gap: 12px; margin-top: 4px; flex-wrap: wrap; }
  .sw { display: inline-block; width: 9px; height: 9px; border-radius: 2px; margin-right: 4px;
        vertical-align: -1px; }
</style>
</head>
<body>
<header>
  <h1>endpoint_proxy</h1><span class="sub">cluster status</span>
  <span class="right"><span id="dot" class="dot"></span><span id="updated">connecting&hellip;</span></span>
</header>
<main id="main">
  <div id="banner" class="banner"></div>
  <div id="clusters"><div class="empty">Loading topology&hellip;</div></div>
</main>
<script>
"use strict";
function h(tag, props, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(props || {})) {
    if (k === "class") el.className = v; else el.setAttribute(k, v);
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}
const ROLE = {writer: "b-blue", reader: "b-green", fenced: "b-red", unknown: ""};
const HEALTH = {up: "b-green", suspect: "b-amber", down: "b-red", unknown: ""};
const STATUS = {"available": "b-green", "failing-over": "b-amber", "no-writer": "b-red"};
function badge(text, cls, title) {
  const b = h("span", {class: "badge " + (cls || "")}, text);
  if (title) b.title = title;
  return b;
}
function bytes(n) {
  if (n === null || n === undefined) return "\\u2013";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0; let v = n;
  while (v >= 1024 && i < units.length - 1) { v /= 1024; i++; }
  return (i ? v.toFixed(1) : String(v)) + " " + units[i];
}
function ms(n) {
  if (n === null || n === undefined) return "\\u2013";
  return n < 1000 ? Math.round(n) + " ms" : (n / 1000).toFixed(1) + " s";
}
function instance(c, i) {
  let lagCls = "";
  if (i.role === "reader" && i.lag_ms !== null) lagCls = i.lag_ms <= c.max_replica_lag_ms ? "b-green" : "b-amber";
  const classes = ["inst"];
  if (i.is_writer) classes.push("writer");
  if (i.health === "down") classes.push("down");
  return h("div", {class: classes.join(" "), "data-instance": i.name, "data-role": i.role},
    h("div", {class: "inst-top"}, h("span", {class: "inst-name"}, i.name), h("span", {class: "addr"}, i.address)),
    h("div", {class: "badges"},
      badge(i.role, ROLE[i.role], "role"), badge(i.health, HEALTH[i.health], "health"),
      i.role === "reader" ? badge("lag " + ms(i.lag_ms), lagCls, "replication lag") : null,
      i.fenced ? badge("fenced", "b-red", "claims to be writable while a newer primary exists") : null),
    h("dl", {class: "kv"},
      h("dt", {}, "lag"), h("dd", {}, bytes(i.lag_bytes) + " \\u00b7 " + ms(i.lag_ms)),
      h("dt", {}, "timeline"), h("dd", {}, i.timeline === null ? "\\u2013" : i.timeline),
      h("dt", {}, "connections"), h("dd", {}, i.connections),
      h("dt", {}, "last probe"),
      h("dd", {}, i.last_probe_age_ms === null ? "never" : ms(i.last_probe_age_ms) + " ago")),
    i.last_error ? h("div", {class: "err"}, i.last_error) : null);
}
const SVG = "http://www.w3.org/2000/svg";
function svg(tag, attrs, ...children) {
  const el = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs || {})) el.setAttribute(k, v);
  for (const c of children) if (c) el.append(c);
  return el;
}
const WINDOW_S = 300;  // the charts and the timeline show at most the last five minutes
const MIN_SPAN_S = 60;  // ... and at least one, so a young proxy's charts are not squeezed
let history = {now: null, clusters: []};
// The time span shown: from the first sample or event (at most WINDOW_S ago) to now.
function span() {
  const now = history.now || Date.now() / 1000;
  let first = now;
  for (const c of history.clusters) {
    for (const e of c.endpoints) if (e.points.length) first = Math.min(first, e.points[0][0]);
    for (const e of c.events) first = Math.min(first, e.at);
  }
  const width = Math.min(WINDOW_S, Math.max(MIN_SPAN_S, now - first));
  return {t0: now - width, width: width};
}
function seriesOf(cluster, endpoint) {
  const c = history.clusters.find(x => x.name === cluster);
  const e = c && c.endpoints.find(x => x.name === endpoint);
  return e ? e.points : [];
}
// A small chart of one column of the points ([at, statements/s, p50, p99]) over the last WINDOW_S.
function chart(points, col, color, kind) {
  const W = 140, H = 34, {t0, width} = span();
  const shown = points.filter(p => p[0] >= t0);
  const values = shown.map(p => p[col]).filter(v => v !== null);
  const max = Math.max(1e-9, ...values) * 1.1;
  const box = svg("svg", {viewBox: `0 0 ${W} ${H}`, preserveAspectRatio: "none", "data-chart": kind,
                          "data-points": String(values.length)});
  let d = "";
  let pen = false;
  for (const p of shown) {
    if (p[col] === null) { pen = false; continue; }
    const x = ((p[0] - t0) / width * W).toFixed(1);
    const y = (H - 2 - (p[col] / max) * (H - 4)).toFixed(1);
    d += (pen ? " L" : " M") + x + " " + y;
    pen = true;
  }
  if (d) box.append(svg("path", {d: d.trim(), fill: "none", stroke: color, "stroke-width": "1.6",
                                 "vector-effect": "non-scaling-stroke"}));
  return box;
}
function number(v, unit) {
  if (v === null || v === undefined) return "\\u2013";
  return (v >= 100 ? Math.round(v) : v >= 10 ? v.toFixed(1) : v.toFixed(2)) + unit;
}
function endpoints(c) {
  const rows = c.endpoints.map(e => {
    const points = seriesOf(c.name, e.name);
    return h("tr", {"data-endpoint": e.name},
      h("td", {}, h("b", {}, e.name)),
      h("td", {}, e.kind + (e.kind === "custom" ? " (" + e.role + ")" : "")),
      h("td", {class: "mono"}, e.listen),
      h("td", {}, e.members.length
        ? e.members.map(m => h("span", {class: "chip" + (m === c.writer ? " w" : "")}, m))
        : h("span", {class: "none"}, "no members")),
      h("td", {class: "chart"}, h("div", {class: "chart-box"}, chart(points, 1, "#1d4fd8", "rate"),
        h("span", {class: "chart-val", title: "statements per second, last 10 s"},
          number(e.statements_per_s, "/s")))),
      h("td", {class: "chart"}, h("div", {class: "chart-box"}, chart(points, 3, "#b42318", "p99"),
        h("span", {class: "chart-val", title: "p99 and p50 latency, last 10 s"},
          number(e.p99_ms, " ms"), h("br", {}), h("small", {}, "p50 " + number(e.p50_ms, " ms"))))));
  });
  return h("table", {}, h("thead", {}, h("tr", {}, h("th", {}, "endpoint"), h("th", {}, "kind"),
    h("th", {}, "listen"), h("th", {}, "members now"), h("th", {}, "statements/s"),
    h("th", {}, "p99 latency"))), h("tbody", {}, rows));
}
function clock(t) {
  return new Date(t * 1000).toLocaleTimeString();
}
function drills(c) {
  const parts = [];
  const s = c.last_switchover;
  if (c.switchover_running) parts.push(badge("switchover running", "b-amber"));
  if (s) {
    parts.push(h("span", {"data-switchover": s.outcome}, "last switchover ", h("b", {}, s.from + " \\u2192 " + s.to),
      " ", badge(s.outcome, s.outcome === "completed" ? "b-green" : "b-red"),
      " writes paused " + ms(s.pause_ms) + " at " + clock(s.at)));
  } else {
    parts.push(h("span", {}, "promotion: " + (c.promotion || "none")));
  }
  const faults = c.faults || [];
  parts.push(faults.length
    ? h("span", {"data-faults": String(faults.length)}, "faults ",
        faults.map(f => h("span", {class: "fault", "data-fault": f.kind},
          "#" + f.id + " " + f.description + " \\u00b7 " + Math.ceil(f.expires_in_s) + " s")))
    : h("span", {"data-faults": "0"}, "no faults injected"));
  return h("div", {class: "drills"}, parts);
}
const EVENT_COLOR = {writer_changed: "#1d4fd8", switchover: "#6b21a8", fault_started: "#b45309",
                     fault_lifted: "#15803d", instance_down: "#b42318", instance_up: "#0f766e",
                     instance_fenced: "#7f1d1d"};
function timeline(c) {
  const hc = history.clusters.find(x => x.name === c.name);
  const events = hc ? hc.events : [];
  const W = 1000, H = 46, {t0, width} = span();
  const box = svg("svg", {viewBox: `0 0 ${W} ${H}`, preserveAspectRatio: "none", "data-timeline": c.name});
  for (let m = 0; m <= 5; m++) {
    const x = m * W / 5;
    box.append(svg("line", {x1: x, x2: x, y1: 0, y2: H, stroke: "#e1e6ee", "stroke-width": "1"}));
  }
  for (const e of events) {
    if (e.at < t0) continue;
    const x = (e.at - t0) / width * W;
    const mark = svg("rect", {x: (x - 2).toFixed(1), y: 6, width: 4, height: H - 12, rx: 1,
                              fill: EVENT_COLOR[e.kind] || "#6a7585", "data-event-kind": e.kind});
    const title = svg("title", {});
    title.textContent = clock(e.at) + " " + e.kind + (e.instance ? " " + e.instance : "") +
      (e.detail ? ": " + e.detail : "");
    mark.append(title);
    box.append(mark);
  }
  const ago = width >= 120 ? Math.round(width / 60) + " min" : Math.round(width) + " s";
  const legend = h("div", {class: "legend"}, h("span", {}, "\\u2190 " + ago + " ago"),
    Object.entries(EVENT_COLOR).map(([k, col]) => {
      const sw = h("span", {class: "sw"});
      sw.style.background = col;
      return h("span", {}, sw, k.replace("_", " "));
    }), h("span", {}, "now \\u2192"));
  const recent = events.slice(-40).reverse().map(e => h("li", {"data-event": e.kind},
    h("span", {class: "t"}, clock(e.at)), badge(e.kind.replace("_", " "), ""),
    h("span", {class: "d"}, [e.instance, e.detail].filter(x => x).join(": "))));
  return h("div", {class: "timeline"}, box, legend,
    recent.length ? h("ul", {class: "events"}, recent) : h("div", {class: "legend"}, "no events yet"));
}
function cluster(c) {
  const writer = c.writer
    ? h("span", {class: "writer-box"}, "writer ", h("b", {}, c.writer))
    : h("span", {class: "writer-box none"},
        "no writer" + (c.writer_lost_ms !== null ? " for " + ms(c.writer_lost_ms) : ""));
  return h("section", {class: "cluster", "data-cluster": c.name},
    h("div", {class: "cluster-head"}, h("h2", {}, c.name), badge(c.protocol, ""),
      badge(c.status, STATUS[c.status]), writer),
    drills(c),
    h("h3", {}, "instances"),
    h("div", {class: "instances"}, c.instances.map(i => instance(c, i))),
    h("h3", {}, "endpoints"),
    endpoints(c),
    h("h3", {}, "events"),
    timeline(c));
}
function render(doc) {
  const box = document.getElementById("clusters");
  box.replaceChildren(...(doc.clusters.length ? doc.clusters.map(cluster)
                                               : [h("div", {class: "empty"}, "No clusters configured.")]));
}
async function refresh() {
  const main = document.getElementById("main");
  const banner = document.getElementById("banner");
  const dot = document.getElementById("dot");
  try {
    // Built on location.origin: a page loaded with credentials in its URL cannot fetch relative
    // URLs (they would carry the credentials); the session cookie authorizes these reads.
    const base = location.origin + location.pathname;
    const [r, hr] = await Promise.all([fetch(new URL("topology", base), {cache: "no-store"}),
                                       fetch(new URL("history", base), {cache: "no-store"}).catch(() => null)]);
    if (!r.ok) throw new Error("HTTP " + r.status);
    if (hr && hr.ok) history = await hr.json();
    render(await r.json());
    main.classList.remove("stale");
    banner.style.display = "none";
    dot.className = "dot ok";
    document.getElementById("updated").textContent = "updated " + new Date().toLocaleTimeString();
  } catch (e) {
    main.classList.add("stale");
    banner.textContent = "Cannot reach the proxy's admin server (" + e.message + "); showing the last known state.";
    banner.style.display = "block";
    dot.className = "dot bad";
  }
}
refresh();
setInterval(refresh, 1000);
</script>
</body>
</html>
"""
