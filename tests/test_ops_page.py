"""The status page in a real headless Chromium: a person logs in through the form, and the page shows the
fleet (some DERs fresh, one late, one revoked, the rest silent), a paged DER table, the refusals, the
quarantine and today's energy chart with the numbers that were sent; a screenshot is kept for the record.
Who may not log in is refused, over plain HTTP."""

from __future__ import annotations

import asyncio
import time
import urllib.error
import urllib.parse
import urllib.request
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from chromium import Browser, chromium_path
from conftest import RunningHub
from helpers import records

from hubd.model import now_ms
from hubd.ops.clocks import Clock
from hubd.ops.fleet import Fleet


def rfc3339(ms: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ms // 1000))


def url_of(hub: RunningHub) -> str:
    assert hub._hub is not None and hub._hub.ops.url is not None
    return hub._hub.ops.url


def fleet(hub: RunningHub, tmp_path: Path) -> dict[str, float]:
    """60 DERs (40 PV in two areas, 20 storage); PV-001 and PV-002 report now, ESS-001 40 minutes ago, PV-003
    is revoked, the rest never reported. Returns the kWh per DER type that today's chart must show."""
    lines = ["der_id,type,area"]
    lines += [f"PV-{i:03d},pv,{'north' if i % 2 else 'south'}" for i in range(1, 41)]
    lines += [f"ESS-{i:03d},ess,south" for i in range(1, 21)]
    (tmp_path / "fleet.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    assert hub.cli("der", "import", str(tmp_path / "fleet.csv")).exit_code == 0
    registered = (("PV-001", "pv"), ("PV-002", "pv"), ("ESS-001", "ess"))
    passwords = {der_id: hub.register(der_id, der_type) for der_id, der_type in registered}
    hub.register("PV-003", "pv")
    assert hub.cli("der", "revoke", "PV-003").exit_code == 0
    now = now_ms()
    sent = [
        ("PV-001", now - 60_000, {"energy_interval_kwh": 1.5, "interval_s": 60}),
        ("PV-002", now - 200_000, {"energy_kwh": 10.0}),
        ("PV-002", now - 100_000, {"energy_kwh": 10.8}),
        ("ESS-001", now - 40 * 60_000, {"energy_interval_kwh": 0.5, "interval_s": 60}),
    ]
    readings = [{"der_id": d, "password": passwords[d], "measured_at": rfc3339(at), **v} for d, at, v in sent]
    readings.append({"der_id": "PV-001", "password": "wrong", "measured_at": rfc3339(now), "power_kw": 1.0})
    answer = hub.rr("hub/v1/data", {"source_id": "edge-1", "readings": readings})
    assert answer["accepted"] == 4, answer
    hub.rr("hub/v1/data", b"not JSON at all")  # quarantined
    midnight = int(datetime.now().astimezone().replace(hour=0, minute=0, second=0, microsecond=0).timestamp() * 1000)
    today = {d: (at // 1000) * 1000 >= midnight for d, at, _ in sent}  # just after midnight, less was today
    # The register's rise counts in the slot of its later reading (from the slot before, even yesterday's).
    pv_register = 0.8 if today["PV-002"] else 0.0
    return {"pv": (1.5 if today["PV-001"] else 0.0) + pv_register, "ess": 0.5 if today["ESS-001"] else 0.0}


@pytest.mark.skipif(chromium_path() is None, reason="Debian's chromium is not installed (./dev installs it)")
def test_a_viewer_logs_in_and_sees_the_fleet_chart_refusals_and_quarantine(hub_factory: Any, tmp_path: Path) -> None:
    hub = hub_factory(http={"bind": "127.0.0.1:0", "fresh_s": 900, "silent_s": 3600})
    energy = fleet(hub, tmp_path)
    viewer = hub.cli("system", "add", "viewer-1", "--role", "viewer").output.strip()
    base = url_of(hub)

    async def browse() -> dict[str, Any]:
        async with Browser(tmp_path / "chromium-profile") as page:
            await page.goto(base)
            assert await page.js("location.pathname") == "/login", "not logged in: sent to the login form"
            await page.type_into("#name", "viewer-1")
            await page.type_into("#password", viewer)
            await page.loaded(page.click("#submit"))
            seen: dict[str, Any] = {"path": await page.js("location.pathname")}
            seen["cookie_visible_to_scripts"] = await page.js("document.cookie")
            seen["totals"] = await page.js(
                "Object.fromEntries(['fresh','late','silent','revoked','all'].map("
                "s => [s, Number(document.getElementById('total-' + s).textContent)]))"
            )
            seen["by_type"] = await page.js(
                "Array.from(document.querySelectorAll('#fleet tbody tr')).map(r => "
                "Array.from(r.cells).map(c => c.textContent))"
            )
            seen["rows"] = await page.js("document.querySelectorAll('#ders tr.der').length")
            seen["states"] = await page.js(
                "Object.fromEntries(Array.from(document.querySelectorAll('#ders tr.der')).map(r => "
                "[r.cells[0].textContent, r.cells[5].textContent]))"
            )
            seen["chart"] = await page.js(
                "Object.fromEntries(Array.from(document.querySelectorAll('svg#energy g[data-type]')).map(g => "
                "[g.dataset.type, Array.from(g.querySelectorAll('rect.bar')).reduce((s, b) => s + "
                "Number(b.dataset.kwh), 0)]))"
            )
            seen["refusals"] = await page.js(
                "Object.fromEntries(Array.from(document.querySelectorAll('#refusals td[data-code]')).map(c => "
                "[c.dataset.code, Number(c.textContent)]))"
            )
            seen["quarantine"] = await page.js("Number(document.getElementById('quarantine-total').textContent)")
            seen["clocks"] = await page.js("document.getElementById('clocks').textContent")
            await page.screenshot(tmp_path / "status-page.png")  # for the record, beside the test's other files
            await page.loaded(page.click("#next"))
            seen["page2"] = await page.js("document.querySelectorAll('#ders tr.der').length")
            return seen

    seen = asyncio.run(browse())
    assert seen["path"] == "/"
    assert seen["cookie_visible_to_scripts"] == "", "the session cookie is HttpOnly"
    assert seen["totals"] == {"fresh": 2, "late": 1, "silent": 56, "revoked": 1, "all": 60}
    assert ["ess", "south", "0", "1", "19", "0", "20"] in seen["by_type"]
    assert ["pv", "north", "1", "0", "18", "1", "20"] in seen["by_type"]  # PV-001 fresh, PV-003 revoked
    assert ["pv", "south", "1", "0", "19", "0", "20"] in seen["by_type"]  # PV-002 fresh
    assert seen["rows"] == 50 and seen["page2"] == 10  # 50 a page, by id
    assert seen["states"]["ESS-001"] == "late" and seen["states"]["PV-003"] == "revoked"
    assert seen["states"]["ESS-002"] == "silent"
    assert seen["chart"].get("pv", 0.0) == pytest.approx(energy["pv"])
    assert seen["chart"].get("ess", 0.0) == pytest.approx(energy["ess"])
    assert seen["refusals"] == {"bad_credentials": 1, "decode_error": 1}
    assert seen["quarantine"] == 1
    assert "hub—not measured" in seen["clocks"]  # no NTP server configured in this hub
    shot = (tmp_path / "status-page.png").read_bytes()
    assert shot.startswith(b"\x89PNG") and len(shot) > 20_000


def post_login(base: str, name: str, password: str) -> tuple[int, str | None]:
    data = urllib.parse.urlencode({"name": name, "password": password}).encode()
    opener = urllib.request.build_opener(NoRedirect())
    try:
        with opener.open(base + "login", data=data, timeout=10) as response:
            return response.status, response.headers.get("Set-Cookie")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers.get("Set-Cookie")


class NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


def test_only_viewers_and_consumers_log_in_and_each_refusal_is_audited(hub: RunningHub) -> None:
    base = url_of(hub)
    viewer = hub.cli("system", "add", "viewer-1", "--role", "viewer").output.strip()
    market = hub.consumer("market-1")
    gateway = hub.cli("system", "add", "gw-1", "--role", "gateway").output.strip()
    der_password = hub.register("PV-1")

    status, cookie = post_login(base, "viewer-1", viewer)
    assert status == 303 and cookie is not None
    attributes = [part.strip().lower() for part in cookie.split(";")]
    assert "httponly" in attributes and "samesite=strict" in attributes and "path=/" in attributes
    assert post_login(base, "market-1", market)[0] == 303
    assert post_login(base, "gw-1", gateway) == (401, None)  # a gateway sends data; it does not read the page
    assert post_login(base, "PV-1", der_password) == (401, None)  # a DER is no system
    assert post_login(base, "viewer-1", "not-the-password") == (401, None)

    opener = urllib.request.build_opener(NoRedirect())
    with pytest.raises(urllib.error.HTTPError) as refused:
        opener.open(base, timeout=10)
    assert refused.value.code == 303 and refused.value.headers["Location"] == "/login"
    forged = urllib.request.Request(base, headers={"Cookie": "hubd_session=made-up"})
    with pytest.raises(urllib.error.HTTPError) as refused:
        opener.open(forged, timeout=10)
    assert refused.value.code == 303

    token = cookie.split(";")[0]
    with opener.open(urllib.request.Request(base, headers={"Cookie": token}), timeout=10) as response:
        assert response.status == 200 and b"<h1>hubd status</h1>" in response.read()
    assert hub.cli("system", "revoke", "viewer-1").exit_code == 0  # a revoked viewer's session ends at once
    with pytest.raises(urllib.error.HTTPError) as refused:
        opener.open(urllib.request.Request(base, headers={"Cookie": token}), timeout=10)
    assert refused.value.code == 303

    logins = [(r["client_id"], r["outcome"]) for r in records(hub, "page.login")]
    assert logins == [
        ("viewer-1", "ok"),
        ("market-1", "ok"),
        ("gw-1", "not_allowed"),
        ("PV-1", "bad_credentials"),
        ("viewer-1", "bad_credentials"),
    ]


def test_clocks_once_measured_show_on_the_page_and_in_the_metrics(hub: RunningHub, monkeypatch: Any) -> None:
    """``hubd.ops.clocks.clocks`` is the one place the page and the metrics read clocks from (a hub that
    measures them: tests/test_clock.py): what it tells is shown, offset and state, and exported as a gauge by
    clock name."""
    measured = [Clock("hub", 0.004, "ok"), Clock("modbus-1", -2.5, "off"), Clock("cloud-1", None, "unknown")]
    monkeypatch.setattr("hubd.ops.http.clocks", lambda hub: measured)
    monkeypatch.setattr("hubd.ops.metrics.clocks", lambda hub: measured)
    base = url_of(hub)
    viewer = hub.cli("system", "add", "viewer-1", "--role", "viewer").output.strip()
    _, cookie = post_login(base, "viewer-1", viewer)
    assert cookie is not None
    with urllib.request.urlopen(urllib.request.Request(base, headers={"Cookie": cookie.split(";")[0]})) as response:
        page = response.read().decode()
    assert '<td>modbus-1</td><td class="n">-2.500 s</td><td>off</td>' in page
    assert '<td>cloud-1</td><td class="n">—</td><td>unknown</td>' in page
    with urllib.request.urlopen(base + "metrics") as response:
        metrics = response.read().decode()
    assert 'hubd_clock_offset_seconds{clock="modbus-1"} -2.5' in metrics
    assert 'clock="cloud-1"' not in metrics  # not measured: no sample rather than a made-up 0


def test_the_chart_reads_what_its_budget_allows_then_the_rest(hub: RunningHub) -> None:
    """Over a large fleet the first view of a day cannot read every slot at once: a view reads slots newest
    first for its budget and says how many are left; the page's thread reads them after, and a later view
    shows the whole day from what was read."""
    password = hub.register("PV-1")
    now = now_ms()
    midnight = int(datetime.now().astimezone().replace(hour=0, minute=0, second=0, microsecond=0).timestamp() * 1000)
    readings = [
        {
            "der_id": "PV-1",
            "password": password,
            "measured_at": rfc3339(at),
            "energy_interval_kwh": 0.25,
            "interval_s": 60,
        }
        for at in range(now - 3 * 3600_000, now, 1800_000)
        if at >= midnight
    ]
    if readings:
        assert hub.rr("hub/v1/data", {"source_id": "edge-1", "readings": readings})["accepted"] == len(readings)
    day = (midnight, midnight + 24 * 3600_000)
    slots_so_far = (now - midnight) // 1800_000 + 1
    fleet = Fleet(hub.config)
    try:
        nothing, pending = fleet.energy(*day, now, budget_s=0.0)
        assert (nothing, pending) == ({}, slots_so_far)
        energy, pending = fleet.energy(*day, now)  # what the page's thread does after the answer
        assert pending == 0 and sum(energy.get("pv", [])) == pytest.approx(0.25 * len(readings))
        again, pending = fleet.energy(*day, now + 1000, budget_s=0.0)  # a view just after: all kept
        assert (again, pending) == (energy, 0)
    finally:
        fleet.close()
