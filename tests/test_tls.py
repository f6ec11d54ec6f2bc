"""hubd against a broker that speaks TLS (``mqtts://``), as in production: a real Mosquitto with a TLS listener
and a certificate from a CA made for the test (openssl), trusted through ``SSL_CERT_FILE`` as
docs/operations.md tells operators to do."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import RunningHub, write_config
from helpers import at, reading

from hubd.broker import EmbeddedBroker, free_port, load_template


@dataclass
class TlsBroker:
    broker: EmbeddedBroker  # its plain listener, for the test's own clients
    tls_port: int
    ca: Path  # the CA that signed the broker's certificate (for the name localhost only)
    other_ca: Path  # a CA that signed nothing the broker shows


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=30)


def _make_ca(folder: Path, name: str) -> None:
    _openssl(
        *("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-days", "2"),
        *("-subj", f"/CN=hubd test {name}", "-keyout", f"{name}.key", "-out", f"{name}.pem"),
        *("-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign"),
        cwd=folder,
    )


@pytest.fixture
def tls(tmp_path: Path) -> Iterator[TlsBroker]:
    certs = tmp_path / "certs"
    certs.mkdir()
    _make_ca(certs, "ca")
    _make_ca(certs, "other-ca")
    _openssl(
        *("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"),
        *("-subj", "/CN=localhost", "-keyout", "server.key", "-out", "server.csr"),
        cwd=certs,
    )
    (certs / "san.cnf").write_text("subjectAltName=DNS:localhost\n", encoding="utf-8")
    _openssl(
        *("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial"),
        *("-days", "2", "-out", "server.pem", "-extfile", "san.cnf"),
        cwd=certs,
    )
    tls_port = free_port()
    template = tmp_path / "tls.conf.in"
    template.write_text(
        load_template()
        + f"\nlistener {tls_port} 127.0.0.1\n"
        + f"cafile {certs / 'ca.pem'}\ncertfile {certs / 'server.pem'}\nkeyfile {certs / 'server.key'}\n",
        encoding="utf-8",
    )
    broker = EmbeddedBroker(tmp_path / "broker-data", port=free_port(), template=template)
    broker.start_sync()
    try:
        yield TlsBroker(broker, tls_port, certs / "ca.pem", certs / "other-ca.pem")
    finally:
        broker.stop_sync()


def _config_for(tmp_path: Path, tls: TlsBroker, url: str) -> Path:
    """The tests' hubd.yaml, with the hub on ``url``."""
    path = write_config(tmp_path / "hubd.yaml", tls.broker)
    config = yaml.safe_load(path.read_text(encoding="utf-8"))
    config["broker"]["url"] = url
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


def _tls_rr(tls: TlsBroker, topic: str, body: dict[str, Any]) -> dict[str, Any]:
    """mosquitto_rr over the TLS listener, trusting the test CA."""
    out = subprocess.run(
        [
            *("mosquitto_rr", "-h", "localhost", "-p", str(tls.tls_port), "--cafile", str(tls.ca), "-q", "1"),
            *("-t", topic, "-e", "tls/answers", "-m", json.dumps(body), "-W", "10"),
        ],
        capture_output=True,
        text=True,
        timeout=20,
        check=True,
    )
    answer: dict[str, Any] = json.loads(out.stdout)
    return answer


def test_the_hub_serves_through_a_tls_broker(tls: TlsBroker, tmp_path: Path, monkeypatch: Any) -> None:
    """The hub connects with mqtts://, checks the broker's certificate against the CA it was told to trust,
    and serves clients on either listener."""
    monkeypatch.setenv("SSL_CERT_FILE", str(tls.ca))
    config = _config_for(tmp_path, tls, f"mqtts://localhost:{tls.tls_port}")
    hub = RunningHub(config, tls.broker)
    hub.start()
    try:
        password = hub.register("PV-TLS-1")  # asked on the plain listener, answered by the hub over TLS
        answer = _tls_rr(tls, "hub/v1/data", {"readings": [reading("PV-TLS-1", password, at(0))]})
        assert answer["ok"] is True and answer["accepted"] == 1
        assert _tls_rr(tls, "hub/v1/time", {})["ok"] is True
    finally:
        hub.stop()
    assert not hub.errors


@pytest.mark.parametrize(
    ("host", "trusted", "why"),
    [
        ("localhost", "other_ca", "certificate verify failed"),  # signed by a CA hubd was not told to trust
        ("127.0.0.1", "ca", "mismatch"),  # the same listener by an address its certificate does not name
    ],
)
def test_a_broker_certificate_hubd_cannot_trust_stops_it_with_one_line(
    tls: TlsBroker, tmp_path: Path, host: str, trusted: str, why: str
) -> None:
    url = f"mqtts://{host}:{tls.tls_port}"
    config = _config_for(tmp_path, tls, url)
    out = subprocess.run(
        [sys.executable, "-c", "from hubd.cli import main; main()", "--config", str(config), "run"],
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, "SSL_CERT_FILE": str(getattr(tls, trusted))},
    )
    assert out.returncode == 1
    assert "Traceback" not in out.stderr
    error = out.stderr.strip().splitlines()[-1]
    assert error.startswith(f"Error: cannot connect to the broker at {url}: ")
    assert why in error


def test_a_private_ca_and_a_client_certificate_from_the_config(tls: TlsBroker, tmp_path: Path) -> None:
    """broker.tls.ca_file instead of the system's store, and a client certificate for a listener that requires
    one (require_certificate true); without the certificate that listener refuses hubd."""
    certs = tls.ca.parent
    _openssl(
        *("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"),
        *("-subj", "/CN=hubd", "-keyout", "client.key", "-out", "client.csr"),
        cwd=certs,
    )
    _openssl(
        *("x509", "-req", "-in", "client.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial"),
        *("-days", "2", "-out", "client.pem"),
        cwd=certs,
    )
    strict_port = free_port()
    template = tmp_path / "strict.conf.in"
    template.write_text(
        load_template()
        + f"\nlistener {strict_port} 127.0.0.1\nrequire_certificate true\n"
        + f"cafile {certs / 'ca.pem'}\ncertfile {certs / 'server.pem'}\nkeyfile {certs / 'server.key'}\n",
        encoding="utf-8",
    )
    strict = EmbeddedBroker(tmp_path / "strict-data", port=free_port(), template=template)
    strict.start_sync()
    try:
        config = _config_for(tmp_path, tls, f"mqtts://localhost:{strict_port}")
        settings = yaml.safe_load(config.read_text(encoding="utf-8"))
        settings["broker"]["tls"] = {"ca_file": str(certs / "ca.pem")}
        config.write_text(yaml.safe_dump(settings), encoding="utf-8")
        refused = subprocess.run(
            [sys.executable, "-c", "from hubd.cli import main; main()", "--config", str(config), "run"],
            capture_output=True,
            text=True,
            timeout=30,
            env={k: v for k, v in os.environ.items() if k != "SSL_CERT_FILE"},
        )
        assert refused.returncode == 1, refused.stderr
        assert "cannot connect to the broker" in refused.stderr
        settings["broker"]["tls"].update(cert_file=str(certs / "client.pem"), key_file=str(certs / "client.key"))
        config.write_text(yaml.safe_dump(settings), encoding="utf-8")
        hub = RunningHub(config, strict)
        hub.start()
        try:
            assert hub.rr("hub/v1/time", {})["ok"] is True  # asked on the strict broker's plain listener
        finally:
            hub.stop()
    finally:
        strict.stop_sync()
