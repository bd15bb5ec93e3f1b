"""Key names: diffusers module paths <-> kohya LoRA names <-> the original (LDM/SGM) single-file checkpoint layout."""

from __future__ import annotations

import json
import re

import torch

KOHYA_UNET = "lora_unet_"  # the denoiser's kohya prefix (kohya keeps the name for every family)
# Where the denoiser and the VAE live in an original checkpoint; the text encoders' prefixes differ per family
# (Family.original_text_encoders).
ORIGINAL_UNET, ORIGINAL_VAE = "model.diffusion_model.", "first_stage_model."


def kohya_name(prefix: str, module_path: str) -> str:
    """`down_blocks.0.attentions.0...to_out.0` -> `lora_unet_down_blocks_0_attentions_0_..._to_out_0`."""
    return prefix + module_path.replace(".", "_")


def text_encoder_prefix(module_path: str, prefix: str = "lora_te_") -> str:
    # transformers 5 dropped the `text_model` level from CLIPTextModel; every loader still expects it in the key.
    return prefix if module_path.startswith("text_model.") else prefix + "text_model_"


def kohya_text_encoder_name(prefix: str, module_path: str) -> str:
    """A text-encoder module's kohya name under the encoder's prefix (`lora_te_`, `lora_te1_`, ...)."""
    return kohya_name(text_encoder_prefix(module_path, prefix), module_path)


def unet_module_name(module_path: str, config, sgm: bool) -> str:
    """The UNet module path kohya names: the diffusers one, or in the original block numbering (`sgm`)."""
    return sgm_unet_path(module_path, config) if sgm else module_path


def kohya_unet_name(module_path: str, config, sgm: bool) -> str:
    """A UNet module's kohya name (`lora_unet_...`); `config` is the UNet's."""
    return kohya_name(KOHYA_UNET, unet_module_name(module_path, config, sgm))


def sgm_unet_path(module_path: str, config) -> str:
    """A diffusers UNet module path in the original (SGM/LDM) block numbering, as kohya names SDXL modules.

    `down_blocks.1.attentions.0.X` -> `input_blocks.4.1.X`, `mid_block.attentions.0.X` -> `middle_block.1.X`,
    `up_blocks.0.attentions.1.X` -> `output_blocks.1.1.X` (for two layers per block); resnet layers get their
    original names too. The same table as the weights' keys (original_unet_key), read for a module.
    """
    return original_unet_key(module_path + ".weight", config)[: -len(".weight")]


_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "norm2": "out_layers.0", "conv2": "out_layers.3",
           "time_emb_proj": "emb_layers.1", "conv_shortcut": "skip_connection"}
_unet_prefix_cache: dict[str, list[tuple[str, str]]] = {}


def _unet_prefixes(config) -> list[tuple[str, str]]:
    """(diffusers prefix, original prefix) for every block of a UNet2DConditionModel, from its config: the inverse of
    diffusers' `convert_ldm_unet_checkpoint`, so it follows any block count and layers_per_block."""
    per, n = config["layers_per_block"], len(config["block_out_channels"])
    pairs = [("time_embedding.linear_1.", "time_embed.0."), ("time_embedding.linear_2.", "time_embed.2."),
             ("conv_in.", "input_blocks.0.0."), ("conv_norm_out.", "out.0."), ("conv_out.", "out.2."),
             ("add_embedding.linear_1.", "label_emb.0.0."), ("add_embedding.linear_2.", "label_emb.0.2."),
             ("class_embedding.linear_1.", "label_emb.0.0."), ("class_embedding.linear_2.", "label_emb.0.2."),
             ("mid_block.resnets.0.", "middle_block.0."), ("mid_block.attentions.0.", "middle_block.1."),
             ("mid_block.resnets.1.", "middle_block.2.")]
    for b in range(n):
        for j in range(per):  # input block i holds (resnet, attention); the block after the last holds the downsampler
            i = 1 + b * (per + 1) + j
            pairs += [(f"down_blocks.{b}.resnets.{j}.", f"input_blocks.{i}.0."),
                      (f"down_blocks.{b}.attentions.{j}.", f"input_blocks.{i}.1.")]
        pairs.append((f"down_blocks.{b}.downsamplers.0.conv.", f"input_blocks.{1 + b * (per + 1) + per}.0.op."))
        for j in range(per + 1):  # output blocks have one layer more; the upsampler sits after the attention if any
            i = b * (per + 1) + j
            pairs += [(f"up_blocks.{b}.resnets.{j}.", f"output_blocks.{i}.0."),
                      (f"up_blocks.{b}.attentions.{j}.", f"output_blocks.{i}.1.")]
        slot = 2 if "CrossAttn" in config["up_block_types"][b] else 1
        pairs.append((f"up_blocks.{b}.upsamplers.0.conv.", f"output_blocks.{b * (per + 1) + per}.{slot}.conv."))
    return pairs


