"""Adapter types sdlora trains and reads: the registry, and what every type provides (AdapterType).

A type attaches its layers to a model and names their trainable parameters, sets their strength, writes and reads
them in the kohya/LyCORIS file layout, gives each module's weight delta (for merge and resize) and the metadata
other tools read. Training, export, merge, resize and info go through these calls only, so a new type (LoHa, LoKr,
DoRA, ...) is one more module here.
"""

from __future__ import annotations

from sdlora.adapters.lora import DORA, LOCON, LORA
from sdlora.adapters.type import AdapterType
from sdlora.errors import UserError

TYPES: dict[str, AdapterType] = {t.name: t for t in (LORA, LOCON, DORA)}


def get(name: str) -> AdapterType:
    """The adapter type registered as `name`."""
    try:
        return TYPES[name]
    except KeyError:
        raise UserError(f"unknown adapter type {name!r}", f"use one of: {', '.join(TYPES)}") from None
