"""Every user mistake on the command line ends in one short error and a non-zero exit, never a traceback.

The walk gives each command bad values of each kind of option it takes: numbers out of range, choices that
are not offered, files that are missing or not what they should be, times that are not RFC 3339, DER ids
and systems that do not exist, and config files that are not YAML or name a key hubd does not know. It runs
in-process (click's CliRunner), where an uncaught exception is what a user would see as a traceback; ``hubd
run`` runs as a process of its own, since it is what systemd starts and what meets a busy port.

Exit statuses (docs/operations.md): 1 a command failed, 2 a usage error, 78 the configuration or the host's
setup must change.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner, Result

from hubd.auth.credentials import hash_password
from hubd.cli import EXIT_CONFIG
from hubd.cli import main as hubd_main
from hubd.config import load_config

FAILED, USAGE, CONFIG = 1, 2, EXIT_CONFIG
ANY = 0  # any non-zero status: the query command's checks are still moving, its refusals may change kind


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """A hub's files with one DER and one gateway, and beside them the wrong files a user might give."""
    config = {
        "data_dir": str(tmp_path / "data"),
        "auth": {"initial_password_hash": hash_password("initial-secret-0f9a", 4), "bcrypt_rounds": 4},
        "log": {"level": "WARNING"},
    }
    (tmp_path / "hubd.yaml").write_text(yaml.safe_dump(config), encoding="utf-8")
    (tmp_path / "not-yaml.yaml").write_text("broker: [unclosed\n", encoding="utf-8")
    (tmp_path / "binary.yaml").write_bytes(b"\x89PNG\r\n\x1a\n\x00\xff")
    (tmp_path / "unknown-key.yaml").write_text("brokr:\n  url: mqtt://127.0.0.1\n", encoding="utf-8")
    (tmp_path / "a-list.yaml").write_text("- data_dir\n", encoding="utf-8")
    (tmp_path / "bad-int.yaml").write_text("store:\n  batch_max_readings: many\n", encoding="utf-8")
    (tmp_path / "bad-port.yaml").write_text("broker:\n  embedded_port: 70000\n", encoding="utf-8")
    (tmp_path / "file-as-data-dir.yaml").write_text("data_dir: sample.json\n", encoding="utf-8")
    (tmp_path / "binary.csv").write_bytes(b"\xff\xfe\x00d\x00e\x00r\x00")
    (tmp_path / "no-der-id.csv").write_text("name,type\nroof,pv\n", encoding="utf-8")
    (tmp_path / "bad-lat.csv").write_text("der_id,lat\nPV-0009,north\n", encoding="utf-8")
    (tmp_path / "not-a-definition.yaml").write_text("just: words\n", encoding="utf-8")
    (tmp_path / "sample.json").write_text("{}", encoding="utf-8")
    for args in (("der", "add", "PV-0001", "--type", "pv"), ("system", "add", "gw-1", "--role", "gateway")):
        assert _hubd(tmp_path, *args).exit_code == 0
    return tmp_path


def _hubd(folder: Path, *args: str, input: str | None = None) -> Result:
    """``hubd --config <folder>/hubd.yaml ARGS``, unless ARGS name their own --config; {d} is the folder."""
    words = [arg.replace("{d}", str(folder)) for arg in args]
    if words[0] != "--config":
        words = ["--config", str(folder / "hubd.yaml"), *words]
    return CliRunner().invoke(hubd_main, words, input=input)


def _one_error(result: Result | subprocess.CompletedProcess[str], said: str) -> str:
    """The one error line of a failed command, checked to be the only one, short, with no traceback."""
    if isinstance(result, Result):
        # In-process, an exception click did not turn into an exit status is what a user sees as a traceback.
        assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
        output = result.output
    else:
        output = result.stdout + result.stderr
    assert "Traceback" not in output, output
    errors = [line for line in output.splitlines() if line.startswith(("Error:", "BROKEN:"))]
    assert len(errors) == 1, output
    # click's usage lines at most, around the one error (which may list an option's choices, a line each)
    assert len([line for line in output.splitlines() if not line.startswith("\t")]) <= 6, output
    assert len(errors[0]) < 400, errors[0]
    assert said in errors[0], output
    return errors[0]


