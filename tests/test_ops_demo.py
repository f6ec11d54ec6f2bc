"""``hubd demo --keep``: the demo says where its status page is and leaves the hub serving it until Ctrl-C."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

HUBD = Path(sys.executable).parent / "hubd"


def test_demo_keep_serves_the_page_until_ctrl_c(tmp_path: Path) -> None:
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    env.pop("HUBD_CONFIG", None)
    demo = subprocess.Popen(
        [str(HUBD), "demo", "--minutes", "1", "--keep"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert demo.stdout is not None
        said: list[str] = []
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            text = demo.stdout.readline()
            assert text, f"the demo ended early:\n{''.join(said)}"
            said.append(text)
            if "Ctrl-C stops it" in text:
                break
        page = re.search(
            r"Its status page: (http://127\.0\.0\.1:\d+/) \(log in as viewer-1, password in (\S+)\)", "".join(said)
        )
        assert page, "".join(said)
        assert Path(page[2]).stat().st_mode & 0o077 == 0, "the viewer's password file is the user's alone"
        time.sleep(1.0)  # still serving after the demo's own steps
        with urllib.request.urlopen(page[1] + "readyz", timeout=10) as response:
            assert json.load(response)["ready"] is True
        with urllib.request.urlopen(page[1] + "login", timeout=10) as response:
            assert b'id="login"' in response.read()
        demo.send_signal(signal.SIGINT)  # Ctrl-C
        out, err = demo.communicate(timeout=30)
    finally:
        if demo.poll() is None:
            demo.kill()
            demo.communicate()
    assert demo.returncode == 0, err
    assert "The hub stopped cleanly" in out and "chain intact" in out
    assert "Traceback" not in err
