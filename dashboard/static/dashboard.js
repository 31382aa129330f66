// The Equilibrium dashboard: reads the admin listener's frame stream (Server-Sent Events) and
// draws plain SVG. No library, no request anywhere but this page's own origin; text is set with
// textContent only (endpoint and sidecar names come from the mesh). The frame's shape is
// documented in the Python package `dashboard` (dashboard/__init__.py).
"use strict";
(() => {
  // Okabe & Ito, "Color Universal Design" (2008): distinguishable with every common colour
  // vision deficiency. Yellow last (weak on white); black for the ninth series and beyond.
  const PALETTE = ["#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9",
    "#F0E442", "#000000"];
  const DASHES = ["", "6 3", "2 3", "8 3 2 3"];
  const SVG = "http://www.w3.org/2000/svg";
  const KEEP = 300;
  const W = 440, H = 190, M = { l: 56, r: 12, t: 12, b: 38 };

  const dash = {
    frames: [], last: null, connects: 0, renders: 0, errors: 0, boot: null,
    colours: new Map(),
  };
  window.eqDashboard = dash;

  const $ = (id) => document.getElementById(id);
  function el(tag, attrs, text) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, String(v));
    if (text !== undefined && text !== null) node.textContent = String(text);
    return node;
  }
  function sv(tag, attrs, text) {
    const node = document.createElementNS(SVG, tag);
    for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, String(v));
    if (text !== undefined) node.textContent = String(text);
    return node;
  }
  const num = (v) => (typeof v === "number" && Number.isFinite(v) ? v : null);
  const ms = (v, digits = 1) => (num(v) === null ? "–" : (v * 1000).toFixed(digits));
  const pct = (v, digits = 1) => (num(v) === null ? "–" : (v * 100).toFixed(digits));
  function colour(endpoint) {
    if (!dash.colours.has(endpoint)) {
      dash.colours.set(endpoint, PALETTE[Math.min(dash.colours.size, PALETTE.length - 1)]);
    }
    return dash.colours.get(endpoint);
  }
  function swatch(fill) {
    const box = sv("svg", { class: "swatch", width: 12, height: 12, "aria-hidden": "true" });
    box.appendChild(sv("rect", { width: 12, height: 12, fill }));
    return box;
  }

  function niceStep(span, count) {
    const raw = span / Math.max(count, 1);
    const power = Math.pow(10, Math.floor(Math.log10(raw)));
    for (const m of [1, 2, 5, 10]) if (m * power >= raw) return m * power;
    return 10 * power;
  }

  // One chart: x = seconds before the newest frame, y from 0. series: [{name, colour, dash,
  // points: [[t, y], ...]}]; stacked: areas summed in series order.
  function chart(title, yLabel, series, opts) {
    const o = opts || {};
    const svg = sv("svg", { class: "chart", width: W, height: H, viewBox: `0 0 ${W} ${H}`,
      role: "img", "aria-label": title });
    svg.appendChild(sv("title", {}, title));
    const pw = W - M.l - M.r, ph = H - M.t - M.b;
    const now = dash.last ? dash.last.time : 0;
    let oldest = now;
    for (const s of series) for (const [t] of s.points) oldest = Math.min(oldest, t);
    const span = Math.max(10, now - oldest);
    let top = o.yMax || 0;
    if (!o.yMax) {
      for (const s of series) for (const [, y] of s.points) if (y !== null) top = Math.max(top, y);
      top = top > 0 ? top * 1.1 : 1;
    }
    const x = (t) => M.l + pw * (1 - (now - t) / span);
    const y = (v) => M.t + ph * (1 - Math.min(v, top) / top);
    const ystep = niceStep(top, 4);
    for (let v = 0; v <= top + 1e-9; v += ystep) {
      svg.appendChild(sv("line", { class: "grid", x1: M.l, x2: M.l + pw, y1: y(v), y2: y(v) }));
      svg.appendChild(sv("text", { x: M.l - 5, y: y(v) + 4, "text-anchor": "end" },
        Number(v.toPrecision(6)).toString()));
    }
    const xstep = niceStep(span, 5);
    for (let a = 0; a <= span + 1e-9; a += xstep) {
      svg.appendChild(sv("text", { x: x(now - a), y: M.t + ph + 14, "text-anchor": "middle" },
        a === 0 ? "0" : `-${Number(a.toPrecision(6))}`));
    }
    svg.appendChild(sv("line", { class: "axis", x1: M.l, x2: M.l, y1: M.t, y2: M.t + ph }));
    svg.appendChild(sv("line", { class: "axis", x1: M.l, x2: M.l + pw, y1: M.t + ph,
      y2: M.t + ph }));
    svg.appendChild(sv("text", { x: M.l + pw / 2, y: H - 4, "text-anchor": "middle" },
      "time (s before now)"));
    svg.appendChild(sv("text", { x: 12, y: M.t + ph / 2, "text-anchor": "middle",
      transform: `rotate(-90 12 ${M.t + ph / 2})` }, yLabel));
    if (o.stacked) {
      const times = [...new Set(series.flatMap((s) => s.points.map(([t]) => t)))].sort((a, b) => a - b);
      const base = new Map(times.map((t) => [t, 0]));
      for (const s of series) {
        const at = new Map(s.points);
        const upper = times.map((t) => [t, base.get(t) + (at.get(t) || 0)]);
        const lower = times.map((t) => [t, base.get(t)]).reverse();
        if (times.length) {
          const pts = upper.concat(lower).map(([t, v]) => `${x(t).toFixed(1)},${y(v).toFixed(1)}`);
          svg.appendChild(sv("polygon", { points: pts.join(" "), fill: s.colour,
            "fill-opacity": 0.85, stroke: s.colour, "data-series": s.name }));
        }
        for (const [t, v] of upper) base.set(t, v);
      }
    } else {
      series.forEach((s, i) => {
        let d = "";
        let pen = false;
        for (const [t, v] of s.points) {
          if (v === null) { pen = false; continue; }
          d += `${pen ? "L" : "M"}${x(t).toFixed(1)},${y(v).toFixed(1)}`;
          pen = true;
        }
        if (d) {
          svg.appendChild(sv("path", { d, fill: "none", stroke: s.colour, "stroke-width": 2,
            "stroke-dasharray": s.dash || DASHES[i % DASHES.length], "data-series": s.name }));
        }
      });
      if (o.legend) {
        svg.appendChild(sv("rect", { x: M.l + 4, y: M.t + 2, width: 150,
          height: 14 * series.length + 4, fill: "#ffffff", "fill-opacity": 0.85 }));
        series.forEach((s, i) => {
          const ly = M.t + 10 + 14 * i;
          svg.appendChild(sv("line", { x1: M.l + 8, x2: M.l + 30, y1: ly, y2: ly,
            stroke: s.colour, "stroke-width": 2,
            "stroke-dasharray": s.dash || DASHES[i % DASHES.length] }));
          svg.appendChild(sv("text", { x: M.l + 34, y: ly + 4 }, s.name));
        });
      }
    }
    return svg;
  }

  function seriesOf(name, pick) {
    const points = [];
    for (const f of dash.frames) {
      const up = (f.upstreams || []).find((u) => u.name === name);
      if (!up) continue;
      points.push([f.time, pick(up)]);
    }
    return points;
  }
  function endpointSeries(name, endpoint, pick) {
    return seriesOf(name, (up) => {
      const row = (up.endpoints || []).find((e) => e.endpoint === endpoint);
      return row ? pick(row) : null;
    });
  }

  function table(headers, rows, cls) {
    const t = el("table", cls ? { class: cls } : {});
    const head = el("tr");
    for (const h of headers) head.appendChild(el("th", { scope: "col" }, h));
    t.appendChild(head);
    for (const r of rows) t.appendChild(r);
    return t;
  }
  function cell(field, value, text) {
    const td = el("td", { "data-field": field }, text);
    if (num(value) !== null) td.setAttribute("data-value", String(value));
    return td;
  }

  function planLine(up) {
    const p = up.plan;
    const box = el("div", { class: "plan" });
    if (!p) {
      box.appendChild(el("span", { "data-field": "plan" }, up.leader === false
        ? "standby: another signaler replica leads this upstream"
        : "no plan (this view has no signaler plan)"));
      return box;
    }
    const off = num(p.played_over_optimum);
    const strong = el("strong", { "data-field": "optimality",
      "data-value": off === null ? "" : off },
    off === null ? "distance from the system optimum: –"
      : `the mesh is ${pct(off - 1)} % from optimal`);
    box.appendChild(strong);
    box.appendChild(el("span", {}, " · plan: "));
    box.appendChild(el("span", { "data-field": "solver" }, `${p.solver} (${p.status})`));
    box.appendChild(el("span", {}, `, ${p.tokens} tokens, solved in `));
    box.appendChild(el("span", { "data-field": "solve_ms", "data-value": p.solve_seconds },
      `${ms(p.solve_seconds, 0)} ms`));
    box.appendChild(el("span", {}, ", expected latency "));
    box.appendChild(el("span", { "data-field": "expected_ms", "data-value": p.expected_latency },
      `${ms(p.expected_latency)} ms`));
    box.appendChild(el("span", {}, `, plan ${pct((num(p.plan_over_optimum) || 1) - 1)} % over`
      + ` the optimum${p.kept ? " (distribution kept)" : ""}`));
    return box;
  }

  function renderUpstream(up) {
    const sec = el("section", { class: "upstream", "data-upstream": up.name });
    const h = el("h2", {}, up.name);
    if (up.leader !== null && up.leader !== undefined) {
      h.appendChild(el("span", { class: "badge" }, up.leader ? "leader" : "standby"));
    }
    sec.appendChild(h);
    sec.appendChild(planLine(up));
    const rows = (up.endpoints || []).map((e) => {
      const tr = el("tr", { "data-endpoint": e.endpoint });
      const name = el("td", { "data-field": "endpoint" });
      name.appendChild(swatch(colour(e.endpoint)));
      name.appendChild(document.createTextNode(e.endpoint));
      tr.appendChild(name);
      tr.appendChild(cell("share", e.share, pct(e.share)));
      tr.appendChild(cell("tokens", e.tokens, e.tokens === null ? "–" : e.tokens));
      tr.appendChild(cell("regret", e.regret, ms(e.regret, 2)));
      const l = e.latency || {};
      tr.appendChild(cell("estimate", l.estimate, ms(l.estimate)));
      tr.appendChild(cell("p50", l.p50, ms(l.p50)));
      tr.appendChild(cell("p99", l.p99, ms(l.p99)));
      tr.appendChild(cell("requests", e.requests, e.requests));
      tr.appendChild(cell("failures", e.failures, e.failures));
      return tr;
    });
    sec.appendChild(table(["endpoint", "share (%)", "tokens", "regret (ms)", "estimate (ms)",
      "p50 (ms)", "p99 (ms)", "requests", "failures"], rows, "endpoints"));
    const endpoints = (up.endpoints || []).map((e) => e.endpoint);
    const charts = el("div", { class: "charts" });
    charts.appendChild(chart(`${up.name}: traffic share`, "traffic share (%)",
      endpoints.map((e) => ({ name: e, colour: colour(e),
        points: endpointSeries(up.name, e, (r) => (num(r.share) || 0) * 100) })),
      { stacked: true, yMax: 100 }));
    const gap = (pick) => seriesOf(up.name, (u) => (num(pick(u)) === null ? null : pick(u) * 1000));
    charts.appendChild(chart(`${up.name}: equilibrium gaps`, "gap (ms)", [
      { name: "Nash gap", colour: PALETTE[0], dash: "", points: gap((u) => u.nash_gap) },
      { name: "CE gap (sidecars)", colour: PALETTE[3], dash: "6 3", points: gap((u) => u.ce_gap) },
      { name: "CE gap (plan)", colour: PALETTE[2], dash: "2 3", points: gap((u) => u.plan_ce_gap) },
    ], { legend: true }));
    charts.appendChild(chart(`${up.name}: latency estimate`, "latency estimate (ms)",
      endpoints.map((e) => ({ name: e, colour: colour(e), dash: "",
        points: endpointSeries(up.name, e, (r) => {
          const v = num((r.latency || {}).estimate);
          return v === null ? null : v * 1000;
        }) }))));
    sec.appendChild(charts);
    const total = num(up.sidecars_total);
    sec.appendChild(el("h3", {}, total === null || total === (up.sidecars || []).length
      ? "sidecars"
      : `sidecars: ${(up.sidecars || []).length} of ${total} shown, ` +
        `${up.sidecars_following} follow the signaler`));
    const sidecars = (up.sidecars || []).map((s) => {
      const tr = el("tr", { "data-sidecar": s.id });
      tr.appendChild(el("td", {}, s.id));
      const word = s.following === null ? "no recommendation"
        : s.following ? "follows the signaler" : "own learning (fallback)";
      tr.appendChild(el("td", { "data-field": "following",
        class: s.following ? "follows" : s.following === false ? "fallback" : "" }, word));
      tr.appendChild(cell("demand", s.demand, num(s.demand) === null ? "–" : s.demand.toFixed(1)));
      tr.appendChild(cell("distance", s.distance,
        num(s.distance) === null ? "–" : s.distance.toFixed(3)));
      return tr;
    });
    sec.appendChild(table(["sidecar", "routing", "demand (req/s)", "distance from its deal (TV)"],
      sidecars, "sidecars"));
    return sec;
  }

  function renderPolicing(list) {
    const box = el("section", { id: "policing" });
    box.appendChild(el("h2", {}, "policing (inbound sidecars)"));
    if (!list || !list.length) {
      box.appendChild(el("p", { class: "muted" }, "no inbound sidecar reports policing here"));
      return box;
    }
    for (const p of list) {
      box.appendChild(el("h3", {}, `${p.sidecar}: congestion ${pct(p.congestion)} %, capacity `
        + `${num(p.capacity) === null ? "–" : p.capacity.toFixed(1)} req/s, clearing price `
        + `${num(p.price) === null ? "–" : p.price.toFixed(3)}, queue ${p.queue ?? "–"}, `
        + `admitted ${num(p.admitted) === null ? "–" : p.admitted.toFixed(0)}, throttled `
        + `${num(p.throttled) === null ? "–" : p.throttled.toFixed(0)} (recent)`));
      const rows = (p.callers || []).map((c) => {
        const tr = el("tr", { "data-caller": c.caller });
        tr.appendChild(el("td", {}, c.caller));
        tr.appendChild(el("td", { "data-field": "phase" }, c.phase));
        tr.appendChild(cell("level", c.level, c.level));
        tr.appendChild(cell("reputation", c.reputation,
          num(c.reputation) === null ? "–" : c.reputation.toFixed(3)));
        tr.appendChild(cell("rate", c.rate, num(c.rate) === null ? "–" : c.rate.toFixed(1)));
        return tr;
      });
      box.appendChild(table(["caller", "phase", "punishment level", "reputation",
        "rate (req/s)"], rows, "callers"));
    }
    return box;
  }

  function render() {
    const f = dash.last;
    if (!f) return;
    $("source").textContent = `${f.source} ${f.id}` + (f.epoch ? ` · epoch ${f.epoch}` : "")
      + (f.redis === false ? " · Redis unreachable" : "");
    $("note").textContent = f.note || "";
    const main = el("main", { id: "upstreams" });
    if (!(f.upstreams || []).length) {
      main.appendChild(el("p", {}, f.source === "signaler"
        ? "no upstream yet (no regret summary has arrived)" : "this sidecar routes no upstream"));
    }
    for (const up of f.upstreams || []) main.appendChild(renderUpstream(up));
    $("upstreams").replaceWith(main);
    $("policing").replaceWith(renderPolicing(f.policing));
    dash.renders += 1;
    document.body.setAttribute("data-renders", String(dash.renders));
  }

  function setStatus(word) {
    const s = $("status");
    s.setAttribute("data-state", word);
    s.textContent = word === "live" ? "live" : word === "reconnecting"
      ? "reconnecting (the admin listener is away)" : word;
  }

  function connect() {
    const source = new EventSource("dashboard/events");
    source.addEventListener("history", (ev) => {
      const frames = JSON.parse(ev.data);
      dash.connects += 1;
      dash.frames = frames.slice(-KEEP);
      dash.last = dash.frames.length ? dash.frames[dash.frames.length - 1] : null;
      dash.boot = dash.last ? dash.last.boot : null;
      setStatus("live");
      render();
    });
    source.addEventListener("frame", (ev) => {
      const frame = JSON.parse(ev.data);
      dash.frames.push(frame);
      if (dash.frames.length > KEEP) dash.frames.splice(0, dash.frames.length - KEEP);
      dash.last = frame;
      dash.boot = frame.boot;
      setStatus("live");
      render();
    });
    source.onerror = () => {
      dash.errors += 1;
      setStatus("reconnecting");
      // EventSource retries a dropped stream by itself; one refused with an HTTP error is
      // closed for good, so start a new one.
      if (source.readyState === EventSource.CLOSED) setTimeout(connect, 2000);
    };
  }

  connect();
})();
