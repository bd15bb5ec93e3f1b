"""Read any LoRA file sdlora understands (LoRA, LoCon, DoRA, LoHa, LoKr) into per-module weights, and describe it: layout, family, ranks,
alphas, targets, trigger words, training settings, and whether its keys fit a given base model."""

from __future__ import annotations

import json
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch

from sdlora import adapters, families
from sdlora.adapters.lora import LORA
from sdlora.adapters.type import AdapterType
from sdlora.errors import UserError, first_line
from sdlora.families.naming import KOHYA_UNET, kohya_name, kohya_text_encoder_name
from sdlora.families.targets import TEXT_TARGETS, UNET_TARGETS
from sdlora.lora import read_lora

# LyCORIS networks sdlora does not read (it reads LoRA/LoCon, DoRA, LoHa and LoKr). (key part, what the file is)
_OTHER_NETWORKS = (("hada_t1", "LyCORIS LoHa with Tucker factors"), ("lokr_t2", "LyCORIS LoKr with Tucker factors"),
                   (".diff", "LyCORIS full-weight"), ("oft_blocks", "LyCORIS OFT"), ("oft_diag", "LyCORIS OFT"),
                   ("lora_mid.weight", "LyCORIS LoCon with Tucker factors"))
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

    modules: dict  # kohya name -> the type's weights: (down, up, alpha[, dora_scale]) for LoRA, a dict for LoHa/LoKr
    metadata: dict[str, str]
    layout: str  # "kohya", "diffusers" (peft keys, `lora_A`/`lora_B`) or "lycoris" (LoHa, LoKr)
    stray: list[str] = field(default_factory=list)  # keys that belong to no module: loaders choke on these
    kind: AdapterType = LORA  # whose `delta`/`describe` read `modules` (LORA for LoRA, LoCon and DoRA files)

    @property
    def plain(self) -> bool:
        """A LoRA/LoCon file without DoRA's magnitudes: what diffusers' loader reads whole."""
        return self.kind is LORA and not any(len(w) > 3 for w in self.modules.values())


def check_plain_lora(name: str, state: dict) -> None:
    """A one-line UserError saying what the file `name` is when its tensors are a network sdlora does not read."""
    for key in state:
        kind = next((kind for part, kind in _OTHER_NETWORKS if part in key), None)
        if kind:
            raise UserError(f"{name} is a {kind} file, which sdlora does not read (key {key})",
                            "sdlora previews, merges and describes LoRA, LoCon, DoRA, LoHa and LoKr files; ComfyUI "
                            "and Forge load this one")


