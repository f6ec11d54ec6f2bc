"""The vendor formats a hub serves, kept in step with the definition folders while it runs.

Two folders: the definitions shipped with hubd (``formats/``) and the operator's (``formats.user_dir``); an
operator's definition of the same code wins. ``scan()`` compares each file's size, time and inode (and those
of the map files it reads) with the last scan: a new or changed file is loaded and registered, a removed one
is unregistered. A definition that does not load is refused and changes nothing: the version loaded before
keeps serving. The hub scans every ``formats.poll_s`` seconds; each change is one ``Change``, which the hub
writes to the audit trail.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from hubd import decode
from hubd.decode.vendor.language import DefinitionError, FormatDefinition
from hubd.decode.vendor.load import SUFFIXES, code_of, load_definition
from hubd.model import HubError

Stamp = tuple[tuple[int, int, int], ...]


@dataclass(frozen=True)
class Change:
    event: Literal["format.loaded", "format.refused", "format.removed"]
    code: str
    file: str
    reason: str | None = None


@dataclass
class _File:
    stamp: Stamp
    definition: FormatDefinition | None = None  # the last version that loaded
    error: str | None = None  # why the current version did not


@dataclass
class Catalog:
    """Definitions by code from the shipped and the user folder (later folders win)."""

    folders: list[Path]
    register: bool = True  # False: only read (the CLI), leave the process's registry alone
    active: dict[str, FormatDefinition] = field(default_factory=dict)
    _files: dict[Path, _File] = field(default_factory=dict)

    def scan(self) -> list[Change]:
        changes: list[Change] = []
        present: list[Path] = []
        for folder in self.folders:
            present += _definition_files(folder)
        for path in list(self._files):
            if path not in present:
                del self._files[path]
        for path in present:
            state = self._files.get(path)
            stamp = _stamp(path, state)
            if state is not None and state.stamp == stamp:
                continue
            try:
                definition = load_definition(path)
            except DefinitionError as exc:
                reason = str(exc)
                if state is None:
                    state = self._files[path] = _File(stamp)
                state.stamp, state.error = stamp, reason
                changes.append(Change("format.refused", code_of(path), str(path), reason))
                continue
            if state is None:
                state = self._files[path] = _File(stamp)
            state.definition, state.error = definition, None
            state.stamp = _stamp(path, state)  # now with the map files it reads
        wanted: dict[str, FormatDefinition] = {}
        for path in present:  # folder order, so the user folder's definition of a code wins
            state = self._files.get(path)
            if state is not None and state.definition is not None:
                wanted[state.definition.code] = state.definition
        for code, definition in wanted.items():
            if self.active.get(code) is not definition:
                if self.register:
                    decode.register(code)(definition.decoder)
                changes.append(Change("format.loaded", code, str(definition.path)))
            elif self.register and not _registered(code, definition):
                decode.register(code)(definition.decoder)  # another catalog in this process took it away
        for code, definition in list(self.active.items()):
            if code not in wanted:
                if self.register:
                    decode.unregister(code)
                changes.append(Change("format.removed", code, str(definition.path)))
        self.active = wanted
        return changes

    def errors(self) -> dict[Path, str]:
        """Files whose current version was refused, with the reason."""
        return {path: state.error for path, state in self._files.items() if state.error}

    def find(self, code: str) -> FormatDefinition | None:
        return self.active.get(code)

    def close(self) -> None:
        """Unregister the formats this catalog registered (and that no other catalog has since replaced)."""
        if self.register:
            for code, definition in self.active.items():
                if _registered(code, definition):
                    decode.unregister(code)
        self.active = {}
        self._files = {}


def _registered(code: str, definition: FormatDefinition) -> bool:
    try:
        return decode.decoder_for(code) is definition.decoder
    except HubError:
        return False


def _definition_files(folder: Path) -> list[Path]:
    try:
        return sorted(p for p in folder.iterdir() if p.suffix in SUFFIXES and not p.name.startswith("."))
    except OSError:  # no such folder (yet): no definitions
        return []


def _stamp(path: Path, state: _File | None) -> Stamp:
    """What tells a changed file: size, modification time and inode, of the file and of its map files.

    A refused file is also retried when its folder changes (a map file it missed may have arrived).
    """
    files = [path]
    if state is not None and state.definition is not None:
        files += state.definition.depends
    if state is not None and state.error is not None:
        files.append(path.parent)
    stamps = []
    for file in files:
        try:
            info = file.stat()
        except OSError:
            stamps.append((0, 0, 0))
            continue
        stamps.append((info.st_size, info.st_mtime_ns, info.st_ino))
    return tuple(stamps)
