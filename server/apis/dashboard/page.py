"""The dashboard page, rendered on the server from the status, so that it reads without JavaScript.

``dashboard.js`` renders the same markup from the same JSON when it refreshes the page: a change
to one belongs in the other (the browser tests compare them).
"""

from __future__ import annotations

import math
import time
from functools import cache
from html import escape
from importlib.resources import files
from typing import Any

PALETTE = ("#2f5bd3", "#d9480f", "#2b8a3e", "#ae3ec9", "#0c8599", "#e67700", "#c2255c", "#5c7cfa")
CHART_WIDTH, CHART_HEIGHT = 1200, 220
CHART_LEFT, CHART_RIGHT, CHART_TOP, CHART_BOTTOM = 60, 24, 10, 24


@cache
def _asset(name: str) -> str:
    return files(__package__).joinpath(name).read_text(encoding="utf-8")


def render(status: dict[str, Any], *, refresh: float, nonce: str) -> str:
    """The whole page: the current state as HTML, and the script that keeps it current."""
    page = _asset("dashboard.html")
    for name, value in (
        ("{{css}}", _asset("dashboard.css")),
        ("{{host}}", escape(status["server"]["hostname"])),
        ("{{refresh}}", escape(f"{refresh:g}")),
        ("{{time}}", escape(_clock(status["time"]))),
        ("{{nonce}}", escape(nonce)),
        ("{{body}}", body(status)),
        # The script last: nothing in it is a placeholder.
        ("{{script}}", _asset("dashboard.js")),
    ):
        page = page.replace(name, value, 1)
    return page


def body(status: dict[str, Any]) -> str:
    """What ``#app`` holds: the server, the latency chart and each model version."""
    models = status["models"]
    parts = [_server(status), _chart(status)]
    if models:
        parts.extend(_model(m, status["time"], status["window_seconds"]) for m in models)
    else:
        parts.append('<section class="models"><h2>Models</h2><p class="empty">No models are registered.</p></section>')
    return "\n".join(parts)


# -- formatting (dashboard.js has the same functions) -----------------------------------------------


def fixed(x: float, digits: int) -> str:
    """``x`` with ``digits`` decimals, halves rounded up, exactly as dashboard.js's ``fixed`` writes it
    (Python's formatting rounds halves to even, JavaScript's ``toFixed`` up)."""
    scale = 10**digits
    return f"{math.floor(x * scale + 0.5) / scale:.{digits}f}"


def _e(value: object) -> str:
    return escape(str(value), quote=True)


def fmt_duration(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    s = max(0, int(seconds))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    if s < 86400:
        return f"{s // 3600} h {s % 3600 // 60:02d} min"
    return f"{s // 86400} d {s % 86400 // 3600} h"


def fmt_bytes(n: float | None) -> str:
    if n is None:
        return "—"
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{fixed(n / size, 1 if n / size < 100 else 0)} {unit}"
    return f"{int(n)} B"


def fmt_ms(ms: float | None) -> str:
    if ms is None:
        return "—"
    if ms >= 1000:
        return f"{fixed(ms / 1000, 2)} s"
    if ms >= 100:
        return f"{fixed(ms, 0)} ms"
    if ms >= 10:
        return f"{fixed(ms, 1)} ms"
    return f"{fixed(ms, 2)} ms"


def fmt_tick(ms: float) -> str:
    """An axis label: ``20 ms``, ``0.5 ms``, ``1 s``."""
    return f"{ms / 1000:.6g} s" if ms >= 1000 else f"{ms:.6g} ms"


def fmt_rate(per_second: float | None) -> str:
    if per_second is None:
        return "—"
    if per_second == 0:
        return "0/s"
    if per_second < 10:
        return f"{fixed(per_second, 2)}/s"
    if per_second < 100:
        return f"{fixed(per_second, 1)}/s"
    return f"{fixed(per_second, 0)}/s"


def fmt_percent(value: float | None) -> str:
    return "—" if value is None else f"{fixed(value, 1)}%"


def _clock(epoch: float) -> str:
    return time.strftime("%H:%M:%S UTC", time.gmtime(epoch))


def _iso(epoch: float | None) -> str:
    return "" if epoch is None else time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(epoch))


def _ago(epoch: float | None, now: float) -> str:
    return "—" if epoch is None else f"{fmt_duration(now - epoch)} ago"