def original_unet_key(key: str, config) -> str:
    """`down_blocks.0.resnets.0.conv1.weight` -> `input_blocks.1.0.in_layers.2.weight` (no `model.diffusion_model.`)."""
    cache_key = json.dumps(dict(config), sort_keys=True, default=str)
    if cache_key not in _unet_prefix_cache:
        _unet_prefix_cache[cache_key] = _unet_prefixes(config)
    for old, new in _unet_prefix_cache[cache_key]:
        if key.startswith(old):
            rest = key[len(old):]
            if ".resnets." in old:
                head, _, tail = rest.partition(".")
                rest = f"{_RESNET.get(head, head)}.{tail}"
            return new + rest
    raise AssertionError(f"no original-layout name for UNet weight {key}")


_VAE_RULES = [
    (r"^(encoder|decoder)\.conv_norm_out\.", r"\1.norm_out."),
    (r"^encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.", r"encoder.down.\1.block.\2."),
    (r"^encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample."),
    (r"^(encoder|decoder)\.mid_block\.attentions\.0\.", r"\1.mid.attn_1."),
]


def vae_original(state: dict, n_up: int) -> dict[str, torch.Tensor]:
    """A diffusers AutoencoderKL state dict under the original VAE's names (no `first_stage_model.`)."""
    out = {}
    for key, value in state.items():
        new = key
        for pattern, repl in _VAE_RULES:
            new = re.sub(pattern, repl, new)
        # the decoder's up blocks are numbered from the bottom in the original layout
        new = re.sub(r"^decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.",
                     lambda m: f"decoder.up.{n_up - 1 - int(m[1])}.block.{m[2]}.", new)
        new = re.sub(r"^decoder\.up_blocks\.(\d+)\.upsamplers\.0\.",
                     lambda m: f"decoder.up.{n_up - 1 - int(m[1])}.upsample.", new)
        new = re.sub(r"mid_block\.resnets\.(\d+)\.", lambda m: f"mid.block_{int(m[1]) + 1}.", new)
        new = new.replace("conv_shortcut", "nin_shortcut")
        if ".mid.attn_1." in new:
            for a, b in (("group_norm", "norm"), ("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "proj_out")):
                new = new.replace(f"attn_1.{a}.", f"attn_1.{b}.")
            if value.dim() == 2:  # the original VAE attention uses 1x1 convolutions
                value = value[:, :, None, None]
        out[new] = value
    return out


def clip_original(state: dict) -> dict[str, torch.Tensor]:
    """A transformers CLIP text model's state dict as the original checkpoints store OpenAI CLIP (HF names)."""
    # transformers 5 dropped CLIPTextModel's `text_model` level; the original layout (and every UI) keeps it.
    return {(k if k.startswith(("text_model.", "text_projection")) else "text_model." + k): v for k, v in state.items()}


def openclip_original(state: dict) -> dict[str, torch.Tensor]:
    """HF CLIP names -> OpenCLIP's (`transformer.resblocks.N.attn.in_proj_weight` holds q, k and v stacked)."""
    out, qkv = {}, {}
    rename = [("embeddings.token_embedding.weight", "token_embedding.weight"),
              ("embeddings.position_embedding.weight", "positional_embedding"), ("final_layer_norm.", "ln_final."),
              ("encoder.layers.", "transformer.resblocks."), (".layer_norm1.", ".ln_1."), (".layer_norm2.", ".ln_2."),
              (".mlp.fc1.", ".mlp.c_fc."), (".mlp.fc2.", ".mlp.c_proj."), (".self_attn.out_proj.", ".attn.out_proj.")]
    for key, value in state.items():
        key = key.removeprefix("text_model.")
        if key == "text_projection.weight":
            out["text_projection"] = value.T.contiguous()
            continue
        m = re.match(r"^encoder\.layers\.(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)$", key)
        if m:
            qkv.setdefault((m[1], m[3]), {})[m[2]] = value
            continue
        for a, b in rename:
            key = key.replace(a, b)
        out[key] = value
    for (layer, kind), parts in qkv.items():
        out[f"transformer.resblocks.{layer}.attn.in_proj_{kind}"] = torch.cat([parts["q"], parts["k"], parts["v"]])
    return out


TEXT_ENCODER_LAYOUTS = {"clip": clip_original, "openclip": openclip_original}  # Family.original_text_encoders' kinds


def original_layout(pipe, family) -> dict[str, torch.Tensor]:
    """The pipeline's weights under the key names of an original (LDM/SGM) single-file checkpoint of `family`."""
    out = {ORIGINAL_UNET + original_unet_key(k, pipe.unet.config): v for k, v in pipe.unet.state_dict().items()}
    vae = vae_original(pipe.vae.state_dict(), len(pipe.vae.config.up_block_types))
    out.update({ORIGINAL_VAE + k: v for k, v in vae.items()})
    for component, kind, prefix in family.original_text_encoders:
        converted = TEXT_ENCODER_LAYOUTS[kind](getattr(pipe, component).state_dict())
        out.update({prefix + k: v for k, v in converted.items()})
    return out
