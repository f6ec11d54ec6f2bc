"""Definitions are checked at load: a bad one is refused naming the file, the key and the problem; the
catalog keeps the formats already loaded when a file goes bad, and follows files as they come and go."""

from __future__ import annotations

import os
from pathlib import Path

import orjson
import pytest
import yaml

from hubd import decode
from hubd.config import ConfigError, load_config, parse_config
from hubd.decode.registry import Limits
from hubd.decode.vendor import Catalog, DefinitionError, load_definition
from hubd.model import HubError, parse_time

GOOD = {
    "kind": "json",
    "records": "$.items[*]",
    "reading": {
        "der_id": {"path": "id"},
        "password": {"path": "pw"},
        "measured_at": {"path": "t", "time": "epoch_ms"},
        "power_kw": {"path": "w", "unit": "W"},
    },
}
LIMITS = Limits(parse_time("2026-12-01T00:00:00Z"), 300_000, 100, {})


def write(folder: Path, name: str, document: object) -> Path:
    path = folder / name
    path.write_text(yaml.safe_dump(document) if not isinstance(document, str) else document, encoding="utf-8")
    return path


def _with(path: list[str], value: object) -> dict[str, object]:
    document = yaml.safe_load(yaml.safe_dump(GOOD))
    target = document
    for key in path[:-1]:
        target = target[key]
    if value is _DROP:
        del target[path[-1]]
    else:
        target[path[-1]] = value
    return dict(document)


_DROP = object()

BAD = [
    (_with(["kind"], "xml"), "kind", "must be one of json, csv, binary, hook"),
    (_with(["colour"], "red"), "colour", "unknown key"),
    (_with(["records"], "items"), "records", "starting with $"),
    (_with(["records"], "items[*]"), "records", "[*] only in a path from the root"),
    (_with(["records"], "$.items[x]"), "records", "is not a path"),
    (_with(["reading", "der_id"], _DROP), "reading.der_id", "required"),
    (_with(["reading", "power_kw", "unit"], "Wh"), "reading.power_kw.unit", "power_kw takes W, kW, MW, not 'Wh'"),
    (_with(["reading", "power_kw", "column"], 3), "reading.power_kw", "has more than one of"),
    (_with(["reading", "power_kw", "scale"], "ten"), "reading.power_kw.scale", "expected a mapping"),
    (_with(["reading", "power_kw", "sign"], "flip"), "reading.power_kw.sign", "must be invert or keep"),
    (_with(["reading", "power_kw", "valid"], [5, 1]), "reading.power_kw.valid", "above the highest"),
    (_with(["reading", "power_kw", "sentinels"], []), "reading.power_kw.sentinels", "expected a list"),
    (_with(["reading", "measured_at", "time"], "local"), "reading.measured_at.zone", "required for local times"),
    (_with(["reading", "measured_at", "time"], "julian"), "reading.measured_at.time", "must be one of"),
    (_with(["reading", "password"], {"const": "hunter2"}), "reading.password", "never written in a definition"),
    (_with(["reading", "der_id"], {"path": "id", "map": {"A": "not an id!"}}), "reading.der_id.map.A", "not a valid"),
    (_with(["reading", "der_id"], {"path": "id", "map_file": "missing.csv"}), "reading.der_id.map_file", "cannot read"),
    (_with(["reading", "interval_s"], {"const": 300}), "reading", "energy_interval_kwh and interval_s go together"),
    (_with(["reading", "power_kw", "path"], "$.items[*].w[*]"), "reading.power_kw.path", "must follow records"),
    (_with(["source_id"], "no spaces allowed"), "source_id", "1-64 characters"),
]


@pytest.mark.parametrize(("document", "key", "problem"), BAD, ids=[f"{b[1]}-{i}" for i, b in enumerate(BAD)])
def test_bad_definition_names_file_key_and_problem(tmp_path: Path, document: object, key: str, problem: str) -> None:
    path = write(tmp_path, "acme.v1.yaml", document)
    with pytest.raises(DefinitionError) as caught:
        load_definition(path)
    assert caught.value.file == str(path)
    assert caught.value.key == key
    assert problem in caught.value.problem
    assert str(caught.value).startswith(f"{path}: {key}: ")


@pytest.mark.parametrize(
    ("name", "problem"),
    [("hub.v1.yaml", "native format"), ("a+b.yaml", "no format code"), ("acme.json", "named <format code>.yaml")],
)
def test_file_names_are_format_codes(tmp_path: Path, name: str, problem: str) -> None:
    with pytest.raises(DefinitionError) as caught:
        load_definition(write(tmp_path, name, GOOD))
    assert problem in str(caught.value)


