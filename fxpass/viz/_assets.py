"""The stylesheet and script inlined into every HTML page (no network at view time).

The script builds the page from the JSON data block with DOM calls only: every string from
the model (module names, reasons, config values) goes through ``textContent`` or
``setAttribute``, never through ``innerHTML``.
"""

CSS = r"""
:root { --rw: #e8590c; --rwbg: #ffe8cc; --py: #495057; --fix: #7048e8; --ins: #2b8a3e;
        --rm: #c92a2a; --first: #d6336c; --edge: #adb5bd; --tpc: #1971c2; --tpr: #9c36b5; }
* { box-sizing: border-box; }
body { margin: 0; font: 13px/1.4 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif;
       color: #212529; background: #f8f9fa; }
header { background: #fff; border-bottom: 1px solid #dee2e6; }
.bar { position: sticky; top: 0; z-index: 20; background: #fff; border-bottom: 1px solid #dee2e6;
       padding: 8px 14px; display: flex; flex-wrap: wrap; gap: 10px 18px; align-items: center; }
.bar h1 { font-size: 15px; margin: 0; white-space: nowrap; }
.counts { display: flex; flex-wrap: wrap; gap: 4px 14px; padding: 8px 14px 4px; }
.count b { font-size: 15px; }
.count.rw b { color: var(--rw); } .count.py b { color: var(--py); } .count.fx b { color: var(--fix); }
.count.tp b { color: var(--tpc); }
.controls { display: flex; gap: 12px; align-items: center; flex-wrap: wrap; }
.controls label { white-space: nowrap; cursor: pointer; }
.controls button { font: inherit; padding: 2px 8px; cursor: pointer; }
.search-wrap { position: relative; }
#search { width: 320px; padding: 3px 6px; font: inherit; }
#search-results { position: absolute; top: 100%; left: 0; width: 520px; max-height: 360px;
  overflow: auto; background: #fff; border: 1px solid #ced4da; box-shadow: 0 4px 12px #0002;
  z-index: 30; }
#search-results button { display: block; width: 100%; text-align: left; border: 0; background: none;
  padding: 3px 8px; font: 12px ui-monospace, monospace; cursor: pointer; }
#search-results button:hover, #search-results button.sel { background: #e7f5ff; }
.legend { display: inline-flex; align-items: center; gap: 6px; font-size: 12px; }
.legend .scale { width: 120px; height: 10px; border-radius: 3px;
  background: linear-gradient(90deg, hsl(0,75%,70%), hsl(60,75%,70%), hsl(120,75%,70%)); }
.legend .exact { width: 14px; height: 10px; background: #7fd4c1; border-radius: 3px; }
.diffsum { padding: 4px 14px; }
.diffsum .ok { color: #2b8a3e; font-weight: 600; } .diffsum .bad { color: var(--rm); font-weight: 600; }
details.list { padding: 2px 14px; }
details.list summary { cursor: pointer; color: #495057; }
details.list ul { margin: 4px 0 8px; padding-left: 20px; max-height: 240px; overflow: auto; }
details.list li { font-size: 12px; }
code, .mono { font-family: ui-monospace, SFMono-Regular, Menlo, monospace; font-size: 12px; }
a.goto { color: #1864ab; cursor: pointer; text-decoration: underline dotted; }
main { padding: 8px 14px 60px; }
.mod { margin: 2px 0 2px 0; }
.mod .mod { margin-left: 18px; }
.mod-head { display: flex; align-items: center; gap: 8px; padding: 3px 6px; border-radius: 4px;
  cursor: pointer; background: #fff; border: 1px solid #e9ecef; }
.mod-head:hover { background: #f1f3f5; }
.twisty { width: 12px; color: #868e96; }
.mod-name { font-family: ui-monospace, monospace; font-weight: 600; }
.mod-type { color: #868e96; font-size: 12px; }
.badge { font-size: 11px; padding: 0 6px; border-radius: 8px; border: 1px solid; white-space: nowrap; }
.b-rw { color: var(--rw); border-color: var(--rw); background: var(--rwbg); }
.b-py { color: #fff; background: var(--py); border-color: var(--py); }
.b-fix { color: var(--fix); border-color: var(--fix); }
.b-sk { color: var(--rm); border-color: var(--rm); }
.b-tp { color: var(--tpc); border-color: var(--tpc); }
.b-fail { color: #fff; background: var(--rm); border-color: var(--rm); }
.b-reuse { color: #868e96; border-color: #ced4da; }
.b-sq { color: #212529; border-color: #adb5bd; display: none; }
body.diff-on .b-sq { display: inline; }
.mod.kind-python > .mod-head { background: repeating-linear-gradient(45deg, #f1f3f5, #f1f3f5 6px, #e9ecef 6px, #e9ecef 12px);
  border-color: #868e96; }
.mod-body { padding: 6px 0 4px 10px; border-left: 2px solid #e9ecef; margin-left: 8px; }
.opaque { border: 2px solid var(--py); background: repeating-linear-gradient(45deg, #f1f3f5, #f1f3f5 6px, #e9ecef 6px, #e9ecef 12px);
  padding: 8px 10px; border-radius: 4px; margin: 4px 0 6px; max-width: 900px; }
.opaque .why { font-family: ui-monospace, monospace; font-size: 12px; white-space: pre-wrap; word-break: break-word; }
.modnote { font-size: 12px; color: #495057; margin: 2px 0 4px; }
.modnote.fix { color: var(--fix); }
.panels { display: flex; gap: 12px; align-items: flex-start; margin: 4px 0 8px; }
.panel { background: #fff; border: 1px solid #dee2e6; border-radius: 4px; overflow: auto;
  max-height: 640px; max-width: 100%; flex: 0 1 auto; }
.panels.both .panel { max-width: 50%; }
.panel-title { font-size: 11px; color: #868e96; padding: 2px 6px; border-bottom: 1px solid #f1f3f5;
  position: sticky; left: 0; }
svg.graph { display: block; }
svg.graph .edge { fill: none; stroke: var(--edge); stroke-width: 1.2; }
g.node { cursor: default; }
g.node rect.bg { fill: #fff; stroke: #adb5bd; stroke-width: 1; }
g.node text { font: 11px ui-monospace, SFMono-Regular, Menlo, monospace; fill: #212529; pointer-events: none; }
g.node text.sub { fill: #868e96; font-size: 10px; }
g.node text.layer { fill: var(--rw); font-weight: 700; font-size: 11px; }
g.node.op-placeholder rect.bg { fill: #ebfbee; stroke: #8ce99a; }
g.node.op-output rect.bg { fill: #f1f3f5; stroke: #868e96; }
g.node.op-get_attr rect.bg { fill: #fff9db; stroke: #ffe066; }
g.node.op-call_module rect.bg { fill: #e7f5ff; stroke: #74c0fc; }
g.node.callable { cursor: pointer; }
g.node.callable:hover rect.bg { stroke-width: 2; }
g.node.static rect.bg { stroke-dasharray: 3 2; fill: #f8f9fa; }
g.node.static text { fill: #868e96; }
g.node.unused { opacity: .65; }
g.node.rewritten rect.bg { fill: var(--rwbg); stroke: var(--rw); stroke-width: 2.5; }
g.node.rewritten text.main { fill: #a63e00; font-weight: 700; }
g.node.will-rewrite rect.bg { stroke: var(--rw); stroke-dasharray: 5 3; stroke-width: 2; }
g.node.python rect.bg { fill: url(#fx-hatch); stroke: var(--py); stroke-width: 2; }
g.node.skipped rect.bg { stroke: var(--rm); stroke-width: 2; }
g.node.tp-column rect.bg { stroke: var(--tpc); stroke-width: 3; }
g.node.tp-row rect.bg { stroke: var(--tpr); stroke-width: 3; }
g.node.tp-refused rect.bg { stroke: var(--rm); stroke-width: 2; stroke-dasharray: 2 2; }
g.node.inserted rect.bg { stroke: var(--ins); stroke-width: 2; stroke-dasharray: 4 2; fill: #ebfbee; }
g.node.removed rect.bg { stroke: var(--rm); stroke-dasharray: 4 2; fill: #fff5f5; }
g.node.removed text.main { text-decoration: line-through; }
g.node.fixed rect.ring { fill: none; stroke: var(--fix); stroke-width: 2; }
g.node .mark { font: bold 11px system-ui, sans-serif; }
g.node .mark.fix { fill: var(--fix); }
g.node .mark.ins { fill: var(--ins); }
body.diff-on g.node.has-m rect.bg { fill: var(--sq); }
body.diff-on g.node.failed rect.bg { stroke: var(--rm); stroke-width: 2.5; }
g.node text.sq { fill: #495057; font-size: 10px; display: none; }
body.diff-on g.node text.sq { display: inline; }
g.node.shape-op rect.bg { stroke: #ced4da; stroke-dasharray: 2 2; fill: #f8f9fa; }
g.node.shape-op text { fill: #868e96; }
g.node g.fold rect { fill: #f1f3f5; stroke: #adb5bd; stroke-width: 1; }
g.node g.fold text { font: 9px system-ui, sans-serif; fill: #495057; }
#tip .refnote { color: #495057; font-size: 11px; }
g.node.first rect.firstring { fill: none; stroke: var(--first); stroke-width: 3; stroke-dasharray: 6 3; }
g.node.first text.firstlabel { font: bold 10px system-ui, sans-serif; fill: var(--first); }
g.node.flash rect.bg { animation: flash 1.2s ease-in-out 2; }
.mod-head.flash { animation: flashbg 1.2s ease-in-out 2; }
@keyframes flash { 50% { stroke: #1c7ed6; stroke-width: 5; } }
@keyframes flashbg { 50% { background: #d0ebff; } }
#tip { position: fixed; z-index: 50; pointer-events: none; max-width: 560px; background: #fff;
  border: 1px solid #adb5bd; border-radius: 4px; box-shadow: 0 4px 16px #0003; padding: 6px 8px;
  font-size: 12px; display: none; }
#tip h4 { margin: 0 0 4px; font: 600 12px ui-monospace, monospace; word-break: break-all; }
#tip .kv { display: grid; grid-template-columns: max-content 1fr; gap: 0 8px; }
#tip .kv span:nth-child(odd) { color: #868e96; }
#tip .kv span { word-break: break-word; }
#tip table { border-collapse: collapse; margin-top: 4px; font-size: 11px; }
#tip td, #tip th { border: 1px solid #e9ecef; padding: 1px 4px; text-align: right; }
#tip th { background: #f8f9fa; text-align: left; font-weight: 500; }
#tip .sec { margin-top: 4px; font-weight: 600; }
.empty { color: #868e96; font-style: italic; }
"""

