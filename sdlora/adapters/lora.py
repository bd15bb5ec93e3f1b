"""LoRA, LoCon and DoRA (peft's layers): W' = W + strength * alpha/r * up @ down in the kohya layout (lora_down,
lora_up, alpha), convolutions too for LoCon, and DoRA's magnitude as LyCORIS writes it (dora_scale)."""

from __future__ import annotations

import json
import math
import re

import torch
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.lora import LoraLayer

from sdlora import families
from sdlora.adapters import dora as dora_layers
from sdlora.families.naming import KOHYA_UNET, kohya_name, kohya_text_encoder_name

ADAPTER = "default"  # peft's adapter name for the one sdlora trains
KOHYA_SUFFIXES = (".lora_down.weight", ".lora_up.weight", ".alpha")
DORA_SUFFIX = ".dora_scale"
PEFT_SUFFIXES = (".lora_A.weight", ".lora_B.weight")  # diffusers/peft layout


class LoRA:
    """LoRA, and the two types that share its layers and file layout: LoCon (`conv`: the UNet's ResNet convolutions
    too, kohya's conv_dim) and DoRA (`dora`: peft's use_dora, a trained magnitude per output channel, `dora_scale`)."""

    def __init__(self, name: str = "lora", *, conv: bool = False, dora: bool = False):
        self.name, self.conv, self.dora = name, conv, dora
        # LoCon files are kohya's networks.lora with conv_dim; DoRA files are LyCORIS's (kohya has no DoRA)
        self.network_module = "lycoris.kohya" if dora else "networks.lora"
        self.key_suffixes = KOHYA_SUFFIXES + ((DORA_SUFFIX,) if dora else ())

    def attach(self, model: torch.nn.Module, targets: list[str], *, rank: int, alpha: float,
               dropout: float = 0.0, conv_targets: list[str] = (), conv_rank: int = 0, conv_alpha: float = 0.0,
               rslora: bool = False, exclude: str = "") -> list[torch.nn.Parameter]:
        """peft LoRA layers on `targets` (Gaussian down, zero up: a fresh adapter leaves the output as it was); the
        base frozen, the adapter's parameters fp32 (updates would vanish in fp16). `conv_targets` take `conv_rank`
        and `conv_alpha` (LoCon's 3x3 convolutions, through peft's rank_pattern/alpha_pattern); `rslora` scales by
        alpha/sqrt(rank). DoRA's magnitudes start at the base weights' row norms (peft), so it too starts as the base.
        `exclude`: a regular expression of module paths left without an adapter (peft's exclude_modules)."""
        config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout,
                            target_modules=[*targets, *conv_targets], init_lora_weights="gaussian",
                            rank_pattern={t: conv_rank for t in conv_targets},
                            alpha_pattern={t: conv_alpha for t in conv_targets}, use_dora=self.dora, use_rslora=rslora,
                            exclude_modules=exclude or None)
        model.requires_grad_(False)
        inject_adapter_in_model(config, model, adapter_name=ADAPTER)
        if self.dora:
            for layer in self.layers(model).values():
                dora_layers.use(layer)
        params = [p for layer in self.layers(model).values()
                  for p in (layer.lora_A[ADAPTER].weight, layer.lora_B[ADAPTER].weight,
                            *((layer.lora_magnitude_vector[ADAPTER].weight,) if self.dora else ()))]
        for p in params:
            p.data = p.data.float()
            p.requires_grad_(True)
        return params

    def layers(self, model: torch.nn.Module, adapter: str = ADAPTER) -> dict[str, torch.nn.Module]:
        """Module path -> peft LoRA layer, for every layer carrying `adapter` (sdlora's by default)."""
        return {name: m for name, m in model.named_modules() if isinstance(m, LoraLayer) and adapter in m.lora_A}

    def set_strength(self, model: torch.nn.Module, strength: float) -> None:
        for layer in self.layers(model).values():
            if not self.dora:
                layer.set_scale(ADAPTER, strength)
                continue
            # peft's DoRA at scale s scales only the direction's update and keeps the magnitude, and at scale 0 still
            # gives m/|W| times the base output. Loaders (ComfyUI, Forge, A1111, LyCORIS) blend the weights instead,
            # W + s * (W_dora - W); per layer that is exactly the outputs' blend, base + s * (dora - base), which a
            # forward hook gives. 0 turns the layer off: the base, as for every other type.
            layer.set_scale(ADAPTER, 1.0)
            layer.enable_adapters(strength != 0)
            blend = layer.__dict__.pop("_sdlora_blend", None)
            if blend is not None:
                blend.remove()
            if strength not in (0, 1):
                layer.__dict__["_sdlora_blend"] = layer.register_forward_hook(_Blend(strength))

    def state_dict(self, named_layers: dict[str, torch.nn.Module]) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for key, layer in named_layers.items():
            down = layer.lora_A[ADAPTER].weight.detach()
            up = layer.lora_B[ADAPTER].weight.detach()
            # copies: on the CPU .float().cpu() is the parameter itself, which training (or an average swapped
            # out) changes in place before the file is written
            out[f"{key}.lora_down.weight"] = down.float().cpu().clone(memory_format=torch.contiguous_format)
            out[f"{key}.lora_up.weight"] = up.float().cpu().clone(memory_format=torch.contiguous_format)
            # every loader scales by alpha / rank; writing the trained alpha (not rank) keeps the strength right
            rank = down.shape[0]
            alpha = layer.lora_alpha[ADAPTER] if hasattr(layer, "lora_alpha") else layer.scaling[ADAPTER] * rank
            if getattr(layer, "use_rslora", {}).get(ADAPTER, False):
                # rsLoRA scales by alpha/sqrt(rank); no loader knows it, so the file's alpha is alpha*sqrt(rank),
                # which every loader's alpha/rank turns back into the trained scale
                alpha = alpha * math.sqrt(rank)
            out[f"{key}.alpha"] = torch.tensor(float(alpha), dtype=torch.float32)
            if self.dora:
                # peft's magnitude is per output channel (the row norms of W + scale * up @ down; Linear (out,),
                # Conv2d (1, out, 1, 1)). LyCORIS writes it as `dora_scale` shaped (out, 1) / (out, 1, 1, 1) with
                # wd_on_output=True (lycoris/modules/locon.py), and ComfyUI takes a first dimension equal to the
                # weight's as the output axis (comfy/weight_adapter/base.py, weight_decompose).
                magnitude = layer.lora_magnitude_vector[ADAPTER].weight.detach()
                out[f"{key}{DORA_SUFFIX}"] = magnitude.float().cpu().reshape(up.shape[0], *[1] * (down.dim() - 1)) \
                    .clone(memory_format=torch.contiguous_format)
        return out

    def read(self, state: dict[str, torch.Tensor], metadata: dict[str, str]) -> dict | None:
        """{"modules": kohya name -> (down, up, alpha) (and dora_scale, 4th, for DoRA modules), "layout": "kohya" or
        "diffusers", "stray": [keys]}: a kohya/LyCORIS-layout file (LoRA, LoCon, DoRA), or a diffusers/peft-layout
        one (`lora_A`/`lora_B`) named the kohya way; None when a file without `lora_A`/`lora_B` keys holds no kohya
        LoRA module."""
        if any(".lora_A." in k or ".lora_B." in k for k in state):
            return _read_peft(state, metadata)
        names: dict[str, dict[str, torch.Tensor]] = {}
        stray = []
        for key, value in state.items():
            suffix = next((s for s in (*KOHYA_SUFFIXES, DORA_SUFFIX) if key.endswith(s)), None)
            name = key[: -len(suffix)] if suffix else ""
            if suffix and name.startswith((KOHYA_UNET, *families.kohya_text_encoder_prefixes())) and "." not in name:
                names.setdefault(name, {})[suffix] = value
            else:
                stray.append(key)
        modules = {}
        for name, parts in names.items():
            if ".lora_down.weight" not in parts or ".lora_up.weight" not in parts:
                stray += [name + s for s in parts]
                continue
            down, up = parts[".lora_down.weight"], parts[".lora_up.weight"]
            # every loader uses alpha = rank (scale 1) when `.alpha` is missing
            alpha = float(parts[".alpha"]) if ".alpha" in parts else float(down.shape[0])
            modules[name] = (down, up, alpha) + ((parts[DORA_SUFFIX],) if DORA_SUFFIX in parts else ())
        return {"modules": modules, "layout": "kohya", "stray": sorted(stray)} if modules else None

    def delta(self, weights, strength: float = 1.0, base_weight: torch.Tensor | None = None) -> torch.Tensor:
        """For a DoRA module (a 4th weight, dora_scale) `base_weight` is needed: its change depends on the base."""
        down, up, alpha = weights[:3]
        change = (up.flatten(1).float() @ down.flatten(1).float()) * (alpha / down.shape[0])
        if len(weights) < 4:
            return change * strength
        # DoRA (LyCORIS's apply_weight_decompose with wd_on_output, peft's DoraLinearLayer): W' = m * V / |V|_row,
        # V = W + change, the norm over each output channel's inputs; strength s gives W + s * (W' - W) as LyCORIS
        # and ComfyUI apply it.
        assert base_weight is not None, "a DoRA module's change needs the base weight"
        base = base_weight.flatten(1).float()
        merged = base + change
        magnitude = weights[3].reshape(-1, 1).float()
        return strength * (magnitude * merged / merged.norm(dim=1, keepdim=True) - base)

    def describe(self, weights) -> dict:
        """rank, alpha, the scale loaders apply (alpha/rank), and the (out, in) size of the weight it changes."""
        down, up, alpha = weights[:3]
        return {"rank": down.shape[0], "alpha": alpha, "scale": alpha / down.shape[0],
                "shape": (up.shape[0], down[0].numel())}

    def metadata(self, *, rank: int, alpha: float, dropout: float, conv_rank: int = 0, conv_alpha: float = 0.0,
                 rslora: bool = False) -> dict[str, str]:
        """With `rslora` the alphas written are the ones in the file's `.alpha` keys (alpha * sqrt(rank))."""
        def written(a, r):
            return a * math.sqrt(r) if rslora else a

        args = {}
        if self.dora:  # as LyCORIS records a run of `--network_module lycoris.kohya --network_args algo=lora dora_wd=True`
            args = {"algo": "lora", "dora_wd": "True", "wd_on_output": "True"}
        if self.conv:  # kohya's networks.lora records its network_args as strings
            args.update(conv_dim=str(conv_rank), conv_alpha=str(written(conv_alpha, conv_rank)))
        meta = {"ss_network_module": self.network_module, "ss_network_dim": str(rank),
                "ss_network_alpha": str(written(alpha, rank)), "ss_network_dropout": str(dropout),
                "sdlora_adapter": self.name}
        if args:
            meta["ss_network_args"] = json.dumps(args)
        if rslora:
            meta["sdlora_rslora"] = json.dumps({"alpha": alpha, **({"conv_alpha": conv_alpha} if self.conv else {})})
        return meta


