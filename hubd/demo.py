"""``hubd demo``: the hub on the embedded default, fed by a simulated edge terminal, queried by a simulated
market system, with a plain account of what happened.

Everything runs for real: a local Mosquitto, the SQLite store, the audit log, MQTT v5 request/response.
"""

from __future__ import annotations

import asyncio
import random
import sys
import tempfile
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

from hubd import audit as audit_trail
from hubd.app import Hub
from hubd.audit import AuditLog
from hubd.auth.credentials import hash_password, issue_password
from hubd.auth.registry import Registry
from hubd.broker import PortInUse, free_port
from hubd.client import EdgeTerminal, HubClient, TerminalClock
from hubd.config import parse_config
from hubd.model import now_ms
from hubd.sources.cloud.simulate import SimulatedCloud
from hubd.sources.modbus.simulate import Device, demo_battery, demo_inverter

VENDOR_SITE = ("PV-0100", "pv", "Vendor cloud site 100", {"lat": 35.70, "lon": 139.80, "area": "feeder-7"})
# Polled by the hub itself over Modbus TCP: a simulated SunSpec inverter and battery (pymodbus servers).
POLLED = (("INV-0001", "pv", "Inverter 1", demo_inverter), ("BAT-0001", "ess", "Battery 1", demo_battery))
# Collected by the hub itself from a simulated vendor cloud (a SolarEdge-style Web API, a cloud source).
CLOUD_SITE = ("PV-0200", "pv", "Vendor cloud site 200", {"lat": 35.66, "lon": 139.70, "area": "feeder-9"})
FLEET = (
    ("PV-0001", "pv", "Rooftop PV 1", {"lat": 35.681, "lon": 139.767, "area": "feeder-12"}),
    ("ESS-0001", "ess", "Home battery 1", {"lat": 35.690, "lon": 139.700, "area": "feeder-12"}),
)


def say(text: str = "") -> None:
    print(text, flush=True)


def _readings(der_id: str, password: str, start: datetime, minutes: int) -> list[dict[str, Any]]:
    """One reading every 10 s: a PV curve with a little noise, or a battery charging then discharging."""
    out = []
    energy = 1200.0
    for step in range(minutes * 6):
        at = start + timedelta(seconds=10 * step)
        if der_id.startswith("PV"):
            power = round(3.2 + 0.4 * random.random(), 3)
            values = {"power_kw": power, "voltage_v": round(201 + random.random(), 1), "power_factor": 0.98}
        else:
            power = -1.5 if step < minutes * 3 else 2.0
            values = {"power_kw": power, "soc_pct": round(min(100, 40 + step * 0.2), 1)}
        energy += max(power, 0) * 10 / 3600
        out.append(
            {
                "der_id": der_id,
                "password": password,
                "measured_at": at.isoformat(timespec="seconds"),
                "energy_kwh": round(energy, 4),
                **values,
            }
        )
    return out


