"""Load one definition file: read, check, build its decoder. The file name is the format code."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hubd.auth.registry import ID_PATTERN
from hubd.decode.registry import Decoder
from hubd.decode.vendor.kinds import build_binary, build_csv, build_json
from hubd.decode.vendor.language import (
    CODE_PATTERN,
    RESERVED_CODES,
    Context,
    DefinitionError,
    FormatDefinition,
    read_document,
    text,
)

SUFFIXES = (".yaml", ".yml")
KINDS = ("json", "csv", "binary", "hook")

# A hook: (the definition, its checking context, the code, the constant source_id) -> a decoder. It checks its
# own keys and raises DefinitionError like the declarative kinds. Named hooks ship with hubd; any other is
# written as module:function and imported.
Hook = Callable[[Context, dict[str, Any], str, str | None], Decoder]
HOOKS = {"echonet_lite": "hubd.decode.vendor.echonet:build"}


def code_of(path: Path) -> str:
    """The format code a definition file stands for: its name without .yaml / .yml."""
    return path.name[: -len(path.suffix)] if path.suffix in SUFFIXES else path.name


def load_definition(path: Path) -> FormatDefinition:
    """Read, check and build ``path``; raise DefinitionError naming the file, the key and the problem."""
    document, source_text = read_document(path)
    file = str(path)
    code = code_of(path)
    if path.suffix not in SUFFIXES:
        raise DefinitionError(file, "", "a definition file is named <format code>.yaml")
    if not CODE_PATTERN.match(code):
        raise DefinitionError(
            file, "", f"{code!r} is no format code: 1-64 letters, digits and ._- (one topic level), from the file name"
        )
    if code in RESERVED_CODES:
        raise DefinitionError(file, "", f"{code!r} is the hub's native format and cannot be redefined")
    if "code" in document and document["code"] != code:
        raise DefinitionError(file, "code", f"{document['code']!r} differs from the file name's code {code!r}")
    kind = document.get("kind")
    if kind not in KINDS:
        raise DefinitionError(file, "kind", f"must be one of {', '.join(KINDS)}, got {kind!r}")
    description = document.get("description", "")
    if not isinstance(description, str):
        raise DefinitionError(file, "description", "expected a string")
    source_id = document.get("source_id")
    if source_id is not None and (not isinstance(source_id, str) or not ID_PATTERN.match(source_id)):
        raise DefinitionError(file, "source_id", "1-64 characters of letters, digits and ._:- (a constant)")
    ctx = Context(file, path.parent, "json")
    if kind == "json":
        decoder = build_json(ctx, document, code, source_id)
    elif kind == "csv":
        ctx.kind = "csv"
        decoder = build_csv(ctx, document, code, source_id)
    elif kind == "binary":
        ctx.kind = "binary"
        decoder = build_binary(ctx, document, code, source_id)
    else:
        decoder = _hook(ctx, document)(ctx, document, code, source_id)
    return FormatDefinition(code, kind, description, path, decoder, tuple(ctx.depends), source_text)


def _hook(ctx: Context, document: dict[str, Any]) -> Hook:
    name = text(ctx, "hook", document.get("hook"))
    target = HOOKS.get(name, name)
    module_name, _, attribute = target.partition(":")
    if not attribute:
        known = ", ".join(HOOKS)
        raise ctx.error("hook", f"{name!r} is neither a hook of hubd ({known}) nor module:function")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ctx.error("hook", f"cannot import {module_name!r} ({exc})") from None
    found = getattr(module, attribute, None)
    if not callable(found):
        raise ctx.error("hook", f"{module_name!r} has no function {attribute!r}")
    hook: Hook = found
    return hook
