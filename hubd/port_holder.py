"""Who holds a TCP port: the process listening on it, named for an operator's error message.

The usual case is Debian's own ``mosquitto.service`` on 127.0.0.1:1883, where the embedded broker wants to
listen, so "the port is in use" alone leaves the operator guessing. Linux tells the owner's uid and the
socket's inode in ``/proc/net/tcp{,6}`` to anyone, and the process behind the inode to whoever may read that
process's ``/proc/<pid>/fd``; ``ss -ltnp`` is asked only when ``/proc`` says nothing. Whatever cannot be
known is said to be unknown: this never fails, since it only decorates another error.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import pwd
import re
import shutil
import struct
import subprocess
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Holder", "describe_holder", "find_holder"]

_PROC = Path("/proc")
_LISTEN = "0A"  # TCP_LISTEN in the st column of /proc/net/tcp
_SS_USER = re.compile(r'\("([^"]+)",pid=(\d+),')


@dataclass(frozen=True, slots=True)
class Holder:
    """What is known about the listener: any of its fields may be unknown."""

    name: str | None = None
    pid: int | None = None
    user: str | None = None
    hubd_data: str | None = None  # the data directory, when the holder is another hubd's embedded broker

    def __str__(self) -> str:
        details = [f"pid {self.pid}"] if self.pid is not None else []
        if self.user is not None:
            details.append(f"user {self.user}")
        name = self.name or ("a process" if details else "an unknown process")
        if self.hubd_data is not None:
            name = f"the embedded broker of another hubd, data in {self.hubd_data}: {name}"
        return f"{name} ({', '.join(details)})" if details else name


def find_holder(port: int, host: str = "127.0.0.1") -> Holder:
    """The process listening on ``port`` where a client of ``host`` would reach it, as far as it can be known."""
    try:
        wanted = ipaddress.ip_address(host)
    except ValueError:
        wanted = None
    sockets = _listening(port)
    # A listener on the very address first, then one on the wildcard, then any on the port (the same port on
    # another address does not block ours, but it is the best guess left).
    sockets.sort(key=lambda found: (found[0] != wanted, not found[0].is_unspecified))
    for _, uid, inode in sockets:
        pid, name = _process_of(inode)
        if pid is not None:
            return Holder(name, pid, _user(uid), _hubd_data(pid))
    if sockets:
        _, uid, _ = sockets[0]
        from_ss = _ask_ss(port)
        return from_ss if from_ss.pid is not None else Holder(user=_user(uid))
    return _ask_ss(port)


def describe_holder(port: int, host: str = "127.0.0.1") -> str:
    """``find_holder`` as words, e.g. ``mosquitto (pid 812, user mosquitto)``."""
    return str(find_holder(port, host))


def _listening(port: int) -> list[tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int, int]]:
    """(address, owner uid, socket inode) of each socket listening on ``port``, from /proc/net/tcp{,6}."""
    found = []
    for table in ("tcp", "tcp6"):
        try:
            lines = (_PROC / "net" / table).read_text(encoding="ascii").splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) < 10 or fields[3] != _LISTEN:
                continue
            address, _, port_hex = fields[1].partition(":")
            with contextlib.suppress(ValueError):
                if int(port_hex, 16) == port:
                    found.append((_address(address), int(fields[7]), int(fields[9])))
    return found


def _address(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """The kernel prints an address as 32-bit words in the host's byte order."""
    words = [int(text[i : i + 8], 16) for i in range(0, len(text), 8)]
    packed = b"".join(struct.pack("=I", word) for word in words)
    return ipaddress.ip_address(packed)


def _process_of(inode: int) -> tuple[int | None, str | None]:
    """The process that has the socket open: pid and command name, or (None, None) where it is hidden."""
    if inode == 0:
        return None, None
    target = f"socket:[{inode}]"
    try:
        pids = [entry for entry in os.listdir(_PROC) if entry.isdigit()]
    except OSError:
        return None, None
    for pid in pids:
        try:
            descriptors = os.listdir(_PROC / pid / "fd")
        except OSError:  # another user's process, or gone
            continue
        for fd in descriptors:
            try:
                if os.readlink(_PROC / pid / "fd" / fd) == target:
                    return int(pid), _command(int(pid))
            except OSError:
                continue
    return None, None


def _command(pid: int) -> str | None:
    try:
        return (_PROC / str(pid) / "comm").read_text(encoding="utf-8", errors="replace").strip() or None
    except OSError:
        return None


def _hubd_data(pid: int) -> str | None:
    """The data directory of the hubd whose embedded broker ``pid`` is: it runs on ``<data>/mosquitto/mosquitto.conf``
    (hubd.broker), beside ``<data>/hub.sqlite3``. None for any other process."""
    try:
        arguments = (_PROC / str(pid) / "cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return None
    for argument in arguments:
        config = Path(argument)
        if config.name == "mosquitto.conf" and config.parent.name == "mosquitto":
            data = config.parent.parent
            if (data / "hub.sqlite3").exists():
                return str(data)
    return None


def _user(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid {uid}"


def _ask_ss(port: int) -> Holder:
    """``ss -ltnp``, where installed: it shows the process only where /proc would have too, but it is a
    second chance where /proc/net is not readable."""
    ss = shutil.which("ss") or next((p for p in ("/usr/sbin/ss", "/sbin/ss") if os.access(p, os.X_OK)), None)
    if ss is None:
        return Holder()
    try:
        out = subprocess.run(
            [ss, "-Hltnp", f"sport = :{port}"], capture_output=True, text=True, timeout=2, check=False
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return Holder()
    match = _SS_USER.search(out)
    return Holder(match[1], int(match[2])) if match else Holder()