def read_adapter(path: str | Path) -> Adapter:
    """Read a kohya/LyCORIS-layout (LoRA, LoCon, DoRA, LoHa, LoKr) or diffusers/peft-layout file; UserError for
    anything else."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"LoRA file not found: {path}", "give the path of a .safetensors file")
    try:
        state, metadata = read_lora(path)
    except Exception as e:  # safetensors raises its own error types for a truncated or foreign file
        raise UserError(f"{path.name} is not a readable .safetensors file: {first_line(e, 200)}",
                        "check that the download finished; sdlora reads .safetensors LoRA files") from None
    check_plain_lora(path.name, state)
    found = adapters.read_any(state, metadata)
    if found is None:
        raise UserError(f"{path.name} holds no LoRA weights (no .lora_down/.lora_up, .lora_A/.lora_B, hada_ or lokr_ "
                        "keys)", "give a LoRA .safetensors file, not a checkpoint or an embedding")
    kind, found = found
    return Adapter(found["modules"], metadata, found["layout"], found["stray"], kind)


def guessed_family(adapter: Adapter) -> str | None:
    """The family the key names and shapes point to, for files without metadata: names only one family uses, else
    the UNet's cross-attention width (attn2 to_k input; the tiny model's 128 tells nothing)."""
    family = families.from_lora_names(list(adapter.modules))
    if family is None:
        widths = {adapter.kind.describe(w)["shape"][1] for n, w in adapter.modules.items() if n.endswith("attn2_to_k")}
        family = next((f for w in widths if (f := families.of_width(w))), None)
    return family.name if family else None


def base_modules(pipe, family: str) -> dict[str, torch.nn.Module]:
    """kohya name -> Linear/Conv2d of the base, under every name the loaders accept for this family: the diffusers
    module paths, the original (SGM) ones where kohya names the UNet so, each text encoder under all its prefixes."""
    fam = families.get(family)
    table: dict[str, torch.nn.Module] = {}
    layers = (torch.nn.Linear, torch.nn.Conv2d)
    # a layer under a loaded adapter (peft's wrapper) is its `base_layer`, named as the layer it wraps
    def named(model):
        return [(path.replace(".base_layer", ""), m) for path, m in model.named_modules() if isinstance(m, layers)]

    denoiser = fam.denoiser_of(pipe)
    unet_layers = named(denoiser)
    if fam.peft_names:  # SD3.5: the files' own names, diffusers' (`transformer.<path>`, `text_encoder.<path>`)
        for path, m in unet_layers:
            table[fam.kohya_unet_name(path, denoiser.config)] = m
        for prefix, te in zip(fam.text_encoders, fam.text_encoder_models(pipe)):
            table.update({fam.kohya_text_encoder_name(prefix, path): m for path, m in named(te)})
        return table
    for path, m in unet_layers:
        table[kohya_name(KOHYA_UNET, path)] = m
    if fam.sgm_unet:
        for path, m in unet_layers:
            table[fam.kohya_unet_name(path, denoiser.config)] = m
    for prefix, component in fam.kohya_prefixes().items():
        for path, m in named(getattr(pipe, component)):
            table[kohya_text_encoder_name(prefix, path)] = m
    return table


def fit(adapter: Adapter, table: dict[str, torch.nn.Module]) -> dict:
    """Which modules land on the base: `mapped` names, `missing` (no such layer), `wrong_shape` (name, lora, layer)."""
    mapped, missing, wrong = [], [], []
    for name, weights in adapter.modules.items():
        layer = table.get(name)
        out, inputs = adapter.kind.describe(weights)["shape"]
        if layer is None:
            missing.append(name)
        elif out != layer.weight.shape[0] or inputs != layer.weight[0].numel():
            wrong.append((name, f"{out}x{inputs}", tuple(layer.weight.shape)))
        else:
            mapped.append(name)
    return {"mapped": mapped, "missing": sorted(missing), "wrong_shape": sorted(wrong)}


# the UNet's 3x3 convolutions as kohya names them in either numbering (diffusers paths; SGM for SDXL)
_CONV3X3_NAMES = ("_conv1", "_conv2", "_downsamplers_0_conv", "_upsamplers_0_conv", "_in_layers_2", "_out_layers_3",
                  "_0_op", "_conv")
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
    described = [adapter.kind.describe(w) for w in adapter.modules.values()]
    ranks = Counter(d["rank"] for d in described)
    alphas = Counter(d["alpha"] for d in described)
    denoiser = ("lora_unet_", "transformer.")  # kohya's prefix; diffusers' for SD3.5
    if adapter.kind is LORA:
        conv3x3 = sum(w[0].dim() == 4 and w[0].shape[-1] > 1 for w in adapter.modules.values())
    else:  # LoHa/LoKr flatten a kernel into the inputs: the ResNet blocks' and samplers' 3x3 convolutions by name
        conv3x3 = sum(n.startswith("lora_unet_") and n.endswith(_CONV3X3_NAMES) for n in adapter.modules)
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
    dora = sum("dora_scale" in w if isinstance(w, dict) else len(w) > 3 for w in adapter.modules.values())
    info = {
        "file": str(path), "layout": adapter.layout, "title": meta.get("modelspec.title") or meta.get("ss_output_name", ""),
        "family": stated.name if stated else guessed_family(adapter),
        "family_source": "metadata" if stated else "key shapes",
        "type": adapter.kind.name if adapter.kind is not LORA else ("dora" if dora else "lora"),
        "ranks": dict(sorted(ranks.items(), key=lambda kv: str(kv[0]).zfill(8))), "alphas": dict(sorted(alphas.items())),
        "scales": sorted({round(d["scale"], 6) for d in described}),
        "conv3x3_modules": conv3x3, "dora_modules": dora,
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


_TYPE_NAMES = {"lora": "LoRA: up @ down", "dora": "DoRA: LoRA with a magnitude per output channel",
               "loha": "LyCORIS LoHa: Hadamard product of two low-rank products",
               "lokr": "LyCORIS LoKr: Kronecker product"}


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
             f"type:          {info['type']} ({_TYPE_NAMES[info['type']]})",
             f"family:        {family}" + (f" (from {info['family_source']})" if info["family"] else ""),
             f"rank:          {counts(info['ranks'])}", f"alpha:         {counts(info['alphas'])}",
             "scale:         " + ", ".join(f"{s:g}" for s in info["scales"])
             + (" (alpha/rank; 1 for full-matrix modules)" if info["type"] == "lokr" else " (alpha/rank)"),
             f"unet:          {targets(info['unet'])}", f"text encoder:  {targets(info['text_encoder'])}"]
    if len(info["alphas"]) > 1 and info["layout"] != "lycoris":
        top = max(info["ranks"])
        lines.append(f"note:          the alphas differ between modules; diffusers 0.42 (so also sdlora's previews) applies the "
                     f"most common one to every module; `sdlora resize FILE --rank {top}` writes one alpha, same function")
    if info["conv3x3_modules"]:
        lines.append(f"conv 3x3:      {info['conv3x3_modules']} modules (the ResNet blocks', as LoCon)")
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
