"""The market's data through a running hub: plans on hub/v1/plan (revised, refused), groups in queries, the
settlement view over MQTT and from ``hubd query``, and the operator's imports, refusals audited."""

from __future__ import annotations

import csv
import io
import json
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import RunningHub
from test_broker_acl import Site, site  # noqa: F401 - the fixture
from test_market import weather_server  # noqa: F401 - the fixture

from hubd.audit import tail as audit_tail
from hubd.config import ConfigError, parse_config
from hubd.model import format_time, parse_time

DATA = Path(__file__).parent / "data"
DAY = parse_time("2026-11-27T00:00:00+09:00")
HOUR, MINUTE = 3_600_000, 60_000
RATE = {"PV-T": 1.0, "PV-K": 2.0}  # kWh per hour: 0.5 and 1.0 kWh per slot
DAY_CONDITIONS = {"start": "2026-11-27T00:00:00+09:00", "end": "2026-11-28T00:00:00+09:00", "tz": "Asia/Tokyo"}


def tokyo(slot: int) -> float:
    return 10 + 0.25 * slot  # the sample file's prices on 2026-11-27


def kansai(slot: int) -> float:
    return 8 + 0.2 * slot


def events(hub: RunningHub, prefix: str) -> list[dict[str, Any]]:
    return [r for r in audit_tail(hub.config.audit_path, 5000) if str(r["event"]).startswith(prefix)]


def fill(hub: RunningHub) -> dict[str, str]:
    passwords = {
        "PV-T": hub.register("PV-T", "pv", location={"area": "tokyo"}),
        "PV-K": hub.register("PV-K", "pv", location={"area": "feeder-k"}),
    }
    for der_id, rate in RATE.items():
        readings = [
            {"der_id": der_id, "password": passwords[der_id], "measured_at": format_time(t),
             "energy_kwh": 50.0 + rate * (t - DAY) / HOUR}
            for t in range(DAY - HOUR, DAY + 25 * HOUR, 5 * MINUTE)
        ]  # fmt: skip
        answer = hub.rr(f"{hub.prefix}/data", {"source_id": "site-1", "readings": readings})
        assert answer["ok"] and answer["accepted"] == len(readings), answer
    result = hub.cli("series", "import", "jepx", str(DATA / "jepx_spot_sample.csv"))
    assert result.exit_code == 0, result.output
    assert "1248 values of jepx stored" in result.output  # 96 slots of 10 prices and 3 volumes
    return passwords


