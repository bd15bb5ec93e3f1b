"""Read any LoRA file sdlora understands into per-module (down, up, alpha), and describe it: layout, family, ranks,
alphas, targets, trigger words, training settings, and whether its keys fit a given base model."""

from __future__ import annotations

import json
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch

from sdlora import families
from sdlora.adapters.lora import LORA
from sdlora.errors import UserError
from sdlora.families.naming import KOHYA_UNET, kohya_name, kohya_text_encoder_name
from sdlora.families.targets import TEXT_TARGETS, UNET_TARGETS
from sdlora.lora import read_lora

# LyCORIS networks store other factorisations; W' = W + s*(alpha/r)*up@down does not apply to them.
# (key part, what the file is)
_OTHER_NETWORKS = (("hada_w1_a", "LyCORIS LoHa"), ("lokr_w1", "LyCORIS LoKr"), (".diff", "LyCORIS full-weight"),
                   ("oft_blocks", "LyCORIS OFT"), ("lora_mid.weight", "LyCORIS LoCon with Tucker factors"))
_SETTINGS = [  # (metadata key, label) shown by `sdlora info`, in this order
    ("ss_sd_model_name", "trained on"), ("ss_resolution", "resolution"), ("ss_num_train_images", "images"),
    ("ss_steps", "steps"), ("sdlora_epochs", "epochs"), ("ss_epoch", "epoch"), ("ss_batch_size_per_device", "batch size"),
    ("ss_gradient_accumulation_steps", "grad accumulation"), ("ss_learning_rate", "learning rate"),
    ("ss_unet_lr", "unet lr"), ("ss_text_encoder_lr", "text encoder lr"), ("ss_optimizer", "optimizer"),
    ("ss_lr_scheduler", "lr scheduler"), ("ss_network_dropout", "lora dropout"), ("ss_min_snr_gamma", "min-SNR gamma"),
    ("ss_noise_offset", "noise offset"), ("ss_caption_dropout_rate", "caption dropout"),
    ("ss_shuffle_caption", "shuffle tags"), ("ss_flip_aug", "flip"), ("ss_masked_loss", "masked loss"),
    ("ss_num_reg_images", "reg images"), ("ss_prior_loss_weight", "prior loss weight"),
    ("ss_mixed_precision", "mixed precision"),
    ("ss_seed", "seed"), ("modelspec.prediction_type", "prediction"), ("ss_zero_terminal_snr", "zero terminal SNR"),
    ("ss_clip_skip", "clip skip"), ("modelspec.date", "date"),
]


@dataclass
class Adapter:
    """A LoRA file, one entry per adapted module, named in the kohya layout whatever layout the file uses."""

    modules: dict[str, tuple]  # kohya name -> (down, up, alpha), and dora_scale 4th for a DoRA module
    metadata: dict[str, str]
    layout: str  # "kohya" or "diffusers" (peft keys, `lora_A`/`lora_B`)
    stray: list[str] = field(default_factory=list)  # keys that belong to no module: loaders choke on these


def check_plain_lora(name: str, state: dict) -> None:
    """A one-line UserError saying what the file `name` is when its tensors are another network than a plain LoRA."""
    for key in state:
        kind = next((kind for part, kind in _OTHER_NETWORKS if part in key), None)
        if kind:
            raise UserError(f"{name} is a {kind} file, not a plain LoRA (key {key})",
                            "sdlora previews, merges and resizes plain LoRA files (lora_down/lora_up or "
                            "lora_A/lora_B); ComfyUI, Forge and InvokeAI load this one")