JS = r"""
(function () {
  "use strict";
  var D = JSON.parse(document.getElementById("fxpass-data").textContent);
  var SVGNS = "http://www.w3.org/2000/svg";
  var NW = D.geom.w, NH = D.geom.h;
  var mods = D.modules;
  var state = { view: "after", open: {}, bodies: {}, rows: {}, shapes: false };
  var tree = document.getElementById("tree");
  var tip = document.getElementById("tip");

  function el(tag, cls, text) {
    var e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined && text !== null) e.textContent = String(text);
    return e;
  }
  function sv(tag, attrs, text) {
    var e = document.createElementNS(SVGNS, tag);
    for (var k in attrs) e.setAttribute(k, attrs[k]);
    if (text !== undefined) e.textContent = String(text);
    return e;
  }
  function num(v) {
    if (v === null || v === undefined) return null;
    if (typeof v === "number") return v;
    if (v === "inf") return Infinity;
    if (v === "-inf") return -Infinity;
    if (v === "nan") return NaN;
    var f = parseFloat(v); return isNaN(f) ? null : f;
  }
  function fmt(v) {
    var x = num(v);
    if (x === null) return String(v);
    if (x === Infinity) return "inf"; if (x === -Infinity) return "-inf"; if (isNaN(x)) return "nan";
    if (Number.isInteger(x)) return String(x);
    var a = Math.abs(x);
    return (a !== 0 && (a < 1e-3 || a >= 1e5)) ? x.toExponential(3) : x.toPrecision(5).replace(/\.?0+$/, "");
  }
  function fmtDb(v) {
    var x = num(v);
    if (x === null) return "–";
    if (x === Infinity) return "exact";
    return fmt(Math.round(x * 10) / 10) + " dB";
  }
  function sqColor(v) {
    var x = num(v);
    if (x === null) return null;
    if (x === Infinity) return "#7fd4c1";
    if (isNaN(x)) x = 0;
    x = Math.max(0, Math.min(40, x));
    return "hsl(" + Math.round(x / 40 * 120) + ",75%,70%)";
  }

  // ---- module rows -----------------------------------------------------------------
  function badge(cls, text, title) {
    var b = el("span", "badge " + cls, text);
    if (title) b.title = title;
    return b;
  }
  function makeRow(mid) {
    var m = mods[mid];
    var div = el("div", "mod kind-" + m.k);
    div.id = "mod-" + mid;
    div.setAttribute("data-path", m.p);
    var head = el("div", "mod-head");
    head.setAttribute("data-mid", mid);
    var tw = el("span", "twisty", "▸");
    var name = el("span", "mod-name", m.p === "" ? "<root>" : m.r);
    name.title = m.p === "" ? "<root>" : m.p;
    head.appendChild(tw); head.appendChild(name);
    head.appendChild(el("span", "mod-type", m.t));
    var r = m.roll;
    if (m.k === "python") head.appendChild(badge("b-py", "Python", m.why));
    if (r.rewritten) head.appendChild(badge("b-rw", r.rewritten + " → vLLM", "rewritten call sites in this subtree"));
    if (r.plain_swaps) head.appendChild(badge("b-rw", r.plain_swaps + " swapped w/o graph"));
    if (r.python && !(m.k === "python" && r.python === 1)) head.appendChild(badge("b-py", r.python + " Python", "modules left as Python in this subtree"));
    if (r.fixes) head.appendChild(badge("b-fix", r.fixes + " fix" + (r.fixes > 1 ? "es" : ""), "probe / contiguity fixes in this subtree"));
    if (r.skipped) head.appendChild(badge("b-sk", r.skipped + " kept nn.Linear"));
    if (r.failed) {
      var fb = badge("b-fail", r.failed + " over budget", "comparisons in this subtree over the verify budget, vs " +
                     Object.keys(D.refs || {}).map(function (k) { return refOf(k).long; }).join(" / "));
      fb.setAttribute("data-ref", Object.keys(D.refs || {}).join(" "));
      head.appendChild(fb);
    }
    if (r.worst_sqnr !== null && r.worst_sqnr !== undefined) {
      var pr = refOf(D.primary);
      var sq = badge("b-sq", "min SQNR " + fmtDb(r.worst_sqnr) + " vs " + pr.tag,
                     "lowest SQNR in this subtree vs " + pr.long);
      sq.setAttribute("data-ref", D.primary);
      sq.style.background = sqColor(r.worst_sqnr);
      head.appendChild(sq);
    }
    if (m.reused) head.appendChild(badge("b-reuse", "same graph as " + (m.reused || "<root>")));
    var body = el("div", "mod-body");
    body.hidden = true;
    div.appendChild(head); div.appendChild(body);
    state.rows[mid] = div;
    return div;
  }

  function setOpen(mid, open) {
    var div = state.rows[mid];
    if (!div) return;
    var body = div.lastChild;
    if (open && !state.bodies[mid]) renderBody(mid);
    body.hidden = !open;
    state.open[mid] = open;
    div.firstChild.firstChild.textContent = open ? "▾" : "▸";
  }

  function renderBody(mid) {
    var m = mods[mid], body = state.rows[mid].lastChild;
    body.textContent = "";
    if (m.k === "python") {
      var box = el("div", "opaque");
      box.appendChild(el("div", "", "Kept as Python (not traced): its code runs as written; submodules it calls are still traced."));
      box.appendChild(el("div", "why", m.why || ""));
      body.appendChild(box);
    } else if (m.k === "none") {
      body.appendChild(el("div", "modnote empty", "No graph: nothing was traced here."));
    }
    var swaps = Object.keys(m.swaps || {});
    swaps.forEach(function (s) {
      var n = el("div", "modnote", "");
      n.appendChild(badge("b-rw", "→ vLLM"));
      n.appendChild(document.createTextNode(" " + s + " swapped without a graph: " + m.swaps[s]));
      body.appendChild(n);
    });
    (m.fixes || []).forEach(function (f) {
      body.appendChild(el("div", "modnote fix", "⚑ " + f.rule + ": " + f.detail));
    });
    if (m.metrics && m.metrics.length) {
      var worst = null;
      m.metrics.forEach(function (e) { var s = sqOf(e); if (s !== null && (worst === null || s < worst)) worst = s; });
      var note = el("div", "modnote metric", "verify: " + m.metrics.length + " comparison(s) of this module's output, lowest SQNR " +
                    fmtDb(worst) + " vs " + refOf(D.primary).short);
      note.title = "vs " + refOf(D.primary).long;
      note.setAttribute("data-ref", D.primary);
      body.appendChild(note);
    }
    var gbox = el("div", "graphs");
    body.appendChild(gbox);
    state.bodies[mid] = gbox;
    renderGraphs(mid);
    (m.ch || []).forEach(function (c) { body.appendChild(makeRow(c)); });
  }

  function renderGraphs(mid) {
    var m = mods[mid], gbox = state.bodies[mid];
    if (!gbox) return;
    gbox.textContent = "";
    if (m.g === null && m.b === null) return;
    var views = state.view === "both" ? ["before", "after"] : [state.view];
    var panels = el("div", "panels" + (views.length > 1 ? " both" : ""));
    views.forEach(function (v) {
      var gi = v === "before" ? m.b : m.g;
      var panel = el("div", "panel");
      panel.setAttribute("data-view", v);
      var title = v === "before" ? "before: the traced HF graph" : (D.applied ? "after: fxpass.apply" : "traced graph");
      if (gi === null || gi === undefined) {
        panel.appendChild(el("div", "panel-title", title));
        panel.appendChild(el("div", "modnote empty", v === "before" ? "no before view (pass before=snapshot(trace))" : "no graph"));
      } else {
        var G = D.graphs[gi];
        var shown = shownCount(G);
        panel.appendChild(el("div", "panel-title", title + " — " + shown + " nodes" +
          (shown < G.n.length ? " (" + (G.n.length - shown) + " shape bookkeeping folded)" : "")));
        panel.appendChild(graphSvg(gi, mid, v));
      }
      panels.appendChild(panel);
    });
    gbox.appendChild(panels);
  }

  // ---- graphs ----------------------------------------------------------------------
  function nodeClasses(n) {
    var c = "node op-" + n.o;
    if (n.rw) c += " rewritten";
    if (n.wr) c += " will-rewrite";
    if (n.ck === "python") c += " python";
    if (n.c !== undefined && n.c !== null) c += " callable";
    if (n.sk) c += " skipped";
    if (n.tp) c += n.tp.style === "RowParallelLinear" ? " tp-row" : " tp-column";
    if (n.tpr) c += " tp-refused";
    if (n.ins) c += " inserted";
    if (n.rm) c += " removed";
    if (n.fx) c += " fixed";
    if (n.st) c += " static";
    if (n.un) c += " unused";
    if (n.m) c += " has-m";
    if (n.fail) c += " failed";
    if (n.first) c += " first";
    if (n.so) c += " shape-op";
    if (n.fo && !state.shapes) c += " has-folded";
    return c;
  }
  // the layout drawn: every node, or (default) shape bookkeeping folded out
  function layoutOf(G) {
    if (state.shapes || !G.f) {
      return { w: G.w, h: G.h, e: G.e, pos: function (i) { return [G.n[i].x, G.n[i].y]; } };
    }
    return { w: G.f.w, h: G.f.h, e: G.f.e, pos: function (i) { return G.f.p[i] || null; } };
  }
  function shownCount(G) {
    if (state.shapes || !G.f) return G.n.length;
    var k = 0;
    for (var i = 0; i < G.f.p.length; i++) if (G.f.p[i]) k++;
    return k;
  }
  function refOf(name) {
    return (D.refs && D.refs[name]) || { tag: name, short: name, long: name };
  }
  function graphSvg(gi, mid, view) {
    var G = D.graphs[gi], L = layoutOf(G);
    var svg = sv("svg", { "class": "graph", width: L.w, height: L.h, viewBox: "0 0 " + L.w + " " + L.h,
                          "data-view": view, "data-module": mods[mid].p,
                          "data-shapes": (state.shapes || !G.f) ? "shown" : "folded" });
    var edges = sv("g", { "class": "edges" });
    for (var k = 0; k < L.e.length; k++) {
      var d, r = L.e[k][2];
      if (r) {
        d = "M" + r[0] + " " + r[1];
        for (var j = 2; j + 5 < r.length; j += 6) {
          d += "C" + r[j] + " " + r[j + 1] + " " + r[j + 2] + " " + r[j + 3] + " " + r[j + 4] + " " + r[j + 5];
        }
      } else {
        var a = G.n[L.e[k][0]], b = G.n[L.e[k][1]], pa = L.pos(L.e[k][0]), pb = L.pos(L.e[k][1]);
        var x1 = pa[0] + NW / 2, y1 = pa[1] + (a.h || NH), x2 = pb[0] + NW / 2, y2 = pb[1] - 2;
        var dy = Math.max(12, (y2 - y1) / 2);
        d = "M" + x1 + " " + y1 + "C" + x1 + " " + (y1 + dy) + " " + x2 + " " + (y2 - dy) + " " + x2 + " " + y2;
      }
      edges.appendChild(sv("path", { "class": "edge", "marker-end": "url(#fx-arrow)", d: d }));
    }
    svg.appendChild(edges);
    for (var i = 0; i < G.n.length; i++) {
      var n = G.n[i], p = L.pos(i);
      if (!p) continue;  // folded into its host
      var g = sv("g", { "class": nodeClasses(n), transform: "translate(" + p[0] + "," + p[1] + ")",
                        id: "n-" + mid + "-" + view + "-" + i, "data-gi": gi, "data-ni": i, "data-mid": mid });
      g.setAttribute("data-node", n.n);
      g.setAttribute("data-module", mods[mid].p);
      var h = n.h || NH;
      var rect = sv("rect", { "class": "bg", width: NW, height: h, rx: 5 });
      if (n.q !== undefined && n.q !== null) rect.setAttribute("style", "--sq:" + sqColor(n.q));
      else if (n.m) rect.setAttribute("style", "--sq:#e9ecef");
      g.appendChild(rect);
      if (n.fx) g.appendChild(sv("rect", { "class": "ring", x: -3, y: -3, width: NW + 6, height: h + 6, rx: 7 }));
      if (n.first) {
        g.appendChild(sv("rect", { "class": "firstring", x: -6, y: -6, width: NW + 12, height: h + 12, rx: 9 }));
        g.appendChild(sv("text", { "class": "firstlabel", x: NW - 2, y: -8, "text-anchor": "end" }, "◆ first divergence"));
      }
      var ty = 15;
      g.appendChild(sv("text", { "class": "main", x: 7, y: ty }, n.l));
      if (n.bd) g.appendChild(sv("text", { "class": "layer", x: 7, y: ty += 15 }, n.bd));
      g.appendChild(sv("text", { "class": "sub", x: 7, y: ty += 15 }, n.s));
      if (n.q !== undefined && n.q !== null) {
        // the number and what it is measured against, on the box itself
        var ref = refOf(D.primary);
        var sq = sv("text", { "class": "sq", x: 7, y: ty += 14, "data-ref": D.primary },
                    "SQNR " + fmtDb(n.q) + " vs " + ref.tag);
        sq.appendChild(sv("title", {}, "lowest SQNR of this node's output vs " + ref.long));
        g.appendChild(sq);
      }
      if (n.fx) g.appendChild(sv("text", { "class": "mark fix", x: NW - 12, y: 14 }, "⚑"));
      if (n.ins) g.appendChild(sv("text", { "class": "mark ins", x: NW - 12, y: 14 }, "+"));
      if (n.fo && !state.shapes) {
        // shape bookkeeping folded into this node: a tab on its bottom edge
        var tab = sv("g", { "class": "fold", transform: "translate(" + (NW - 62) + "," + (h - 6) + ")" });
        tab.appendChild(sv("rect", { width: 56, height: 12, rx: 6 }));
        tab.appendChild(sv("text", { x: 28, y: 9, "text-anchor": "middle" }, "+" + n.fo.length + " shape"));
        g.appendChild(tab);
      }
      svg.appendChild(g);
    }
    return svg;
  }

  // ---- reveal / navigation -----------------------------------------------------------
  function chainOf(mid) {
    var chain = [];
    for (var x = mid; x !== null && x !== undefined; x = mods[x].par) chain.unshift(x);
    return chain;
  }
  function reveal(mid, nodeName, preferView) {
    chainOf(mid).forEach(function (x) { setOpen(x, true); });
    var target = null;
    if (nodeName !== null && nodeName !== undefined && nodeName !== "") {
      var m = mods[mid];
      var order = preferView ? [preferView] : [];
      order.push(state.view === "before" ? "before" : "after", "before");
      for (var j = 0; j < order.length && !target; j++) {
        var gi = order[j] === "before" ? m.b : m.g;
        if (gi === null || gi === undefined) continue;
        var ns = D.graphs[gi].n;
        for (var i = 0; i < ns.length; i++) {
          if (ns[i].n !== nodeName) continue;
          // folded shape bookkeeping: its host stands for it
          var k = (ns[i].so && !state.shapes && ns[i].ho !== undefined) ? ns[i].ho : i;
          target = document.getElementById("n-" + mid + "-" + order[j] + "-" + k);
          break;
        }
      }
    }
    if (!target) target = state.rows[mid].firstChild;
    target.scrollIntoView({ block: "center", inline: "center" });
    target.classList.remove("flash");
    void target.getBoundingClientRect();
    target.classList.add("flash");
    return target;
  }
  window.fxpassReveal = reveal;

  document.addEventListener("click", function (ev) {
    var a = ev.target.closest ? ev.target.closest("a.goto") : null;
    if (a) {
      ev.preventDefault();
      reveal(parseInt(a.getAttribute("data-mod"), 10), a.getAttribute("data-node"), a.getAttribute("data-view"));
      return;
    }
    var head = ev.target.closest ? ev.target.closest(".mod-head") : null;
    if (head) {
      var mid = parseInt(head.getAttribute("data-mid"), 10);
      setOpen(mid, !state.open[mid]);
      return;
    }
    var g = ev.target.closest ? ev.target.closest("g.node.callable") : null;
    if (g) {
      var n = D.graphs[+g.getAttribute("data-gi")].n[+g.getAttribute("data-ni")];
      reveal(n.c, null);
    }
  });

  // ---- tooltip ----------------------------------------------------------------------
  function kv(box, k, v) {
    if (v === undefined || v === null || v === "") return;
    box.appendChild(el("span", "", k));
    box.appendChild(el("span", "mono", v));
  }
  function sqOf(e) {
    var ref = D.primary, m = ref && e.metrics ? e.metrics[ref] : null;
    return m ? num(m.sqnr_db) : null;
  }
  function metricsTable(entries) {
    // one column per (comparison, reference), one row per metric
    var cols = [], keys = [];
    entries.forEach(function (e) {
      Object.keys(e.metrics || {}).forEach(function (ref) {
        cols.push({ e: e, ref: ref, m: e.metrics[ref] });
        Object.keys(e.metrics[ref]).forEach(function (k) { if (keys.indexOf(k) < 0) keys.push(k); });
      });
    });
    var t = el("table"), hr = el("tr");
    hr.appendChild(el("th", "", ""));
    cols.forEach(function (c) {
      var th = el("th", "", "vs " + refOf(c.ref).short + (entries.length > 1 ? " · " + c.e.label + " in" + c.e.input : " · input " + c.e.input));
      th.title = c.e.label + ": vs " + refOf(c.ref).long;
      th.setAttribute("data-ref", c.ref);
      hr.appendChild(th);
    });
    t.appendChild(hr);
    var ok = el("tr");
    ok.appendChild(el("th", "", "within budget"));
    cols.forEach(function (c) { ok.appendChild(el("td", "", c.e.passed ? "✓" : "✗")); });
    t.appendChild(ok);
    keys.forEach(function (k) {
      var tr = el("tr");
      tr.appendChild(el("th", "", k));
      cols.forEach(function (c) {
        var v = c.m[k];
        tr.appendChild(el("td", "", v === undefined || v === null ? "" : (Array.isArray(v) ? "[" + v.join(",") + "]" : fmt(v))));
      });
      t.appendChild(tr);
    });
    return t;
  }
  function fillTip(n, mid, gi) {
    tip.textContent = "";
    tip.appendChild(el("h4", "", (mods[mid].p ? mods[mid].p + " / " : "<root> / ") + n.n));
    var box = el("div", "kv");
    kv(box, "op", n.o);
    kv(box, "target", n.tg);
    if (n.sh) {
      kv(box, "shape", "[" + n.sh.shape.join(", ") + "]");
      kv(box, "dtype", n.sh.dtype + (n.sh.contiguous ? "" : " (non-contiguous)"));
    } else kv(box, "value", n.py);
    if (n.c !== undefined && n.c !== null) kv(box, "calls", (mods[n.c].p || "<root>") + " (click to open)");
    if (n.ct) kv(box, "module type", n.ct);
    if (n.rw) {
      kv(box, "rewritten to", n.rw.layer + " (was " + n.rw.was + ")");
      kv(box, "quant method", n.rw.quant_method);
      kv(box, "vLLM prefix", n.rw.prefix);
    }
    if (n.wr) kv(box, "apply makes it", n.wr.layer + " · " + n.wr.quant_method);
    if (n.ck === "python") kv(box, "Python", n.why);
    if (n.sk) kv(box, "kept nn.Linear", n.sk);
    if (n.tp) kv(box, "tensor parallel", n.tp.style + " (tp=" + n.tp.tp + ")" +
                 (n.tp.pair ? ": " + n.tp.pair : ""));
    if (n.tpr) kv(box, "tensor parallel", "replicated: " + n.tpr);
    if (n.ins) kv(box, "inserted by", n.ins);
    if (n.rm) kv(box, "removed", "not in the graph after apply");
    (n.fx || []).forEach(function (f) { kv(box, "fix: " + f.rule, f.detail); });
    if (n.gd) kv(box, "guard", JSON.stringify(n.gd));
    if (n.un) kv(box, "note", "result not used by the output");
    if (n.fo) kv(box, "shape bookkeeping", n.fo.length + " node(s) folded into this one: " + n.fo.join(", ") +
                 (state.shapes ? "" : " (tick \u201cshape bookkeeping\u201d to draw them)"));
    if (n.so) kv(box, "shape bookkeeping", "sizes / dtypes / guards only, no tensor data" +
                 (n.ho !== undefined ? "; folded into " + D.graphs[+gi].n[n.ho].n + " by default" : ""));
    kv(box, "node", n.tx);
    tip.appendChild(box);
    if (n.m && n.m.length) {
      tip.appendChild(el("div", "sec", "verify: lowest SQNR " + fmtDb(n.q) + " vs " + refOf(D.primary).short +
                         (n.fail ? " — over budget" : "")));
      Object.keys(D.refs || {}).forEach(function (k) {
        tip.appendChild(el("div", "refnote", "vs " + refOf(k).short + ": " + refOf(k).long));
      });
      n.m.forEach(function (e) {
        if (e.violations && e.violations.length) tip.appendChild(el("div", "", "✗ " + e.violations.join("; ")));
      });
      tip.appendChild(metricsTable(n.m));
    }
  }
  document.addEventListener("mouseover", function (ev) {
    var g = ev.target.closest ? ev.target.closest("g.node") : null;
    if (!g) { tip.style.display = "none"; return; }
    fillTip(D.graphs[+g.getAttribute("data-gi")].n[+g.getAttribute("data-ni")], +g.getAttribute("data-mid"), +g.getAttribute("data-gi"));
    tip.style.display = "block";
  });
  document.addEventListener("mousemove", function (ev) {
    if (tip.style.display !== "block") return;
    var w = tip.offsetWidth, h = tip.offsetHeight;
    var x = ev.clientX + 14, y = ev.clientY + 14;
    if (x + w > window.innerWidth - 4) x = Math.max(4, ev.clientX - w - 14);
    if (y + h > window.innerHeight - 4) y = Math.max(4, ev.clientY - h - 14);
    tip.style.left = x + "px"; tip.style.top = y + "px";
  });

  // ---- controls ---------------------------------------------------------------------
  function setView(v) {
    state.view = v;
    Object.keys(state.bodies).forEach(function (mid) { renderGraphs(+mid); });
  }
  var shapes = document.getElementById("shape-toggle");
  if (shapes) {
    state.shapes = shapes.checked;
    shapes.addEventListener("change", function () {
      state.shapes = shapes.checked;
      setView(state.view);
    });
  }
  Array.prototype.forEach.call(document.querySelectorAll("input[name=view]"), function (r) {
    r.addEventListener("change", function () { if (r.checked) setView(r.value); });
    if (r.checked) state.view = r.value;
  });
  var diff = document.getElementById("diff-toggle");
  if (diff) {
    diff.addEventListener("change", function () { document.body.classList.toggle("diff-on", diff.checked); });
    document.body.classList.toggle("diff-on", diff.checked);
  }
  document.getElementById("expand-all").addEventListener("click", function () {
    for (var i = 0; i < mods.length; i++) chainOf(i).forEach(function (x) { setOpen(x, true); });
  });
  document.getElementById("collapse-all").addEventListener("click", function () {
    Object.keys(state.rows).forEach(function (mid) { if (+mid !== 0) setOpen(+mid, false); });
  });

  // search: module paths and the leaf modules graphs call (rewritten linears included)
  var index = [];
  mods.forEach(function (m, i) { index.push({ p: m.p || "<root>", mid: i, node: null, what: m.t }); });
  D.leaves.forEach(function (l) { index.push({ p: l[0], mid: l[1], node: l[2], what: l[3] }); });
  var search = document.getElementById("search"), results = document.getElementById("search-results");
  function runSearch() {
    var q = search.value.trim().toLowerCase();
    results.textContent = "";
    if (!q) { results.hidden = true; return []; }
    var hits = [];
    for (var i = 0; i < index.length && hits.length < 60; i++) {
      if (index[i].p.toLowerCase().indexOf(q) >= 0) hits.push(index[i]);
    }
    hits.forEach(function (h, k) {
      var b = el("button", k === 0 ? "sel" : "", h.p + "  ·  " + h.what);
      b.addEventListener("click", function () { results.hidden = true; reveal(h.mid, h.node); });
      results.appendChild(b);
    });
    if (!hits.length) results.appendChild(el("div", "empty", " no module path contains that"));
    results.hidden = false;
    return hits;
  }
  search.addEventListener("input", runSearch);
  search.addEventListener("keydown", function (ev) {
    if (ev.key === "Enter") {
      var hits = runSearch();
      if (hits.length) { results.hidden = true; reveal(hits[0].mid, hits[0].node); }
    } else if (ev.key === "Escape") { results.hidden = true; }
  });
  document.addEventListener("click", function (ev) {
    if (!results.contains(ev.target) && ev.target !== search) results.hidden = true;
  });

  // ---- first render -------------------------------------------------------------------
  if (mods.length) {
    tree.appendChild(makeRow(0));
    for (var i = 0; i < mods.length; i++) {
      if (mods[i].d < D.expand_depth && state.rows[i]) setOpen(i, true);
    }
  } else {
    tree.appendChild(el("div", "empty", "Nothing was traced."));
  }
  window.__fxpassReady = { ms: performance.now(), modules: mods.length, graphs: D.graphs.length };
})();
"""