def test_plans_groups_and_settlement_through_the_hub(hub_factory: Any) -> None:
    hub: RunningHub = hub_factory(market={"price_areas": {"feeder-k": "kansai"}})
    fill(hub)
    assert hub.cli("group", "add", "VPP-1", "PV-T", "PV-K").output.strip() == "group VPP-1: 2 DERs (2 added)"
    assert hub.cli("group", "list").output == "VPP-1\t2\n"
    assert json.loads(hub.cli("group", "show", "VPP-1").output) == {"group": "VPP-1", "der_ids": ["PV-K", "PV-T"]}
    planner = hub.cli("system", "add", "planner-1", "--role", "planner").output.strip()
    market = hub.consumer()

    def plan(items: list[dict[str, Any]], who: str = "planner-1", password: str = planner) -> dict[str, Any]:
        return hub.rr(f"{hub.prefix}/plan", {"client_id": who, "password": password, "plans": items})

    first = [{"group": "VPP-1", "date": "2026-11-27", "slot": k, "kwh": 1.2} for k in range(1, 49)]
    first += [{"der_id": "PV-T", "date": "2026-11-27", "slot": k, "kwh": 0.4} for k in range(1, 49)]
    assert plan(first) == {"ok": True, "stored": 96, "replaced": 0}
    revised = [{"der_id": "PV-T", "date": "2026-11-27", "slot": k, "kwh": 0.6} for k in range(25, 49)]
    assert plan(revised, "market-1", market) == {"ok": True, "stored": 24, "replaced": 24}  # a consumer may plan too
    # A plan naming a DER the hub does not know is refused whole: nothing of it is stored.
    bad = [{"der_id": "PV-T", "date": "2026-11-27", "slot": 1, "kwh": 99.0}]
    bad += [{"der_id": "NOPE-9", "date": "2026-11-27", "slot": 2, "kwh": 1.0}]
    refused = plan(bad)
    assert refused["ok"] is False and refused["error"]["code"] == "unknown_der"
    assert plan(first[:1], "planner-1", "wrong")["error"]["code"] == "bad_credentials"

    # The planner may plan but not query; the consumer queries the settlement view.
    asked = {"client_id": "planner-1", "password": planner, "view": "settlement", "der_ids": ["PV-T"], **DAY_CONDITIONS}
    assert hub.rr(f"{hub.prefix}/query", asked)["error"]["code"] == "not_allowed"
    answer = hub.rr(
        f"{hub.prefix}/query",
        {"client_id": "market-1", "password": market, "view": "settlement", "der_ids": ["PV-T"], "groups": ["VPP-1"],
         **DAY_CONDITIONS},
    )  # fmt: skip
    assert answer["ok"] and answer["view"] == "settlement" and answer["count"] == 96, answer
    ders = [r for r in answer["rows"] if r.get("der_id") == "PV-T"]
    groups = [r for r in answer["rows"] if r.get("group") == "VPP-1"]
    for row in ders:
        k, plan_kwh = row["slot"], (0.4 if row["slot"] < 25 else 0.6)
        assert row["plan_kwh"] == plan_kwh  # slot 1 is still 0.4: the refused plan changed nothing
        assert abs(row["actual_kwh"] - 0.5) < 1e-6 and abs(row["imbalance_kwh"] - (0.5 - plan_kwh)) < 1e-6
        assert abs(row["imbalance_yen"] - (0.5 - plan_kwh) * tokyo(k)) < 0.01 and row["completeness"] == 1.0
    for row in groups:
        k, price = row["slot"], (0.5 * tokyo(row["slot"]) + 1.0 * kansai(row["slot"])) / 1.5
        assert abs(row["actual_kwh"] - 1.5) < 1e-6 and row["plan_kwh"] == 1.2
        assert abs(row["imbalance_yen"] - 0.3 * price) < 0.01 and row["price_area"] == "kansai,tokyo"

    # Groups stand for their DERs in every other query too.
    buckets = hub.rr(
        f"{hub.prefix}/query",
        {"client_id": "market-1", "password": market, "groups": ["VPP-1"], "interval": "1d",
         "agg": {"energy_kwh": "delta"}, **DAY_CONDITIONS},
    )  # fmt: skip
    assert {r["der_id"]: round(r["energy_kwh"], 6) for r in buckets["rows"]} == {"PV-K": 48.0, "PV-T": 24.0}
    unknown = hub.rr(f"{hub.prefix}/query", {"client_id": "market-1", "password": market, "groups": ["NOPE"],
                                             **DAY_CONDITIONS})  # fmt: skip
    assert unknown["error"]["code"] == "bad_request" and "no such group" in unknown["error"]["message"]

    # Every revision is in the audit trail: the first 0.4 of slot 25, and the 0.6 that replaced it.
    stored = [r for r in events(hub, "plan.") if r["event"] == "plan.stored"]
    slot_25 = format_time(DAY + 24 * 30 * MINUTE)
    assert ["der:PV-T", slot_25, 0.4, None] in stored[0]["entries"]
    assert ["der:PV-T", slot_25, 0.6, 0.4] in stored[1]["entries"] and stored[1]["client_id"] == "market-1"
    failed = [(r["outcome"], r.get("client_id")) for r in events(hub, "plan.failed")]
    assert failed == [("unknown_der", "planner-1"), ("bad_credentials", "planner-1")]
    trail = json.dumps(events(hub, "plan."))
    assert planner not in trail and market not in trail

    # The operator's view is the same: hubd query --view settlement.
    day = ["--start", DAY_CONDITIONS["start"], "--end", DAY_CONDITIONS["end"], "--tz", "Asia/Tokyo"]
    result = hub.cli("query", "--view", "settlement", "--group", "VPP-1", "--der", "PV-T", "--format", "csv", *day)
    assert result.exit_code == 0, result.output
    table = list(csv.DictReader(io.StringIO(result.output)))
    assert len(table) == 96
    assert [float(r["imbalance_yen"]) for r in table] == [r["imbalance_yen"] for r in answer["rows"]]
    first = hub.cli("query", "--view", "settlement", "--group", "VPP-1", "--der", "PV-T", "--limit", "3", *day)
    assert [json.loads(line)["slot"] for line in first.output.split()] == [1, 2, 3]  # --limit: the first rows only


