"""Write a diffusers Stable Diffusion pipeline as a single-file checkpoint in the original key layout.

SD1/SD2 use the LDM layout (`model.diffusion_model.`, `first_stage_model.`, `cond_stage_model.`), SDXL the SGM one
(`conditioner.embedders.0/1.`), as the files on model-sharing sites are. The mapping is the inverse of diffusers'
loaders/single_file_utils.py (written from its tables and the published checkpoints' key names); the tests and
bench/full_size_check.py check it by loading the result with diffusers' `from_single_file` and comparing every
weight. Used to make test fixtures and benchmark checkpoints, not by sdlora itself.
"""

from __future__ import annotations

import torch

_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1", "norm2": "out_layers.0",
           "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
_UNET_TOP = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
             "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2",
             "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}


def unet_to_original(state: dict[str, torch.Tensor], config) -> dict[str, torch.Tensor]:
    """diffusers UNet2DConditionModel keys -> `model.diffusion_model.` keys (LDM/SGM numbering)."""
    n = config.layers_per_block + 1  # a down block: layers + downsampler; an up block: layers_per_block + 1 layers
    up_has_attention = ["CrossAttn" in t for t in config.up_block_types]
    out = {}
    for key, value in state.items():
        module, _, param = key.rpartition(".")
        p = module.split(".")
        if module in _UNET_TOP:
            new = _UNET_TOP[module]
        elif p[0] == "down_blocks" and p[2] in ("resnets", "attentions"):
            block = 1 + int(p[1]) * n + int(p[3])
            new = _inner(f"input_blocks.{block}", p[2], p[4:])
        elif p[0] == "down_blocks" and p[2] == "downsamplers":  # downsamplers.0.conv
            new = f"input_blocks.{(int(p[1]) + 1) * n}.0.op"
        elif p[0] == "mid_block":
            index = {("resnets", "0"): 0, ("attentions", "0"): 1, ("resnets", "1"): 2}[(p[1], p[2])]
            new = _inner(f"middle_block.{index}", p[1], p[3:], slot=False)
        elif p[0] == "up_blocks" and p[2] in ("resnets", "attentions"):
            block = int(p[1]) * n + int(p[3])
            new = _inner(f"output_blocks.{block}", p[2], p[4:])
        elif p[0] == "up_blocks" and p[2] == "upsamplers":  # upsamplers.0.conv sits after the block's last layer
            i = int(p[1])
            new = f"output_blocks.{i * n + n - 1}.{2 if up_has_attention[i] else 1}.conv"
        else:
            raise KeyError(f"no original name for UNet key {key}")
        out[f"model.diffusion_model.{new}.{param}"] = value
    return out


def _inner(prefix: str, kind: str, rest: list[str], slot: bool = True) -> str:
    # an input/output block holds [resnet, attention]: slots .0 and .1; the middle block numbers them itself
    if kind == "resnets":
        return f"{prefix}{'.0' if slot else ''}.{_RESNET[rest[0]]}"
    if kind == "attentions":  # inside a transformer the names match: proj_in, transformer_blocks.N.attn1.to_q...
        return f"{prefix}{'.1' if slot else ''}.{'.'.join(rest)}"
    raise KeyError(kind)


def vae_to_original(state: dict[str, torch.Tensor], config) -> dict[str, torch.Tensor]:
    """diffusers AutoencoderKL keys -> `first_stage_model.` keys (the LDM autoencoder)."""
    levels = len(config.block_out_channels)
    out = {}
    for key, value in state.items():
        module, _, param = key.rpartition(".")
        p = module.split(".")
        side = p[0]
        if module in ("quant_conv", "post_quant_conv") or p[1] in ("conv_in", "conv_out"):
            new = module
        elif p[1] == "conv_norm_out":
            new = f"{side}.norm_out"
        elif p[1] in ("down_blocks", "up_blocks"):
            level = int(p[2]) if side == "encoder" else levels - 1 - int(p[2])  # LDM numbers the decoder bottom-up
            group = "down" if side == "encoder" else "up"
            if p[3] == "resnets":
                new = f"{side}.{group}.{level}.block.{p[4]}.{_vae_resnet(p[5])}"
            else:  # downsamplers.0.conv / upsamplers.0.conv
                new = f"{side}.{group}.{level}.{'downsample' if side == 'encoder' else 'upsample'}.conv"
        elif p[1] == "mid_block" and p[2] == "resnets":
            new = f"{side}.mid.block_{int(p[3]) + 1}.{_vae_resnet(p[4])}"
        elif p[1] == "mid_block" and p[2] == "attentions":
            name = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out": "proj_out"}[p[4]]
            new = f"{side}.mid.attn_1.{name}"
            if value.ndim == 2:  # the LDM attention uses 1x1 convolutions where diffusers has Linear layers
                value = value[:, :, None, None]
        else:
            raise KeyError(f"no original name for VAE key {key}")
        out[f"first_stage_model.{new}.{param}"] = value
    return out


def _vae_resnet(name: str) -> str:
    return {"conv_shortcut": "nin_shortcut"}.get(name, name)


