"""Vendor formats as data: YAML definitions built into decoders and registered by format code.

A definition says where a vendor payload keeps each value of a reading (a JSON path, a CSV column, a field of
a binary layout, an MQTT v5 user property) and how to turn it into the unified schema (units, scale factors,
sentinels, sign, time zone). ``language`` reads and checks a definition, ``readings`` builds it once into
the closures of an interpreter (``numbers`` for the quantities' values, ``access`` for what it asks of a
payload kind), ``times`` turns vendor times into epoch milliseconds, ``kinds`` holds what differs between JSON,
CSV and binary payloads, ``echonet`` is the Python hook for ECHONET Lite property lists (what a
fixed layout cannot say), ``load`` turns one file into a decoder, and ``catalog`` keeps the registry in step
with the definition folders while the hub runs. The language is documented in docs/formats.md.
"""

from hubd.decode.vendor.catalog import Catalog, Change
from hubd.decode.vendor.language import DefinitionError, FormatDefinition
from hubd.decode.vendor.load import load_definition

__all__ = ["Catalog", "Change", "DefinitionError", "FormatDefinition", "load_definition"]