def _read_peft(state: dict, metadata: dict) -> dict:
    # diffusers writes the peft config per component into `lora_adapter_metadata`; without it alpha = rank.
    config = json.loads(metadata.get("lora_adapter_metadata", "{}") or "{}")
    components = "|".join(("unet", "transformer", *families.text_encoder_components()))
    pattern = re.compile(rf"^({components})\.(.+)\.lora_(A|B)\.weight$")
    parts: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    stray = []
    for key, value in state.items():
        m = pattern.match(key)
        if m:
            parts.setdefault((m[1], m[2]), {})[m[3]] = value
        else:
            stray.append(key)
    # the kohya prefixes follow the text encoders the file holds (two: SDXL's lora_te1_ and lora_te2_)
    held = {k.split(".", 1)[0] for k in state} & set(families.text_encoder_components())
    prefixes = families.peft_prefixes(held)
    # a file for a DiT family (SD3.5) is named as its files are: the layout's own names (`transformer.<path>`)
    own_names = any(component == "transformer" for component, _ in parts)
    modules = {}
    for (component, module_path), ab in parts.items():
        if set(ab) != {"A", "B"}:
            stray += [f"{component}.{module_path}.lora_{x}.weight" for x in ab]
            continue
        rank = ab["A"].shape[0]
        alpha = config.get(f"{component}.lora_alpha", rank)
        for pat, value in (config.get(f"{component}.alpha_pattern") or {}).items():
            if module_path == pat or module_path.endswith("." + pat) or re.fullmatch(pat, module_path):
                alpha = value
        if own_names:
            name = f"{component}.{module_path}"
        else:
            name = kohya_name(KOHYA_UNET, module_path) if component == "unet" \
                else kohya_text_encoder_name(prefixes[component], module_path)
        modules[name] = (ab["A"], ab["B"], float(alpha))
    return {"modules": modules, "layout": "diffusers", "stray": sorted(stray)}


LORA = LoRA()
LOCON = LoRA("locon", conv=True)
DORA = LoRA("dora", dora=True)
DORA_CONV = LoRA("dora", conv=True, dora=True)  # DoRA on LoCon's layers too (TrainConfig.dora_conv)


class _Blend:
    """A forward hook that makes a DoRA layer's output the base's plus `strength` times its change."""

    def __init__(self, strength: float):
        self.strength = strength

    def __call__(self, layer, args, output):
        base = layer.base_layer(args[0])
        return base + self.strength * (output - base)
