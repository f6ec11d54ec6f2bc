"""Progress on stderr for the commands that can take seconds: ``audit verify``, ``der import``, ``query``.

Only a person watching a terminal wants it. When stderr is not a terminal (a pipe, a log file, cron, a test)
nothing at all is written, so scripts and logs see exactly what they saw before.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

import click

T = TypeVar("T")


def watched() -> bool:
    """True when stderr is a terminal, i.e. someone may be waiting in front of it."""
    return sys.stderr.isatty()


@contextmanager
def bar(length: int, label: str) -> Iterator[Callable[[int], None]]:
    """A bar over ``length`` units; yields ``reached(position)``, to call now and then with the units done."""
    if not watched():
        yield lambda _position: None
        return
    with click.progressbar(length=length, label=label, file=sys.stderr) as shown:
        yield lambda position: shown.update(position - shown.pos)


@contextmanager
def each(items: list[T], label: str) -> Iterator[Iterator[T]]:
    """``items`` as they are worked through, with a bar when watched.

    The bar moves in 1/200 steps: click's bar redrawn for every item cost more than importing a DER did.
    """
    with bar(len(items), label) as reached:
        yield _counted(items, reached, max(1, len(items) // 200))


def _counted(items: list[T], reached: Callable[[int], None], step: int) -> Iterator[T]:
    for done, item in enumerate(items, start=1):
        yield item
        if done % step == 0:
            reached(done)
    reached(len(items))


class Counter:
    """A count that grows toward an unknown total (rows read so far), on one line erased when done."""

    def __init__(self, label: str) -> None:
        self._label = label
        self._shown = False

    def __call__(self, count: int) -> None:
        if watched():
            click.echo(f"\r{self._label}: {count}", nl=False, err=True)
            self._shown = True

    def done(self) -> None:
        if self._shown:
            click.echo("\r\033[K", nl=False, err=True)
            self._shown = False
