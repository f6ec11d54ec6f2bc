"""Decode: a payload → readings in the unified schema, by the format code the sender named.

``registry`` maps format codes to decoders; ``native`` is the hub's own ``hub.v1``; ``vendor`` turns the
definition files of ``hubd/formats/`` (and the operator's folder) into decoders. Importing this package
registers ``hub.v1``.
"""

from hubd.decode import native
from hubd.decode.registry import Decoded, Decoder, Limits, codes, decoder_for, load_json_object, register, unregister

__all__ = [
    "Decoded",
    "Decoder",
    "Limits",
    "codes",
    "decoder_for",
    "load_json_object",
    "native",
    "register",
    "unregister",
]