def test_binary_layout_is_checked(tmp_path: Path) -> None:
    document = {
        "kind": "binary",
        "binary": {"records": {"fields": [
            {"name": "a", "type": "uint16", "offset": 0}, {"name": "b", "type": "uint32", "offset": 1}]}},
        "reading": {"der_id": {"const": "PV-1"}, "password": {"property": "password"},
                    "measured_at": {"field": "a", "time": "epoch_s"}, "power_kw": {"field": "b"}},
    }  # fmt: skip
    with pytest.raises(DefinitionError) as caught:
        load_definition(write(tmp_path, "box.yaml", document))
    assert caught.value.key == "binary.records.fields[1]"
    assert "overlaps" in caught.value.problem


def test_catalog_follows_the_folders_and_keeps_a_good_version(tmp_path: Path) -> None:
    shipped, user = tmp_path / "shipped", tmp_path / "user"
    shipped.mkdir()
    user.mkdir()
    write(shipped, "acme.v1.yaml", GOOD)
    catalog = Catalog([shipped, user])
    try:
        changes = catalog.scan()
        assert [(c.event, c.code) for c in changes] == [("format.loaded", "acme.v1")]
        shipped_decoder = decode.registry.decoder_for("acme.v1")
        assert catalog.scan() == []  # nothing changed, nothing done

        override = write(user, "acme.v1.yaml", _with(["reading", "power_kw", "unit"], "kW"))
        assert [(c.event, c.file) for c in catalog.scan()] == [("format.loaded", str(override))]
        payload = b'{"items": [{"id": "PV-1", "pw": "x", "t": 1764201600000, "w": 2}]}'
        (reading,) = decode.registry.decoder_for("acme.v1")(payload, LIMITS).items
        assert reading.values == {"power_kw": 2.0}  # type: ignore[union-attr]

        write(user, "acme.v1.yaml", "kind: json\nreading: [\n")
        os.utime(override, ns=(1, 1))  # a different time even on a coarse clock
        (refused,) = catalog.scan()
        assert refused.event == "format.refused" and "not valid YAML" in (refused.reason or "")
        (reading,) = decode.registry.decoder_for("acme.v1")(payload, LIMITS).items  # the good version still serves
        assert reading.values == {"power_kw": 2.0}  # type: ignore[union-attr]
        assert catalog.errors() == {override: refused.reason}

        override.unlink()
        assert [(c.event, c.code) for c in catalog.scan()] == [("format.loaded", "acme.v1")]
        assert decode.registry.decoder_for("acme.v1") is shipped_decoder
        (shipped / "acme.v1.yaml").unlink()
        assert [(c.event, c.code) for c in catalog.scan()] == [("format.removed", "acme.v1")]
        with pytest.raises(HubError):
            decode.registry.decoder_for("acme.v1")
    finally:
        catalog.close()


def test_a_changed_map_file_reloads_its_definition(tmp_path: Path) -> None:
    mapped = _with(["reading", "der_id"], {"path": "id", "map_file": "ids.csv"})
    (tmp_path / "ids.csv").write_text("vendor_id,der_id\nA1,PV-1\n", encoding="utf-8")
    write(tmp_path, "acme.v1.yaml", mapped)
    catalog = Catalog([tmp_path], register=False)
    catalog.scan()
    payload = b'{"items": [{"id": "A1", "pw": "x", "t": 1764201600000, "w": 2}]}'
    decode = catalog.active["acme.v1"].decoder
    assert decode(payload, LIMITS).items[0].der_id == "PV-1"  # type: ignore[union-attr]
    (tmp_path / "ids.csv").write_text("vendor_id,der_id\nA1,PV-2\n", encoding="utf-8")
    assert [c.event for c in catalog.scan()] == ["format.loaded"]
    assert catalog.active["acme.v1"].decoder(payload, LIMITS).items[0].der_id == "PV-2"  # type: ignore[union-attr]


def test_formats_config(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"formats\.poll_s: must be 0\.1"):
        parse_config({"formats": {"poll_s": 0}})
    with pytest.raises(ConfigError, match=r"formats\.usr_dir: unknown key"):
        parse_config({"formats": {"usr_dir": "x"}})
    path = tmp_path / "hubd.yaml"
    path.write_text("data_dir: state\nformats: {shipped_dir: defs}\n", encoding="utf-8")
    config = load_config(path)
    assert config.formats_user_path == (tmp_path / "state" / "formats").resolve()
    assert config.formats_shipped_path == (tmp_path / "defs").resolve()
    assert load_config(None).formats_shipped_path.joinpath("echonet.lite.yaml").exists()


@pytest.mark.parametrize("der_id", [["PV-1"], {"id": "PV-1"}, 7.5, True, None, "PV 1", "x" * 65])
def test_a_der_id_of_any_json_shape_is_refused_not_a_crash(tmp_path: Path, der_id: object) -> None:
    decode = load_definition(write(tmp_path, "acme.v1.yaml", GOOD)).decoder
    payload = orjson.dumps({"items": [{"id": der_id, "pw": "x", "t": 1764201600000, "w": 2}]})
    (refused,) = decode(payload, LIMITS).items
    assert isinstance(refused, HubError)
    assert refused.message == "items[0]: der_id is missing or not a valid DER id (id)"
