"""The embedded Mosquitto: config rendering, start/stop, delivery, persistence, errors."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
from pathlib import Path

import pytest

from hubd import broker as broker_module
from hubd.broker import (
    BrokerNotInstalled,
    BrokerNotStarted,
    EmbeddedBroker,
    PortInUse,
    free_port,
    load_template,
    render_config,
)
from hubd.port_holder import Holder, find_holder


def _accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def _client_args(tool: str, broker: EmbeddedBroker) -> list[str]:
    return [tool, "-h", "127.0.0.1", "-p", str(broker.port), "-V", "mqttv5", "-q", "1"]


def _sub_args(broker: EmbeddedBroker, *extra: str) -> list[str]:
    return [*_client_args("mosquitto_sub", broker), *extra]


def _pub(broker: EmbeddedBroker, topic: str, payload: str) -> None:
    subprocess.run(
        [*_client_args("mosquitto_pub", broker), "-t", topic, "-m", payload],
        check=True,
        timeout=5,
    )


# -- template ---------------------------------------------------------------------------


def test_render_config(tmp_path: Path) -> None:
    text = render_config(load_template(), port=18830, bind="127.0.0.1", data_dir=tmp_path, user="hubd")
    lines = text.splitlines()
    assert "listener 18830 127.0.0.1" in lines
    assert f"persistence_location {tmp_path.resolve()}/mosquitto/" in lines
    assert "user hubd" in lines
    assert "max_queued_messages 1000000" in lines
    # The default limits.max_payload_bytes (4 MiB) and 256 KiB for the topic and properties; from the config.
    assert "max_packet_size 4456448" in lines
    text = render_config(
        load_template(), port=18830, bind="127.0.0.1", data_dir=tmp_path, user="hubd", max_packet_size=1024 + 262144
    )
    assert "max_packet_size 263168" in text.splitlines()
    assert "{" not in "\n".join(line for line in lines if not line.startswith("#"))


@pytest.mark.parametrize(
    ("bind", "data_dir"),
    [("127.0.0.1\nallow_anonymous true", "d"), ("127.0.0.1", "d\nlistener 1 0.0.0.0"), ("a b", "d")],
)
def test_render_config_rejects_injection(tmp_path: Path, bind: str, data_dir: str) -> None:
    with pytest.raises(ValueError, match="invalid"):
        render_config(load_template(), port=1883, bind=bind, data_dir=tmp_path / data_dir, user="u")


def test_render_config_rejects_unknown_placeholder(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown placeholders"):
        render_config("listener {port} {bind}\nfoo {bar}\n", port=1, bind="x", data_dir=tmp_path, user="u")


# -- delivery and lifecycle --------------------------------------------------------------


def test_qos1_publish_is_delivered(broker: EmbeddedBroker) -> None:
    assert broker.url == f"mqtt://127.0.0.1:{broker.port}"
    # -d prints "Subscribed" once the SUBACK arrives, so we publish only after that;
    # stdbuf makes mosquitto_sub flush that line now rather than at exit.
    with subprocess.Popen(
        ["stdbuf", "-oL", *_sub_args(broker, "-d", "-t", "hub/v1/data/#", "-C", "1", "-W", "5")],
        stdout=subprocess.PIPE,
        text=True,
    ) as sub:
        assert sub.stdout is not None
        for line in sub.stdout:  # bounded: -W 5 ends mosquitto_sub
            if "Subscribed" in line:
                break
        _pub(broker, "hub/v1/data/der-1", '{"p_w": 1500}')
        rest = sub.stdout.read()
        assert sub.wait(timeout=5) == 0
    assert "received PUBLISH (d0, q1" in rest
    assert '{"p_w": 1500}' in rest


def test_queued_messages_survive_restart(tmp_path: Path) -> None:
    """QoS 1 messages queued for a persistent session are kept across a broker restart."""
    embedded = EmbeddedBroker(tmp_path, port=free_port())
    session = ("-c", "-i", "hubd-test", "-x", "3600", "-t", "hub/v1/#")
    with embedded:
        # Create the persistent session and its subscription, then go away.
        subprocess.run(_sub_args(embedded, *session, "-E"), check=True, timeout=5)
        _pub(embedded, "hub/v1/data/der-1", "queued")
    assert (tmp_path / "mosquitto" / "mosquitto.db").is_file()
    with embedded:
        got = subprocess.run(
            _sub_args(embedded, *session, "-C", "1", "-W", "5", "-v"),
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        )
    assert got.stdout.strip() == "hub/v1/data/der-1 queued"


def test_async_start_stop_closes_port(tmp_path: Path) -> None:
    embedded = EmbeddedBroker(tmp_path, port=free_port())

    async def run() -> None:
        async with embedded:
            assert embedded.running
            assert _accepts(embedded.port)
        assert not embedded.running
        await embedded.stop()  # idempotent

    asyncio.run(run())
    assert not _accepts(embedded.port)
    embedded.stop_sync()  # still idempotent


# -- errors ------------------------------------------------------------------------------


def test_not_installed(tmp_path: Path) -> None:
    with pytest.raises(BrokerNotInstalled) as info:
        EmbeddedBroker(tmp_path, executable="/nonexistent/mosquitto")
    message = str(info.value)
    assert "Mosquitto is not installed" in message
    assert "sudo apt-get install mosquitto" in message
    assert "broker.url" in message


def test_finds_mosquitto_outside_path(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Debian installs mosquitto to /usr/sbin, which a normal user's PATH often lacks."""
    fake = tmp_path / "sbin" / "mosquitto"
    fake.parent.mkdir()
    fake.write_text("#!/bin/sh\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    monkeypatch.setattr(broker_module, "FALLBACK_EXECUTABLES", (str(tmp_path / "nope"), str(fake)))
    assert EmbeddedBroker(tmp_path).executable == str(fake)
    monkeypatch.setattr(broker_module, "FALLBACK_EXECUTABLES", (str(tmp_path / "nope"),))
    with pytest.raises(BrokerNotInstalled):
        EmbeddedBroker(tmp_path)


def test_port_in_use_by_a_listener_names_it_and_the_ways_out(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        embedded = EmbeddedBroker(tmp_path, port=port)
        with pytest.raises(PortInUse) as info:
            asyncio.run(embedded.start())
        assert not embedded.running
    message = str(info.value)
    assert "\n" not in message
    assert f"port {port} on 127.0.0.1 is already in use by " in message
    assert f"pid {os.getpid()}" in message
    assert f"broker.url: mqtt://127.0.0.1:{port}" in message
    assert "sudo systemctl disable --now mosquitto" in message
    assert "broker.embedded_port" in message


def test_port_in_use_on_ipv6_loopback(tmp_path: Path) -> None:
    with socket.socket(socket.AF_INET6) as taken:
        taken.bind(("::1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(PortInUse) as info:
            EmbeddedBroker(tmp_path, port=port, bind="::1").start_sync()
    assert f"pid {os.getpid()}" in str(info.value)
    assert f"broker.url: mqtt://[::1]:{port}" in str(info.value)


def test_port_bound_but_not_listening(tmp_path: Path) -> None:
    """Mosquitto itself fails to bind: still the port-in-use error, though nothing can name the socket's owner
    (a socket that does not listen is in no table of /proc/net)."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        port = taken.getsockname()[1]
        embedded = EmbeddedBroker(tmp_path, port=port)
        with pytest.raises(PortInUse, match=f"port {port} on 127.0.0.1 is already in use by ") as info:
            asyncio.run(embedded.start())
        assert "\n" not in str(info.value)
        assert not embedded.running


def test_a_broker_that_fails_to_start_says_why_in_one_line(tmp_path: Path) -> None:
    """Any other start-up failure: one line that ends with what Mosquitto logged last."""
    template = tmp_path / "broken.conf.in"
    template.write_text("listener {port} {bind}\nno_such_option 1\n", encoding="utf-8")
    embedded = EmbeddedBroker(tmp_path, port=free_port(), template=template)
    with pytest.raises(BrokerNotStarted, match="exited with status") as info:
        embedded.start_sync()
    assert "\n" not in str(info.value)
    assert "no_such_option" in str(info.value)
    assert not embedded.running


@pytest.mark.parametrize(
    ("holder", "said"),
    [
        (Holder("mosquitto", 812, "mosquitto"), "mosquitto (pid 812, user mosquitto)"),
        (Holder(user="mosquitto"), "a process (user mosquitto)"),
        (Holder(), "an unknown process"),
    ],
)
def test_a_holder_is_named_as_far_as_it_is_known(holder: Holder, said: str) -> None:
    """Another user's process (the system's Mosquitto, to a non-root hubd) shows its user but not its pid."""
    assert str(holder) == said


def test_nothing_listening_is_an_unknown_holder() -> None:
    assert find_holder(free_port()) == Holder()


def test_another_hubds_embedded_broker_is_named_with_its_data_and_the_right_way_out(tmp_path: Path) -> None:
    """Two hubs on one host: pointing the second at the first's broker would have them take the client id from
    each other, so the way out is to stop that hubd or move the port, not broker.url."""
    first = tmp_path / "first"
    first.mkdir()
    (first / "hub.sqlite3").touch()  # a hubd's data directory
    running = EmbeddedBroker(first, port=free_port())
    running.start_sync()
    try:
        with pytest.raises(PortInUse) as info:
            EmbeddedBroker(tmp_path / "second", port=running.port).start_sync()
    finally:
        running.stop_sync()
    said = str(info.value)
    assert f"the embedded broker of another hubd, data in {first}" in said
    assert "stop that hubd, or set broker.embedded_port" in said and "broker.url" not in said
