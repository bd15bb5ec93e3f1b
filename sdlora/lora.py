"""LoRA adapters: add peft layers to the UNet and text encoder, and map them to/from the kohya file layout."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from peft import LoraConfig, inject_adapter_in_model
from safetensors.torch import load_file, safe_open, save_file

ADAPTER = "default"
# docs/lora-format.md, Targets: attention only, or attention + MLP as kohya trains by default.
UNET_TARGETS = {
    "attn": ["to_q", "to_k", "to_v", "to_out.0"],
    "attn-mlp": ["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "proj_in", "proj_out"],
}
TEXT_TARGETS = {
    "attn": ["q_proj", "k_proj", "v_proj", "out_proj"],
    "attn-mlp": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
}


def add_adapters(model: torch.nn.Module, targets: list[str], rank: int, alpha: float, dropout: float = 0.0) -> list[torch.nn.Parameter]:
    """Inject a LoRA adapter into `model` and return its trainable parameters (fp32; the base stays frozen).

    lora_B starts at zero, so a fresh adapter leaves the model's output exactly as it was.
    """
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets,
                        init_lora_weights="gaussian")
    model.requires_grad_(False)
    inject_adapter_in_model(config, model, adapter_name=ADAPTER)
    params = [p for n, p in model.named_parameters() if "lora_" in n]
    for p in params:
        p.data = p.data.float()
        p.requires_grad_(True)
    return params


def adapter_layers(model: torch.nn.Module, adapter: str = ADAPTER) -> dict[str, torch.nn.Module]:
    """Module path -> peft LoRA layer, for every layer carrying `adapter` (ours by default)."""
    return {name: m for name, m in model.named_modules() if hasattr(m, "lora_A") and adapter in m.lora_A}


def kohya_name(prefix: str, module_path: str) -> str:
    """`down_blocks.0.attentions.0...to_out.0` -> `lora_unet_down_blocks_0_attentions_0_..._to_out_0`."""
    return prefix + module_path.replace(".", "_")


def text_encoder_prefix(module_path: str, prefix: str = "lora_te_") -> str:
    # transformers 5 dropped the `text_model` level from CLIPTextModel; every loader still expects it in the key.
    return prefix if module_path.startswith("text_model.") else prefix + "text_model_"


def sgm_unet_path(module_path: str, layers_per_block: int) -> str:
    """A diffusers UNet module path in the original (SGM/LDM) block numbering, as kohya names SDXL modules.

    `down_blocks.1.attentions.0.X` -> `input_blocks.4.1.X`, `mid_block.attentions.0.X` -> `middle_block.1.X`,
    `up_blocks.0.attentions.1.X` -> `output_blocks.1.1.X`. Inside a transformer block the names are the same. The
    inverse of diffusers' `_maybe_map_sgm_blocks_to_diffusers`: a down block holds `layers_per_block` layers plus
    a downsampler, an up block one layer more.
    """
    parts = module_path.split(".")
    n = layers_per_block + 1
    if parts[0] == "down_blocks" and parts[2] == "attentions":
        return ".".join(["input_blocks", str(1 + int(parts[1]) * n + int(parts[3])), "1", *parts[4:]])
    if parts[0] == "mid_block" and parts[1] == "attentions":
        return ".".join(["middle_block", "1", *parts[3:]])
    if parts[0] == "up_blocks" and parts[2] == "attentions":
        return ".".join(["output_blocks", str(int(parts[1]) * n + int(parts[3])), "1", *parts[4:]])
    raise AssertionError(f"no SGM name for {module_path}: only transformer-block modules are LoRA targets")


def kohya_state_dict(unet: torch.nn.Module, text_encoders: dict[str, torch.nn.Module],
                     sgm_unet: bool = False) -> dict[str, torch.Tensor]:
    """The adapter in the kohya layout: `<name>.lora_down.weight`, `.lora_up.weight` and the trained `.alpha`.

    `text_encoders` maps a key prefix (`lora_te_` for SD1/SD2, `lora_te1_`/`lora_te2_` for SDXL) to a text encoder
    that carries an adapter. `sgm_unet` names UNet modules in the original block numbering, as kohya does for SDXL
    (docs/lora-format.md, Keys); otherwise they keep their diffusers paths.
    """
    out: dict[str, torch.Tensor] = {}
    modules = [("lora_unet_", unet_module_name(path, unet, sgm_unet), layer)
               for path, layer in adapter_layers(unet).items()]
    for prefix, te in text_encoders.items():
        modules += [(text_encoder_prefix(path, prefix), path, layer) for path, layer in adapter_layers(te).items()]
    for prefix, path, layer in modules:
        key = kohya_name(prefix, path)
        down = layer.lora_A[ADAPTER].weight.detach()
        up = layer.lora_B[ADAPTER].weight.detach()
        out[f"{key}.lora_down.weight"] = down.float().cpu().contiguous()
        out[f"{key}.lora_up.weight"] = up.float().cpu().contiguous()
        # every loader scales by alpha / rank; writing the trained alpha (not rank) keeps the strength right
        alpha = layer.lora_alpha[ADAPTER] if hasattr(layer, "lora_alpha") else layer.scaling[ADAPTER] * down.shape[0]
        out[f"{key}.alpha"] = torch.tensor(float(alpha), dtype=torch.float32)
    return out


def unet_module_name(module_path: str, unet: torch.nn.Module, sgm_unet: bool) -> str:
    return sgm_unet_path(module_path, unet.config.layers_per_block) if sgm_unet else module_path


def save_lora(path: str | Path, state_dict: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Write a .safetensors file atomically (temporary name, then rename), so readers never see half a file."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        save_file(state_dict, str(tmp), metadata={k: str(v) for k, v in metadata.items()})
        usual_mode(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a failed write (a full disk) leaves no half file behind
        raise


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
    from sdlora.errors import UserError
    from sdlora.models import FAMILIES, family_of_width

    fam = FAMILIES[base.family]
    hint = f"use it with a base model of its own family, or pick a LoRA made for {fam['label']}"
    made_for = stated_family(metadata)
    foreign = metadata.get("modelspec.architecture", "").split("/")[0]
    if made_for is None and foreign and not foreign.startswith("stable-diffusion"):  # flux, sd3, ...
        raise UserError(f"{name} is a LoRA for {foreign}, and the base model is {fam['label']}", hint)
    if made_for is not None and FAMILIES[made_for]["arch"] != fam["arch"]:
        raise UserError(f"{name} is a LoRA for {FAMILIES[made_for]['label']}, and the base model is {fam['label']}",
                        hint)

    state = state or {}  # None: the caller maps every shape onto the base itself
    base_width = base.pipe.unet.config.cross_attention_dim
    for key, tensor in state.items():
        if key.endswith(("attn2_to_k.lora_down.weight", "attn2.to_k.lora_A.weight", "attn2_to_v.lora_down.weight")):
            width = tensor.shape[1]
            if width != base_width:
                family = family_of_width(width)
                made = f"{FAMILIES[family]['label']} ({width}-wide cross-attention)" if family \
                    else f"a model with {width}-wide cross-attention"
                raise UserError(f"{name} was made for {made}, and the base model is {fam['label']} "
                                f"({base_width}-wide)", hint)
            break
    encoders = base.text_encoders()
    first = encoders.get("lora_te_") or encoders.get("lora_te1_")  # loaders take either prefix for the first one
    for prefix, te in (("lora_te_", first), ("lora_te1_", first), ("lora_te2_", encoders.get("lora_te2_"))):
        keys = [k for k in state if k.startswith(prefix) and k.endswith("q_proj.lora_down.weight")]
        if not keys:
            continue
        if te is None:
            raise UserError(f"{name} has a LoRA for a second text encoder (SDXL's), and the base model is "
                            f"{fam['label']}", hint)
        width = state[keys[0]].shape[1]
        if width != te.config.hidden_size:
            raise UserError(f"{name} was made for a {width}-wide text encoder, and the base model's is "
                            f"{te.config.hidden_size} wide ({fam['label']})", hint)


def stated_family(metadata: dict[str, str]) -> str | None:
    """The family the file says it was made for (kohya's `ss_base_model_version`, else `modelspec.architecture`)."""
    from sdlora.models import FAMILIES

    version = metadata.get("ss_base_model_version", "")
    for fam, spec in FAMILIES.items():
        if version == spec["base_model_version"]:
            return fam
    if version.startswith("sdxl"):
        return "sdxl"
    if version.startswith("sd_v2"):
        return "sd2-v" if version.endswith("_v") else "sd2"
    if version.startswith("sd_v1"):
        return "sd1"
    arch = metadata.get("modelspec.architecture", "")
    for fam, spec in FAMILIES.items():
        if arch == spec["architecture"]:
            return fam
    for start, fam in (("stable-diffusion-xl", "sdxl"), ("stable-diffusion-v2-768-v", "sd2-v"),
                       ("stable-diffusion-v2", "sd2"), ("stable-diffusion-v1", "sd1")):
        if arch.startswith(start):
            return fam
    if metadata.get("ss_v2") == "True":
        return "sd2"
    return None