WALK: list[tuple[tuple[str, ...], int, str]] = [
    # the config file
    (("--config", "{d}/missing.yaml", "der", "list"), CONFIG, "cannot read the config file"),
    (("--config", "{d}/not-yaml.yaml", "der", "list"), CONFIG, "not valid YAML (expected ',' or ']'"),
    (("--config", "{d}/binary.yaml", "der", "list"), CONFIG, "not a YAML file"),
    (("--config", "{d}/unknown-key.yaml", "der", "list"), CONFIG, "brokr: unknown key"),
    (("--config", "{d}/a-list.yaml", "der", "list"), CONFIG, "expected a mapping"),
    (("--config", "{d}/bad-int.yaml", "quarantine", "list"), CONFIG, "store.batch_max_readings: expected int"),
    (("--config", "{d}/bad-port.yaml", "run"), CONFIG, "broker.embedded_port: must be 1 … 65535, got 70000"),
    (("--config", "{d}", "der", "list"), USAGE, "is a directory"),
    (("--config", "{d}/file-as-data-dir.yaml", "der", "list"), FAILED, "cannot use hubd's files: "),
    (("--config", "{d}/file-as-data-dir.yaml", "run"), FAILED, "cannot use hubd's files: "),
    # commands and options that do not exist
    (("no-such-command",), USAGE, "No such command"),
    (("der", "list", "--no-such-option"), USAGE, "No such option"),
    # the demo
    (("demo", "--minutes", "0"), USAGE, "--minutes"),
    (("demo", "--minutes", "many"), USAGE, "--minutes"),
    (("demo", "--port", "70000"), USAGE, "--port"),
    (("demo", "--port", "-1"), USAGE, "--port"),
    (("demo", "--port", "high"), USAGE, "--port"),
    # DERs
    (("der", "add", "PV-0002", "--type", "windmill"), USAGE, "--type"),
    (("der", "add", "PV-0002", "--lat", "north"), USAGE, "--lat"),
    (("der", "add", "PV-0002", "--lat", "999"), FAILED, "lat is out of range"),
    (("der", "add", "PV-0002", "--capacity-kw", "-5"), FAILED, "capacity_kw must not be negative"),
    (("der", "add", "not a DER id!"), FAILED, "der_id must be"),
    (("der", "import", "{d}/missing.csv"), USAGE, "does not exist"),
    (("der", "import", "{d}"), USAGE, "is a directory"),
    (("der", "import", "{d}/binary.csv"), FAILED, "not a CSV file of UTF-8 text"),
    (("der", "import", "{d}/no-der-id.csv"), FAILED, "the header must name a der_id column"),
    (("der", "import", "{d}/bad-lat.csv"), FAILED, "line 2: lat is not a number"),
    (("der", "list", "--status", "sleeping"), USAGE, "--status"),
    (("der", "show", "PV-9999"), FAILED, "no DER PV-9999"),
    (("der", "reset", "PV-9999"), FAILED, "no DER PV-9999"),
    (("der", "rotate", "PV-9999"), FAILED, "no DER PV-9999"),
    (("der", "revoke", "PV-9999"), FAILED, "no DER PV-9999"),
    # systems
    (("system", "add", "market-1", "--role", "boss"), USAGE, "--role"),
    (("system", "add", "market-1"), USAGE, "Missing option '--role'"),
    (("system", "add", "gw-1", "--role", "gateway"), FAILED, "exists already"),
    (("system", "add", "not a name!", "--role", "consumer"), FAILED, "system name must be"),
    (("system", "bind", "gw-1"), USAGE, "Missing argument"),
    (("system", "bind", "gw-1", "PV-9999"), FAILED, "unknown DER PV-9999"),
    (("system", "bind", "gw-9", "PV-0001"), FAILED, "'gw-9' is not a gateway system"),
    (("system", "revoke", "gw-9"), FAILED, "no system gw-9"),
    # quarantine
    (("quarantine", "list", "-n", "0"), USAGE, "-n"),
    (("quarantine", "list", "-n", "all"), USAGE, "-n"),
    (("quarantine", "show", "first"), USAGE, "ENTRY_ID"),
    (("quarantine", "show", "999"), FAILED, "no quarantine entry 999"),
    # query
    (("query", "--start", "yesterday", "--end", "today"), ANY, "RFC 3339"),
    (("query", "--start", "2026-01-01T00:00:00", "--end", "2026-01-02T00:00:00Z"), ANY, "no UTC offset"),
    (("query", "--start", "2026-01-02T00:00:00Z", "--end", "2026-01-01T00:00:00Z"), ANY, "--end must be after --start"),
    (("query", "--at", "noon"), ANY, "RFC 3339"),
    (("query", "--at", "2026-01-01T00:00:00Z", "--tolerance", "soon"), ANY, "--tolerance"),
    (("query", "--at", "2026-01-01T00:00:00Z", "--tolerance", "-1"), ANY, "--tolerance must be 0"),
    (("query", "--type", "windmill"), ANY, "--type"),
    (("query", "--field", "colour"), ANY, "--field"),
    (("query", "--interval", "7m"), ANY, "--interval"),
    (("query", "--limit", "all"), ANY, "--limit"),
    (("query", "--bbox", "1,2"), ANY, "bbox"),
    (("query", "--bbox", "a,b,c,d"), ANY, "bbox"),
    (("query", "--where", "power_kw"), ANY, "where"),
    (("query", "--where", "power_kw>=high"), ANY, "where"),
    (("query", "--agg", "power_kw"), ANY, "agg"),
    (("query", "--format", "xml"), ANY, "--format"),
    (("query", "--table"), ANY, "--interval"),
    # audit
    (("audit", "verify", "--file", "{d}/missing.jsonl"), FAILED, "does not exist"),
    (("audit", "tail", "-n", "0"), USAGE, "-n"),
    # formats
    (("format", "show", "no.such.code"), FAILED, "no format 'no.such.code'"),
    (("format", "add", "{d}/missing.yaml"), USAGE, "does not exist"),
    (("format", "add", "{d}/not-yaml.yaml"), FAILED, "not valid YAML"),
    (("format", "add", "{d}/not-a-definition.yaml"), FAILED, "refused"),
    (("format", "remove", "no.such.code"), FAILED, "no user definition"),
    (("format", "test", "no.such.code", "{d}/sample.json"), FAILED, "neither a definition file nor"),
    (("format", "test", "hub.v1", "{d}/missing.json"), USAGE, "does not exist"),
    (("format", "test", "hub.v1", "{d}/sample.json", "--now", "noon"), USAGE, "RFC 3339"),
    (("format", "test", "hub.v1", "{d}/sample.json", "-p", "no-value"), USAGE, "KEY=VALUE"),
]


