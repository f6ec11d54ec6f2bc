"""``hubd status``: the running hub's /readyz as lines for a terminal, and an exit status for scripts.

0: ready; 1: the hub answers but is not ready (the broker gone, a source down, stopping); 3: no answer (not
running, or not on that address), as LSB init scripts use 3 for "not running".
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any

READY, NOT_READY, NO_ANSWER = 0, 1, 3


def report(url: str | None) -> tuple[int, str]:
    """(exit status, text) for the hub listening at ``url``."""
    if url is None:
        return NO_ANSWER, "hubd: no HTTP listener configured (http.bind is null); give --url"
    if url.endswith(":0/"):
        return NO_ANSWER, "hubd: http.bind has port 0 (a free one, chosen at start); give --url"
    try:
        with urllib.request.urlopen(url.rstrip("/") + "/readyz", timeout=5) as response:
            body = json.load(response)
    except urllib.error.HTTPError as exc:
        if exc.code != 503:
            return NO_ANSWER, f"hubd: unexpected answer from {url}: HTTP {exc.code}"
        body = json.load(exc)
    except (OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        return NO_ANSWER, f"hubd: no answer at {url} ({reason}): not running?"
    return (READY if body.get("ready") else NOT_READY), report_lines(body)


def report_lines(body: dict[str, Any]) -> str:
    checks = body.get("checks", {})
    counts = body.get("counts", {})
    head = "ready" if body.get("ready") else "NOT READY" + (" (stopping)" if body.get("stopping") else "")
    lines = [f"hubd: {head}"]
    broker = checks.get("broker", {})
    lines.append(f"  broker:  {'connected' if broker.get('ok') else 'NOT CONNECTED'} ({broker.get('address')})")
    store = checks.get("store", {})
    spooling = f", spooling {store['spooled_readings']} readings" if store.get("spooled_readings") else ""
    lines.append(f"  store:   {'writing' if store.get('ok') else 'NOT WRITING'} ({store.get('backend')}{spooling})")
    for source in checks.get("sources", {}).get("sources", []):
        lines.append(f"  source:  {source['kind']} {source['name']}: {source['state']}")
    lines.append(f"  messages received: {counts.get('messages_received', 0)}")
    lines.append(f"  readings stored: {counts.get('readings_stored', 0)}")
    refused = counts.get("readings_refused") or {}
    lines.append("  readings refused: " + (", ".join(f"{k} {v}" for k, v in refused.items()) or "none"))
    kept = counts.get("messages_quarantined") or {}
    lines.append("  messages quarantined: " + (", ".join(f"{k} {v}" for k, v in kept.items()) or "none"))
    lines.append(
        f"  waiting for a commit: {counts.get('store_queue_messages', 0)} messages, "
        f"{counts.get('store_queue_readings', 0)} readings"
    )
    if body.get("url"):
        lines.append(f"  status page: {body['url']}")
    return "\n".join(lines)
