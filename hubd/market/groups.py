"""Groups in queries: ``"groups": [...]`` (``--group``) stands for the DERs of those groups, beside ``der_ids``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from hubd.model import ErrorCode, HubError


def expand(request: Mapping[str, Any], groups: Mapping[str, tuple[str, ...]], key: str = "groups") -> dict[str, Any]:
    """The request with ``groups`` replaced by their members added to ``der_ids``; an unknown group is
    ``bad_request``, so a mistyped name never reads as "no data"."""
    out = dict(request)
    named = out.pop("groups", None)
    if named is None:
        return out
    if not isinstance(named, list) or not named or not all(isinstance(g, str) for g in named):
        raise HubError(ErrorCode.BAD_REQUEST, f"{key} must be a non-empty list of group names")
    unknown = [g for g in named if g not in groups]
    if unknown:
        raise HubError(ErrorCode.BAD_REQUEST, f"{key}: no such group {unknown[0][:64]!r}")
    der_ids = out.get("der_ids") or []
    if not isinstance(der_ids, list):
        return out  # parse_query says what is wrong with der_ids
    members = [d for g in named for d in groups[g]]
    if not der_ids and not members:  # an empty der_ids would mean every DER
        raise HubError(ErrorCode.BAD_REQUEST, f"{key}: the groups named have no DERs")
    out["der_ids"] = list(dict.fromkeys([*der_ids, *members]))
    return out