@pytest.mark.parametrize(("args", "status", "said"), WALK, ids=[" ".join(case[0]) for case in WALK])
def test_a_mistake_is_one_short_error(folder: Path, args: tuple[str, ...], status: int, said: str) -> None:
    result = _hubd(folder, *args)
    assert result.exit_code != 0, result.output
    if status != ANY:
        assert result.exit_code == status, result.output
    _one_error(result, said)


def test_a_short_initial_password_is_one_short_error(folder: Path) -> None:
    result = _hubd(folder, "hash-password", input="short\n")
    assert result.exit_code == FAILED
    _one_error(result, "use at least 12 characters")


def test_a_missing_config_named_by_the_environment_is_one_short_error(
    folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HUBD_CONFIG", str(folder / "missing.yaml"))
    result = CliRunner().invoke(hubd_main, ["der", "list"])
    assert result.exit_code == CONFIG
    _one_error(result, "cannot read the config file")


# -- hubd run, as systemd starts it -----------------------------------------------------------------------


def _run(config: Path) -> subprocess.CompletedProcess[str]:
    env = {key: value for key, value in os.environ.items() if key != "HUBD_CONFIG"}
    return subprocess.run(
        [sys.executable, "-c", "from hubd.cli import main; main()", "--config", str(config), "run"],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        check=False,
    )


@pytest.fixture
def taken_port() -> Iterator[int]:
    """A loopback port this test's own process listens on, as the system's Mosquitto would on 1883."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        yield taken.getsockname()[1]


def test_run_on_a_busy_port_names_the_holder_and_the_ways_out(folder: Path, taken_port: int) -> None:
    config = folder / "busy.yaml"
    config.write_text(
        f"data_dir: data\nbroker:\n  embedded_port: {taken_port}\nhttp:\n  bind: 127.0.0.1:0\n", encoding="utf-8"
    )
    out = _run(config)
    assert out.returncode == CONFIG, out.stderr
    assert out.stdout == ""
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr
    line = _one_error(out, f"port {taken_port} on 127.0.0.1 is already in use by ")
    assert f"pid {os.getpid()}" in line  # this test's own process holds it
    assert f"broker.url: mqtt://127.0.0.1:{taken_port}" in line  # use that broker,
    assert "sudo systemctl disable --now mosquitto" in line  # or stop the system's one,
    assert "broker.embedded_port" in line  # or move
    assert load_config(config).data_path.joinpath("mosquitto", "mosquitto.conf").exists() is False


def test_run_with_a_bad_config_value_is_one_line_and_the_config_status(folder: Path) -> None:
    out = _run(folder / "bad-int.yaml")
    assert out.returncode == CONFIG
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr
    _one_error(out, "store.batch_max_readings: expected int, got 'many'")
