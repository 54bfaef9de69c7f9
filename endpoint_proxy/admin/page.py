"""The admin status page: one self-contained HTML document that renders /topology every second."""

from __future__ import annotations

# Rules of this page: no external resources (the CSP forbids them), no innerHTML with data
# from the server (names and errors go in as text nodes), and it keeps working when a fetch
# fails (the last good view stays, dimmed, under a banner).
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
function endpoints(c) {
  const rows = c.endpoints.map(e => h("tr", {"data-endpoint": e.name},
    h("td", {}, h("b", {}, e.name)),
    h("td", {}, e.kind + (e.kind === "custom" ? " (" + e.role + ")" : "")),
    h("td", {class: "mono"}, e.listen),
    h("td", {}, e.members.length
      ? e.members.map(m => h("span", {class: "chip" + (m === c.writer ? " w" : "")}, m))
      : h("span", {class: "none"}, "no members"))));
  return h("table", {}, h("thead", {}, h("tr", {}, h("th", {}, "endpoint"), h("th", {}, "kind"),
    h("th", {}, "listen"), h("th", {}, "members now"))), h("tbody", {}, rows));
}
function cluster(c) {
  const writer = c.writer
    ? h("span", {class: "writer-box"}, "writer ", h("b", {}, c.writer))
    : h("span", {class: "writer-box none"},
        "no writer" + (c.writer_lost_ms !== null ? " for " + ms(c.writer_lost_ms) : ""));
  return h("section", {class: "cluster", "data-cluster": c.name},
    h("div", {class: "cluster-head"}, h("h2", {}, c.name), badge(c.protocol, ""),
      badge(c.status, STATUS[c.status]), writer),
    h("h3", {}, "instances"),
    h("div", {class: "instances"}, c.instances.map(i => instance(c, i))),
    h("h3", {}, "endpoints"),
    endpoints(c));
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
    const r = await fetch("topology", {cache: "no-store"});
    if (!r.ok) throw new Error("HTTP " + r.status);
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
