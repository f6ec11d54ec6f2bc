"""``--config`` goes before or after the subcommand, as people write it; after wins; ``HUBD_CONFIG`` still works.

Two hubs' worth of data dirs side by side: which one a command touched shows which config it read.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from hubd.cli import main


@pytest.fixture
def configs(tmp_path: Path) -> tuple[str, str]:
    """Two configs, each with its own data dir and one DER on its allowlist (added the old way: before)."""
    paths = []
    for name in ("a", "b"):
        path = tmp_path / f"{name}.yaml"
        path.write_text(f"data_dir: {tmp_path / ('data-' + name)}\n", encoding="utf-8")
        assert invoke("--config", str(path), "der", "add", f"{name.upper()}-0001").exit_code == 0
        paths.append(str(path))
    return paths[0], paths[1]


def invoke(*args: str, env: dict[str, str] | None = None) -> Result:
    return CliRunner().invoke(main, list(args), env=env)


def listed(result: Result) -> list[str]:
    assert result.exit_code == 0, result.output
    return [line.split("\t")[0] for line in result.output.splitlines()]


def test_config_after_the_subcommand(configs: tuple[str, str]) -> None:
    a, b = configs
    assert listed(invoke("der", "list", "--config", a)) == ["A-0001"]
    assert listed(invoke("der", "--config", b, "list")) == ["B-0001"]  # after the group, before its command
    assert invoke("der", "add", "A-0002", "--config", a).exit_code == 0
    assert listed(invoke("--config", a, "der", "list")) == ["A-0001", "A-0002"]
    assert invoke("system", "add", "market-1", "--role", "consumer", "--config", b).exit_code == 0
    assert listed(invoke("system", "list", "--config", b))[0] == "market-1"
    assert listed(invoke("--config", a, "system", "list")) == []
    assert "ok: " in invoke("audit", "verify", "--config", b).output
    assert invoke("format", "list", "--config", a).exit_code == 0


def test_after_wins_over_before_and_over_the_environment(configs: tuple[str, str]) -> None:
    a, b = configs
    assert listed(invoke("--config", a, "der", "list", "--config", b)) == ["B-0001"]
    assert listed(invoke("der", "list", env={"HUBD_CONFIG": a})) == ["A-0001"]
    assert listed(invoke("der", "list", "--config", b, env={"HUBD_CONFIG": a})) == ["B-0001"]
    assert listed(invoke("--config", b, "der", "list", env={"HUBD_CONFIG": a})) == ["B-0001"]


def test_every_command_takes_it() -> None:
    """The README says all commands take ``--config``: each command's help lists it."""

    def walk(group: object, path: tuple[str, ...]) -> list[tuple[str, ...]]:
        found = []
        for name, command in getattr(group, "commands", {}).items():
            found.append((*path, name))
            found += walk(command, (*path, name))
        return found

    for path in walk(main, ()):
        assert "--config FILE" in invoke(*path, "--help").output, path