def _card(key: str, value: str, sub: str = "", *, cls: str = "", attrs: str = "", extra: str = "") -> str:
    sub_html = f'<div class="s">{sub}</div>' if sub else ""
    return (
        f'<div class="card {cls}"><div class="k">{_e(key)}</div>'
        f'<div class="v"{attrs}>{_e(value)}</div>{sub_html}{extra}</div>'
    )


def _list(items: list[tuple[str, str, bool]]) -> str:
    rows = "".join(f'<li class="{"zero" if zero else ""}"><span>{_e(k)}</span><span>{_e(v)}</span></li>' for k, v, zero in items)
    return f"<ul>{rows}</ul>"


# -- the sections -------------------------------------------------------------------------------------


def _server(status: dict[str, Any]) -> str:
    server = status["server"]
    cards = [
        _card("Uptime", fmt_duration(server["uptime_seconds"]), _e(f"since {_iso(server['started_at'])}"), cls="uptime"),
    ]
    off = "system metrics off" if not server["system_metrics"] else ""
    cards.append(_card("Host CPU", fmt_percent(server["cpu_percent"]), _e(off or "all cores"), cls="cpu"))
    memory = server["memory"]
    if memory is not None:
        sub = f"{fmt_bytes(memory['used_bytes'])} of {fmt_bytes(memory['total_bytes'])}"
        cards.append(_card("Host memory", fmt_percent(memory["percent"]), _e(sub), cls="memory", extra=_bar(memory["percent"])))
    else:
        cards.append(_card("Host memory", "—", _e(off), cls="memory"))
    frontend = server["frontend"]
    sub = f"CPU {fmt_percent(frontend['cpu_percent'])} of a core · pid {frontend['pid']}"
    cards.append(_card("Frontend memory", fmt_bytes(frontend["rss_bytes"]), _e(sub), cls="frontend"))
    for gpu in server["gpus"]:
        sub = f"memory {fmt_bytes(gpu.get('memory_used_bytes'))} ({fmt_percent(gpu.get('memory_percent'))})"
        cards.append(_card(f"GPU {gpu['id']}", fmt_percent(gpu.get("utilization_percent")), _e(sub), cls="gpu"))
    if not server["gpus"]:
        cards.append(_card("GPU", "none", _e(off or "none found"), cls="gpu"))
    connections = server["connections"]
    cards.append(
        _card(
            "Open connections", str(sum(connections.values())), cls="connections",
            extra=_list([(api, str(n), n == 0) for api, n in connections.items()]),
        )
    )  # fmt: skip
    responses = server["responses"]
    rates = [r["per_second"] for r in responses.values()]
    total_rate = sum(rates) if None not in rates else None
    cards.append(
        _card(
            "Responses", fmt_rate(total_rate), "all ports, by status class", cls="responses",
            extra=_list([(cls, f"{r['total']} · {fmt_rate(r['per_second'])}", r["total"] == 0) for cls, r in responses.items()]),
        )
    )  # fmt: skip
    refused = server["refused"]
    cards.append(
        _card(
            "Refused", str(sum(r["total"] for r in refused.values())), "before they were requests", cls="refused",
            extra=_list(_refusals(refused)),
        )
    )  # fmt: skip
    title = f"{server['hostname']} · marserve {server['version']} (TorchServe {server['torchserve_version']} APIs)"
    return f'<section class="server" id="server"><h2>Server <span class="version">{_e(title)}</span></h2><div class="cards">{"".join(cards)}</div></section>'


def _refusals(refused: dict[str, Any]) -> list[tuple[str, str, bool]]:
    """The reasons that happened, then one line for those that did not."""
    items = [(reason, str(r["total"]), False) for reason, r in refused.items() if r["total"]]
    if len(items) < len(refused):
        items.append(("others" if items else "none", "0", True))
    return items


def _bar(percent: float | None) -> str:
    if percent is None:
        return ""
    width = min(100.0, max(0.0, percent))
    return f'<div class="bar{" full" if width >= 90 else ""}"><i style="width:{fixed(width, 1)}%"></i></div>'


