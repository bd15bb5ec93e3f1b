"""What an artist shares: a copy of the LoRA with their title, trigger words and description, and a model card."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from safetensors import safe_open
from safetensors.torch import save_file


def retitle(src: str | Path, dst: str | Path, *, title: str, trigger: str, description: str) -> dict[str, str]:
    """Copy the LoRA file `src` to `dst` with title, trigger words and description written into its metadata
    (`modelspec.*` and kohya's `ss_output_name` / `ss_training_comment`); the tensors stay exactly as they were.
    Returns the new metadata."""
    with safe_open(str(src), "pt") as f:
        metadata = dict(f.metadata() or {})
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    metadata.update({
        "modelspec.title": title,
        "modelspec.trigger_phrase": trigger,
        "modelspec.description": description,
        "ss_output_name": title,
        "ss_training_comment": description,
    })
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(dst.name + ".tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    if "sshs_model_hash" in metadata:  # design.md: when written it must be the sha256 of the bytes after the header
        metadata["sshs_model_hash"] = _data_sha256(tmp)
        metadata.pop("sshs_legacy_hash", None)
        save_file(tensors, str(tmp), metadata=metadata)
    tmp.replace(dst)
    return metadata


def _data_sha256(path: Path) -> str:
    data = path.read_bytes()
    header = int.from_bytes(data[:8], "little")
    return hashlib.sha256(data[8 + header:]).hexdigest()


def model_card(*, title: str, trigger: str, description: str, config: dict, file_name: str, step: int | None,
               samples: list[dict], sample_file: str | None = None) -> str:
    """A short markdown model card: trigger words, base model, how to use, key settings, sample prompts and seeds.

    `config` is the run's config.json; `samples` its `sample` events at the exported step.
    """
    base = config.get("base", "")
    base_name = "sdlora tiny (SD1-family test model)" if base == "tiny" else Path(base).name or base
    front = ["---", "tags: [stable-diffusion, lora, text-to-image]", "library_name: diffusers"]
    if base.count("/") == 1 and not Path(base).exists():
        front.append(f"base_model: {base}")
    if trigger:
        front.append(f"instance_prompt: {json.dumps(trigger)}")
    front.append("---")

    lines = front + ["", f"# {title}", ""]
    if description:
        lines += [description, ""]
    if sample_file:
        lines += [f"![sample]({sample_file})", ""]
    lines += [
        f"- **Trigger words:** {trigger or '(none: the LoRA applies without one)'}",
        f"- **Base model:** {base_name}",
        f"- **File:** `{file_name}`" + (f" (saved at step {step})" if step is not None else ""),
        "",
        "## How to use",
        "",
        f"- AUTOMATIC1111 / Forge: put the file in `models/Lora` and add `<lora:{Path(file_name).stem}:0.8>` "
        "to the prompt" + (f" together with `{trigger}`." if trigger else "."),
        "- ComfyUI: put it in `models/loras` and use a *Load LoRA* node.",
        "- InvokeAI: install it from the model manager.",
        f"- diffusers: `pipe.load_lora_weights(\"{file_name}\")`.",
        "",
        "## Training settings",
        "",
        "| setting | value |",
        "|---|---|",
    ]
    keys = [("steps", "steps"), ("batch_size", "batch size"), ("rank", "rank (dim)"), ("alpha", "alpha"),
            ("unet_lr", "UNet learning rate"), ("text_encoder_lr", "text encoder learning rate"),
            ("train_text_encoder", "text encoder trained"), ("targets", "layers"), ("resolution", "resolution"),
            ("optimizer", "optimizer"), ("lr_scheduler", "schedule"), ("min_snr_gamma", "min-SNR gamma"),
            ("noise_offset", "noise offset"), ("seed", "seed")]
    for key, label in keys:
        if key in config:
            value = config[key]
            if key == "resolution" and not value:
                value = "model default"
            lines.append(f"| {label} | {value} |")
    lines.append("| trained with | sdlora |")
    if samples:
        lines += ["", "## Sample prompts", "", "| prompt | negative | seed | steps | guidance | sampler |",
                  "|---|---|---|---|---|---|"]
        for s in samples:
            cells = [s.get("prompt", ""), s.get("negative_prompt", ""), s.get("seed", ""), s.get("steps", ""),
                     s.get("guidance_scale", ""), s.get("scheduler", "")]
            lines.append("| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines) + "\n"
