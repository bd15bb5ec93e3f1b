"""What an artist shares: a copy of the LoRA with their title, trigger words and description, a sample picture and
a model card, made from a run directory."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from safetensors import safe_open
from safetensors.torch import save_file

from sdlora.atomic import atomic_path
from sdlora.lora import usual_mode
from sdlora.rundir import read_events


@dataclass
class Shared:
    files: list[Path]  # the LoRA file first
    card: str  # the model card's markdown
    notes: list[str] = field(default_factory=list)  # what was asked for but could not be made


def share(run_dir: str | Path, file: str, out: str | Path, *, title: str, trigger: str, description: str,
          diffusers: bool = False, sample: bool = True, readme: bool = True) -> Shared:
    """Write into `out` the run's LoRA `file` (lora.safetensors or lora-step-N.safetensors) under `title`, with the
    metadata rewritten; optionally its diffusers-layout twin, a sample picture and the model card as README."""
    run_dir, out = Path(run_dir), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    match = re.match(r"lora-step-(\d+)\.safetensors$", file)
    step = int(match.group(1)) if match else None
    stem = re.sub(r"[^A-Za-z0-9._-]+", "-", title).strip(".-") or run_dir.name
    stem += f"-step{step}" if step is not None else ""
    made = Shared([out / f"{stem}.safetensors"], "")
    retitle(run_dir / file, made.files[0], title=title, trigger=trigger, description=description)
    if diffusers:
        twin = run_dir / "lora-diffusers.safetensors"
        if step is None and twin.is_file():
            made.files.append(out / f"{stem}-diffusers.safetensors")
            shutil.copyfile(twin, made.files[-1])
        else:
            made.notes.append("This run has no diffusers version of that file: tick 'Also write the diffusers "
                              "version' under Train, Advanced before training (only the final file gets one).")
    events = read_events(run_dir)
    if step is None:  # the final file: the step it was written at
        step = next((e["step"] for e in reversed(events) if e["type"] in ("done", "stopped")), None)
    samples = [e for e in events if e["type"] == "sample" and e["step"] == step] or \
        [e for e in events if e["type"] == "sample"][-2:]
    sample_name = None
    if sample and samples and Path(samples[0]["path"]).is_file():
        sample_name = f"{stem}-sample.png"
        made.files.append(out / sample_name)
        shutil.copyfile(samples[0]["path"], made.files[-1])
    config = json.loads((run_dir / "config.json").read_text())
    measured = next((e for e in reversed(events) if e["type"] == "eval" and Path(e["path"]).name == file), None)
    best = next((e for e in reversed(events) if e["type"] == "recommend"), None)
    made.card = model_card(title=title, trigger=trigger, description=description, config=config,
                           file_name=made.files[0].name, step=step, samples=samples, sample_file=sample_name,
                           measured=measured, recommended=best is not None and Path(best["path"]).name == file)
    if readme:
        made.files.append(out / f"{stem}-README.md")
        made.files[-1].write_text(made.card, encoding="utf-8")
    return made


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
    with atomic_path(dst) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
        if "sshs_model_hash" in metadata:  # the sha256 after the header (docs/lora-format.md, Cover image and hash)
            metadata["sshs_model_hash"] = _data_sha256(tmp)
            metadata.pop("sshs_legacy_hash", None)
            save_file(tensors, str(tmp), metadata=metadata)
        usual_mode(tmp)
    return metadata


def _data_sha256(path: Path) -> str:
    data = path.read_bytes()
    header = int.from_bytes(data[:8], "little")
    return hashlib.sha256(data[8 + header:]).hexdigest()


def model_card(*, title: str, trigger: str, description: str, config: dict, file_name: str, step: int | None,
               samples: list[dict], sample_file: str | None = None, measured: dict | None = None,
               recommended: bool = False) -> str:
    """A short markdown model card: trigger words, base model, suggested strength, how to use, key settings, sample
    prompts and seeds.

    `config` is the run's config.json; `samples` its `sample` events at the exported step; `measured` the file's `eval`
    event (sdlora.evaluate), `recommended` whether the run recommends this file.
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
    ]
    strength = measured["suggested_strength"] if measured else 0.8
    if measured:
        lines.append(f"- **Suggested strength:** {strength:g} (measured by sdlora on the {measured['on']}: it removes "
                     f"{measured['learned']:.0%} of the base model's error there; prompts without the trigger change "
                     f"{measured['bleed']:.0%} as much as prompts with it"
                     + ("; the save this run recommends)" if recommended else ")"))
    lines += [
        "",
        "## How to use",
        "",
        f"- AUTOMATIC1111 / Forge: put the file in `models/Lora` and add `<lora:{Path(file_name).stem}:{strength:g}>` "
        "to the prompt" + (f" together with `{trigger}`." if trigger else "."),
        "- ComfyUI: put it in `models/loras` and use a *Load LoRA* node.",
        "- InvokeAI: install it from the model manager.",
        f"- diffusers: `pipe.load_lora_weights(\"{file_name}\")`." if config.get("adapter", "lora") in ("lora", "locon")
        else f"- diffusers: reads no LyCORIS {config.get('adapter')} file whole; merge it into the base "
             "(`sdlora merge`) and load that.",
        "",
        "## Training settings",
        "",
        "| setting | value |",
        "|---|---|",
    ]
    keys = [("adapter", "adapter type"), ("steps", "steps"), ("batch_size", "batch size"), ("rank", "rank (dim)"), ("alpha", "alpha"),
            ("unet_lr", "UNet learning rate"), ("text_encoder_lr", "text encoder learning rate"),
            ("train_text_encoder", "text encoder trained"), ("targets", "layers"), ("resolution", "resolution"),
            ("optimizer", "optimizer"), ("lr_scheduler", "schedule"), ("min_snr_gamma", "min-SNR gamma"),
            ("noise_offset", "noise offset"), ("seed", "seed")]
    for key, label in keys:
        if key == "text_encoder_lr" and not config.get("train_text_encoder", True):
            continue  # a text encoder that did not train had no learning rate
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
