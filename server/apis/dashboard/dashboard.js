// The dashboard's script: polls dashboard/status and redraws #app from it. page.py renders the
// same markup on the server (the page without JavaScript); a change to one belongs in the other.
"use strict";
(function () {
  const PALETTE = ["#2f5bd3", "#d9480f", "#2b8a3e", "#ae3ec9", "#0c8599", "#e67700", "#c2255c", "#5c7cfa"];
  const W = 1200, H = 220, L = 60, R = 24, T = 10, B = 24;
  const app = document.getElementById("app");
  const live = document.getElementById("live");
  const refresh = Math.max(0.25, parseFloat(document.body.dataset.refresh) || 1) * 1000;
  // Relative to wherever the page was served from (a proxy's prefix included), with or without a trailing slash.
  const statusUrl = location.pathname.replace(/\/+$/, "") + "/status";

  const e = (v) => String(v).replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#x27;" })[c]);
  const pad2 = (n) => String(n).padStart(2, "0");
  // Halves rounded up, exactly as page.py's fixed() writes numbers.
  const fixed = (x, digits) => (Math.floor(x * 10 ** digits + 0.5) / 10 ** digits).toFixed(digits);

  function fmtDuration(seconds) {
    if (seconds === null || seconds === undefined) return "—";
    const s = Math.max(0, Math.floor(seconds));
    if (s < 60) return `${s} s`;
    if (s < 3600) return `${Math.floor(s / 60)} min ${pad2(s % 60)} s`;
    if (s < 86400) return `${Math.floor(s / 3600)} h ${pad2(Math.floor((s % 3600) / 60))} min`;
    return `${Math.floor(s / 86400)} d ${Math.floor((s % 86400) / 3600)} h`;
  }
  function fmtBytes(n) {
    if (n === null || n === undefined) return "—";
    for (const [unit, size] of [["GiB", 2 ** 30], ["MiB", 2 ** 20], ["KiB", 2 ** 10]]) {
      if (n >= size) return `${fixed(n / size, n / size < 100 ? 1 : 0)} ${unit}`;
    }
    return `${Math.floor(n)} B`;
  }
  function fmtMs(ms) {
    if (ms === null || ms === undefined) return "—";
    if (ms >= 1000) return `${fixed(ms / 1000, 2)} s`;
    if (ms >= 100) return `${fixed(ms, 0)} ms`;
    if (ms >= 10) return `${fixed(ms, 1)} ms`;
    return `${fixed(ms, 2)} ms`;
  }
  const fmtTick = (ms) => (ms >= 1000 ? `${Number((ms / 1000).toPrecision(6))} s` : `${Number(ms.toPrecision(6))} ms`);
  function fmtRate(r) {
    if (r === null || r === undefined) return "—";
    if (r === 0) return "0/s";
    if (r < 10) return `${fixed(r, 2)}/s`;
    if (r < 100) return `${fixed(r, 1)}/s`;
    return `${fixed(r, 0)}/s`;
  }
  const fmtPercent = (v) => (v === null || v === undefined ? "—" : `${fixed(v, 1)}%`);
  const iso = (t) => (t === null || t === undefined ? "" : new Date(t * 1000).toISOString().replace("T", " ").replace(/\.\d+Z$/, " UTC"));
  const ago = (t, now) => (t === null || t === undefined ? "—" : `${fmtDuration(now - t)} ago`);

  function card(key, value, sub, cls, attrs, extra) {
    return `<div class="card ${cls || ""}"><div class="k">${e(key)}</div><div class="v"${attrs || ""}>${e(value)}</div>` +
      (sub ? `<div class="s">${sub}</div>` : "") + (extra || "") + "</div>";
  }
  function list(items) {
    return "<ul>" + items.map(([k, v, zero]) => `<li class="${zero ? "zero" : ""}"><span>${e(k)}</span><span>${e(v)}</span></li>`).join("") + "</ul>";
  }
  function bar(percent) {
    if (percent === null || percent === undefined) return "";
    const width = Math.min(100, Math.max(0, percent));
    return `<div class="bar${width >= 90 ? " full" : ""}"><i style="width:${fixed(width, 1)}%"></i></div>`;
  }

  function server(status) {
    const s = status.server;
    const off = s.system_metrics ? "" : "system metrics off";
    const cards = [card("Uptime", fmtDuration(s.uptime_seconds), e(`since ${iso(s.started_at)}`), "uptime")];
    cards.push(card("Host CPU", fmtPercent(s.cpu_percent), e(off || "all cores"), "cpu"));
    if (s.memory) {
      cards.push(card("Host memory", fmtPercent(s.memory.percent), e(`${fmtBytes(s.memory.used_bytes)} of ${fmtBytes(s.memory.total_bytes)}`), "memory", "", bar(s.memory.percent)));
    } else {
      cards.push(card("Host memory", "—", e(off), "memory"));
    }
    const f = s.frontend;
    cards.push(card("Frontend memory", fmtBytes(f.rss_bytes), e(`CPU ${fmtPercent(f.cpu_percent)} of a core · pid ${f.pid}`), "frontend"));
    for (const gpu of s.gpus) {
      cards.push(card(`GPU ${gpu.id}`, fmtPercent(gpu.utilization_percent), e(`memory ${fmtBytes(gpu.memory_used_bytes)} (${fmtPercent(gpu.memory_percent)})`), "gpu"));
    }
    if (!s.gpus.length) cards.push(card("GPU", "none", e(off || "none found"), "gpu"));
    const conns = Object.entries(s.connections);
    cards.push(card("Open connections", String(conns.reduce((a, [, n]) => a + n, 0)), "", "connections", "", list(conns.map(([api, n]) => [api, String(n), n === 0]))));
    const responses = Object.entries(s.responses);
    const rates = responses.map(([, r]) => r.per_second);
    const total = rates.includes(null) ? null : rates.reduce((a, b) => a + b, 0);
    cards.push(card("Responses", fmtRate(total), "all ports, by status class", "responses", "",
      list(responses.map(([cls, r]) => [cls, `${r.total} · ${fmtRate(r.per_second)}`, r.total === 0]))));
    const refused = Object.entries(s.refused);
    cards.push(card("Refused", String(refused.reduce((a, [, r]) => a + r.total, 0)), "before they were requests", "refused", "",
      list(refusals(refused))));
    const title = `${s.hostname} · marserve ${s.version} (TorchServe ${s.torchserve_version} APIs)`;
    return `<section class="server" id="server"><h2>Server <span class="version">${e(title)}</span></h2><div class="cards">${cards.join("")}</div></section>`;
  }

  // The reasons that happened, then one line for those that did not.
  function refusals(refused) {
    const items = refused.filter(([, r]) => r.total).map(([reason, r]) => [reason, String(r.total), false]);
    if (items.length < refused.length) items.push([items.length ? "others" : "none", "0", true]);
    return items;
  }

  function model(m, now, window) {
    const st = m.settings;
    let badges = m.default ? '<span class="badge">default</span>' : "";
    if (m.loaded_at_startup) badges += ' <span class="badge">startup</span>';
    const meta = [m.url, m.handler, `batch ${st.batch_size}, up to ${st.max_batch_delay_ms} ms`,
      `workers ${st.min_workers}–${st.max_workers}`, st.device_type, `loaded ${ago(m.loaded_at, now)}`].join(" · ");
    const rate = m.requests.per_second;
    const latency = m.latency_ms || {};
    const cards = [card("Requests/s", fmtRate(rate), e(`${m.requests.total} in all`), "requests", ` data-value="${rate === null ? "" : fixed(rate, 3)}"`)];
    for (const q of ["p50", "p90", "p99"]) cards.push(card(`${q} latency`, fmtMs(latency[q]), "last minute", q));
    // Errors by status class: the answers that were not 2xx.
    const errors = Object.entries(m.responses).filter(([cls]) => cls !== "2xx");
    const rates = errors.map(([, r]) => r.per_second);
    cards.push(card("Errors/s", fmtRate(rates.includes(null) ? null : rates.reduce((a, b) => a + b, 0)),
      e(`${errors.reduce((a, [, r]) => a + r.total, 0)} in all`), "errors", "",
      list(errors.map(([cls, r]) => [cls, `${r.total} · ${fmtRate(r.per_second)}`, r.total === 0]))));
    const cap = m.queue.capacity;
    cards.push(card("Queue", `${m.queue.length} / ${cap}`, "waiting / capacity", "queue", "", bar(cap ? (100 * m.queue.length) / cap : 0)));
    return `<section class="model" data-model="${e(m.name)}" data-version="${e(m.version)}">` +
      `<h2>${e(m.name)} <span class="version">${e(m.version)}</span> ${badges}</h2>` +
      `<div class="meta">${e(meta)}</div>` +
      `<div class="row"><div><div class="cards">${cards.join("")}</div>${workers(m.workers, now)}</div>${batches(m, window)}</div></section>`;
  }

  function workers(list, now) {
    if (!list.length) return '<p class="empty">No workers (scaled to 0).</p>';
    const rows = list.map((w) => {
      const exit = w.last_exit || "";
      return `<tr data-worker="${e(w.id)}"><td>${e(w.id)}</td>` +
        `<td><span class="state ${e(w.state)}">${e(w.state)}</span></td>` +
        `<td class="pid">${e(w.pid || "—")}</td><td>${e(fmtBytes(w.rss_bytes))}</td>` +
        `<td class="inflight">${e(w.in_flight)}</td><td class="restarts">${e(w.restarts)}</td>` +
        `<td class="exit" title="${e(exit)}">${e(exit || "—")}</td>` +
        `<td>${e(w.started_at ? fmtDuration(now - w.started_at) : "—")}</td></tr>`;
    });
    return '<table class="workers"><tr><th>Worker</th><th>State</th><th>PID</th><th>RSS</th><th title="batches sent and not answered">In flight</th><th>Restarts</th><th>Last exit</th><th>Up</th></tr>' + rows.join("") + "</table>";
  }

  function batches(m, window) {
    const buckets = m.batch_sizes;
    let last = buckets.findIndex((b) => b.le === null || b.le >= m.settings.batch_size);
    if (last < 0) last = buckets.length - 1;
    const shown = buckets.filter((b, i) => i <= last || b.total);
    const recent = window !== null;
    const counts = shown.map((b) => (recent ? b.count : b.total) || 0);
    const top = Math.max(0, ...counts) || 1;
    const cols = shown.map((b, i) => {
      const c = counts[i];
      return `<div class="col${c ? "" : " zero"}" title="${e(b.label)}: ${c} last minute, ${b.total} in all"><i style="height:${fixed((100 * c) / top, 0)}%"></i></div>`;
    }).join("");
    const labels = shown.map((b) => `<span>${e(b.label)}</span>`).join("");
    const caption = recent ? "Batch sizes, last minute" : "Batch sizes, since start";
    return `<div class="batches"><div class="k">${caption}</div><div class="hist">${cols}</div><div class="hist-labels">${labels}</div></div>`;
  }

  // Decades that hold the values, and the ticks between them (page.py's log_scale).
  function logScale(values) {
    const low = Math.floor(Math.log10(Math.min(...values)));
    const high = Math.max(low + 1, Math.ceil(Math.log10(Math.max(...values))));
    const steps = high - low <= 2 ? [1, 2, 5] : [1];
    const ticks = [];
    for (let p = low; p <= high; p++) for (const m of steps) if (m * 10 ** p <= 10 ** high * (1 + 1e-9)) ticks.push(m * 10 ** p);
    return [low, high, ticks];
  }

  function chart(status) {
    const step = status.history_step_seconds, span = status.history_span_seconds, now = status.time;
    const series = status.models.map((m, i) => [m, PALETTE[i % PALETTE.length]]).filter(([m]) => m.history.length);
    const values = [];
    for (const [m] of series) for (const p of m.history) for (const v of [p.p50_ms, p.p99_ms]) if (v) values.push(v);
    const head = '<section class="latency" id="latency"><h2>Latency, last 5 minutes <span class="version">p50 solid, p99 dashed</span></h2>';
    if (!values.length) return head + `<p class="empty">Collecting: a point every ${step} s while this page is open.</p></section>`;
    const [low, high, ticks] = logScale(values);
    const x = (t) => L + ((t - (now - span)) / span) * (W - L - R);
    const y = (v) => T + (1 - (Math.log10(v) - low) / (high - low)) * (H - T - B);
    const parts = [`<svg class="chart" viewBox="0 0 ${W} ${H}" role="img" aria-label="latency chart">`];
    for (const v of ticks) {
      parts.push(`<line class="grid" x1="${L}" x2="${W - R}" y1="${fixed(y(v), 1)}" y2="${fixed(y(v), 1)}"/>` +
        `<text x="${L - 6}" y="${fixed(y(v) + 4, 1)}" text-anchor="end">${e(fmtTick(v))}</text>`);
    }
    for (let minute = 0; minute < 6; minute++) {
      const label = minute === 5 ? "now" : `−${5 - minute} min`;
      parts.push(`<text x="${fixed(x(now - span + minute * 60), 1)}" y="${H - 6}" text-anchor="middle">${label}</text>`);
    }
    const legend = [];
    for (const [m, color] of series) {
      for (const [field, cls] of [["p50_ms", "p50"], ["p99_ms", "p99"]]) {
        const d = path(m.history, field, x, y, step);
        if (d) parts.push(`<path class="${cls}" stroke="${color}" d="${d}"/>`);
      }
      legend.push(`<span><i style="background:${color}"></i>${e(m.name)} ${e(m.version)}</span>`);
    }
    parts.push("</svg>");
    return head + parts.join("") + `<div class="legend">${legend.join("")}</div></section>`;
  }

  function path(history, field, x, y, step) {
    const segments = [];
    let last = null;
    for (const p of history) {
      const v = p[field];
      if (!v) { last = null; continue; }
      if (last === null || p.time - last > 2.5 * step) segments.push([]);
      segments[segments.length - 1].push(`${fixed(x(p.time), 1)} ${fixed(y(v), 1)}`);
      last = p.time;
    }
    return segments.map((s) => "M" + s.join(" L") + (s.length === 1 ? " h0.1" : "")).join(" ");
  }

  function body(status) {
    const parts = [server(status), chart(status)];
    if (status.models.length) {
      for (const m of status.models) parts.push(model(m, status.time, status.window_seconds));
    } else {
      parts.push('<section class="models"><h2>Models</h2><p class="empty">No models are registered.</p></section>');
    }
    return parts.join("\n");
  }

  let timer = null, busy = false;
  async function poll() {
    timer = null;
    if (busy) return;
    busy = true;
    try {
      const response = await fetch(statusUrl, { cache: "no-store", headers: { accept: "application/json" } });
      if (!response.ok) throw new Error(`HTTP ${response.status}`);
      const status = await response.json();
      app.innerHTML = body(status);
      live.className = "live ok";
      live.textContent = `live · updated ${new Date().toLocaleTimeString()}`;
      document.body.dataset.updates = String((parseInt(document.body.dataset.updates || "0", 10) || 0) + 1);
    } catch (error) {
      live.className = "live lost";
      live.textContent = `connection lost (${error.message}) · retrying`;
    }
    busy = false;
    schedule();
  }
  function schedule() {
    // A hidden tab does not poll: the dashboard costs nothing while nobody looks at it.
    if (timer === null && !busy && !document.hidden) timer = setTimeout(poll, refresh);
  }
  document.addEventListener("visibilitychange", () => {
    if (!document.hidden && timer === null && !busy) poll();
  });
  live.className = "live ok";
  live.textContent = "live";
  schedule();
})();