def read_adapter(path: str | Path) -> Adapter:
    """Read a kohya-layout or diffusers/peft-layout LoRA file; UserError for anything else."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"LoRA file not found: {path}", "give the path of a .safetensors file")
    try:
        state, metadata = read_lora(path)
    except Exception as e:  # safetensors raises its own error types for a truncated or foreign file
        raise UserError(f"{path.name} is not a readable .safetensors file: {str(e).splitlines()[0][:200]}",
                        "check that the download finished; sdlora reads .safetensors LoRA files") from None
    check_plain_lora(path.name, state)
    found = LORA.read(state, metadata)
    if found is None:
        raise UserError(f"{path.name} holds no LoRA weights (no .lora_down/.lora_up or .lora_A/.lora_B keys)",
                        "give a LoRA .safetensors file, not a checkpoint or an embedding")
    return Adapter(found["modules"], metadata, found["layout"], found["stray"])


def guessed_family(adapter: Adapter) -> str | None:
    """The family the key names and shapes point to, for files without metadata: names only one family uses, else
    the UNet's cross-attention width (attn2 to_k input; the tiny model's 128 tells nothing)."""
    family = families.from_lora_names(list(adapter.modules))
    if family is None:
        widths = {w[0].shape[1] for n, w in adapter.modules.items() if n.endswith("attn2_to_k")}
        family = next((f for w in widths if (f := families.of_width(w))), None)
    return family.name if family else None


def base_modules(pipe, family: str) -> dict[str, torch.nn.Module]:
    """kohya name -> Linear/Conv2d of the base, under every name the loaders accept for this family: the diffusers
    module paths, the original (SGM) ones where kohya names the UNet so, each text encoder under all its prefixes."""
    fam = families.get(family)
    table: dict[str, torch.nn.Module] = {}
    layers = (torch.nn.Linear, torch.nn.Conv2d)
    denoiser = fam.denoiser_of(pipe)
    unet_layers = [(path, m) for path, m in denoiser.named_modules() if isinstance(m, layers)]
    if fam.peft_names:  # SD3.5: the files' own names, diffusers' (`transformer.<path>`, `text_encoder.<path>`)
        for path, m in unet_layers:
            table[fam.kohya_unet_name(path, denoiser.config)] = m
        for prefix, te in zip(fam.text_encoders, fam.text_encoder_models(pipe)):
            table.update({fam.kohya_text_encoder_name(prefix, path): m for path, m in te.named_modules()
                          if isinstance(m, layers)})
        return table
    for path, m in unet_layers:
        table[kohya_name(KOHYA_UNET, path)] = m
    if fam.sgm_unet:
        for path, m in unet_layers:
            table[fam.kohya_unet_name(path, denoiser.config)] = m
    for prefix, component in fam.kohya_prefixes().items():
        for path, m in getattr(pipe, component).named_modules():
            if isinstance(m, layers):
                table[kohya_text_encoder_name(prefix, path)] = m
    return table


def fit(adapter: Adapter, table: dict[str, torch.nn.Module]) -> dict:
    """Which modules land on the base: `mapped` names, `missing` (no such layer), `wrong_shape` (name, lora, layer)."""
    mapped, missing, wrong = [], [], []
    for name, (down, up, *_) in adapter.modules.items():
        layer = table.get(name)
        if layer is None:
            missing.append(name)
        elif up.shape[0] != layer.weight.shape[0] or down[0].numel() != layer.weight[0].numel():
            wrong.append((name, f"{tuple(up.shape)}x{tuple(down.shape)}", tuple(layer.weight.shape)))
        else:
            mapped.append(name)
    return {"mapped": mapped, "missing": sorted(missing), "wrong_shape": sorted(wrong)}


_KNOWN_LAYERS = sorted({t for f in families.FAMILIES.values() for ts in (*f.unet_targets.values(),
                                                                          *f.text_targets.values()) for t in ts},
                       key=len, reverse=True)


def _kind(name: str) -> str:
    """`lora_unet_..._attn1_to_out_0` -> `to_out.0`; the layer's own name, as UNET_TARGETS/TEXT_TARGETS spell it.
    Names in diffusers' layout (SD3.5: `transformer.transformer_blocks.0.attn.to_out.0`) keep their dots."""
    for target in _KNOWN_LAYERS:
        if name.endswith("_" + target.replace(".", "_")) or name.endswith("." + target):
            return target
    return name.rsplit("_", 1)[-1]


def _targets(names: list[str], presets: dict[str, list[str]]) -> dict:
    kinds = Counter(_kind(n) for n in names)
    preset = next((p for p, ts in presets.items() if set(kinds) == set(ts)), None)
    return {"modules": len(names), "layers": dict(sorted(kinds.items())), "preset": preset}


def describe(path: str | Path, base=None) -> dict:
    """Everything `sdlora info` prints, as a dict. `base`: a spec or a loaded `Base` to check the keys against."""
    adapter = read_adapter(path)
    meta = adapter.metadata
    ranks = Counter(w[0].shape[0] for w in adapter.modules.values())
    alphas = Counter(w[2] for w in adapter.modules.values())
    conv3x3 = sum(w[0].dim() == 4 and w[0].shape[-1] > 1 for w in adapter.modules.values())
    denoiser = ("lora_unet_", "transformer.")  # kohya's prefix; diffusers' for SD3.5
    unet = [n for n in adapter.modules if n.startswith(denoiser)]
    te = [n for n in adapter.modules if not n.startswith(denoiser)]
    tags = Counter()
    for per_dir in json.loads(meta.get("ss_tag_frequency", "{}") or "{}").values():
        tags.update(per_dir)
    settings = {label: meta[key] for key, label in _SETTINGS if meta.get(key, "") not in ("", "None")}
    if "epochs" in settings:  # sdlora's fraction says more than kohya's count of the epoch under way
        settings.pop("epoch", None)
    for key, label in (("ss_training_started_at", "started"), ("ss_training_finished_at", "finished")):
        try:
            settings[label] = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(meta[key])))
        except (KeyError, ValueError):
            pass
    stated = families.stated(meta)
    fam = stated or (families.get(guessed_family(adapter)) if guessed_family(adapter) else None)
    info = {
        "file": str(path), "layout": adapter.layout, "title": meta.get("modelspec.title") or meta.get("ss_output_name", ""),
        "family": stated.name if stated else guessed_family(adapter),
        "family_source": "metadata" if stated else "key shapes",
        "ranks": dict(sorted(ranks.items())), "alphas": dict(sorted(alphas.items())),
        "scales": sorted({round(w[2] / w[0].shape[0], 6) for w in adapter.modules.values()}),
        "conv3x3_modules": conv3x3, "dora_modules": sum(len(w) > 3 for w in adapter.modules.values()),
        "network": meta.get("ss_network_module", ""), "network_args": meta.get("ss_network_args", ""),
        "unet": _targets(unet, fam.unet_targets if fam else UNET_TARGETS),
        "text_encoder": _targets(te, fam.text_targets if fam else TEXT_TARGETS),
        "trigger": meta.get("modelspec.trigger_phrase", ""),
        "top_tags": [t for t, _ in tags.most_common(5)],
        "settings": settings, "stray_keys": adapter.stray,
    }
    if base is not None:
        from sdlora.models import Base, load_base

        base = base if isinstance(base, Base) else load_base(base)
        result = fit(adapter, base_modules(base.pipe, base.family))
        info["base"] = {"name": base.name, "family": base.family, "mapped": len(result["mapped"]),
                        "missing": result["missing"], "wrong_shape": result["wrong_shape"],
                        "family_ok": not stated or stated.arch == base.fam.arch,
                        "ok": not result["missing"] and not result["wrong_shape"] and not adapter.stray}
    return info