async def _demo(minutes: int, port: int, data_dir: Path, keep: bool = False) -> int:
    initial = issue_password()
    devices = [Device({1: (image(), {})}, free_port()) for *_, image in POLLED]
    for device in devices:
        await device.start()
    vendor = SimulatedCloud(["200"], api_key=issue_password())
    await vendor.start()
    (data_dir / "vendor.key").touch(mode=0o600)
    (data_dir / "vendor.key").write_text(vendor.api_key + "\n", encoding="utf-8")
    cloud_source = {"kind": "cloud", "name": "vendor-cloud", "profile": "solaredge.site_power"} | {
        "base_url": vendor.url,
        "sites": {"200": CLOUD_SITE[0]},
        "secrets": {"api_key": str(data_dir / "vendor.key")},
        "lookback_s": 7200,
    }
    sources = [
        {"kind": "modbus", "name": der_id.lower(), "host": "127.0.0.1", "port": device.port}
        | {"profile": "sunspec", "der": der_id, "poll_s": 1.0}
        for (der_id, *_), device in zip(POLLED, devices, strict=True)
    ]
    config = parse_config(
        {
            "data_dir": str(data_dir),
            "broker": {"embedded_port": port or free_port()},
            "auth": {"initial_password_hash": hash_password(initial, 10)},
            "log": {"level": "WARNING"},
            "http": {"bind": "127.0.0.1:0"},
            "sources": [*sources, cloud_source],
        },
        "demo",
    )
    say(f"hubd demo — data in {data_dir}")
    say("1. The operator puts three DERs on the allowlist and creates the market system's account.")
    say(f"   Two more the hub polls itself over Modbus TCP: {', '.join(d for d, *_ in POLLED)} (simulated SunSpec).")
    say(f"   And {CLOUD_SITE[0]}, which the hub collects from a simulated vendor cloud (SolarEdge-style Web API).")
    registry = Registry(config.registry_path)
    market_password = issue_password()
    with AuditLog(config.audit_path) as audit:
        for der_id, der_type, name, location in (*FLEET, VENDOR_SITE, CLOUD_SITE):
            registry.add_der(der_id, now_ms(), {"type": der_type, "name": name, **location})
            audit.append("der.added", der_id=der_id, by="operator")
        for der_id, der_type, name, _ in POLLED:
            registry.add_der(der_id, now_ms(), {"type": der_type, "name": name})
            audit.append("der.added", der_id=der_id, by="operator")
        registry.add_system("market-1", "consumer", hash_password(market_password, 10), now_ms())
        audit.append("system.added", client_id="market-1", role="consumer", by="operator")
        # The status page's login, for the person running the demo: in a file, never on the screen.
        viewer_password = issue_password()
        registry.add_system("viewer-1", "viewer", hash_password(viewer_password, 10), now_ms())
        audit.append("system.added", client_id="viewer-1", role="viewer", by="operator")
        viewer_file = data_dir / "viewer.password"
        viewer_file.touch(mode=0o600)
        viewer_file.write_text(viewer_password + "\n", encoding="utf-8")
    registry.close()

    hub = Hub(config)
    hub_task = asyncio.create_task(hub.run(), name="hub")
    ready = asyncio.create_task(hub.ready.wait(), name="hub ready")
    await asyncio.wait({hub_task, ready}, timeout=20, return_when=asyncio.FIRST_COMPLETED)
    if not hub.ready.is_set():  # the hub ended before it was ready (its broker's port taken, say): say why now
        ready.cancel()
        if not hub_task.done():
            hub.stop()
            await hub_task
            print("hubd demo: the hub was not ready within 20 s", file=sys.stderr, flush=True)
        else:
            failure = hub_task.exception()
            said = str(failure)
            if isinstance(failure, PortInUse):  # the demo's way out is its own option, not the config's
                said = f"port {failure.port} is already in use by {failure.holder}: leave out --port for a free one"
            print(f"hubd demo: the hub did not start: {said}", file=sys.stderr, flush=True)
        return 1
    url = f"mqtt://127.0.0.1:{config.broker.embedded_port}"
    prefix = config.topic_prefix
    say(f"2. The hub runs with its own Mosquitto on {url} and an SQLite store.")
    say(f"   Its status page: {hub.ops.url} (log in as viewer-1, password in {viewer_file})")
    try:
        # The simulated edge terminal (hubd.client.EdgeTerminal) answers the hub's time checks; its clock runs
        # 90 s fast, which the hub finds and has it correct (step 5).
        async with EdgeTerminal(url, "edge-9a", prefix=prefix, clock=TerminalClock(ahead_s=90)) as terminal:
            edge = terminal.client
            say("3. The edge terminal registers its DERs with the initial password:")
            passwords = {}
            for der_id, der_type, name, location in FLEET:
                answer = await edge.request(
                    f"{prefix}/register",
                    {
                        "der_id": der_id,
                        "password": initial,
                        "type": der_type,
                        "name": name,
                        "location": location,
                    },
                )
                passwords[der_id] = answer["password"]
                say(f"   {der_id}: ok={answer['ok']}, got a unique password (not shown), at {answer['registered_at']}")
            again = await edge.request(f"{prefix}/register", {"der_id": "PV-0001", "password": initial})
            say(f"   registering PV-0001 a second time: {again['error']['code']}")

            start = datetime.now(UTC).replace(second=0, microsecond=0) - timedelta(minutes=minutes)
            readings = [r for der_id, *_ in FLEET for r in _readings(der_id, passwords[der_id], start, minutes)]
            random.shuffle(readings)  # late and out of order, as in the field
            batches = [readings[i : i + 10] for i in range(0, len(readings), 10)]
            say(
                f"4. It sends {len(readings)} readings ({minutes} min, every 10 s) in {len(batches)} messages, "
                "shuffled out of order:"
            )
            accepted = 0
            for batch in batches:
                answer = await edge.request(f"{prefix}/data", {"source_id": "edge-9a", "readings": batch})
                accepted += answer["accepted"]
            resend = await edge.request(f"{prefix}/data", {"source_id": "edge-9a", "readings": batches[0]})
            say(
                f"   accepted {accepted}; re-sending one message: accepted {resend['accepted']} again, "
                "stored once (idempotent)"
            )
            bad = dict(readings[0], password="not-the-password")
            answer = await edge.request(f"{prefix}/data", {"source_id": "edge-9a", "readings": [bad]})
            say(f"   a reading with a wrong password: rejected with {answer['rejected'][0]['error']['code']}")
            answer = await edge.request(f"{prefix}/data", b"\x00\x01 not json")
            say(f"   a payload that is not JSON: {answer['error']['code']}, kept in quarantine")
            await _clock_step(hub, terminal, passwords["PV-0001"])

        async with HubClient(url, "vendor-connector") as cloud:
            der_id, der_type, name, location = VENDOR_SITE
            site = await cloud.request(
                f"{prefix}/register",
                {"der_id": der_id, "password": initial, "type": der_type, "name": name, "location": location},
            )
            tokyo = ZoneInfo("Asia/Tokyo")
            quarter = datetime.now(tokyo).replace(second=0, microsecond=0)
            quarter -= timedelta(minutes=quarter.minute % 15)
            values = [
                {
                    "date": (quarter - timedelta(minutes=15 * k)).strftime("%Y-%m-%d %H:%M:%S"),
                    "value": None if k == 2 else round(2400 - 150 * k + 10 * random.random(), 1),
                }
                for k in range(8, 0, -1)
            ]
            answer = await cloud.request(
                f"{prefix}/data/solaredge.site_power",
                {"power": {"timeUnit": "QUARTER_OF_AN_HOUR", "unit": "W", "values": values}},
                properties={"der_id": der_id, "password": site["password"]},
            )
            say(
                f"6. A vendor-cloud connector forwards {der_id}'s last two hours as the vendor sends them (format "
                f"solaredge.site_power: watts, Tokyo local time, one null): accepted {answer['accepted']}"
            )

        async with HubClient(url, "market-1") as market:
            say("7. The market system extracts the edge terminal's readings back, 50 rows a page:")
            rows: list[dict[str, Any]] = []
            cursor = None
            pages = 0
            while True:
                answer = await market.request(
                    f"{prefix}/query",
                    {
                        "client_id": "market-1",
                        "password": market_password,
                        "start": start.isoformat(),
                        "end": (start + timedelta(minutes=minutes)).isoformat(),
                        "fields": ["power_kw", "energy_kwh", "soc_pct"],
                        "der_ids": [d for d, *_ in FLEET],
                        "limit": 50,
                        "cursor": cursor,
                    },
                )
                rows += answer["rows"]
                pages += 1
                cursor = answer["next_cursor"]
                if cursor is None:
                    break
            say(f"   {len(rows)} rows in {pages} pages, ordered by measurement time; the first and last:")
            for row in (rows[0], rows[1], rows[-2], rows[-1]):
                say(f"   {row}")
            per_der = {d: sum(1 for r in rows if r["der_id"] == d) for d, *_ in FLEET}
            flagged = await market.request(
                f"{prefix}/query",
                {
                    "client_id": "market-1",
                    "password": market_password,
                    "start": (datetime.now(UTC) - timedelta(hours=1)).isoformat(),
                    "end": (datetime.now(UTC) + timedelta(hours=1)).isoformat(),
                    "der_ids": ["PV-0001"],
                    "fields": ["power_kw"],
                    "clock_flagged": True,
                },
            )
            say(f"   per DER: {per_der} (each exactly {minutes * 6}: nothing lost, nothing doubled)")
            say("   readings stored with a clock flag (asked with clock_flagged: true):")
            for row in flagged["rows"]:
                say(
                    f"   {row['der_id']} at {row['measured_at']}: {row['power_kw']} kW, "
                    f"clock_flag {row['clock_flag']}, clock_offset_s {row['clock_offset_s']:+.3f}"
                )
            slots = await market.request(
                f"{prefix}/query",
                {
                    "client_id": "market-1",
                    "password": market_password,
                    "types": ["pv"],
                    "areas": ["feeder-7"],
                    "start": (quarter - timedelta(hours=3)).isoformat(),
                    "end": quarter.isoformat(),
                    "interval": "30m",
                    "tz": "Asia/Tokyo",
                    "agg": {"power_kw": "mean"},
                },
            )
            say("   and, by type and area, the vendor site's 30-minute settlement slots of the Tokyo day:")
            for row in slots["rows"]:
                say(
                    f"   {row['der_id']} slot {row['slot']:2d} from {row['bucket_start']}: "
                    f"mean {row['power_kw']:.3f} kW of {row['n']} reading{'s' if row['n'] != 1 else ''}"
                )
            polled = await market.request(
                f"{prefix}/query",
                {"client_id": "market-1", "password": market_password, "der_ids": [d for d, *_ in POLLED]}
                | {"at": datetime.now(UTC).isoformat(), "at_tolerance_s": 60, "fields": ["power_kw", "soc_pct"]},
            )
            say("   and the latest readings the hub polled itself (SunSpec over Modbus TCP, no password involved):")
            for row in polled["rows"]:
                say(f"   {row}")
            collected = await market.request(
                f"{prefix}/query",
                {"client_id": "market-1", "password": market_password, "der_ids": [CLOUD_SITE[0]]}
                | {"start": (datetime.now(UTC) - timedelta(hours=2)).isoformat(), "fields": ["power_kw"]}
                | {"end": datetime.now(UTC).isoformat()},
            )
            cloud_rows = collected["rows"]
            say(
                f"   and what the hub collected from the vendor cloud itself: {len(cloud_rows)} quarter hours of "
                f"{CLOUD_SITE[0]}" + (f", the last {cloud_rows[-1]}" if cloud_rows else "")
            )
        if keep:
            say(f"The hub keeps running (--keep): open {hub.ops.url} in a browser; Ctrl-C stops it.")
            await hub_task  # until SIGINT or SIGTERM, which the hub takes as its stop
    finally:
        hub.stop()
        await hub_task
        for device in devices:
            await device.stop()
        await vendor.stop()
    report = audit_trail.verify(config.audit_path)
    say(
        f"8. The hub stopped cleanly. Audit log: {report.records} records, "
        f"{'chain intact' if report.ok else 'BROKEN: ' + report.reason}."
    )
    events: dict[str, int] = {}
    for record in audit_trail.tail(config.audit_path, 100000):
        events[str(record["event"])] = events.get(str(record["event"]), 0) + 1
    say("   events: " + ", ".join(f"{k} {v}" for k, v in sorted(events.items())))
    say(f"   look around: {_command()} --config {data_dir}/hubd.yaml audit tail -n 5   (or der list, query ...)")
    (data_dir / "hubd.yaml").write_text(f"data_dir: {data_dir}\n", encoding="utf-8")
    ok = report.ok and all(n == minutes * 6 for n in per_der.values())
    return 0 if ok else 1