def test_operator_imports_refuse_bad_files_whole_and_audit_them(hub: RunningHub, tmp_path: Path) -> None:
    fill(hub)
    assert hub.cli("group", "add", "G-1", "PV-T", "NOPE").output.strip() == "Error: unknown_der: no such DER: NOPE"
    assert hub.cli("group", "list").output == ""
    good = tmp_path / "plan.csv"
    good.write_text("der_id,date,slot,kwh\nPV-T,2026-11-27,1,0.4\nPV-T,2026-11-27,2,0.4\n")
    assert hub.cli("plan", "import", str(good)).output == "2 plan entries stored (0 replaced an earlier plan)\n"
    again = tmp_path / "again.csv"
    again.write_text("der_id,date,slot,kwh\nPV-T,2026-11-27,2,0.45\nNOPE,2026-11-27,3,1\n")
    result = hub.cli("plan", "import", str(again))
    assert result.exit_code == 1 and "unknown_der: plans[1]: no such DER 'NOPE'" in result.output
    wrong = tmp_path / "wrong.csv"
    wrong.write_text("time,temperature_c\n2026-11-27T00:00:00+09:00,3.5\n")
    result = hub.cli("plan", "import", str(wrong))
    assert result.exit_code == 1 and result.output.startswith("Error: bad_request: a plan CSV needs")
    result = hub.cli("series", "import", "jepx", str(wrong))
    assert result.exit_code == 1 and "bad_request: not a JEPX spot CSV" in result.output
    before = hub.cli("series", "list").output
    assert hub.cli("series", "import", "jepx", str(DATA / "jepx_spot_sample.csv")).exit_code == 0
    assert hub.cli("series", "list").output == before  # imported again: the same values, replaced
    span = ["--start", "2026-11-27T00:00:00+09:00", "--end", "2026-11-27T01:30:00+09:00"]
    rows = [
        json.loads(line) for line in hub.cli("query", "--view", "settlement", "--der", "PV-T", *span).output.split()
    ]
    assert [r["plan_kwh"] for r in rows] == [0.4, 0.4, None]  # the refused file left slot 2 as it was
    failures = [
        (r["event"], r["outcome"]) for r in audit_tail(hub.config.audit_path, 5000) if ".failed" in str(r["event"])
    ]
    assert failures == [
        ("group.failed", "unknown_der"),
        ("plan.failed", "unknown_der"),
        ("plan.failed", "bad_request"),
        ("series.failed", "bad_request"),
    ]
    # The hub kept serving throughout.
    assert hub.rr(f"{hub.prefix}/query", {"client_id": "x", "password": "y", **DAY_CONDITIONS})["error"]["code"] == (
        "bad_credentials"
    )


def test_the_running_hub_fetches_weather_on_its_schedule(
    hub_factory: Any,
    weather_server: tuple[str, list[int]],  # noqa: F811 - the fixture
) -> None:
    url, _ = weather_server
    hub: RunningHub = hub_factory(market={"weather": [{"place": "tokyo", "url": url, "every_s": 1}]})
    deadline = time.monotonic() + 10
    while "weather\ttokyo\ttemperature_c\t24\t" not in hub.cli("series", "list").output:
        assert time.monotonic() < deadline, hub.cli("series", "list").output
        time.sleep(0.1)
    fetched = events(hub, "series.fetched")
    assert fetched and fetched[0]["place"] == "tokyo" and fetched[0]["values"] == 72


def test_a_price_area_that_is_not_jepx_s_stops_the_config(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"market.price_areas.feeder-1: 'okinawa' is no JEPX area"):
        parse_config({"market": {"price_areas": {"feeder-1": "okinawa"}}})
    with pytest.raises(ConfigError, match=r"market.weather\[0\].url: must start with http"):
        parse_config({"market": {"weather": [{"place": "tokyo", "url": "ftp://x"}]}})


def test_at_a_dynsec_broker_a_planner_may_send_plans_but_not_queries(site: Site) -> None:  # noqa: F811
    planner = site.hub.cli("system", "add", "planner-1", "--role", "planner").output.strip()
    consumer = site.hub.consumer("market-1")
    as_planner = {"user": "planner-1", "password": planner, "client": "planner-1"}
    as_consumer = {"user": "market-1", "password": consumer, "client": "market-1"}
    assert site.publish("hub/v1/plan", "{}", **as_planner) in (0x00, 0x10)
    assert site.publish("hub/v1/query", "{}", **as_planner) == 0x87  # not authorized
    assert site.publish("hub/v1/plan", "{}", **as_consumer) in (0x00, 0x10)
    assert site.publish("hub/v1/query", "{}", **as_consumer) in (0x00, 0x10)
