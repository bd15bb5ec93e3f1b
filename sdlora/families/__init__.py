"""The model families sdlora trains: the registry (SD1.x, SD2.x, SD2.x v-prediction, SDXL, SD3.5, FLUX.1) and finding a model's.

A family is a `Family` (family.py): plain data plus the functions in which families differ. One module per group of
families fills them in (sd.py, sdxl.py, sd3.py, flux.py); key naming shared by all lives in naming.py. The rest of sdlora asks a
family object and never compares family names.
"""

from __future__ import annotations

from sdlora.errors import UserError
from sdlora.families import flux, sd, sd3, sdxl
from sdlora.families.family import Family

# Detection asks one family of each group, in this order, and takes the first answer: a group whose test is narrower
# comes first (an SDXL pipeline has all an SD one has, and a second text encoder; SD3's denoiser is a transformer and
# it has a second text encoder too; FLUX's transformer config has SD3's joint_attention_dim, and its LoRAs SD3's
# transformer_blocks), and the last one always answers.
_GROUPS = (flux.FAMILIES, sd3.FAMILIES, sdxl.FAMILIES, sd.FAMILIES)
# Registry order counts where two families share a trait: the first is the one meant (sd2 before sd2-v by width).
FAMILIES: dict[str, Family] = {f.name: f for f in (*sd.FAMILIES, *sdxl.FAMILIES, *sd3.FAMILIES, *flux.FAMILIES)}
TINY = sd.SD1.name  # the embedded tiny model is SD1 for every loader's purposes


def get(name: str) -> Family:
    """The family registered as `name`."""
    try:
        return FAMILIES[name]
    except KeyError:
        raise UserError(f"unknown model family {name!r}", f"use one of: {', '.join(FAMILIES)}") from None


def _ask(question: str, *args) -> Family | None:
    for group in _GROUPS:
        name = getattr(group[0], question)(*args)
        if name is not None:
            return FAMILIES[name]
    return None


def detect(pipe) -> Family:
    """The family of a loaded diffusers pipeline."""
    return _ask("detect_pipeline", pipe)


def detect_folder(model_index: dict) -> Family:
    """A family of the group a diffusers folder (its model_index.json) belongs to: enough to load it."""
    return _ask("detect_folder", model_index)


def detect_checkpoint(file_name: str, keys, tensor) -> Family:
    """The family whose weights layout an original-layout single file has (`tensor(key)` -> Tensor or None)."""
    return _ask("detect_checkpoint", file_name, keys, tensor)


def detect_denoiser(config) -> Family:
    """A family of the group whose denoiser has this config."""
    return _ask("detect_denoiser", config)


def of_arch(arch: str) -> Family:
    """The first family with this weights layout (sd2 for "sd2")."""
    return next(f for f in FAMILIES.values() if f.arch == arch)


def of_width(cross_attention_dim: int) -> Family | None:
    """The family whose full-size denoiser cross-attends to states this wide (sd2 for 1024), if any."""
    return next((f for f in FAMILIES.values() if f.cross_attention_dim == cross_attention_dim), None)


def from_lora_names(names) -> Family | None:
    """The family a LoRA's kohya module names alone show, if they do."""
    return _ask("detect_lora", names)


def stated(metadata: dict[str, str]) -> Family | None:
    """The family a LoRA file says it was made for: kohya's `ss_base_model_version`, else `modelspec.architecture`
    (each exact, else as the groups read it), else `ss_v2`."""
    version = metadata.get("ss_base_model_version", "")
    architecture = metadata.get("modelspec.architecture", "")
    by_architecture = next((f for f in FAMILIES.values()
                            if architecture == f.lora_metadata()["modelspec.architecture"]), None) \
        or _ask("read_architecture", architecture)
    shared = [f for f in FAMILIES.values() if version == f.base_model_version]
    if len(shared) > 1 and by_architecture in shared:  # kohya writes `flux1` for dev and schnell alike
        return by_architecture
    found = next(iter(shared), None) or _ask("read_version", version)
    if found:
        return found
    if by_architecture:
        return by_architecture
    if metadata.get("ss_v2") == "True":
        return next(f for f in FAMILIES.values() if f.v2)
    return None


def text_encoder_components() -> tuple[str, ...]:
    """Every pipeline component that is a text encoder in some family, in registry order."""
    return tuple(dict.fromkeys(c for f in FAMILIES.values() for c in f.text_encoders.values()))


def kohya_text_encoder_prefixes() -> tuple[str, ...]:
    """Every kohya text-encoder key prefix some family's loaders take, in registry order."""
    return tuple(dict.fromkeys(p for f in FAMILIES.values() for p in f.kohya_prefixes()))


def peft_prefixes(components) -> dict[str, str]:
    """Text-encoder component -> kohya prefix for a diffusers/peft-layout LoRA holding these components, as the first
    family whose text encoders cover them names them (one text encoder: SD's `lora_te_`, which loaders also take for
    SDXL's first)."""
    for family in FAMILIES.values():
        own = {component: prefix for prefix, component in family.text_encoders.items()}
        if set(components) <= set(own):
            return own
    return {c: p for f in reversed(FAMILIES.values()) for p, c in f.text_encoders.items()}
