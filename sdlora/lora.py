"""LoRA files: the adapters of a trained model as a kohya-layout state dict, safetensors written whole, read, and
checked against a base model's family."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors.torch import load_file, safe_open, save_file

from sdlora import families
from sdlora.adapters.lora import LORA
from sdlora.adapters.type import AdapterType
from sdlora.atomic import atomic_path
from sdlora.errors import UserError
from sdlora.families.naming import KOHYA_UNET, kohya_name, kohya_text_encoder_name, unet_module_name


def kohya_state_dict(unet: torch.nn.Module, text_encoders: dict[str, torch.nn.Module], sgm_unet: bool = False,
                     adapter: AdapterType = LORA, family=None) -> dict[str, torch.Tensor]:
    """The adapters of a model in the kohya layout (for LoRA `<name>.lora_down.weight`, `.lora_up.weight` and the
    trained `.alpha`), each module named as kohya names it.

    `text_encoders` maps a key prefix (a key of Family.text_encoders) to a text encoder that carries an adapter.
    `sgm_unet` (Family.sgm_unet) names UNet modules in the original block numbering, as kohya does for SDXL
    (docs/lora-format.md, Keys); otherwise they keep their diffusers paths. `family` (a Family): name every module
    as the family's files do instead (SD3.5: diffusers' names); its file_state_dict then gives the file's layout.
    """
    return adapter.state_dict(kohya_modules(unet, text_encoders, sgm_unet, adapter, family))


def kohya_modules(unet: torch.nn.Module, text_encoders: dict[str, torch.nn.Module], sgm_unet: bool = False,
                  adapter: AdapterType = LORA, family=None) -> dict[str, torch.nn.Module]:
    """kohya name -> adapter layer, for the UNet and the text encoders as `kohya_state_dict` names them."""
    if family is not None:
        modules = {family.kohya_unet_name(path, unet.config): layer for path, layer in adapter.layers(unet).items()}
        for prefix, te in text_encoders.items():
            modules.update({family.kohya_text_encoder_name(prefix, path): layer
                            for path, layer in adapter.layers(te).items()})
        return modules
    modules = {kohya_name(KOHYA_UNET, unet_module_name(path, unet.config, sgm_unet)): layer
               for path, layer in adapter.layers(unet).items()}
    for prefix, te in text_encoders.items():
        modules.update({kohya_text_encoder_name(prefix, path): layer for path, layer in adapter.layers(te).items()})
    return modules


def save_lora(path: str | Path, state_dict: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Write a .safetensors file atomically (temporary name, then rename), so readers never see half a file."""
    with atomic_path(path) as tmp:  # a failed write (a full disk) leaves no half file behind
        save_file(state_dict, str(tmp), metadata={k: str(v) for k, v in metadata.items()})
        usual_mode(tmp)


def usual_mode(path: str | Path) -> None:
    """Give a written file the permissions any new file gets here (0644 under the usual umask): safetensors creates
    its files readable by their owner only, and a LoRA is made to be shared."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def read_lora(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of a LoRA file."""
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
    return load_file(str(path)), metadata


def check_lora_fits(name: str, state: dict[str, torch.Tensor] | None, metadata: dict[str, str], base) -> None:
    """Raise a one-line UserError when the LoRA file `name` was made for another model family than `base`.

    The metadata says so first (`ss_base_model_version`, `modelspec.architecture`); files without it are judged by
    their shapes: the width the UNet's cross-attention layers take (768 SD1, 1024 SD2, 2048 SDXL) and the text
    encoders' widths. A mismatch otherwise shows up as a shape error deep in a loader, or as a LoRA that silently
    does nothing (docs/lora-format.md, Wrong base family).
    """
    fam = base.fam
    hint = f"use it with a base model of its own family, or pick a LoRA made for {fam.label}"
    made_for = families.stated(metadata)
    foreign = metadata.get("modelspec.architecture", "").split("/")[0]
    if made_for is None and foreign and not foreign.startswith("stable-diffusion"):  # flux, ...
        raise UserError(f"{name} is a LoRA for {foreign}, and the base model is {fam.label}", hint)
    if made_for is not None and made_for.arch != fam.arch:
        raise UserError(f"{name} is a LoRA for {made_for.label}, and the base model is {fam.label}", hint)

    state = state or {}  # None: the caller maps every shape onto the base itself
    names = {k.split(".lora_")[0].rsplit(".alpha", 1)[0] for k in state}
    shown = families.from_lora_names(names)
    if shown is not None and shown.group != fam.group and (shown.peft_names or fam.peft_names):
        # a transformer's names (SD3.5) and a UNet's never match: say so before a loader fails on them
        raise UserError(f"{name} is a LoRA for {shown.group}, and the base model is {fam.label}", hint)
    base_width = fam.denoiser_of(base.pipe).config.get("cross_attention_dim")  # None: no UNet cross-attention
    for key, tensor in state.items():
        if base_width is None:
            break
        if key.endswith(("attn2_to_k.lora_down.weight", "attn2.to_k.lora_A.weight", "attn2_to_v.lora_down.weight",
                         "attn2_to_k.hada_w1_b")):  # each (rank, in): LoRA's down, LoHa's w1_b
            width = tensor.shape[1]
            if width != base_width:
                family = families.of_width(width)
                made = f"{family.label} ({width}-wide cross-attention)" if family \
                    else f"a model with {width}-wide cross-attention"
                raise UserError(f"{name} was made for {made}, and the base model is {fam.label} "
                                f"({base_width}-wide)", hint)
            break
    # loaders take some prefixes for the same encoder (lora_te_ and lora_te1_ for the first one)
    encoders = {prefix: getattr(base.pipe, component) for prefix, component in fam.kohya_prefixes().items()}
    for prefix in families.kohya_text_encoder_prefixes():
        keys = [k for k in state if k.startswith(prefix) and k.endswith(("q_proj.lora_down.weight", "q_proj.hada_w1_b"))]
        if not keys:
            continue
        te = encoders.get(prefix)
        if te is None:
            owner = next(f for f in families.FAMILIES.values() if prefix in f.kohya_prefixes())
            position = list(owner.text_encoders).index(owner.text_encoder_aliases.get(prefix, prefix))
            raise UserError(f"{name} has a LoRA for a {_ORDINALS[position]} text encoder ({owner.label}'s), and the "
                            f"base model is {fam.label}", hint)
        width = state[keys[0]].shape[1]
        if width != te.config.hidden_size:
            raise UserError(f"{name} was made for a {width}-wide text encoder, and the base model's is "
                            f"{te.config.hidden_size} wide ({fam.label})", hint)


_ORDINALS = ("first", "second", "third", "fourth")
