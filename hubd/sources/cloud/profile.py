"""Cloud profiles: a vendor's Web API described as data (``drivers/cloud/<name>.yaml``), checked when loaded.

A profile says where the API is, how to authenticate, how one window of one site is asked for (a request
template with ``{site}``, ``{start}`` and ``{end}``, the times rendered in the vendor's zone and format), how
pages follow each other, which format code decodes an answer, and what the vendor allows (daily requests,
requests at once). docs/operations.md, Cloud sources, documents every key with a worked example.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import msgspec
import yaml

from hubd.config import CloudSourceConfig, Config, ConfigError

SHIPPED = Path(__file__).resolve().parent.parent.parent / "drivers" / "cloud"


class _Spec(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    pass


class AuthSpec(_Spec, frozen=True, kw_only=True):
    """One credential a request carries. ``secret`` names a secret the source's ``secrets`` maps to a file."""

    kind: Literal["header", "query", "bearer", "oauth2_client_credentials"]
    name: str | None = None  # the header or query parameter (header, query)
    secret: str | None = None  # header, query, bearer: the secret's name
    prefix: str = ""  # header: put before the secret ("Token ")
    token_url: str | None = None  # oauth2: absolute, or a path on base_url's host (/oauth/token)
    client_id: str | None = None  # oauth2: the secret holding the client id
    client_secret: str | None = None  # oauth2: the secret holding the client secret
    scope: str | None = None


class PagingSpec(_Spec, frozen=True, kw_only=True):
    """How the pages of one window follow each other."""

    kind: Literal["none", "page", "cursor", "link"] = "none"
    param: str | None = None  # page: the page number's parameter; cursor: the cursor's parameter
    first: int = 1  # page: the first page's number
    size_param: str | None = None  # page: the page size's parameter (optional)
    size: Annotated[int, msgspec.Meta(ge=1)] | None = None  # page: the page size asked for
    items: str | None = None  # page: dotted path to the page's list; an empty or short list is the last page
    next: str | None = None  # cursor: dotted path to the next cursor in the body; missing/null/"" ends
    max_pages: Annotated[int, msgspec.Meta(ge=1, le=100000)] = 1000


class RequestSpec(_Spec, frozen=True, kw_only=True):
    """One request per site and window; its answer is decoded by ``format``."""

    path: str  # under base_url, with {site}, {start}, {end}
    query: dict[str, str] = {}
    headers: dict[str, str] = {}
    format: str
    role: str | None = None  # which of a site's DERs its readings are for, when a site has several
    paging: PagingSpec = PagingSpec()


class CorrectionSpec(_Spec, frozen=True, kw_only=True):
    """A request the vendor offers to set its (or its devices') clock right, sent when the clock is off."""

    method: Literal["POST", "PUT", "GET"] = "POST"
    path: str  # under base_url, with {site}
    body: dict[str, Any] | None = None  # sent as JSON


class ClockSpec(_Spec, frozen=True, kw_only=True):
    """The vendor's time endpoint: asked once per poll, its answer against the round trip's midpoint."""

    path: str  # under base_url
    field: str  # dotted path to the time in its JSON answer
    time_format: Literal["epoch_s", "epoch_ms", "iso"] = "epoch_ms"
    correction: CorrectionSpec | None = None


class Profile(_Spec, frozen=True, kw_only=True):
    """A vendor cloud's Web API (docs/operations.md, Cloud sources)."""

    description: str = ""
    base_url: str
    auth: list[AuthSpec] = []
    zone: str = "UTC"  # the zone {start}/{end} are rendered in (a source's zone: wins)
    time_format: str = "iso"  # epoch_s, epoch_ms, iso (RFC 3339 with offset), or a strftime pattern (local)
    inclusive_end: bool = False  # the API includes its end time: {end} is rendered one second earlier
    interval_s: Annotated[int, msgspec.Meta(ge=1, le=86400)] = 900  # the data's interval; windows align to it
    window_s: Annotated[int, msgspec.Meta(ge=60, le=366 * 86400)] = 86400  # the longest window one request asks
    delay_s: Annotated[int, msgspec.Meta(ge=0, le=7 * 86400)] = 0  # how long after an interval its data is there
    daily_requests: Annotated[int, msgspec.Meta(ge=1)] | None = None  # null: no budget
    concurrency: Annotated[int, msgspec.Meta(ge=1, le=64)] = 2
    requests: list[RequestSpec]
    clock: ClockSpec | None = None  # null: the clock from each answer's Date header

    @property
    def formats(self) -> list[str]:
        return [request.format for request in self.requests]


def folders(config: Config) -> list[Path]:
    """Where cloud profiles are: those shipped with hubd, then the operator's (which win on a name)."""
    return [SHIPPED, config.drivers_user_path / "cloud"]


def load_profile(config: Config, name: str) -> Profile:
    """The profile ``name``: the operator's own first, else the shipped one; a bad one raises ConfigError."""
    for folder in reversed(folders(config)):
        file = folder / f"{name}.yaml"
        if file.exists():
            return parse_profile(file)
    where = " or ".join(str(folder) for folder in folders(config))
    raise ConfigError(f"cloud profile {name}: no {name}.yaml in {where}")


