"""``pip install`` of this checkout into a fresh virtual environment, then ``hubd demo`` from elsewhere.

What a person gets who installs hubd and never looks into the repository: the console script works, the
shipped vendor format definitions and the embedded broker's template came along inside the package, and the
demo decodes a vendor-format message with them. The build runs on a copy of the checkout, so that it
leaves nothing in the working tree and two runs at once do not share a build folder.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from hubd.broker import free_port

ROOT = Path(__file__).resolve().parent.parent
NOT_SOURCE = shutil.ignore_patterns(
    ".git", ".venv", "__pycache__", "*.egg-info", "build", "dist", "var", ".*_cache", ".hypothesis", "tests", "bench"
)

# What the installed package must carry besides its modules, as found in the checkout.
PACKAGE_DATA = sorted(
    [
        *(p.relative_to(ROOT).as_posix() for p in (ROOT / "hubd" / "formats").glob("*.yaml")),
        "hubd/mosquitto/embedded.conf.in",
        "hubd/py.typed",
    ]
)

FILES_OF_HUBD = """
import importlib.metadata, json, hubd
files = importlib.metadata.files("hubd") or []
print(json.dumps({"module": hubd.__file__, "files": sorted(f.as_posix() for f in files if f.parts[0] == "hubd")}))
"""


def clean_env(**extra: str) -> dict[str, str]:
    """The environment of a person's shell: nothing that points Python back at the checkout."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "HUBD_CONFIG", "VIRTUAL_ENV")}
    return {**env, **extra}


@pytest.mark.timeout(900)
def test_pip_install_outside_the_checkout_runs_the_demo(tmp_path: Path) -> None:
    assert len(PACKAGE_DATA) > 2, "the checkout ships format definitions under hubd/formats/"
    source = tmp_path / "hubd-source"
    shutil.copytree(ROOT, source, ignore=NOT_SOURCE)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    install = subprocess.run(
        [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", str(source)],
        cwd=tmp_path,
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=780,
        check=False,
    )
    assert install.returncode == 0, f"pip install failed:\n{install.stdout}\n{install.stderr}"

    away = tmp_path / "elsewhere"
    away.mkdir()
    found = subprocess.run(
        [str(python), "-c", FILES_OF_HUBD], cwd=away, env=clean_env(), capture_output=True, text=True, timeout=60
    )
    assert found.returncode == 0, found.stderr
    installed = json.loads(found.stdout)
    assert Path(installed["module"]).is_relative_to(venv), "hubd was imported from the new environment"
    missing = sorted(set(PACKAGE_DATA) - set(installed["files"]))
    assert not missing, f"the installed package lacks {missing}"

    port = free_port()
    demo = subprocess.run(
        [str(venv / "bin" / "hubd"), "demo", "--minutes", "1", "--port", str(port)],
        cwd=away,
        env=clean_env(TMPDIR=str(away)),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert demo.returncode == 0, f"hubd demo exited {demo.returncode}\n{demo.stdout}\n{demo.stderr}"
    assert f"Mosquitto on mqtt://127.0.0.1:{port}" in demo.stdout
    vendor = [text for text in demo.stdout.splitlines() if "format solaredge.site_power" in text]
    assert len(vendor) == 1 and vendor[0].endswith("accepted 7"), demo.stdout
    assert "chain intact" in demo.stdout, demo.stdout