def format_info(info: dict, limit: int = 10) -> str:
    """`describe`'s dict as the lines `sdlora info` prints."""

    def counts(c: dict) -> str:
        return ", ".join(f"{k:g} ({v} modules)" if isinstance(k, float) else f"{k} ({v} modules)" for k, v in c.items())

    def targets(t: dict) -> str:
        if not t["modules"]:
            return "none"
        preset = f"; sdlora preset '{t['preset']}'" if t["preset"] else ""
        return f"{t['modules']} modules: " + ", ".join(f"{k} x{v}" for k, v in t["layers"].items()) + preset

    family = info["family"] or "unknown (no metadata, and the key shapes fit no known family)"
    title = f"   title: {info['title']}" if info["title"] else ""
    lines = [f"file:          {info['file']}", f"layout:        {info['layout']}{title}",
             f"family:        {family}" + (f" (from {info['family_source']})" if info["family"] else ""),
             f"rank:          {counts(info['ranks'])}", f"alpha:         {counts(info['alphas'])}",
             "scale:         " + ", ".join(f"{s:g}" for s in info["scales"]) + " (alpha/rank)",
             f"unet:          {targets(info['unet'])}", f"text encoder:  {targets(info['text_encoder'])}"]
    if len(info["alphas"]) > 1:
        top = max(info["ranks"])
        lines.append(f"note:          the alphas differ between modules; diffusers 0.42 (so also sdlora's previews) applies the "
                     f"most common one to every module; `sdlora resize FILE --rank {top}` writes one alpha, same function")
    if info["conv3x3_modules"]:
        lines.append(f"conv 3x3:      {info['conv3x3_modules']} modules (LoCon)")
    if info["dora_modules"]:
        lines.append(f"DoRA:          {info['dora_modules']} modules with a magnitude (dora_scale); diffusers does not "
                     "read it, ComfyUI, Forge and LyCORIS do")
    if info["network"]:
        lines.append(f"network:       {info['network']}" + (f" {info['network_args']}" if info["network_args"] else ""))
    lines.append(f"trigger:       {info['trigger'] or '(none in the metadata)'}")
    if info["top_tags"]:
        lines.append("top tags:      " + "; ".join(info["top_tags"]))
    if info["settings"]:
        lines.append("training:      " + ", ".join(f"{k} {v}" for k, v in info["settings"].items()))
    else:
        lines.append("training:      (no training settings in the metadata)")
    if info["stray_keys"]:
        lines.append(f"stray keys:    {len(info['stray_keys'])} (diffusers then loads nothing): "
                     + ", ".join(info["stray_keys"][:limit]))
    base = info.get("base")
    if base:
        total = base["mapped"] + len(base["missing"]) + len(base["wrong_shape"])
        verdict = "every key maps" if base["ok"] else "NOT every key maps"
        lines.append(f"on base:       {base['name']} ({base['family']}): {verdict}, {base['mapped']}/{total} modules")
        if not base["family_ok"]:
            lines.append(f"               made for {info['family']}, the base is {base['family']}")
        for name in base["missing"][:limit]:
            lines.append(f"  no such layer in the base: {name}")
        for name, lora, layer in base["wrong_shape"][:limit]:
            lines.append(f"  shape mismatch: {name}: lora up x down {lora}, layer {layer}")
        hidden = max(0, len(base["missing"]) - limit) + max(0, len(base["wrong_shape"]) - limit)
        if hidden:
            lines.append(f"  ... and {hidden} more (--json lists all)")
    return "\n".join(lines)