async def _clock_step(hub: Hub, terminal: EdgeTerminal, password: str) -> None:
    """The terminal's clock is 90 s fast: its live reading is flagged, the hub checks and corrects it."""
    first = await terminal.send([{"der_id": "PV-0001", "password": password, "power_kw": 3.3}])
    say(
        "5. The terminal's own clock runs 90 s fast. A live reading it stamps arrives 'from the future' "
        f"(accepted {first['accepted']}), stored with a clock flag: passive skew."
    )
    for _ in range(100):  # the hub checks a new source at once; a few seconds at most
        if terminal.corrections:
            break
        await asyncio.sleep(0.1)
    await asyncio.sleep(0.5)  # the check after the correction
    clock = hub.clocks.sources.get("edge-9a")
    if clock is None or not terminal.corrections:
        say("   the hub did not correct the terminal's clock in time")
        return
    say(
        f"   the hub checked the terminal's clock (time.checked: {terminal.corrections[0]:+.2f} s), told it to "
        f"correct (time.set), checked again: {clock.state}, offset {clock.offset_s:+.3f} s, "
        f"round trip {(clock.rtt_s or 0) * 1000:.1f} ms"
    )
    second = await terminal.send([{"der_id": "PV-0001", "password": password, "power_kw": 3.4}])
    say(f"   its next live reading (accepted {second['accepted']}) carries the right time and no flag")


def run_demo(minutes: int = 5, port: int = 0, data_dir: Path | None = None, keep: bool = False) -> int:
    directory = data_dir or Path(tempfile.mkdtemp(prefix="hubd-demo-"))
    return asyncio.run(_demo(minutes, port, directory, keep))


def _command() -> str:
    """The ``hubd`` the demo was run as, so the hint can be pasted: ``.venv/bin/hubd`` in a checkout, the
    installed script's path elsewhere."""
    script = Path(sys.argv[0])
    if script.name != "hubd":
        return "hubd"
    try:
        return str(script.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(script)