def _model(m: dict[str, Any], now: float, window: float | None) -> str:
    settings = m["settings"]
    badges = '<span class="badge">default</span>' if m["default"] else ""
    if m["loaded_at_startup"]:
        badges += ' <span class="badge">startup</span>'
    meta = " · ".join(
        [
            m["url"],
            m["handler"],
            f"batch {settings['batch_size']}, up to {settings['max_batch_delay_ms']} ms",
            f"workers {settings['min_workers']}–{settings['max_workers']}",
            settings["device_type"],
            f"loaded {_ago(m['loaded_at'], now)}",
        ]
    )
    requests, latency, queue = m["requests"], m["latency_ms"] or {}, m["queue"]
    rate = requests["per_second"]
    cards = [
        _card(
            "Requests/s", fmt_rate(rate), _e(f"{requests['total']} in all"), cls="requests",
            attrs=f' data-value="{"" if rate is None else fixed(rate, 3)}"',
        )
    ]  # fmt: skip
    for q in ("p50", "p90", "p99"):
        cards.append(_card(f"{q} latency", fmt_ms(latency.get(q)), "last minute", cls=q))
    # Errors by status class: the answers that were not 2xx.
    errors = [(cls, r) for cls, r in m["responses"].items() if cls != "2xx"]
    rates = [r["per_second"] for _, r in errors]
    cards.append(
        _card(
            "Errors/s", fmt_rate(sum(rates) if None not in rates else None),
            _e(f"{sum(r['total'] for _, r in errors)} in all"), cls="errors",
            extra=_list([(cls, f"{r['total']} · {fmt_rate(r['per_second'])}", r["total"] == 0) for cls, r in errors]),
        )
    )  # fmt: skip
    capacity = queue["capacity"]
    share = 100.0 * queue["length"] / capacity if capacity else 0.0
    cards.append(_card("Queue", f"{queue['length']} / {capacity}", "waiting / capacity", cls="queue", extra=_bar(share)))
    return (
        f'<section class="model" data-model="{_e(m["name"])}" data-version="{_e(m["version"])}">'
        f'<h2>{_e(m["name"])} <span class="version">{_e(m["version"])}</span> {badges}</h2>'
        f'<div class="meta">{_e(meta)}</div>'
        f'<div class="row"><div><div class="cards">{"".join(cards)}</div>{_workers(m["workers"], now)}</div>'
        f"{_batches(m, window)}</div></section>"
    )


def _workers(workers: list[dict[str, Any]], now: float) -> str:
    if not workers:
        return '<p class="empty">No workers (scaled to 0).</p>'
    rows = []
    for w in workers:
        last_exit = w["last_exit"] or ""
        rows.append(
            f'<tr data-worker="{_e(w["id"])}"><td>{_e(w["id"])}</td>'
            f'<td><span class="state {_e(w["state"])}">{_e(w["state"])}</span></td>'
            f'<td class="pid">{_e(w["pid"] or "—")}</td><td>{_e(fmt_bytes(w["rss_bytes"]))}</td>'
            f'<td class="inflight">{_e(w["in_flight"])}</td><td class="restarts">{_e(w["restarts"])}</td>'
            f'<td class="exit" title="{_e(last_exit)}">{_e(last_exit or "—")}</td>'
            f'<td>{_e(fmt_duration(now - w["started_at"]) if w["started_at"] else "—")}</td></tr>'
        )
    head = (
        '<tr><th>Worker</th><th>State</th><th>PID</th><th>RSS</th><th title="batches sent and not answered">In flight</th>'
        "<th>Restarts</th><th>Last exit</th><th>Up</th></tr>"
    )
    return f'<table class="workers">{head}{"".join(rows)}</table>'


def _batches(m: dict[str, Any], window: float | None) -> str:
    buckets = m["batch_sizes"]
    batch_size = m["settings"]["batch_size"]
    # The buckets a batch of this model can fall in, and any other that has counts.
    last = next((i for i, b in enumerate(buckets) if b["le"] is None or b["le"] >= batch_size), len(buckets) - 1)
    shown = [b for i, b in enumerate(buckets) if i <= last or b["total"]]
    recent = window is not None
    counts = [(b["count"] if recent else b["total"]) or 0 for b in shown]
    top = max(counts, default=0) or 1
    cols = "".join(
        f'<div class="col{" zero" if not c else ""}" title="{_e(b["label"])}: {c} last minute, {b["total"]} in all">'
        f'<i style="height:{fixed(100 * c / top, 0)}%"></i></div>'
        for b, c in zip(shown, counts)
    )
    labels = "".join(f"<span>{_e(b['label'])}</span>" for b in shown)
    caption = "Batch sizes, last minute" if recent else "Batch sizes, since start"
    return f'<div class="batches"><div class="k">{caption}</div><div class="hist">{cols}</div><div class="hist-labels">{labels}</div></div>'


