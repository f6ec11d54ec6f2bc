"""``hubd edge ...``: an edge terminal on the command line, for integrators and for trying the hub out.

``register`` keeps the issued password in a file of its own (0600); ``send`` sends readings from a CSV or
JSON Lines file or stdin and answers the hub's time checks meanwhile; ``serve`` only answers time checks and
set commands. All three speak the protocol through ``hubd.client.EdgeTerminal``.
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import getpass
import io
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click
import orjson

from hubd.client import EdgeTerminal, TerminalClock, load_passwords, save_password
from hubd.model import DER_TYPES, FIELDS


def _broker_options(command: Any) -> Any:
    for option in reversed(
        [
            click.option(
                "--broker",
                envvar="HUBD_BROKER",
                default="mqtt://127.0.0.1:1883",
                show_default=True,
                help="The hub's MQTT broker (env HUBD_BROKER).",
            ),
            click.option("--prefix", default="hub/v1", show_default=True, help="The hub's topic prefix."),
            click.option("--username", default=None, help="The broker's user name for this terminal."),
            click.option(
                "--password-file",
                type=click.Path(dir_okay=False, exists=True),
                help="A file holding the broker password (with --username).",
            ),
            click.option(
                "--client-id",
                default=None,
                help="A fixed MQTT client id (with access control at the broker: the user name itself).",
            ),
        ]
    ):
        command = option(command)
    return command


def _terminal(
    options: dict[str, Any], source_id: str, clock: TerminalClock | None = None, answer_time: bool = True
) -> EdgeTerminal:
    password = Path(options["password_file"]).read_text().strip() if options.get("password_file") else None
    return EdgeTerminal(
        options["broker"],
        source_id,
        prefix=options["prefix"],
        clock=clock,
        answer_time=answer_time,
        username=options.get("username"),
        password=password,
        client_id=options.get("client_id"),
    )


@click.group("edge")
def edge_group() -> None:
    """Act as an edge terminal: register DERs, send readings, answer the hub's time checks."""


@edge_group.command("register")
@click.argument("der_id")
@click.option(
    "--passwords",
    "passwords_path",
    required=True,
    type=click.Path(dir_okay=False),
    help="Where the issued password is kept (JSON, mode 0600; other DERs' entries are kept).",
)
@click.option("--type", "der_type", type=click.Choice(DER_TYPES), default=None)
@click.option("--name", default=None)
@_broker_options
def edge_register(der_id: str, passwords_path: str, der_type: str | None, name: str | None, **options: Any) -> None:
    """Register DER_ID with the hub's initial password (env HUBD_INITIAL_PASSWORD, else asked for)."""
    initial = os.environ.get("HUBD_INITIAL_PASSWORD") or getpass.getpass("initial password: ")
    details = {k: v for k, v in (("type", der_type), ("name", name)) if v is not None}

    async def register() -> dict[str, Any]:
        # It sends no data, so the hub checks no clock of it: it listens for its answer alone.
        async with _terminal(options, f"register-{der_id}", answer_time=False) as terminal:
            return await terminal.register(der_id, initial, **details)

    answer = _run(register())
    if not answer.get("ok"):
        error = answer.get("error", {})
        raise click.ClickException(f"{der_id}: {error.get('code')}: {error.get('message')}")
    save_password(Path(passwords_path), der_id, answer["password"])
    click.echo(f"{der_id} registered; its password is kept in {passwords_path} (mode 0600)")


@edge_group.command("send")
@click.argument("file", type=click.File("r", encoding="utf-8"), default="-")
@click.option("--source-id", required=True, help="This terminal's source id (its time checks come to it).")
@click.option(
    "--passwords",
    "passwords_path",
    required=True,
    type=click.Path(dir_okay=False, exists=True),
    help="The file `hubd edge register` kept the DERs' passwords in.",
)
@click.option(
    "--format", "kind", type=click.Choice(["csv", "jsonl"]), default=None, help="Default: by suffix, else jsonl."
)
@click.option("--batch", default=500, show_default=True, type=click.IntRange(1, 10000), help="Readings per message.")
@click.option("--stay", default=0.0, type=float, help="Seconds to keep answering time checks after the input ends.")
@click.option("--clock-file", type=click.Path(dir_okay=False), help="Keep the clock correction here between runs.")
@_broker_options
def edge_send(
    file: io.TextIOBase,
    source_id: str,
    passwords_path: str,
    kind: str | None,
    batch: int,
    stay: float,
    clock_file: str | None,
    **options: Any,
) -> None:
    """Send the readings in FILE (CSV with a header, or one JSON object a line; `-`: stdin).

    Each reading needs der_id and a quantity; measured_at is stamped now when left out. Readings go --batch at a
    time, the rest when the input ends. Exits 1 when a reading is refused or a message is not answered."""
    passwords = load_passwords(Path(passwords_path))
    name = getattr(file, "name", "-")
    kind = kind or ("csv" if str(name).endswith(".csv") else "jsonl")
    clock = _load_clock(clock_file)

    async def send() -> int:
        failures = 0
        async with _terminal(options, source_id, clock) as terminal:
            for chunk in _chunks(_readings(file, kind, passwords), batch):
                try:
                    answer = await terminal.send(chunk)
                except TimeoutError:
                    click.echo(f"no answer for {len(chunk)} readings (send them again later)", err=True)
                    failures += 1
                    continue
                if not answer.get("ok"):
                    click.echo(f"refused: {answer['error']['code']}: {answer['error']['message']}", err=True)
                    failures += 1
                    continue
                for refused in answer["rejected"]:
                    error = refused["error"]
                    click.echo(
                        f"reading {refused['index']} ({refused['der_id']}): {error['code']}: {error['message']}",
                        err=True,
                    )
                    failures += 1
                click.echo(f"accepted {answer['accepted']}, rejected {len(answer['rejected'])}")
                _save_clock(clock_file, clock)
            if stay > 0:
                await asyncio.sleep(stay)
        _save_clock(clock_file, clock)
        return failures

    if _run(send()):
        sys.exit(1)


