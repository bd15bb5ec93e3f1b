"""Key names: diffusers module paths <-> kohya LoRA names <-> the original (LDM/SGM/MMDiT) single-file checkpoint layout."""

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


def peft_layout(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A kohya-layout state dict whose module names are diffusers' (`transformer.<path>`) in diffusers' peft layout:
    `<name>.lora_A.weight` (down) and `<name>.lora_B.weight` (up times alpha / rank), no `.alpha` keys.

    diffusers' SD3 loader refuses any key without "lora" in its name (an `.alpha` key) and reads the alpha only from
    its own `lora_adapter_metadata`, which ComfyUI ignores (it takes alpha = rank without an `.alpha` key); folded
    into lora_B, the trained scale is the one every loader applies."""
    out = {}
    for key, value in state.items():
        if not key.endswith(".lora_down.weight"):
            continue
        name = key[: -len(".lora_down.weight")]
        up = state[f"{name}.lora_up.weight"]
        alpha = float(state[f"{name}.alpha"]) if f"{name}.alpha" in state else value.shape[0]
        out[f"{name}.lora_A.weight"] = value
        out[f"{name}.lora_B.weight"] = (up * (alpha / value.shape[0])).contiguous()
    return out


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


def t5_original(state: dict) -> dict[str, torch.Tensor]:
    """A transformers T5EncoderModel's state dict as SD3 single files store it: the same names, the token embedding
    once (`shared.weight`; the encoder's copy is tied to it)."""
    return {k: v for k, v in state.items() if k != "encoder.embed_tokens.weight"}


# Family.original_text_encoders' kinds
TEXT_ENCODER_LAYOUTS = {"clip": clip_original, "openclip": openclip_original, "t5": t5_original}


def original_layout(pipe, family) -> dict[str, torch.Tensor]:
    """The pipeline's weights under the key names of an original (LDM/SGM/MMDiT) single-file checkpoint of `family`;
    for a family whose single files hold the denoiser alone (FLUX.1), BFL's transformer file."""
    denoiser = family.denoiser_of(pipe)
    if family.denoiser_from_original is not None:
        return flux_original(denoiser.state_dict(), denoiser.config)
    if family.denoiser == "transformer":
        out = {ORIGINAL_UNET + k: v for k, v in mmdit_original(denoiser.state_dict(), denoiser.config).items()}
    else:
        out = {ORIGINAL_UNET + original_unet_key(k, denoiser.config): v for k, v in denoiser.state_dict().items()}
    vae = vae_original(pipe.vae.state_dict(), len(pipe.vae.config.up_block_types))
    out.update({ORIGINAL_VAE + k: v for k, v in vae.items()})
    for component, kind, prefix in family.original_text_encoders:
        converted = TEXT_ENCODER_LAYOUTS[kind](getattr(pipe, component).state_dict())
        out.update({prefix + k: v for k, v in converted.items()})
    return out


def _swap_scale_shift(weight: torch.Tensor) -> torch.Tensor:
    # the original final adaLN rows hold (shift, scale), diffusers' (scale, shift): the swap is its own inverse
    shift, scale = weight.chunk(2, dim=0)
    return torch.cat([scale, shift], dim=0)


def mmdit_original(state: dict, config) -> dict[str, torch.Tensor]:
    """A diffusers SD3Transformer2DModel state dict under the original MMDiT names (no `model.diffusion_model.`): the
    inverse of diffusers' `convert_sd3_transformer_checkpoint_to_diffusers` (to_q/to_k/to_v fused back into `qkv`)."""
    s = dict(state)
    out = {"pos_embed": s.pop("pos_embed.pos_embed"), "x_embedder.proj.weight": s.pop("pos_embed.proj.weight"),
           "x_embedder.proj.bias": s.pop("pos_embed.proj.bias")}
    renames = {"time_text_embed.timestep_embedder.linear_1.": "t_embedder.mlp.0.",
               "time_text_embed.timestep_embedder.linear_2.": "t_embedder.mlp.2.",
               "time_text_embed.text_embedder.linear_1.": "y_embedder.mlp.0.",
               "time_text_embed.text_embedder.linear_2.": "y_embedder.mlp.2.",
               "context_embedder.": "context_embedder.", "proj_out.": "final_layer.linear."}
    for old, new in renames.items():
        for kind in ("weight", "bias"):
            out[new + kind] = s.pop(old + kind)
    for kind in ("weight", "bias"):
        out[f"final_layer.adaLN_modulation.1.{kind}"] = _swap_scale_shift(s.pop(f"norm_out.linear.{kind}"))
    last = config["num_layers"] - 1
    for i in range(config["num_layers"]):
        b, o = f"transformer_blocks.{i}.", f"joint_blocks.{i}."
        for kind in ("weight", "bias"):
            out[f"{o}x_block.attn.qkv.{kind}"] = torch.cat([s.pop(f"{b}attn.to_{x}.{kind}") for x in "qkv"])
            out[f"{o}context_block.attn.qkv.{kind}"] = torch.cat([s.pop(f"{b}attn.add_{x}_proj.{kind}") for x in "qkv"])
            if f"{b}attn2.to_q.{kind}" in s:
                out[f"{o}x_block.attn2.qkv.{kind}"] = torch.cat([s.pop(f"{b}attn2.to_{x}.{kind}") for x in "qkv"])
                out[f"{o}x_block.attn2.proj.{kind}"] = s.pop(f"{b}attn2.to_out.0.{kind}")
            pairs = [("attn.to_out.0.", "x_block.attn.proj."), ("norm1.linear.", "x_block.adaLN_modulation.1."),
                     ("ff.net.0.proj.", "x_block.mlp.fc1."), ("ff.net.2.", "x_block.mlp.fc2.")]
            if i != last:
                pairs += [("attn.to_add_out.", "context_block.attn.proj."),
                          ("norm1_context.linear.", "context_block.adaLN_modulation.1."),
                          ("ff_context.net.0.proj.", "context_block.mlp.fc1."),
                          ("ff_context.net.2.", "context_block.mlp.fc2.")]
            for old, new in pairs:
                out[o + new + kind] = s.pop(b + old + kind)
            if i == last:  # the last block's context stream ends in its modulation (context_pre_only)
                out[f"{o}context_block.adaLN_modulation.1.{kind}"] = _swap_scale_shift(
                    s.pop(f"{b}norm1_context.linear.{kind}"))
        for old, new in (("attn.norm_q", "x_block.attn.ln_q"), ("attn.norm_k", "x_block.attn.ln_k"),
                         ("attn.norm_added_q", "context_block.attn.ln_q"),
                         ("attn.norm_added_k", "context_block.attn.ln_k"),
                         ("attn2.norm_q", "x_block.attn2.ln_q"), ("attn2.norm_k", "x_block.attn2.ln_k")):
            if f"{b}{old}.weight" in s:
                out[f"{o}{new}.weight"] = s.pop(f"{b}{old}.weight")
    assert not s, f"no original MMDiT name for {sorted(s)[:3]}"
    return out


def _mmdit_modules(config) -> dict[str, tuple[list[str], bool]]:
    """Original MMDiT module -> (the diffusers modules its output rows split into, in order; whether its rows are
    (shift, scale) where diffusers' are (scale, shift)). The module-level view of mmdit_original."""
    table = {"context_embedder": (["context_embedder"], False), "x_embedder.proj": (["pos_embed.proj"], False),
             "t_embedder.mlp.0": (["time_text_embed.timestep_embedder.linear_1"], False),
             "t_embedder.mlp.2": (["time_text_embed.timestep_embedder.linear_2"], False),
             "y_embedder.mlp.0": (["time_text_embed.text_embedder.linear_1"], False),
             "y_embedder.mlp.2": (["time_text_embed.text_embedder.linear_2"], False),
             "final_layer.linear": (["proj_out"], False), "final_layer.adaLN_modulation.1": (["norm_out.linear"], True)}
    last = config["num_layers"] - 1
    for i in range(config["num_layers"]):
        o, b = f"joint_blocks.{i}.", f"transformer_blocks.{i}."
        table.update({
            o + "x_block.attn.qkv": ([b + "attn.to_q", b + "attn.to_k", b + "attn.to_v"], False),
            o + "x_block.attn.proj": ([b + "attn.to_out.0"], False),
            o + "x_block.attn2.qkv": ([b + "attn2.to_q", b + "attn2.to_k", b + "attn2.to_v"], False),
            o + "x_block.attn2.proj": ([b + "attn2.to_out.0"], False),
            o + "context_block.attn.qkv": ([b + "attn.add_q_proj", b + "attn.add_k_proj", b + "attn.add_v_proj"], False),
            o + "context_block.attn.proj": ([b + "attn.to_add_out"], False),
            o + "x_block.mlp.fc1": ([b + "ff.net.0.proj"], False), o + "x_block.mlp.fc2": ([b + "ff.net.2"], False),
            o + "context_block.mlp.fc1": ([b + "ff_context.net.0.proj"], False),
            o + "context_block.mlp.fc2": ([b + "ff_context.net.2"], False),
            o + "x_block.adaLN_modulation.1": ([b + "norm1.linear"], False),
            o + "context_block.adaLN_modulation.1": ([b + "norm1_context.linear"], i == last)})
    return table


def mmdit_original_modules(config) -> dict[str, str]:
    """diffusers module path -> the original MMDiT module it is (part of) (`transformer_blocks.0.attn.to_q` ->
    `joint_blocks.0.x_block.attn.qkv`); kohya names a LoRA module after the original one."""
    return {part: original for original, (parts, _) in _mmdit_modules(config).items() for part in parts}


def kohya_sd3_to_peft(state: dict[str, torch.Tensor], config, text_encoders: dict[str, tuple[str, list[str]]]) \
        -> tuple[dict[str, torch.Tensor], list[str]]:
    """A kohya-layout SD3 LoRA (sd-scripts' networks/lora_sd3.py: `lora_unet_joint_blocks_0_x_block_attn_qkv`, the
    original fused layers; `lora_te1_`/`lora_te2_` CLIP names) in diffusers' peft layout with alpha folded, which
    diffusers' SD3 loader reads. Exact: a LoRA on a fused qkv is the same down with its up split in three.

    `config`: the transformer's; `text_encoders`: kohya prefix -> (component, its module paths). Returns the state
    dict and the keys it could not place (T5's `lora_te3_`, unknown names)."""
    modules = {}
    for key, value in state.items():
        for suffix in (".lora_down.weight", ".lora_up.weight", ".alpha"):
            if key.endswith(suffix):
                modules.setdefault(key[: -len(suffix)], {})[suffix] = value
    names = {kohya_name(KOHYA_UNET, original): target for original, target in _mmdit_modules(config).items()}
    for prefix, (component, paths) in text_encoders.items():
        names.update({kohya_text_encoder_name(prefix, p): ([f"{component}.{p}"], False) for p in paths})
    out, left = {}, []
    for name, parts in modules.items():
        if name not in names or ".lora_down.weight" not in parts or ".lora_up.weight" not in parts:
            left += [name + s for s in parts]
            continue
        targets, swapped = names[name]
        down, up = parts[".lora_down.weight"], parts[".lora_up.weight"]
        alpha = float(parts[".alpha"]) if ".alpha" in parts else down.shape[0]
        up = up * (alpha / down.shape[0])
        if swapped:
            up = _swap_scale_shift(up)
        for target, rows in zip(targets, up.chunk(len(targets), dim=0)):
            out[f"{target}.lora_A.weight"] = down.contiguous()
            out[f"{target}.lora_B.weight"] = rows.contiguous()
    return {(k if k.startswith("text_encoder") else f"transformer.{k}"): v for k, v in out.items()}, sorted(left)


def _flux_pairs(config) -> list[tuple[str, str]]:
    """(diffusers name, BFL name) of every FLUX.1 transformer weight that is renamed only (no split), without the
    `.weight`/`.bias`."""
    pairs = [("time_text_embed.timestep_embedder.linear_1", "time_in.in_layer"),
             ("time_text_embed.timestep_embedder.linear_2", "time_in.out_layer"),
             ("time_text_embed.text_embedder.linear_1", "vector_in.in_layer"),
             ("time_text_embed.text_embedder.linear_2", "vector_in.out_layer"),
             ("context_embedder", "txt_in"), ("x_embedder", "img_in"), ("proj_out", "final_layer.linear")]
    if config.get("guidance_embeds"):
        pairs += [("time_text_embed.guidance_embedder.linear_1", "guidance_in.in_layer"),
                  ("time_text_embed.guidance_embedder.linear_2", "guidance_in.out_layer")]
    for i in range(config["num_layers"]):
        b, o = f"transformer_blocks.{i}.", f"double_blocks.{i}."
        pairs += [(b + "norm1.linear", o + "img_mod.lin"), (b + "norm1_context.linear", o + "txt_mod.lin"),
                  (b + "ff.net.0.proj", o + "img_mlp.0"), (b + "ff.net.2", o + "img_mlp.2"),
                  (b + "ff_context.net.0.proj", o + "txt_mlp.0"), (b + "ff_context.net.2", o + "txt_mlp.2"),
                  (b + "attn.to_out.0", o + "img_attn.proj"), (b + "attn.to_add_out", o + "txt_attn.proj")]
    for i in range(config["num_single_layers"]):
        b, o = f"single_transformer_blocks.{i}.", f"single_blocks.{i}."
        pairs += [(b + "norm.linear", o + "modulation.lin"), (b + "proj_out", o + "linear2")]
    return pairs


def _flux_norms(config) -> list[tuple[str, str]]:
    """(diffusers, BFL) names of the qk RMS norms' weights (BFL calls them `scale`)."""
    out = []
    for i in range(config["num_layers"]):
        b, o = f"transformer_blocks.{i}.attn.", f"double_blocks.{i}."
        out += [(b + "norm_q.weight", o + "img_attn.norm.query_norm.scale"),
                (b + "norm_k.weight", o + "img_attn.norm.key_norm.scale"),
                (b + "norm_added_q.weight", o + "txt_attn.norm.query_norm.scale"),
                (b + "norm_added_k.weight", o + "txt_attn.norm.key_norm.scale")]
    for i in range(config["num_single_layers"]):
        b, o = f"single_transformer_blocks.{i}.attn.", f"single_blocks.{i}."
        out += [(b + "norm_q.weight", o + "norm.query_norm.scale"), (b + "norm_k.weight", o + "norm.key_norm.scale")]
    return out


def _flux_fused(config) -> list[tuple[str, list[str]]]:
    """(BFL fused module, the diffusers modules its output rows split into, in order)."""
    out = []
    for i in range(config["num_layers"]):
        b, o = f"transformer_blocks.{i}.attn.", f"double_blocks.{i}."
        out += [(o + "img_attn.qkv", [b + "to_q", b + "to_k", b + "to_v"]),
                (o + "txt_attn.qkv", [b + "add_q_proj", b + "add_k_proj", b + "add_v_proj"])]
    for i in range(config["num_single_layers"]):
        b = f"single_transformer_blocks.{i}."
        out.append((f"single_blocks.{i}.linear1", [b + "attn.to_q", b + "attn.to_k", b + "attn.to_v", b + "proj_mlp"]))
    return out


def flux_original_modules(config) -> dict[str, str]:
    """diffusers module path -> the BFL module it is (part of), for every FLUX.1 transformer layer that is renamed or
    fused (`transformer_blocks.0.attn.to_q` -> `double_blocks.0.img_attn.qkv`). kohya names a LoRA module after the
    BFL one: `lora_unet_` and the path with `_` for `.`."""
    out = dict(_flux_pairs(config))
    out.update({part: fused for fused, parts in _flux_fused(config) for part in parts})
    return out


def flux_original(state: dict, config) -> dict[str, torch.Tensor]:
    """A diffusers FluxTransformer2DModel state dict under BFL's original names (`double_blocks.0.img_attn.qkv`,
    `single_blocks.0.linear1`, ...): the inverse of diffusers' convert_flux_transformer_checkpoint_to_diffusers."""
    s = dict(state)
    out = {}
    for new, old in _flux_pairs(config):
        for kind in ("weight", "bias"):
            out[f"{old}.{kind}"] = s.pop(f"{new}.{kind}")
    for fused, parts in _flux_fused(config):
        for kind in ("weight", "bias"):
            out[f"{fused}.{kind}"] = torch.cat([s.pop(f"{p}.{kind}") for p in parts])
    for new, old in _flux_norms(config):
        out[old] = s.pop(new)
    for kind in ("weight", "bias"):
        out[f"final_layer.adaLN_modulation.1.{kind}"] = _swap_scale_shift(s.pop(f"norm_out.linear.{kind}"))
    assert not s, f"no original FLUX name for {sorted(s)[:3]}"
    return out


def flux_from_original(state: dict, config) -> dict[str, torch.Tensor]:
    """A BFL-layout FLUX.1 transformer state dict (no `model.diffusion_model.`) in diffusers' names, for a transformer
    of `config`: diffusers' convert_flux_transformer_checkpoint_to_diffusers for any width (it assumes 3072 wide
    blocks). Keys of other parts (a VAE, text encoders) are left out. A KeyError names a missing weight."""
    inner = config["num_attention_heads"] * config["attention_head_dim"]
    mlp = int(inner * 4.0)  # FLUX.1's mlp_ratio
    out = {}
    for new, old in _flux_pairs(config):
        for kind in ("weight", "bias"):
            out[f"{new}.{kind}"] = state[f"{old}.{kind}"]
    for fused, parts in _flux_fused(config):
        sizes = [inner] * 3 + ([mlp] if len(parts) == 4 else [])
        for kind in ("weight", "bias"):
            out.update({f"{p}.{kind}": t for p, t in zip(parts, torch.split(state[f"{fused}.{kind}"], sizes))})
    for new, old in _flux_norms(config):
        out[new] = state[old]
    for kind in ("weight", "bias"):
        out[f"norm_out.linear.{kind}"] = _swap_scale_shift(state[f"final_layer.adaLN_modulation.1.{kind}"])
    return out