def clip_to_original(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """transformers CLIPTextModel keys -> `<prefix>text_model.` keys (SD1's and SDXL's CLIP-L)."""
    return {prefix + ("" if k.startswith("text_model.") else "text_model.") + k: v for k, v in state.items()
            if not k.endswith("position_ids")}


def open_clip_to_original(state: dict[str, torch.Tensor], prefix: str, width: int) -> dict[str, torch.Tensor]:
    """transformers CLIPTextModel(WithProjection) keys -> OpenCLIP keys under `prefix` (SD2's ViT-H, SDXL's bigG):
    `resblocks.N` with fused q/k/v (`attn.in_proj_weight`), `ln_final`, `positional_embedding`, `text_projection`."""
    state = {k.removeprefix("text_model."): v for k, v in state.items() if not k.endswith("position_ids")}
    out = {"token_embedding.weight": state.pop("embeddings.token_embedding.weight"),
           "positional_embedding": state.pop("embeddings.position_embedding.weight"),
           "ln_final.weight": state.pop("final_layer_norm.weight"), "ln_final.bias": state.pop("final_layer_norm.bias")}
    projection = state.pop("text_projection.weight", None)
    # OpenCLIP stores x @ text_projection (width x dim); SD2's text encoder has none in diffusers, but its file does
    out["text_projection"] = projection.T.contiguous() if projection is not None else torch.eye(width)
    layers = sorted({int(k.split(".")[2]) for k in state if k.startswith("encoder.layers.")})
    for i in layers:
        src, dst = f"encoder.layers.{i}.", f"transformer.resblocks.{i}."
        for param in ("weight", "bias"):
            out[dst + f"attn.in_proj_{param}"] = torch.cat([state.pop(src + f"self_attn.{x}_proj.{param}")
                                                            for x in "qkv"])
            out[dst + f"attn.out_proj.{param}"] = state.pop(src + f"self_attn.out_proj.{param}")
            out[dst + f"ln_1.{param}"] = state.pop(src + f"layer_norm1.{param}")
            out[dst + f"ln_2.{param}"] = state.pop(src + f"layer_norm2.{param}")
            out[dst + f"mlp.c_fc.{param}"] = state.pop(src + f"mlp.fc1.{param}")
            out[dst + f"mlp.c_proj.{param}"] = state.pop(src + f"mlp.fc2.{param}")
    assert not state, f"unmapped text-encoder keys: {sorted(state)[:5]}"
    return {prefix + k: v for k, v in out.items()}


def text_encoders_to_original(text_encoder, text_encoder_2=None) -> dict[str, torch.Tensor]:
    """SD1: CLIP under cond_stage_model.transformer; SD2: OpenCLIP under cond_stage_model.model; SDXL: CLIP-L and
    OpenCLIP-G under conditioner.embedders.0/1."""
    te = text_encoder.state_dict()
    if text_encoder_2 is not None:
        return {**clip_to_original(te, "conditioner.embedders.0.transformer."),
                **open_clip_to_original(text_encoder_2.state_dict(), "conditioner.embedders.1.model.",
                                        text_encoder_2.config.hidden_size)}
    if text_encoder.config.hidden_act == "gelu":  # SD2: OpenCLIP ViT-H
        return open_clip_to_original(te, "cond_stage_model.model.", text_encoder.config.hidden_size)
    return clip_to_original(te, "cond_stage_model.transformer.")


def pipeline_to_original(pipe, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The whole pipeline as one original-layout state dict (SDXL if it has a second text encoder)."""
    out = {**unet_to_original(pipe.unet.state_dict(), pipe.unet.config),
           **vae_to_original(pipe.vae.state_dict(), pipe.vae.config),
           **text_encoders_to_original(pipe.text_encoder, getattr(pipe, "text_encoder_2", None))}
    return {k: (v.to(dtype) if dtype is not None else v).contiguous() for k, v in out.items()}


_KOHYA_TE = {"cond_stage_model.transformer.": "lora_te_", "conditioner.embedders.0.transformer.": "lora_te1_",
             "cond_stage_model.model.": "lora_te_", "conditioner.embedders.1.model.": "lora_te2_"}
_TARGETS = {"attn": (["attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q", "attn2.to_k",
                      "attn2.to_v", "attn2.to_out.0"], ["q_proj", "k_proj", "v_proj", "out_proj"])}


def kohya_reference(original_keys, targets: str = "attn") -> set[str]:
    """The LoRA module names kohya's sd-scripts gives an SDXL checkpoint (or the text encoders of any SD checkpoint),
    read off the original-layout keys alone: UNet modules keep their SGM paths (`input_blocks.4.1...`), CLIP text
    encoders their HF paths, and OpenCLIP's fused `attn.in_proj_weight` becomes q/k/v as kohya converts it.

    SD1/SD2 UNets are not covered: kohya names those by diffusers paths, which come from converting the model."""
    unet_targets, te_targets = _TARGETS[targets]
    names = set()
    for key in original_keys:
        if key.startswith("model.diffusion_model.") and key.endswith(".weight"):
            path = key[len("model.diffusion_model."):-len(".weight")]
            if "transformer_blocks." in path and path.endswith(tuple("." + t for t in unet_targets)):
                names.add("lora_unet_" + path.replace(".", "_"))
            continue
        prefix = next((p for p in _KOHYA_TE if key.startswith(p)), None)
        if prefix is None or not key.endswith("weight"):
            continue
        path = key[len(prefix):]
        if path.startswith("text_model.encoder.layers.") and path.endswith(tuple(f".{t}.weight" for t in te_targets)):
            names.add(_KOHYA_TE[prefix] + path[:-len(".weight")].replace(".", "_"))
        elif path.startswith("transformer.resblocks."):  # OpenCLIP
            layer = path.split(".")[2]
            base = f"{_KOHYA_TE[prefix]}text_model_encoder_layers_{layer}_self_attn_"
            if path.endswith("attn.in_proj_weight"):
                names |= {base + "q_proj", base + "k_proj", base + "v_proj"}
            elif path.endswith("attn.out_proj.weight"):
                names.add(base + "out_proj")
    return names
