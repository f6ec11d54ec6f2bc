"""Shared pytest fixtures.

Tests are plain sync functions (no pytest-asyncio): async code runs via asyncio.run or
in a background thread, so fixtures here are sync too.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

# hubd is not installed into the venv; make the checkout importable when pytest is run
# as `.venv/bin/pytest` (which, unlike `python -m pytest`, does not put the cwd on sys.path).
_REPO_ROOT = str(Path(__file__).resolve().parent.parent)
if _REPO_ROOT not in sys.path:
    sys.path.insert(0, _REPO_ROOT)

from hubd.broker import EmbeddedBroker, free_port  # noqa: E402

# -- hygiene ---------------------------------------------------------------------------

THREAD_GRACE_SECONDS = 2.0


@pytest.fixture(autouse=True)
def no_leaked_threads() -> Iterator[None]:
    """Fail a test that leaves non-daemon threads running.

    A leftover non-daemon thread (a hub loop not shut down, an executor not closed)
    keeps the interpreter from exiting and leaks into later tests. Threads get a short
    grace period to finish after the test's own teardown.
    """
    before = set(threading.enumerate())
    yield
    deadline = time.monotonic() + THREAD_GRACE_SECONDS
    leaked: list[threading.Thread] = []
    for thread in threading.enumerate():
        if thread in before or thread.daemon or thread is threading.current_thread():
            continue
        thread.join(timeout=max(0.0, deadline - time.monotonic()))
        if thread.is_alive():
            leaked.append(thread)
    if leaked:
        names = ", ".join(repr(t.name) for t in leaked)
        pytest.fail(f"test left non-daemon threads running: {names}", pytrace=False)


# -- MQTT broker -----------------------------------------------------------------------


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[EmbeddedBroker]:
    """A running embedded Mosquitto on a free loopback port, with its data in tmp_path.

    Use ``broker.url`` (``mqtt://127.0.0.1:<port>``), ``broker.host``/``broker.port``;
    its log is ``broker.log_path``. Stopped (SIGTERM, then SIGKILL) after the test.
    """
    embedded = EmbeddedBroker(tmp_path / "broker-data", port=free_port())
    embedded.start_sync()
    try:
        yield embedded
    finally:
        embedded.stop_sync()
