"""Adapter types sdlora trains and reads: the registry, and what every type provides (AdapterType).

A type attaches its layers to a model and names their trainable parameters, sets their strength, writes and reads
them in the kohya/LyCORIS file layout, gives each module's weight delta (for merge and resize) and the metadata
other tools read. Training, export, merge, resize and info go through these calls only, so a new type is one more
module here.
"""

from __future__ import annotations

from sdlora.adapters.lora import DORA, DORA_CONV, LOCON, LORA
from sdlora.adapters.lycoris import LOHA, LOKR, LoKr
from sdlora.adapters.type import AdapterType
from sdlora.errors import UserError

TYPES: dict[str, AdapterType] = {t.name: t for t in (LORA, LOCON, LOHA, LOKR, DORA)}


def get(name: str) -> AdapterType:
    """The adapter type registered as `name`."""
    try:
        return TYPES[name]
    except KeyError:
        raise UserError(f"unknown adapter type {name!r}", f"use one of: {', '.join(TYPES)}") from None


def for_config(config) -> AdapterType:
    """The adapter type a run trains, with the run's options: DoRA on the convolutions too (`dora_conv`), LoKr's
    factor and full matrices."""
    adapter = get(config.adapter)
    if adapter is DORA and config.dora_conv:
        return DORA_CONV
    if adapter is LOKR:
        return LoKr(factor=config.lokr_factor, full_matrix=config.lokr_full_matrix)
    return adapter


def read_any(state: dict, metadata: dict) -> "tuple[AdapterType, dict] | None":
    """(type, what its `read` found) for the first registered type whose keys are in the file; None if none's are.
    LoRA, LoCon and DoRA share one reader (LORA's)."""
    for adapter in (LORA, LOHA, LOKR):
        found = adapter.read(state, metadata)
        if found is not None:
            return adapter, found
    return None
