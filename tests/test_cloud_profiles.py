"""Cloud profiles as an operator writes them: their own profile and format in the user folders, against aiohttp
servers in the vendors' shapes — pages by number, by cursor and by Link header (one page breaking mid-series),
a daylight-saving day in the vendor's zone collected by ``hubd source backfill``, and the Enphase-style v4 API
with an OAuth2 token that expires and is asked again.
"""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import yaml
from aiohttp import web
from click.testing import CliRunner
from conftest import write_config
from helpers import records
from test_cloud_source import API_KEY, QUARTER_MS, hubs_with, stored, wait_for, write_key

from hubd.broker import EmbeddedBroker
from hubd.cli import main as hubd_main
from hubd.config import load_config
from hubd.model import format_time, parse_time
from hubd.sources.cloud.simulate import CloudThread, SimulatedCloud, power_w

SHIPPED = Path(__file__).resolve().parent.parent / "hubd" / "drivers" / "cloud"
PAGED_FORMAT = {
    "description": "a paged test API: items[*] of t (epoch s) and w (W)",
    "kind": "json",
    "records": "$.items[*]",
    "reading": {
        "der_id": {"property": "der_id"},
        "password": {"property": "password"},
        "measured_at": {"path": "t", "time": "epoch_s"},
        "power_kw": {"path": "w", "unit": "W"},
    },
}


@pytest.fixture
def key_file(tmp_path: Path) -> Path:
    return write_key(tmp_path)


@pytest.fixture
def site(tmp_path: Path, broker: EmbeddedBroker) -> Iterator[Any]:
    yield from hubs_with(tmp_path, broker)


class Served:
    """An aiohttp app served from a thread of its own (the hub under test runs in another)."""

    def __init__(self, app: web.Application) -> None:
        self.app = app
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.runner = web.AppRunner(app, access_log=None, handle_signals=False)
        self.port = 0

    def __enter__(self) -> Served:
        self.thread.start()

        async def start() -> None:
            await self.runner.setup()
            tcp = web.TCPSite(self.runner, "127.0.0.1", 0)
            await tcp.start()
            self.port = tcp._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

        asyncio.run_coroutine_threadsafe(start(), self.loop).result(10)
        return self

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __exit__(self, *exc: object) -> None:
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


def paged_api(style: str, broken: list[int]) -> tuple[web.Application, list[str]]:
    """Quarter-hour energy by pages of 4: ``page`` (?page=N), ``cursor`` (next in the body) or ``link``
    (a Link: rel=next header). Page numbers in ``broken`` answer 500 once each (a page breaking mid-series)."""
    asked: list[str] = []

    async def handle(request: web.Request) -> web.Response:
        asked.append(request.path_qs)
        if request.headers.get("X-Api-Key") != API_KEY:
            return web.json_response({"error": "unauthorised"}, status=401)
        start, end = int(request.query["from"]), int(request.query["to"])
        times = list(range(start - start % 900 + (900 if start % 900 else 0), end, 900))
        pages = [times[i : i + 4] for i in range(0, len(times), 4)] or [[]]
        number = int(request.query.get("page") or request.query.get("cursor") or 1)
        if number in broken:
            broken.remove(number)
            return web.json_response({"error": "backend"}, status=500)
        items = [
            {"t": t, "w": power_w(request.match_info["site"], t)}
            for t in (pages[number - 1] if number <= len(pages) else [])
        ]
        body: dict[str, Any] = {"items": items}
        headers = {}
        more = number < len(pages)
        if style == "cursor":
            body["meta"] = {"next": str(number + 1) if more else None}
        if style == "link" and more:
            query = f"from={start}&to={end}&page={number + 1}"
            headers["Link"] = f'<{request.url.origin()}{request.path}?{query}>; rel="next"'
        return web.json_response(body, headers=headers)

    app = web.Application()
    app.router.add_get("/v2/sites/{site}/energy", handle)
    return app, asked


PAGING = {
    "page": {"kind": "page", "param": "page", "items": "items", "size_param": "per_page", "size": 4},
    "cursor": {"kind": "cursor", "param": "cursor", "next": "meta.next"},
    "link": {"kind": "link"},
}


