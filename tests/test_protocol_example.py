"""The worked example of docs/protocol.md (Settlement view) run as written: its commands, its messages, and
the answer it shows, which must be the answer a hub gives."""

from __future__ import annotations

import csv
import io
import json
import re
import shlex
from pathlib import Path
from typing import Any

from conftest import RunningHub

ROOT = Path(__file__).parent.parent
DOC = (ROOT / "docs" / "protocol.md").read_text(encoding="utf-8")
EXAMPLE = DOC[DOC.index("### A worked example") :]


def block(name: str) -> str:
    match = re.search(rf"<!-- example: {name} -->\n```json\n(.*?)\n```", EXAMPLE, re.S)
    assert match, name
    return match[1]


def test_the_worked_example_gives_the_answer_it_shows(hub: RunningHub) -> None:
    commands = re.search(r"```\n(hubd der add.*?)\n```", EXAMPLE, re.S)
    assert commands
    passwords: dict[str, str] = {}
    for line in commands[1].splitlines():
        args = [str(ROOT / a) if a.startswith("tests/") else a for a in shlex.split(line)[1:]]
        result = hub.cli(*args)
        assert result.exit_code == 0, (line, result.output)
        if args[:2] == ["system", "add"]:
            passwords[args[2]] = result.output.strip()
    passwords["PV-0001"] = hub.register("PV-0001", "pv")

    def filled(name: str) -> dict[str, Any]:
        text = block(name)
        for who, password in passwords.items():
            text = text.replace(f"<{who}'s password>", password)
        return dict(json.loads(text))

    sent = hub.rr(f"{hub.prefix}/data", filled("data"))
    assert sent["ok"] and sent["accepted"] == 12, sent
    assert hub.rr(f"{hub.prefix}/plan", filled("plan")) == {"ok": True, "stored": 4, "replaced": 0}
    assert hub.rr(f"{hub.prefix}/plan", filled("revision")) == {"ok": True, "stored": 1, "replaced": 1}
    answer = hub.rr(f"{hub.prefix}/query", filled("query"))
    assert answer == json.loads(block("answer")), json.dumps(answer)
    rows = answer["rows"]
    assert round(sum(r["imbalance_yen"] for r in rows), 4) == 2.95  # the sum the text works out by hand

    command = re.search(r"The same from the\s+command line: `(hubd query[^`]*)`", EXAMPLE)
    assert command
    result = hub.cli(*shlex.split(command[1].replace("\n", " "))[1:])
    assert result.exit_code == 0, result.output
    table = list(csv.DictReader(io.StringIO(result.output)))
    assert [float(r["imbalance_yen"]) for r in table] == [r["imbalance_yen"] for r in rows]
    assert [float(r["completeness"]) for r in table] == [r["completeness"] for r in rows]