def check_zones(config: Config, source: CloudSourceConfig, profile: Profile) -> None:
    """A format that reads the answer's local times in a zone other than the one the windows are asked in
    (the source's ``zone``, else the profile's) would move every reading by the difference: refused, naming
    both files and keys. A format with no local times, or not found here (named elsewhere), is not judged."""
    asked_in = source.zone or profile.zone
    asked_key = (
        f"source {source.name}: zone" if source.zone else f"cloud profile {_file_of(config, source.profile)}: zone"
    )
    for index, request in enumerate(profile.requests):
        for folder in (config.formats_user_path, config.formats_shipped_path):
            found = [folder / f"{request.format}{suffix}" for suffix in (".yaml", ".yml")]
            file = next((f for f in found if f.is_file()), None)
            if file is None:
                continue
            try:
                measured = yaml.safe_load(file.read_text(encoding="utf-8"))["reading"]["measured_at"]
            except (OSError, UnicodeDecodeError, yaml.YAMLError, TypeError, KeyError):
                break  # the format's own mistakes are named when it is loaded
            if isinstance(measured, dict) and measured.get("time") == "local" and measured.get("zone") != asked_in:
                raise ConfigError(
                    f"{asked_key} is {asked_in}, but requests[{index}]'s format {request.format} ({file}) reads "
                    f"reading.measured_at in zone {measured.get('zone')}: they must be the same zone"
                )
            break


def _file_of(config: Config, name: str) -> Path:
    for folder in reversed(folders(config)):
        if (folder / f"{name}.yaml").exists():
            return folder / f"{name}.yaml"
    return Path(f"{name}.yaml")


def parse_profile(file: Path) -> Profile:
    try:
        document = yaml.safe_load(file.read_text(encoding="utf-8"))
        profile = msgspec.convert(document, Profile)
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise ConfigError(f"cloud profile {file}: cannot be read: {' '.join(str(exc).split())}") from None
    except msgspec.ValidationError as exc:
        raise ConfigError(f"cloud profile {file}: {exc}") from None
    _check(profile, file)
    return profile


def _check(profile: Profile, file: Path) -> None:
    """What the types cannot say; every mistake named with its key."""

    def bad(key: str, why: str) -> ConfigError:
        return ConfigError(f"cloud profile {file}: {key}: {why}")

    if not profile.base_url.startswith(("http://", "https://")):
        raise bad("base_url", "must start with http:// or https://")
    zone_of(profile.zone, f"cloud profile {file}: zone")
    if profile.window_s % profile.interval_s:
        raise bad("window_s", "must be a multiple of interval_s")
    if not profile.requests:
        raise bad("requests", "give at least one request")
    for index, auth in enumerate(profile.auth):
        key = f"auth[{index}]"
        if auth.kind in ("header", "query") and not (auth.name and auth.secret):
            raise bad(key, f"{auth.kind} needs name and secret")
        if auth.kind == "bearer" and not auth.secret:
            raise bad(key, "bearer needs secret")
        if auth.kind == "oauth2_client_credentials" and not (auth.token_url and auth.client_id and auth.client_secret):
            raise bad(key, "oauth2_client_credentials needs token_url, client_id and client_secret")
    for index, request in enumerate(profile.requests):
        paging = request.paging
        key = f"requests[{index}].paging"
        if paging.kind in ("page", "cursor") and not paging.param:
            raise bad(key, f"{paging.kind} paging needs param")
        if paging.kind == "page" and not paging.items:
            raise bad(key, "page paging needs items (the path of the page's list)")
        if paging.kind == "cursor" and not paging.next:
            raise bad(key, "cursor paging needs next (the path of the next cursor)")


def zone_of(name: str, key: str) -> ZoneInfo:
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise ConfigError(f"{key}: {name!r} is not a known IANA time zone") from None


def render_time(epoch_ms: int, time_format: str, zone: ZoneInfo) -> str:
    """A window's bound as the vendor wants it: epoch seconds or ms, RFC 3339, or a local-time pattern."""
    if time_format == "epoch_s":
        return str(epoch_ms // 1000)
    if time_format == "epoch_ms":
        return str(epoch_ms)
    moment = datetime.fromtimestamp(epoch_ms / 1000, UTC).astimezone(zone)
    if time_format == "iso":
        return moment.isoformat()
    return moment.strftime(time_format)


def fill(template: str, values: dict[str, str]) -> str:
    """``{site}``, ``{start}``, ``{end}`` put in; other braces stay as written."""
    for name, value in values.items():
        template = template.replace("{" + name + "}", value)
    return template


def window_values(profile: Profile, zone: ZoneInfo, site: str, start_ms: int, end_ms: int) -> dict[str, str]:
    end = end_ms - 1000 if profile.inclusive_end else end_ms
    return {
        "site": site,
        "start": render_time(start_ms, profile.time_format, zone),
        "end": render_time(end, profile.time_format, zone),
    }


def dig(body: Any, path: str) -> Any:
    """A dotted path into a JSON body (``meta.next``); None where it leads nowhere."""
    for part in path.split("."):
        if isinstance(body, dict):
            body = body.get(part)
        elif isinstance(body, list) and part.isdigit() and int(part) < len(body):
            body = body[int(part)]
        else:
            return None
    return body
