"""Configuration: a typo or a wrong type stops hubd with one message naming the key."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner
from loguru import logger

from hubd import config as config_module
from hubd.cli import main
from hubd.config import ConfigError, load_config, parse_config


def test_no_file_is_the_embedded_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HUBD_CONFIG", raising=False)
    config = load_config(None)
    assert config.broker.url is None
    assert config.store.backend == "sqlite"
    assert config.auth.registration_mode == "allowlist"


@pytest.mark.parametrize(
    ("document", "message"),
    [
        ({"brokr": {}}, "brokr: unknown key"),
        ({"broker": {"ulr": "mqtt://x"}}, "broker.ulr: unknown key"),
        ({"broker": {"embedded_port": "1883"}}, "broker.embedded_port: expected int, got '1883'"),
        ({"broker": {"embedded_port": 99999}}, "broker.embedded_port: must be 1 … 65535, got 99999"),
        ({"broker": {"keepalive_s": 65536}}, "broker.keepalive_s: must be 0 … 65535, got 65536"),
        ({"broker": {"embedded_port": 1883.0}}, "broker.embedded_port: expected int, got 1883.0"),
        ({"broker": 1883}, "broker: expected a mapping, got 1883"),
        ({"store": {"sqlite": {"sync": "full"}}}, "store.sqlite.sync: unknown key (known: path, synchronous)"),
        (
            {"store": {"sqlite": {"synchronous": "off"}}},
            "store.sqlite.synchronous: must be 'full' or 'normal', got 'off'",
        ),
        ({"auth": {"bcrypt_rounds": 3}}, "auth.bcrypt_rounds: must be 4 … 16, got 3"),
        ({"auth": {"rate_limit": {"window_s": "300"}}}, "auth.rate_limit.window_s: expected float, got '300'"),
        ({"audit": {"fsync": 1}}, "audit.fsync: expected bool, got 1"),
        ({"audit": {"path": 7}}, "audit.path: expected str or null, got 7"),
        ({"query": {1: 2}}, "query.1: unknown key (known: default_limit, max_der_ids, max_limit)"),
        ({"auth": {"registration_mode": "anyone"}}, "auth.registration_mode: must be 'allowlist' or 'open'"),
        ({"auth": {"rate_limit": {"failures": True}}}, "auth.rate_limit.failures: expected int"),
        ({"auth": {"rate_limit": {"global_failures": 0}}}, "auth.rate_limit.global_failures: must be positive, got 0"),
        ({"auth": {"initial_password_hash": "hunter2-in-plain-text"}}, "auth.initial_password_hash: must be a bcrypt"),
        ({"limits": {"max_payload_bytes": 0}}, "limits.max_payload_bytes: must be positive, got 0"),
        (
            {"limits": {"quarantine_max_bytes": 100}},
            "limits.quarantine_max_bytes: must be 1024 … 1000000000, got 100",
        ),
        ({"broker": {"receive_maximum": 65536}}, "broker.receive_maximum: must be 1 … 65535, got 65536"),
        ({"broker": {"url": "tcp://broker:1883"}}, "broker.url: must start with mqtt://"),
        ({"broker": {"url": "mqtt://broker:18830000"}}, "broker.url: must be mqtt[s]://host[:port]"),
        ({"broker": {"url": "mqtt://broker/some/path"}}, "broker.url: must be mqtt[s]://host[:port]"),
        ({"topic_prefix": "hub/#"}, "topic_prefix: must be a plain topic"),
        ([1, 2], "config: expected a mapping, got [1, 2]"),
    ],
)
def test_bad_config_names_the_key(document: object, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(document, "hubd.yaml")
    assert str(caught.value).startswith("hubd.yaml: ")
    assert message in str(caught.value)


def test_an_int_is_taken_for_a_float_and_an_empty_section_is_its_defaults(tmp_path: Path) -> None:
    path = tmp_path / "hubd.yaml"
    path.write_text("broker:\n  # url: mqtts://broker:8883\nlimits:\n  max_future_s: 60\n", encoding="utf-8")
    config = load_config(path)
    assert config.broker.url is None and config.broker.embedded_port == 1883
    assert config.limits.max_future_s == 60.0 and isinstance(config.limits.max_future_s, float)


@pytest.mark.parametrize("password", ["my-secret-initial", "31415926"])  # the second one YAML reads as an int
def test_plain_initial_password_is_not_echoed(tmp_path: Path, password: str) -> None:
    path = tmp_path / "hubd.yaml"
    path.write_text(f"auth:\n  initial_password_hash: {password}\n", encoding="utf-8")
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert "auth.initial_password_hash: " in str(caught.value)
    assert password not in str(caught.value)


@pytest.mark.parametrize(
    "url",
    [
        "mqtts://hubd:s3cret-pass@broker:8883",
        "tcp://hubd:s3cret-pass@broker:1883",
        "hubd:s3cret-pass@broker:8883",  # no scheme at all
        "mqtts://hubd:1234/s3cret-pass@broker:8883",  # a / in the password: urlsplit sees a path
        "mqtts://hubd:se#s3cret-pass@broker:8883",  # a # in the password: urlsplit sees a fragment
    ],
)
def test_a_password_in_the_broker_url_is_refused_and_not_echoed(tmp_path: Path, url: str) -> None:
    path = tmp_path / "hubd.yaml"
    path.write_text(f"broker:\n  url: {url}\n", encoding="utf-8")
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert "broker.url: no user or password in the URL" in str(caught.value)
    assert "s3cret-pass" not in str(caught.value)


def test_relative_data_dir_is_relative_to_the_file(tmp_path: Path) -> None:
    path = tmp_path / "etc" / "hubd.yaml"
    path.parent.mkdir()
    path.write_text("data_dir: ../state\n", encoding="utf-8")
    assert load_config(path).data_path == (tmp_path / "state").resolve()


def test_relative_paths_are_relative_to_the_file(tmp_path: Path) -> None:
    path = tmp_path / "etc" / "hubd.yaml"
    path.parent.mkdir()
    path.write_text("store: {sqlite: {path: db/readings.sqlite3}}\naudit: {path: /srv/audit.jsonl}\n", encoding="utf-8")
    config = load_config(path)
    assert config.readings_path == (tmp_path / "etc" / "db" / "readings.sqlite3").resolve()
    assert config.audit_path == Path("/srv/audit.jsonl")


@pytest.mark.parametrize(
    ("old", "document"),
    [
        ("store.sqlite.sync", {"store": {"sqlite": {"sync": "normal"}}}),
        ("sqlite_synchronous", {"sqlite_synchronous": "normal"}),  # from another section: the new one is made
    ],
)
def test_a_renamed_key_is_read_under_its_new_name_with_a_warning(
    monkeypatch: pytest.MonkeyPatch, old: str, document: dict[str, object]
) -> None:
    monkeypatch.setattr(config_module, "RENAMED", {old: "store.sqlite.synchronous"})
    given = repr(document)
    warnings: list[str] = []
    sink = logger.add(lambda message: warnings.append(str(message)), level="WARNING", format="{message}")
    try:
        assert parse_config(document, "hubd.yaml").store.sqlite.synchronous == "normal"
    finally:
        logger.remove(sink)
    assert warnings == [f"hubd.yaml: {old} is deprecated; use store.sqlite.synchronous\n"]
    assert repr(document) == given  # the caller's document is left as it was


def test_a_renamed_key_given_with_its_new_name_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(config_module, "RENAMED", {"store.sqlite.sync": "store.sqlite.synchronous"})
    with pytest.raises(ConfigError) as caught:
        parse_config({"store": {"sqlite": {"sync": "normal", "synchronous": "full"}}}, "hubd.yaml")
    assert str(caught.value).startswith("hubd.yaml: store.sqlite.sync and store.sqlite.synchronous: both given")


def test_daemon_refuses_to_start_with_one_clear_line(tmp_path: Path) -> None:
    path = tmp_path / "hubd.yaml"
    path.write_text("store:\n  backend: sqlite\n  batch_max_readings: many\n", encoding="utf-8")
    result = CliRunner().invoke(main, ["--config", str(path), "run"])
    assert result.exit_code != 0
    assert "store.batch_max_readings: expected int, got 'many'" in result.output


def test_yaml_syntax_error_and_missing_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("broker: [unclosed\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="cannot read the config file"):
        load_config(tmp_path / "missing.yaml")
