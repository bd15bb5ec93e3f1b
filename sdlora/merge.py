"""Bake LoRAs (any type sdlora reads: LoRA, LoCon, DoRA, LoHa, LoKr) into a base model (W' = W + s * delta) and write
it as a single-file checkpoint in the original (LDM/SGM/MMDiT) layout that ComfyUI and AUTOMATIC1111 load, or as a
diffusers folder."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from sdlora.adapters.lora import KOHYA_SUFFIXES, LORA
from sdlora.errors import UserError
from sdlora.families.naming import original_layout
from sdlora.info import Adapter, base_modules, fit, read_adapter
from sdlora.lora import check_lora_fits, save_lora
from sdlora.models import Base, load_base

PRECISIONS = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


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
    for i, (name, adapter, strength) in enumerate(adapters):
        # kohya's SD3 files name the original fused layers: split onto the base's, as previews load them
        if adapter.layout == "kohya" and base.fam.peft_names:
            state = {f"{m}{suffix}": tensor for m, w in adapter.modules.items()
                     for suffix, tensor in zip(KOHYA_SUFFIXES, (w[0], w[1], torch.tensor(w[2])))}
            found = LORA.read(base.fam.loadable(state, pipe), {})
            adapters[i] = (name, Adapter(found["modules"], adapter.metadata, adapter.layout, adapter.stray), strength)
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
        for key, weights in adapter.modules.items():
            layer = table[key]
            changed.add(id(layer))
            # DoRA's change depends on the weight it lands on: the layer as the files before left it, as ComfyUI
            # applies patches one after another
            delta = adapter.kind.delta(weights, strength, base_weight=layer.weight)
            layer.weight += delta.reshape(layer.weight.shape).to(layer.weight.dtype)
    dtype = PRECISIONS[precision]
    meta = {"modelspec.sai_model_spec": "1.0.1",
            "modelspec.architecture": base.fam.architecture,
            "modelspec.title": out.stem,
            "modelspec.prediction_type": "v" if base.prediction_type == "v_prediction" else "epsilon",
            "sdlora_merged": json.dumps({"base": base.name, "loras": [[n, s] for n, _, s in adapters]})}
    out.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "diffusers":
        pipe.to(dtype)
        pipe.save_pretrained(str(out), safe_serialization=True)
        (out / "sdlora_merged.json").write_text(json.dumps(meta, indent=2))
    else:
        state = {k: v.to(dtype).contiguous() for k, v in original_layout(pipe, base.fam).items()}
        if base.prediction_type == "v_prediction":
            state["v_pred"] = torch.tensor([])  # ComfyUI marks (and detects) v-prediction checkpoints this way
            if base.zero_terminal_snr:  # and a zero-terminal-SNR schedule beside it (comfy/supported_models.py)
                state["ztsnr"] = torch.tensor([])
        save_lora(out, state, meta)
    return {"out": str(out), "format": fmt, "precision": precision, "family": base.family,
            "loras": [{"file": n, "strength": s, "modules": len(a.modules)} for n, a, s in adapters],
            "layers_changed": len(changed)}
