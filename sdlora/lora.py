"""LoRA adapters: add peft layers to the UNet and text encoder, and map them to/from the kohya file layout."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from peft import LoraConfig, inject_adapter_in_model
from safetensors.torch import load_file, safe_open, save_file

ADAPTER = "default"
# design.md, "Targets": attention only, or attention + MLP as kohya trains by default.
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


def adapter_layers(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """Module path -> peft LoRA layer, for every layer carrying our adapter."""
    return {name: m for name, m in model.named_modules() if hasattr(m, "lora_A") and ADAPTER in m.lora_A}


def kohya_name(prefix: str, module_path: str) -> str:
    """`down_blocks.0.attentions.0...to_out.0` -> `lora_unet_down_blocks_0_attentions_0_..._to_out_0`."""
    return prefix + module_path.replace(".", "_")


def text_encoder_prefix(module_path: str, prefix: str = "lora_te_") -> str:
    # transformers 5 dropped the `text_model` level from CLIPTextModel; every loader still expects it in the key.
    return prefix if module_path.startswith("text_model.") else prefix + "text_model_"


def kohya_state_dict(unet: torch.nn.Module, text_encoders: dict[str, torch.nn.Module]) -> dict[str, torch.Tensor]:
    """The adapter in the kohya layout: `<name>.lora_down.weight`, `.lora_up.weight` and the trained `.alpha`.

    `text_encoders` maps a key prefix (`lora_te_` for SD1/SD2) to a text encoder that carries an adapter.
    """
    out: dict[str, torch.Tensor] = {}
    modules = [("lora_unet_", path, layer) for path, layer in adapter_layers(unet).items()]
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


def save_lora(path: str | Path, state_dict: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Write a .safetensors file atomically (temporary name, then rename), so readers never see half a file."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    save_file(state_dict, str(tmp), metadata={k: str(v) for k, v in metadata.items()})
    os.replace(tmp, path)


def read_lora(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of a LoRA file."""
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
    return load_file(str(path)), metadata
