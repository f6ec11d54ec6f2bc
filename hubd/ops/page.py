"""The status page as HTML, drawn on the server: no script, no stylesheet or font from elsewhere, so it works
offline and behind any proxy. Every text from outside (names, areas, reasons) is escaped."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from html import escape
from typing import Any

from hubd.model import format_time
from hubd.ops.clocks import Clock
from hubd.ops.fleet import SLOT_MS, STATES, DerRow

_STYLE = """
body{font:14px system-ui,sans-serif;margin:1.5em;color:#222}h1{font-size:1.4em}h2{font-size:1.1em;margin-top:1.6em}
table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:.2em .6em;text-align:left}
td.n{text-align:right}.fresh{color:#1a7f37}.late{color:#9a6700}.silent{color:#cf222e}.revoked{color:#666}
.bad{color:#cf222e;font-weight:bold}.muted{color:#666}form.inline{display:inline}
"""
# One colour per DER type in the chart (model.DER_TYPES).
_COLOURS = {
    "pv": "#f2b705",
    "ess": "#2e86de",
    "generator": "#8e44ad",
    "fuel_cell": "#16a085",
    "meter": "#7f8c8d",
    "ev": "#e67e22",
    "load": "#c0392b",
    "other": "#95a5a6",
}


@dataclass
class View:
    """What one rendering of the page shows."""

    user: str
    status: str
    ready: bool
    states: list[tuple[str, str, str, int]]
    ders: list[DerRow]
    after: str
    page_size: int
    now: int
    sources: list[dict[str, Any]]
    clocks: list[Clock]
    refusals: dict[str, int]
    quarantine_total: int
    quarantine: list[dict[str, Any]]
    day_start: datetime
    energy: dict[str, list[float]] = field(default_factory=dict)
    energy_pending: int = 0  # slots of the chart not read yet


def login_page(message: str = "") -> str:
    said = f'<p class="bad" id="message">{escape(message)}</p>' if message else ""
    return _document(
        "hubd — log in",
        f"""<h1>hubd status — log in</h1>{said}
<form method="post" action="/login" id="login">
<p><label>System name <input name="name" id="name" autocomplete="username" required></label></p>
<p><label>Password <input name="password" id="password" type="password" autocomplete="current-password"
required></label></p>
<p><button type="submit" id="submit">Log in</button></p></form>
<p class="muted">A system account of role viewer or consumer (<code>hubd system add NAME --role viewer</code>).</p>""",
    )


def status_page(view: View) -> str:
    ready = "ready" if view.ready else '<span class="bad">NOT READY</span>'
    body = f"""<h1>hubd status</h1>
<p>{ready} — {escape(view.status)} — at {escape(format_time(view.now))}
— logged in as {escape(view.user)}
<form class="inline" method="post" action="/logout"><button>Log out</button></form></p>
{_fleet(view)}{_ders(view)}{_sources(view)}{_clocks(view)}{_refusals(view)}{_quarantine(view)}{_energy(view)}"""
    return _document("hubd status", body)


def _document(title: str, body: str) -> str:
    return (
        f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{escape(title)}</title>'
        f'<meta name="viewport" content="width=device-width"><style>{_STYLE}</style></head><body>{body}</body></html>'
    )


def _fleet(view: View) -> str:
    totals = dict.fromkeys(STATES, 0)
    rows: dict[tuple[str, str], dict[str, int]] = {}
    for der_type, area, state, count in view.states:
        rows.setdefault((der_type, area), dict.fromkeys(STATES, 0))[state] = count
        totals[state] += count
    head = "".join(f'<th class="{s}">{s}</th>' for s in STATES)
    lines = "".join(
        f"<tr><td>{escape(t)}</td><td>{escape(a) or '—'}</td>"
        + "".join(f'<td class="n" data-state="{s}">{counts[s]}</td>' for s in STATES)
        + f'<td class="n">{sum(counts.values())}</td></tr>'
        for (t, a), counts in sorted(rows.items())
    )
    total = "".join(f'<td class="n" id="total-{s}">{totals[s]}</td>' for s in STATES)
    return (
        '<h2>Fleet</h2><table id="fleet"><thead><tr><th>type</th><th>area</th>'
        f"{head}<th>all</th></tr></thead><tbody>{lines}</tbody>"
        f'<tfoot><tr><th colspan="2">all</th>{total}<td class="n" id="total-all">{sum(totals.values())}</td></tr>'
        "</tfoot></table>"
    )


def _ders(view: View) -> str:
    lines = "".join(
        f'<tr class="der"><td>{escape(d.der_id)}</td><td>{escape(d.type)}</td><td>{escape(d.area or "—")}</td>'
        f"<td>{escape(d.status)}</td><td>{_age(view.now, d.last_at)}</td>"
        f'<td class="{d.state}">{d.state}</td></tr>'
        for d in view.ders
    )
    more = ""
    if len(view.ders) == view.page_size:
        more = f' <a id="next" href="/?after={escape(view.ders[-1].der_id, quote=True)}">next page</a>'
    first = ' <a href="/">first page</a>' if view.after else ""
    return (
        f'<h2>DERs</h2><p class="muted">{view.page_size} a page, by id{first}{more}</p>'
        '<table id="ders"><thead><tr><th>DER</th><th>type</th><th>area</th><th>status</th>'
        f"<th>last reading</th><th>state</th></tr></thead><tbody>{lines}</tbody></table>"
    )


def _age(now: int, at: int | None) -> str:
    if at is None:
        return '<span class="muted">never</span>'
    seconds = max(0, (now - at) // 1000)
    age = f"{seconds} s" if seconds < 120 else f"{seconds // 60} min" if seconds < 7200 else f"{seconds // 3600} h"
    return f'<span title="{escape(format_time(at))}">{age} ago</span>'


def _sources(view: View) -> str:
    lines = "".join(
        f"<tr><td>{escape(s['kind'])}</td><td>{escape(s['name'])}</td>"
        f'<td class="{"fresh" if s["state"] == "up" else "bad"}">{escape(s["state"])}</td>'
        f"<td>{escape(s['last_success'] or '—')}</td><td>{escape(s['error'] or '—')}</td></tr>"
        for s in view.sources
    )
    return (
        '<h2>Sources</h2><table id="sources"><thead><tr><th>kind</th><th>name</th><th>state</th>'
        f"<th>last success</th><th>error</th></tr></thead><tbody>{lines}</tbody></table>"
    )


_CLOCK_ROWS = 51  # the hub's and 50 sources', flagged first: a fleet of edge terminals stays one screen


def _clocks(view: View) -> str:
    if not view.clocks:
        return '<h2>Clocks</h2><p id="clocks" class="muted">not measured</p>'
    lines = "".join(
        f'<tr><td>{escape(c.name)}</td><td class="n">{"—" if c.offset_s is None else f"{c.offset_s:+.3f} s"}</td>'
        f"<td>{escape(c.state)}</td></tr>"
        for c in view.clocks[:_CLOCK_ROWS]
    )
    more = len(view.clocks) - _CLOCK_ROWS
    rest = f'<p class="muted">and {more} more sources (hubd time sources)</p>' if more > 0 else ""
    table = f'<table id="clocks"><tr><th>clock</th><th>offset</th><th>state</th></tr>{lines}</table>'
    return f"<h2>Clocks</h2>{table}{rest}"


def _refusals(view: View) -> str:
    if not view.refusals:
        return '<h2>Refusals in the last hour</h2><p id="refusals" class="muted">none</p>'
    lines = "".join(
        f'<tr><td>{escape(code)}</td><td class="n" data-code="{escape(code)}">{n}</td></tr>'
        for code, n in view.refusals.items()
    )
    return (
        '<h2>Refusals in the last hour</h2><p class="muted">readings, messages, requests and logins refused, '
        f'by error code (from the audit trail)</p><table id="refusals">{lines}</table>'
    )


def _quarantine(view: View) -> str:
    lines = "".join(
        f"<tr><td>{q['id']}</td><td>{escape(format_time(q['received_at']))}</td><td>{escape(q['topic'])}</td>"
        f"<td>{escape(q['source_id'] or '—')}</td><td>{escape(q['code'])}</td><td>{escape(q['reason'][:200])}</td>"
        f'<td class="n">{q["size"]}</td></tr>'
        for q in view.quarantine
    )
    return (
        f'<h2>Quarantine</h2><p><span id="quarantine-total">{view.quarantine_total}</span> entries '
        "(<code>hubd quarantine list</code>, <code>hubd quarantine show ID</code>)</p>"
        '<table id="quarantine"><thead><tr><th>id</th><th>received</th><th>topic</th><th>source</th><th>code</th>'
        f"<th>reason</th><th>bytes</th></tr></thead><tbody>{lines}</tbody></table>"
    )


def _energy(view: View) -> str:
    """Stacked bars, one per 30-minute slot, a colour per DER type; each bar's title tells its kWh."""
    width, height, left, bottom = 960, 260, 50, 24
    slots = max((len(v) for v in view.energy.values()), default=48)
    totals = [sum(max(v[i], 0.0) for v in view.energy.values()) for i in range(slots)]
    top = max(totals, default=0.0) or 1.0
    bar = (width - left) / slots
    parts = [
        f'<svg id="energy" xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height + 40}" '
        f'viewBox="0 0 {width} {height + 40}" role="img" aria-label="energy per 30-minute slot by DER type">',
        f'<line x1="{left}" y1="{height - bottom}" x2="{width}" y2="{height - bottom}" stroke="#888"/>',
        f'<text x="0" y="12" font-size="11">{top:.1f} kWh</text>',
    ]
    for i in range(0, slots, 4):
        label = (view.day_start.timestamp() * 1000 + i * SLOT_MS) / 1000
        parts.append(
            f'<text x="{left + i * bar:.1f}" y="{height - 8}" font-size="10">'
            f"{datetime.fromtimestamp(label, view.day_start.tzinfo):%H:%M}</text>"
        )
    scale = (height - bottom - 16) / top
    base = [float(height - bottom)] * slots
    for der_type in sorted(view.energy):
        colour = _COLOURS.get(der_type, "#555")
        parts.append(f'<g data-type="{escape(der_type, quote=True)}" fill="{colour}">')
        for i, kwh in enumerate(view.energy[der_type]):
            if kwh <= 0:
                continue
            h = kwh * scale
            base[i] -= h
            parts.append(
                f'<rect class="bar" data-slot="{i}" data-kwh="{kwh:.3f}" x="{left + i * bar + 1:.1f}" '
                f'y="{base[i]:.1f}" width="{max(bar - 2, 1):.1f}" height="{h:.1f}">'
                f"<title>{escape(der_type)} slot {i + 1}: {kwh:.3f} kWh</title></rect>"
            )
        parts.append("</g>")
    for n, der_type in enumerate(sorted(view.energy)):
        x = left + n * 110
        parts.append(
            f'<rect x="{x}" y="{height + 8}" width="12" height="12" fill="{_COLOURS.get(der_type, "#555")}"/>'
            f'<text x="{x + 16}" y="{height + 19}" font-size="12">{escape(der_type)}</text>'
        )
    parts.append("</svg>")
    zone = view.day_start.tzname() or ""
    pending = (
        f' <span id="energy-pending">{view.energy_pending} earlier slots are still being read: reload in a '
        "while.</span>"
        if view.energy_pending
        else ""
    )
    return (
        f'<h2>Energy today</h2><p class="muted">kWh per 30-minute slot by DER type, from '
        f"{escape(view.day_start.strftime('%Y-%m-%d %H:%M'))} {escape(zone)}{pending}</p>{''.join(parts)}"
    )