def user_profile(data: Path, name: str, profile: dict[str, Any]) -> None:
    folder = data / "drivers" / "cloud"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.yaml").write_text(yaml.safe_dump(profile))


def user_format(data: Path, code: str, definition: dict[str, Any]) -> None:
    folder = data / "formats"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{code}.yaml").write_text(yaml.safe_dump(definition))


@pytest.mark.parametrize("style", ["page", "cursor", "link"])
def test_pages_are_followed_and_a_page_breaking_mid_series_loses_nothing(
    style: str, site: Any, key_file: Path, tmp_path: Path
) -> None:
    app, asked = paged_api(style, broken=[2])
    data = tmp_path / "data"
    user_format(data, "test.paged", PAGED_FORMAT)
    profile = {
        "base_url": "http://unused.invalid",
        "auth": [{"kind": "header", "name": "X-Api-Key", "secret": "key"}],
        "time_format": "epoch_s",
        "interval_s": 900,
        "window_s": 3 * 3600,
        "requests": [
            {"path": "/v2/sites/{site}/energy", "query": {"from": "{start}", "to": "{end}"}, "format": "test.paged"}
            | {"paging": PAGING[style]}
        ],
    }
    user_profile(data, "paged", profile)
    with Served(app) as api:
        begin = (wait_now() // QUARTER_MS - 12) * QUARTER_MS
        source = {
            "kind": "cloud",
            "name": "paged",
            "profile": "paged",
            "base_url": api.url,
            "sites": {"7": "PV-P7"},
            "secrets": {"key": str(key_file)},
            "start": format_time(begin),
            "lookback_s": 0,
            "poll_s": 0.2,
            "retry_min_s": 0.05,
            "retry_max_s": 0.1,
        }
        hub = site([source], ders=("PV-P7",))
        wait_for(lambda: len(stored(hub, "PV-P7")) >= 12 and records(hub, "cloud.online"))
        rows = stored(hub, "PV-P7")
        expected = list(range(begin, begin + 12 * QUARTER_MS, QUARTER_MS))
        assert [row[0] for row in rows] == expected  # every quarter hour once: none lost, none doubled
        assert [row[1] for row in rows] == [power_w("7", at // 1000) / 1000 for at in expected]
        assert len(records(hub, "cloud.offline")) == 1 and len(records(hub, "cloud.online")) == 1
        assert any("page=2" in path or "cursor=2" in path for path in asked)
        assert all(API_KEY not in path for path in asked)  # the key went in a header, as the profile says


def wait_now() -> int:
    from hubd.model import now_ms

    return now_ms()


def berlin_backfill(tmp_path: Path, broker: EmbeddedBroker, key_file: Path, start: str, end: str) -> Any:
    """``hubd source backfill`` of one site of a SolarEdge-style cloud in Europe/Berlin from ``start`` to ``end``:
    (the command's result, the requests the cloud saw, the config file)."""
    data = tmp_path / "data"
    shipped_format = yaml.safe_load((SHIPPED.parent.parent / "formats" / "solaredge.site_power.yaml").read_text())
    shipped_format["reading"]["measured_at"]["zone"] = "Europe/Berlin"
    user_format(data, "solaredge.berlin", shipped_format)
    profile = yaml.safe_load((SHIPPED / "solaredge.site_power.yaml").read_text())
    profile["zone"] = "Europe/Berlin"
    profile["requests"][0]["format"] = "solaredge.berlin"
    user_profile(data, "solaredge.berlin", profile)
    with CloudThread(SimulatedCloud(["42"], zone="Europe/Berlin", api_key=API_KEY)) as cloud:
        source = {
            "kind": "cloud",
            "name": "berlin",
            "profile": "solaredge.berlin",
            "base_url": cloud.url,
            "sites": {"42": "PV-B42"},
            "secrets": {"api_key": str(key_file)},
        }
        config = write_config(tmp_path / "hubd.yaml", broker, sources=[source])
        runner = CliRunner()
        assert runner.invoke(hubd_main, ["--config", str(config), "der", "add", "PV-B42"]).exit_code == 0
        result = runner.invoke(
            hubd_main, ["--config", str(config), "source", "backfill", "berlin", "--start", start, "--end", end]
        )
        assert result.exit_code == 0, result.output
        return result, [path for _, path in cloud.requests], config


def test_a_daylight_saving_day_in_the_vendor_zone_is_backfilled_whole(
    tmp_path: Path, broker: EmbeddedBroker, key_file: Path
) -> None:
    """Europe/Berlin springs forward on 2026-03-29: its local day has 92 quarter hours, none at 02:xx."""
    start, end = "2026-03-29T00:00:00+01:00", "2026-03-30T00:00:00+02:00"
    result, asked, config = berlin_backfill(tmp_path, broker, key_file, start, end)
    assert "backfilled 92 readings in 1 windows" in result.output
    assert len(asked) == 1 and asked[0].startswith("/site/42/power?")  # local times, the end included
    assert {"startTime=2026-03-29 00:00:00", "endTime=2026-03-29 23:59:59"} == set(asked[0][15:].split("&"))

    rows = stored(SimpleNamespace(config=load_config(config)), "PV-B42")  # type: ignore[arg-type]
    first = parse_time(start)
    expected = list(range(first, parse_time(end), QUARTER_MS))
    assert len(expected) == 92
    assert [row[0] for row in rows] == expected  # contiguous in UTC across the missing local hour
    assert [row[1] for row in rows] == [power_w("42", at // 1000) / 1000 for at in expected]
    again = CliRunner().invoke(
        hubd_main, ["--config", str(config), "source", "backfill", "nothing", "--start", start, "--end", end]
    )
    assert again.exit_code == 1 and "no cloud source nothing" in again.output


def test_the_hour_repeated_when_clocks_go_back_is_stored_twice_in_its_order(
    tmp_path: Path, broker: EmbeddedBroker, key_file: Path
) -> None:
    """Europe/Berlin falls back on 2026-10-25: 02:00 … 02:45 local come twice, without an offset, in order. The
    first are 00:00 … 00:45Z, the repeats 01:00 … 01:45Z: all 100 quarter hours, each with its own value."""
    start, end = "2026-10-25T00:00:00+02:00", "2026-10-26T00:00:00+01:00"
    result, _, config = berlin_backfill(tmp_path, broker, key_file, start, end)
    assert "backfilled 100 readings in 2 windows" in result.output, result.output
    rows = stored(SimpleNamespace(config=load_config(config)), "PV-B42")  # type: ignore[arg-type]
    expected = list(range(parse_time(start), parse_time(end), QUARTER_MS))
    assert len(expected) == 100
    assert [row[0] for row in rows] == expected
    assert [row[1] for row in rows] == [power_w("42", at // 1000) / 1000 for at in expected]


def enphase_api(expires_in: int) -> tuple[web.Application, dict[str, Any]]:
    """Enphase-style v4: OAuth2 client credentials at /oauth/token, the API key as ?key=, telemetry for
    production (5-minute powr/enwh) and battery (15-minute charge/discharge/soc.percent)."""
    seen: dict[str, Any] = {"tokens": 0, "refused": 0, "asked": []}
    valid: set[str] = set()

    async def token(request: web.Request) -> web.Response:
        form = await request.post()
        if request.headers.get("Authorization") != "Basic Y2xpZW50LTE6Y2xpZW50LXNlY3JldC0x":  # client-1:...
            return web.json_response({"error": "invalid_client"}, status=401)
        assert form["grant_type"] == "client_credentials"
        seen["tokens"] += 1
        issued = f"token-{seen['tokens']}"
        valid.clear()
        valid.add(issued)
        return web.json_response({"access_token": issued, "token_type": "bearer", "expires_in": expires_in})

    async def telemetry(request: web.Request) -> web.Response:
        seen["asked"].append(request.path_qs.replace(API_KEY, "KEY"))
        if request.query.get("key") != API_KEY or request.headers.get("Authorization", "")[7:] not in valid:
            seen["refused"] += 1
            return web.json_response({"message": "Not Authorized"}, status=401)
        start = int(request.query["start_at"])
        battery = request.match_info["kind"] == "battery"
        step = 900 if battery else 300
        ends = range(start - start % step + step, start + 2 * 3600 + 1, step)
        if battery:
            intervals = [
                {"end_at": e, "charge": {"enwh": 10}, "discharge": {"enwh": 40}, "soc": {"percent": 50 + i}}
                for i, e in enumerate(ends)
            ]
        else:
            intervals = [{"end_at": e, "devices_reporting": 3, "powr": 1200, "enwh": 100} for e in ends]
        return web.json_response({"system_id": int(request.match_info["system"]), "intervals": intervals})

    app = web.Application()
    app.router.add_post("/oauth/token", token)
    app.router.add_get("/api/v4/systems/{system}/telemetry/{kind}", telemetry)
    return app, seen


def test_enphase_v4_with_oauth2_tokens_renewed_stores_production_and_battery(
    site: Any, key_file: Path, tmp_path: Path
) -> None:
    (tmp_path / "client_id").write_text("client-1")
    (tmp_path / "client_secret").write_text("client-secret-1")
    app, seen = enphase_api(expires_in=1)  # renewed every half second or so
    with Served(app) as api:
        profile = yaml.safe_load((SHIPPED / "enphase.v4.yaml").read_text())
        profile["auth"][1]["token_url"] = "/oauth/token"
        user_profile(tmp_path / "data", "enphase.local", profile)
        begin = (wait_now() // 3_600_000 - 2) * 3_600_000
        source = {
            "kind": "cloud",
            "name": "enphase",
            "profile": "enphase.local",
            "base_url": api.url + "/api/v4",
            "sites": {"698": {"production": "PV-E1", "battery": "ESS-E1"}},
            "secrets": {
                "api_key": str(key_file),
                "client_id": str(tmp_path / "client_id"),
                "client_secret": str(tmp_path / "client_secret"),
            },
            "start": format_time(begin),
            "lookback_s": 600,
            "poll_s": 0.3,
            "retry_min_s": 0.05,
        }
        hub = site([source], ders=("PV-E1", "ESS-E1"))
        wait_for(lambda: len(stored(hub, "ESS-E1")) >= 8 and len(stored(hub, "PV-E1")) >= 24)
        assert records(hub, "cloud.backfill") == []
        wait_for(lambda: seen["tokens"] >= 2, timeout=5)  # the token expired and was asked for again
        assert not records(hub, "cloud.offline")  # renewed before it was refused
        db = sqlite3.connect(hub.config.readings_path)
        soc = db.execute("SELECT soc_pct, energy_interval_kwh FROM readings WHERE der_id = 'ESS-E1'").fetchall()
        power = db.execute("SELECT power_kw, energy_interval_kwh FROM readings WHERE der_id = 'PV-E1'").fetchall()
        db.close()
        assert {s for s, _ in soc} >= {50.0, 51.0} and {e for _, e in soc} == {0.03}
        assert {p for p, _ in power} == {1.2} and {e for _, e in power} == {0.1}
        production = [path for path in seen["asked"] if "/telemetry/production_micro?" in path]
        assert production and all("start_at=" in path and "key=KEY" in path for path in production)
        for file in [hub.config.audit_path, *hub.config.data_path.glob("sources/*.json")]:
            text = file.read_text()
            assert "client-secret-1" not in text and API_KEY not in text and "token-1" not in text


def documented_block(after: str) -> str:
    """The first fenced block after the line ``after`` in docs/operations.md."""
    text = (Path(__file__).resolve().parent.parent / "docs" / "operations.md").read_text()
    rest = text[text.index(after) :]
    start = rest.index("```yaml\n") + len("```yaml\n")
    return rest[start : rest.index("```", start)]


def acme_api() -> tuple[web.Application, list[str]]:
    """Acme Solar as operations.md's worked example describes it: pages until an empty ``records``."""
    asked: list[str] = []

    async def history(request: web.Request) -> web.Response:
        asked.append(request.path_qs)
        if request.headers.get("X-Acme-Key") != API_KEY:
            return web.json_response({"error": "bad key"}, status=401)
        start = parse_time(request.query["from"]) // 1000
        end = parse_time(request.query["to"]) // 1000
        ends = list(range(start + 300, end + 1, 300))  # five-minute records stamped with their end
        page = int(request.query["page"])
        chunk = ends[(page - 1) * 10 : page * 10]
        records = [{"t": format_time(t * 1000), "pac": 1800 + t % 7, "yield": 150} for t in chunk]
        return web.json_response({"plant": 12, "records": records, "page": page})

    app = web.Application()
    app.router.add_get("/v2/plants/{plant}/history", history)
    return app, asked


def test_the_documented_worked_example_collects_an_unseen_api(site: Any, key_file: Path, tmp_path: Path) -> None:
    """operations.md's Acme Solar profile and format, as written there, against a server in that shape."""
    data = tmp_path / "data"
    (data / "formats").mkdir(parents=True)
    (data / "drivers" / "cloud").mkdir(parents=True)
    (data / "formats" / "acme.history.yaml").write_text(documented_block("The format, `<data_dir>/formats/"))
    (data / "drivers" / "cloud" / "acme.yaml").write_text(documented_block("The profile, `<data_dir>/drivers/"))
    source = yaml.safe_load(documented_block("And the source in `hubd.yaml`:"))["sources"][0]
    documented = tmp_path / "documented.yaml"  # as written: its unquoted `start` is a YAML timestamp
    documented.write_text(documented_block("And the source in `hubd.yaml`:"))
    assert load_config(documented).sources[0].start == "2026-11-01T00:00:00+00:00"
    sample = tmp_path / "answer.json"
    sample.write_text('{"plant": 12, "records": [{"t": "2026-11-27T00:05:00Z", "pac": 1830, "yield": 152}], "page": 1}')
    app, asked = acme_api()
    with Served(app) as api:
        begin = (wait_now() // 3_600_000 - 2) * 3_600_000
        source |= {"base_url": api.url, "secrets": {"api_key": str(key_file)}, "start": format_time(begin)}
        hub = site([source | {"poll_s": 0.5}], ders=("PV-ACME-12",))
        tested = hub.cli("format", "test", "acme.history", str(sample), "-p", "der_id=PV-ACME-12", "-p", "password=-")
        assert tested.exit_code == 0 and '"power_kw":1.83' in tested.output.replace(" ", ""), tested.output
        wait_for(lambda: len(stored(hub, "PV-ACME-12")) >= 24)
        rows = stored(hub, "PV-ACME-12")
        assert [row[0] for row in rows[:24]] == list(range(begin + 300_000, begin + 24 * 300_000 + 1, 300_000))
        assert any("page=3" in path for path in asked)  # two hours of 5-minute records: pages of ten
        assert records(hub, "cloud.offline") == []


def test_the_documented_try_out_config_is_valid_and_tests_against_the_simulator(tmp_path: Path) -> None:
    documented = documented_block("serves a simulated SolarEdge-style cloud on 127.0.0.1:8480")
    config = yaml.safe_load(documented)
    with CloudThread(SimulatedCloud(["1001", "1002"], api_key="demo-api-key")) as cloud:
        config["sources"][0]["base_url"] = cloud.url  # the documented port may be taken here
        config["data_dir"] = str(tmp_path / "var")
        (tmp_path / "hubd.yaml").write_text(yaml.safe_dump(config))
        (tmp_path / "se.key").write_text("demo-api-key\n")
        runner, path = CliRunner(), str(tmp_path / "hubd.yaml")
        assert runner.invoke(hubd_main, ["--config", path, "der", "add", "PV-1001", "--type", "pv"]).exit_code == 0
        tested = runner.invoke(hubd_main, ["--config", path, "source", "test", "se-account"])
        assert tested.exit_code == 0 and '"readings": 4' in tested.output, tested.output


def test_config_and_profile_mistakes_are_named_by_their_key(tmp_path: Path, broker: EmbeddedBroker) -> None:
    from hubd.config import ConfigError, parse_config

    base = {"kind": "cloud", "name": "c", "profile": "solaredge.site_power", "sites": {"1": "PV-1"}}
    cases = [
        ({"sites": {}}, "sources[0].sites: give at least one site"),
        ({"sitez": 1}, "sources[0].sitez: unknown key"),
        ({"base_url": "ftp://x"}, "sources[0].base_url: must be http(s)://"),
        ({"base_url": "https://user:pw@x"}, "sources[0].base_url: must be http(s)://host[:port][/path] without"),
        ({"start": "2026-11-01 00:00"}, "sources[0].start"),
        ({"start": yaml.safe_load("2026-11-01 00:00:00")}, "sources[0].start: 2026-11-01T00:00:00 has no time zone"),
        ({"start": yaml.safe_load("2026-11-01")}, "sources[0].start: 2026-11-01 has no time zone"),
        ({"retry_min_s": 10, "retry_max_s": 1}, "sources[0].retry_max_s: must be at least retry_min_s"),
        ({"push": {"bind": "nowhere", "token_file": "t"}}, "sources[0].push.bind: must be host:port"),
    ]
    for source, message in cases:
        with pytest.raises(ConfigError) as refused:
            parse_config({"sources": [base | source]})
        assert message in str(refused.value), str(refused.value)
    data = tmp_path / "data"
    bad = yaml.safe_load((SHIPPED / "solaredge.site_power.yaml").read_text())
    bad["requests"][0]["paging"] = {"kind": "page", "param": "page"}
    user_profile(data, "broken", bad)
    config = write_config(
        tmp_path / "hubd.yaml", broker, sources=[base | {"profile": "broken", "secrets": {"api_key": "k"}}]
    )
    started = CliRunner().invoke(hubd_main, ["--config", str(config), "run"])
    assert started.exit_code == 78
    assert "broken.yaml: requests[0].paging: page paging needs items" in started.output
    utc = yaml.safe_load((SHIPPED / "solaredge.site_power.yaml").read_text()) | {"zone": "UTC"}
    user_profile(data, "se.utc", utc)  # its format reads Asia/Tokyo local times: every reading 9 h off
    config = write_config(
        tmp_path / "hubd.yaml", broker, sources=[base | {"profile": "se.utc", "secrets": {"api_key": "k"}}]
    )
    started = CliRunner().invoke(hubd_main, ["--config", str(config), "run"])
    assert started.exit_code == 78, started.output
    assert "se.utc.yaml: zone is UTC, but requests[0]'s format solaredge.site_power (" in started.output
    assert "solaredge.site_power.yaml) reads reading.measured_at in zone Asia/Tokyo" in started.output
    missing = write_config(tmp_path / "hubd.yaml", broker, sources=[base])
    started = CliRunner().invoke(hubd_main, ["--config", str(missing), "run"])
    assert started.exit_code == 78 and "secrets.api_key: the profile solaredge.site_power needs it" in started.output


def test_a_time_endpoint_finds_the_clock_off_and_the_correction_request_sets_it_right(
    site: Any, key_file: Path, tmp_path: Path
) -> None:
    profile = yaml.safe_load((SHIPPED / "solaredge.site_power.yaml").read_text())
    profile["clock"] = {"path": "/time", "field": "serverTime", "correction": {"path": "/site/{site}/time/sync"}}
    user_profile(tmp_path / "data", "se.clocked", profile)
    with CloudThread(SimulatedCloud(["1001"], api_key=API_KEY, clock_offset_s=-120)) as cloud:
        source = {
            "kind": "cloud",
            "name": "clocked",
            "profile": "se.clocked",
            "base_url": cloud.url,
            "sites": {"1001": "PV-1001"},
            "secrets": {"api_key": str(key_file)},
            "poll_s": 0.3,
            "lookback_s": 1800,
        }
        hub = site([source], ders=("PV-1001",))
        wait_for(lambda: records(hub, "time.unflagged"))
        flagged, corrected = records(hub, "time.flagged"), records(hub, "cloud.clock_corrected")
        assert len(flagged) == 1 and -120.1 < flagged[0]["offset_s"] < -119.9  # ms from the endpoint, not Date
        assert len(corrected) == 1 and corrected[0]["status"] == 200 and corrected[0]["site"] == "1001"
        assert cloud.corrections == ["1001"]
        wait_for(lambda: '"source_id":"clocked","state":"ok"' in hub.cli("time", "sources", "--json").output)
