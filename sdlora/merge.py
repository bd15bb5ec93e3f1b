"""Bake LoRAs into a base model (W' = W + s * alpha/r * up @ down) and write it as a single-file checkpoint in the
original (LDM/SGM) layout that ComfyUI and AUTOMATIC1111 load, or as a diffusers folder."""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from sdlora.errors import UserError
from sdlora.info import base_modules, fit, read_adapter
from sdlora.lora import check_lora_fits, save_lora
from sdlora.models import FAMILIES, Base, load_base

PRECISIONS = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
# Where each component lives in an original checkpoint, per family, and how its text encoder is stored
# (the prefixes diffusers' single-file loader strips: diffusers/loaders/single_file_utils.py).
UNET_PREFIX, VAE_PREFIX = "model.diffusion_model.", "first_stage_model."
TEXT_ENCODERS = {
    "sd1": [("text_encoder", "clip", "cond_stage_model.transformer.")],
    "sd2": [("text_encoder", "openclip", "cond_stage_model.model.")],
    "sd2-v": [("text_encoder", "openclip", "cond_stage_model.model.")],
    "sdxl": [("text_encoder", "clip", "conditioner.embedders.0.transformer."),
             ("text_encoder_2", "openclip", "conditioner.embedders.1.model.")],
}


@torch.no_grad()
def merge(base: str | Base, loras: list[tuple[str, float]], out: str | Path, fmt: str = "single",
          precision: str = "fp16") -> dict:
    """Merge `loras` [(file, strength), ...] into `base` and write `out` (a .safetensors file, or a folder for
    fmt="diffusers"). The sum is done in float32, then cast to `precision`. A `Base` passed in is changed in place.
    Returns what was merged."""
    if fmt not in ("single", "diffusers"):
        raise UserError(f"unknown format {fmt!r}", "use --format single or --format diffusers")
    if precision not in PRECISIONS:
        raise UserError(f"unknown precision {precision!r}", "use fp16, bf16 or fp32")
    out = Path(out)
    if fmt == "single" and out.suffix != ".safetensors":
        raise UserError(f"{out} does not end in .safetensors",
                        "name the merged checkpoint NAME.safetensors, or add --format diffusers")
    if not loras:
        raise UserError("nothing to merge", "give at least one LORA[:STRENGTH]")
    # Read and check every file before touching the base, so a bad second file wastes no time.
    adapters = []
    for path, strength in loras:
        adapter = read_adapter(path)
        adapters.append((Path(path).name, adapter, float(strength)))
    base = load_base(base) if isinstance(base, str) else base
    pipe = base.pipe
    table = base_modules(pipe, base.family)
    for name, adapter, _ in adapters:
        check_lora_fits(name, None, adapter.metadata, base)  # shapes: fit() below
        result = fit(adapter, table)
        bad = adapter.stray + result["missing"] + [n for n, _, _ in result["wrong_shape"]]
        if bad:
            raise UserError(f"{len(bad)} of the {len(adapter.modules) + len(adapter.stray)} entries in {name} do not map "
                            f"onto the {base.family} base model, e.g. {bad[0]}",
                            f"`sdlora info {name} --base {base.name}` lists them; check that the LoRA was made for this model")
    changed = set()
    for name, adapter, strength in adapters:
        for key, (down, up, alpha) in adapter.modules.items():
            layer = table[key]
            changed.add(id(layer))
            delta = (up.flatten(1).float() @ down.flatten(1).float()) * (strength * alpha / down.shape[0])
            layer.weight += delta.reshape(layer.weight.shape).to(layer.weight.dtype)
    dtype = PRECISIONS[precision]
    meta = {"modelspec.sai_model_spec": "1.0.1",
            "modelspec.architecture": FAMILIES[base.family]["architecture"].removesuffix("/lora"),
            "modelspec.title": out.stem,
            "modelspec.prediction_type": "v" if base.prediction_type == "v_prediction" else "epsilon",
            "sdlora_merged": json.dumps({"base": base.name, "loras": [[n, s] for n, _, s in adapters]})}
    out.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "diffusers":
        pipe.to(dtype)
        pipe.save_pretrained(str(out), safe_serialization=True)
        (out / "sdlora_merged.json").write_text(json.dumps(meta, indent=2))
    else:
        state = {k: v.to(dtype).contiguous() for k, v in original_layout(pipe, base.family).items()}
        if base.prediction_type == "v_prediction":
            state["v_pred"] = torch.tensor([])  # ComfyUI marks (and detects) v-prediction checkpoints this way
        save_lora(out, state, meta)
    return {"out": str(out), "format": fmt, "precision": precision, "family": base.family,
            "loras": [{"file": n, "strength": s, "modules": len(a.modules)} for n, a, s in adapters],
            "layers_changed": len(changed)}


def original_layout(pipe, family: str) -> dict[str, torch.Tensor]:
    """The pipeline's weights under the key names of an original (LDM/SGM) single-file checkpoint."""
    out = {UNET_PREFIX + original_unet_key(k, pipe.unet.config): v for k, v in pipe.unet.state_dict().items()}
    vae = _vae_original(pipe.vae.state_dict(), len(pipe.vae.config.up_block_types))
    out.update({VAE_PREFIX + k: v for k, v in vae.items()})
    for attr, kind, prefix in TEXT_ENCODERS[family]:
        state = getattr(pipe, attr).state_dict()
        converted = _clip_original(state) if kind == "clip" else _openclip_original(state)
        out.update({prefix + k: v for k, v in converted.items()})
    return out


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


def _vae_original(state: dict, n_up: int) -> dict[str, torch.Tensor]:
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


def _clip_original(state: dict) -> dict[str, torch.Tensor]:
    # transformers 5 dropped CLIPTextModel's `text_model` level; the original layout (and every UI) keeps it.
    return {(k if k.startswith(("text_model.", "text_projection")) else "text_model." + k): v for k, v in state.items()}


def _openclip_original(state: dict) -> dict[str, torch.Tensor]:
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
