"""LoRA (peft's layers): W' = W + strength * alpha/r * up @ down, in the kohya layout (lora_down, lora_up, alpha)."""

from __future__ import annotations

import json
import re

import torch
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.lora import LoraLayer

from sdlora import families
from sdlora.families.naming import KOHYA_UNET, kohya_name, kohya_text_encoder_name

ADAPTER = "default"  # peft's adapter name for the one sdlora trains
KOHYA_SUFFIXES = (".lora_down.weight", ".lora_up.weight", ".alpha")


class LoRA:
    name = "lora"
    network_module = "networks.lora"
    key_suffixes = KOHYA_SUFFIXES

    def attach(self, model: torch.nn.Module, targets: list[str], *, rank: int, alpha: float,
               dropout: float = 0.0) -> list[torch.nn.Parameter]:
        """peft LoRA layers on `targets` (Gaussian down, zero up: a fresh adapter leaves the output as it was); the
        base frozen, the adapter's parameters fp32 (updates would vanish in fp16)."""
        config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets,
                            init_lora_weights="gaussian")
        model.requires_grad_(False)
        inject_adapter_in_model(config, model, adapter_name=ADAPTER)
        params = [p for layer in self.layers(model).values()
                  for p in (layer.lora_A[ADAPTER].weight, layer.lora_B[ADAPTER].weight)]
        for p in params:
            p.data = p.data.float()
            p.requires_grad_(True)
        return params

    def layers(self, model: torch.nn.Module, adapter: str = ADAPTER) -> dict[str, torch.nn.Module]:
        """Module path -> peft LoRA layer, for every layer carrying `adapter` (sdlora's by default)."""
        return {name: m for name, m in model.named_modules() if isinstance(m, LoraLayer) and adapter in m.lora_A}

    def set_strength(self, model: torch.nn.Module, strength: float) -> None:
        for layer in self.layers(model).values():
            layer.set_scale(ADAPTER, strength)

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
            alpha = layer.lora_alpha[ADAPTER] if hasattr(layer, "lora_alpha") else layer.scaling[ADAPTER] * down.shape[0]
            out[f"{key}.alpha"] = torch.tensor(float(alpha), dtype=torch.float32)
        return out

    def read(self, state: dict[str, torch.Tensor], metadata: dict[str, str]) -> dict | None:
        """{"modules": kohya name -> (down, up, alpha), "layout": "kohya" or "diffusers", "stray": [keys]}: a
        kohya-layout file, or a diffusers/peft-layout one (`lora_A`/`lora_B`) named the kohya way; None when a file
        without `lora_A`/`lora_B` keys holds no kohya LoRA module."""
        if any(".lora_A." in k or ".lora_B." in k for k in state):
            return _read_peft(state, metadata)
        names: dict[str, dict[str, torch.Tensor]] = {}
        stray = []
        for key, value in state.items():
            suffix = next((s for s in KOHYA_SUFFIXES if key.endswith(s)), None)
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
            modules[name] = (down, up, alpha)
        return {"modules": modules, "layout": "kohya", "stray": sorted(stray)} if modules else None

    def delta(self, weights, strength: float = 1.0) -> torch.Tensor:
        down, up, alpha = weights
        return (up.flatten(1).float() @ down.flatten(1).float()) * (strength * alpha / down.shape[0])

    def metadata(self, *, rank: int, alpha: float, dropout: float) -> dict[str, str]:
        return {"ss_network_module": self.network_module, "ss_network_dim": str(rank),
                "ss_network_alpha": str(alpha), "ss_network_dropout": str(dropout)}


def _read_peft(state: dict, metadata: dict) -> dict:
    # diffusers writes the peft config per component into `lora_adapter_metadata`; without it alpha = rank.
    config = json.loads(metadata.get("lora_adapter_metadata", "{}") or "{}")
    components = "|".join(("unet", *families.text_encoder_components()))
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
        name = kohya_name(KOHYA_UNET, module_path) if component == "unet" \
            else kohya_text_encoder_name(prefixes[component], module_path)
        modules[name] = (ab["A"], ab["B"], float(alpha))
    return {"modules": modules, "layout": "diffusers", "stray": sorted(stray)}


LORA = LoRA()
