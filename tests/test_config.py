"""Configuration: a typo or a wrong type stops hubd with one message naming the key."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

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
        ({"broker": {"embedded_port": "1883"}}, "broker.embedded_port: expected int"),
        ({"auth": {"registration_mode": "anyone"}}, "auth.registration_mode: must be 'allowlist' or 'open'"),
        ({"auth": {"rate_limit": {"failures": True}}}, "auth.rate_limit.failures: expected int"),
        ({"auth": {"initial_password_hash": "hunter2-in-plain-text"}}, "auth.initial_password_hash: must be a bcrypt"),
        ({"limits": {"max_payload_bytes": 0}}, "limits.max_payload_bytes: must be positive"),
        ({"broker": {"url": "tcp://broker:1883"}}, "broker.url: must start with mqtt://"),
        ({"broker": {"url": "mqtt://broker:18830000"}}, "broker.url: must be mqtt[s]://host[:port]"),
        ({"broker": {"url": "mqtt://broker/some/path"}}, "broker.url: must be mqtt[s]://host[:port]"),
        ({"topic_prefix": "hub/#"}, "topic_prefix: must be a plain topic"),
        ([1, 2], "config: expected a mapping"),
    ],
)
def test_bad_config_names_the_key(document: object, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(document, "hubd.yaml")
    assert str(caught.value).startswith("hubd.yaml: ")
    assert message in str(caught.value)


def test_plain_initial_password_is_not_echoed(tmp_path: Path) -> None:
    path = tmp_path / "hubd.yaml"
    path.write_text("auth:\n  initial_password_hash: my-secret-initial\n", encoding="utf-8")
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert "my-secret-initial" not in str(caught.value)


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