def log_scale(values: list[float]) -> tuple[int, int, list[float]]:
    """Decades (powers of ten: lowest, highest) that hold ``values``, and the ticks between them:
    1, 2 and 5 of each decade over one or two decades, else the decades alone."""
    low = math.floor(math.log10(min(values)))
    high = max(low + 1, math.ceil(math.log10(max(values))))
    steps = (1, 2, 5) if high - low <= 2 else (1,)
    ticks = [m * 10.0**e for e in range(low, high + 1) for m in steps if m * 10.0**e <= 10.0**high * (1 + 1e-9)]
    return low, high, ticks


def _chart(status: dict[str, Any]) -> str:
    step: float = status["history_step_seconds"]
    span: float = status["history_span_seconds"]
    now: float = status["time"]
    series = [(m, PALETTE[i % len(PALETTE)]) for i, m in enumerate(status["models"]) if m["history"]]
    values = [v for m, _ in series for p in m["history"] for v in (p["p50_ms"], p["p99_ms"]) if v]
    head = '<section class="latency" id="latency"><h2>Latency, last 5 minutes <span class="version">p50 solid, p99 dashed</span></h2>'
    if not values:
        return head + f'<p class="empty">Collecting: a point every {step:g} s while this page is open.</p></section>'
    low, high, ticks = log_scale(values)  # latencies span decades: a log scale shows p50 and p99 alike
    inner_w = CHART_WIDTH - CHART_LEFT - CHART_RIGHT
    inner_h = CHART_HEIGHT - CHART_TOP - CHART_BOTTOM

    def x(t: float) -> float:
        return CHART_LEFT + (t - (now - span)) / span * inner_w

    def y(v: float) -> float:
        return CHART_TOP + (1 - (math.log10(v) - low) / (high - low)) * inner_h

    parts = [f'<svg class="chart" viewBox="0 0 {CHART_WIDTH} {CHART_HEIGHT}" role="img" aria-label="latency chart">']
    for value in ticks:
        parts.append(
            f'<line class="grid" x1="{CHART_LEFT}" x2="{CHART_WIDTH - CHART_RIGHT}" y1="{fixed(y(value), 1)}" y2="{fixed(y(value), 1)}"/>'
            f'<text x="{CHART_LEFT - 6}" y="{fixed(y(value) + 4, 1)}" text-anchor="end">{_e(fmt_tick(value))}</text>'
        )
    for minute in range(6):
        t = now - span + minute * 60
        label = "now" if minute == 5 else f"−{5 - minute} min"
        parts.append(f'<text x="{fixed(x(t), 1)}" y="{CHART_HEIGHT - 6}" text-anchor="middle">{label}</text>')
    legend = []
    for m, color in series:
        for field, cls in (("p50_ms", "p50"), ("p99_ms", "p99")):
            d = _path(m["history"], field, x, y, step)
            if d:
                parts.append(f'<path class="{cls}" stroke="{color}" d="{d}"/>')
        legend.append(f'<span><i style="background:{color}"></i>{_e(m["name"])} {_e(m["version"])}</span>')
    parts.append("</svg>")
    return head + "".join(parts) + f'<div class="legend">{"".join(legend)}</div></section>'


def _path(history: list[dict[str, Any]], field: str, x: Any, y: Any, step: float) -> str:
    """An SVG path through the points, broken where a value is missing or polling stopped."""
    segments: list[list[str]] = []
    last = None
    for point in history:
        value = point[field]
        if not value:
            last = None
            continue
        if last is None or point["time"] - last > 2.5 * step:
            segments.append([])
        segments[-1].append(f"{fixed(x(point['time']), 1)} {fixed(y(value), 1)}")
        last = point["time"]
    # A lone point is drawn as a dot (a round cap on a very short line).
    return " ".join("M" + " L".join(s) + (" h0.1" if len(s) == 1 else "") for s in segments)