@edge_group.command("serve")
@click.option("--source-id", required=True, help="This terminal's source id.")
@click.option("--set-system-clock", is_flag=True, help="Set the system clock when told to (needs CAP_SYS_TIME).")
@click.option("--for", "seconds", type=float, default=None, help="Stop after this many seconds (default: never).")
@click.option("--clock-file", type=click.Path(dir_okay=False), help="Keep the clock correction here between runs.")
@_broker_options
def edge_serve(
    source_id: str, set_system_clock: bool, seconds: float | None, clock_file: str | None, **options: Any
) -> None:
    """Answer the hub's time checks and set commands for SOURCE_ID until stopped."""
    clock = _load_clock(clock_file)
    clock.set_system = set_system_clock

    async def serve() -> None:
        async with _terminal(options, source_id, clock) as terminal:
            click.echo(f"answering time checks for {source_id}", err=True)
            done = 0
            waited = 0.0
            while seconds is None or waited < seconds:
                await asyncio.sleep(0.5)
                waited += 0.5
                for offset in terminal.corrections[done:]:
                    click.echo(f"told to correct the clock by {-offset:+.3f} s", err=True)
                done = len(terminal.corrections)
                _save_clock(clock_file, clock)

    with contextlib.suppress(KeyboardInterrupt):
        _run(serve())


def _run(work: Any) -> Any:
    try:
        return asyncio.run(work)
    except (OSError, ConnectionError) as exc:
        raise click.ClickException(f"cannot reach the broker: {exc}") from None
    except TimeoutError:
        raise click.ClickException("the hub did not answer (is it running, on this broker and prefix?)") from None


def _load_clock(path: str | None) -> TerminalClock:
    clock = TerminalClock()
    if path and Path(path).exists():
        clock.correction_s = float(orjson.loads(Path(path).read_bytes()).get("correction_s", 0.0))
    return clock


def _save_clock(path: str | None, clock: TerminalClock) -> None:
    if path:
        Path(path).write_bytes(orjson.dumps({"correction_s": clock.correction_s}))


def _readings(file: io.TextIOBase, kind: str, passwords: dict[str, str]) -> Iterator[dict[str, Any]]:
    """The readings of the input, each with its DER's password from the passwords file."""
    if kind == "csv":
        rows: Iterator[dict[str, Any]] = (
            {k: _value(k, v) for k, v in row.items() if k and v not in (None, "")} for row in csv.DictReader(file)
        )
    else:
        rows = (orjson.loads(line) for line in file if line.strip())
    for number, row in enumerate(rows, 1):
        if not isinstance(row, dict) or not isinstance(row.get("der_id"), str):
            raise click.ClickException(f"reading {number}: needs a der_id")
        password = passwords.get(row["der_id"])
        if password is None:
            raise click.ClickException(f"reading {number}: no password kept for {row['der_id']} (hubd edge register)")
        yield {**row, "password": password}


def _value(key: str, text: str) -> Any:
    """A CSV cell: quantities are numbers, the rest text (measured_at: RFC 3339, or epoch ms if all digits)."""
    if key in FIELDS:
        try:
            return float(text)
        except ValueError:
            return text  # the hub refuses it, naming the field
    if key == "measured_at" and text.isdigit():
        return int(text)
    return text


def _chunks(readings: Iterator[dict[str, Any]], size: int) -> Iterator[list[dict[str, Any]]]:
    chunk: list[dict[str, Any]] = []
    for reading in readings:
        chunk.append(reading)
        if len(chunk) >= size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk
