"""The browser app's page: pictures and captions, training with live progress, previews at any strength, export.

Layout and wiring only. Training runs as its own process (`sdlora.launch.start`; a spare one started ahead, so that a
run skips the seconds of imports); the page follows it through the run directory, so a reload or a second tab finds it
again. Importing this builds nothing; `build()` makes the page; `sdlora app` (or `python app.py` in a clone) serves it
on 127.0.0.1:7860 and ends every process it started when it exits.
"""

from __future__ import annotations

import asyncio
import atexit
import dataclasses
import functools
import hmac
import os
import shutil
import signal
import socket
import sys
import threading
import time
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
for _name in ("TRANSFORMERS_VERBOSITY", "DIFFUSERS_VERBOSITY"):
    os.environ.setdefault(_name, "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import gradio as gr
import pandas as pd

from sdlora import card, examples as bundled, launch, rundir
from sdlora import dataset as ds
from sdlora import workspace as ws
from sdlora.atomic import write_atomic
from sdlora.config import PRESETS, TrainConfig, build_config
from sdlora.errors import UserError

PRESET_CHOICES = [("Style", "style"), ("Character", "character"), ("Quick test", "quick")]
FIRST_PRESET = "quick"
GRID_STRENGTHS = (0.0, 0.25, 0.5, 0.75, 1.0)
SAVES_STRENGTHS = (0.0, 0.5, 0.75, 1.0)
STACK_SLOTS = 3  # LoRAs that can be added to the first one on the Try it tab (the handlers name each)
# A tiny-model step on a laptop CPU, measured: ~0.1 s at 4 pictures a step, plus ~15 s to start and sample.
TINY_CPU_SPEED = (40.0, 15.0)

# The main knobs, with the words an artist uses; every other TrainConfig field goes under "Advanced".
MAIN = {
    "trigger": ("Trigger word", "a made-up word that calls up your LoRA in prompts, e.g. zkstyle"),
    "steps": ("Training steps", "more steps learn more; too many copy the pictures"),
    "batch_size": ("Pictures per step", "lower it if you run out of memory"),
    "resolution": ("Resolution", "0 = the base model's own (tiny 64, SD1 512, SDXL 1024)"),
    "train_text_encoder": ("Also teach the text model", "helps characters; usually off for styles"),
    "rank": ("Rank", "size of the LoRA: 8-32 is plenty for most styles and characters"),
    "alpha": ("Alpha", "scales the LoRA's effect; half the rank is usual"),
    "unet_lr": ("Learning rate", "how fast the image model learns"),
    "text_encoder_lr": ("Text learning rate", "how fast the text model learns; 1/2 to 1/5 of the other"),
}
HIDDEN = {"dataset", "base"}
# Labels for the rest (the field's help is shown under each); unnamed fields get their name in words.
LABELS = {
    "caption_template": "Caption for pictures without one", "keep_tags": "Tags kept in front",
    "flip": "Mirror pictures", "lora_dropout": "LoRA dropout", "targets": "Layers to train",
    "grad_accum": "Gradient accumulation", "lr_scheduler": "Learning rate schedule", "lr_cycles": "Schedule restarts",
    "warmup_fraction": "Warmup", "min_snr_gamma": "Min-SNR gamma", "mixed_precision": "Precision",
    "gradient_checkpointing": "Save memory (slower)", "cache_latents": "Cache encoded pictures",
    "sample_negative": "Sample negative prompt", "sample_guidance": "Sample guidance", "sample_scheduler": "Sampler",
    "keep_checkpoints": "Checkpoints kept", "export_diffusers": "Also write the diffusers version",
}

CSS = """
.sdl-progress progress { width: 100%; height: 18px; }
.sdl-progress p { margin: 4px 0 0 0; }
#picture img, #grid img { width: 100%; height: 100%; object-fit: contain; image-rendering: pixelated; }
footer { display: none !important; }
"""


def _user_errors(fn):
    """Show a UserError in the page (and to API clients) as one line; the app keeps running."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserError as e:
            raise gr.Error(str(e)) from None
    return wrapper


def _default(f: dataclasses.Field):
    return f.default if f.default is not dataclasses.MISSING else f.default_factory()


def _form_values(preset: str | None) -> dict:
    """Every form field's value under a preset (defaults first, then the preset)."""
    config = dataclasses.asdict(build_config(preset or None))
    return {name: _form_text(name, value) for name, value in config.items()}


# The fields a preset sets: choosing a preset changes these and nothing else (a trigger word typed before stays).
PRESET_FIELDS = sorted({name for values in PRESETS.values() for name in values})


def _preset_values(preset: str) -> dict:
    """The preset's value of every field presets set (the default where this one sets none), as the form holds it."""
    values = _form_values(preset)
    return {name: values[name] for name in PRESET_FIELDS}


def _preset_of(config: dict) -> str | None:
    """The preset a run's settings match in every field presets set, or None (the form then shows no preset)."""
    return next((p for _, p in PRESET_CHOICES if all(_form_text(name, config.get(name)) == value
                                                       for name, value in _preset_values(p).items())), None)


def _form_text(name: str, value):
    """A TrainConfig value as its form field holds it (the list of sample prompts is one prompt a line)."""
    return "\n".join(value) if name == "sample_prompts" else value


def _field_input(f: dataclasses.Field, value):
    label, info = MAIN.get(f.name, (LABELS.get(f.name, f.name.replace("_", " ").capitalize()), f.metadata["help"]))
    default = _default(f)
    if isinstance(default, bool):
        return gr.Checkbox(value=value, label=label, info=info)
    if f.metadata.get("choices"):
        return gr.Dropdown(list(f.metadata["choices"]), value=value, label=label, info=info)
    if isinstance(default, int):
        return gr.Number(value=value, label=label, info=info, precision=0, minimum=0)
    if isinstance(default, float):
        step = 1e-5 if f.name.endswith("_lr") else 0.5 if f.name == "alpha" else 0.01
        return gr.Number(value=value, label=label, info=info, step=step, minimum=0)
    if isinstance(default, list):
        return gr.Textbox(value=value, label=label, info=f"{info}; one prompt a line", lines=2)
    return gr.Textbox(value=value, label=label, info=info)


def visible_gpus() -> int:
    """How many CUDA GPUs this process sees (`CUDA_VISIBLE_DEVICES` applies)."""
    import torch

    return torch.cuda.device_count()


def build(workspace: str | Path = "workspace", models: str | Path | None = None,
          max_unpacked: int = ws.MAX_UNPACKED, gpus: int | None = None, spare: bool = False,
          children: launch.Children | None = None) -> gr.Blocks:
    """The page, for a workspace folder (datasets, runs, exports) and a folder of base models. `gpus`: how many GPUs
    to offer (default: those visible); with more than one the Train tab asks how many a run uses. `spare`: keep a
    training process started ahead (sdlora.launch.Spare), so that a one-GPU run skips the seconds of imports.
    `children`: where every process the page starts is recorded, so that its owner can end them (`serve` does)."""
    gpus = visible_gpus() if gpus is None else int(gpus)
    root = Path(workspace).resolve()
    models = Path(models).resolve() if models else root / "models"
    children = launch.Children() if children is None else children
    start_lock = threading.Lock()

    def new_spare() -> launch.Spare:
        made = launch.Spare()
        children.add(made.proc, "spare")
        return made

    spares = {"next": new_spare() if spare else None}  # the process the next run goes to

    def after(process):
        """Reap a run's process, so its pid dies with it; then start the next spare."""
        process.wait()
        with start_lock:
            if spare and spares["next"] is None and children.accepting:
                spares["next"] = new_spare()
    previewers: dict = {}
    load_seconds: dict = {}  # base -> seconds its last load took
    preview_lock = threading.Lock()

    def examples() -> list[str]:
        return bundled.names()

    # ---- dataset ----------------------------------------------------------------------------------------------
    def gallery_of(name: str):
        if not name:
            return [], "Pick a dataset, or type a name and add pictures."
        if name not in ws.dataset_names(root):
            return [], f"**{ws.slug(name)}** is a new dataset: add pictures to it."
        items = ws.captions(root, name)
        images, captioned, per_epoch = ws.dataset_counts(root, name)
        note = f"**{name}**: {images} pictures, {captioned} with captions"
        if per_epoch != images:
            note += f" ({per_epoch} per round, counting repeat folders)"
        if images and captioned < images:
            note += ". Pictures without a caption train with the caption template (Train, Advanced)."
        return [(str(path), f"{file}: {caption or '(no caption)'}") for file, path, caption in items], note

    @_user_errors
    def show_dataset(name):
        items, note = gallery_of(name)
        return items, note, "", ""

    @_user_errors
    def add_pictures(name, files):
        if not files:
            raise UserError("no files to add", "drop pictures, caption .txt files or a .zip into the box first")
        name = ws.slug(name or "my-pictures")
        added = ws.add_files(root, name, [str(f) for f in files], max_unpacked=max_unpacked)
        report = [f"Added {len(added.saved)} pictures to **{name}**."]
        if added.rejected:
            report.append("Not used:\n" + "\n".join(f"- `{n}`: {why}" for n, why in added.rejected))
        report += [f"Note: {w}" for w in added.warnings]
        items, note = gallery_of(name)
        return (gr.update(choices=ws.dataset_names(root), value=name), items, note + "\n\n" + "\n\n".join(report),
                None)

    @_user_errors
    def use_example(example):
        if example not in examples():
            raise UserError(f"no example named {example!r}", "pick one from the list")
        name = ws.copy_example(root, bundled.path(example))
        items, note = gallery_of(name)
        return gr.update(choices=ws.dataset_names(root), value=name), items, note

    @_user_errors
    def pick_picture(name, evt: gr.SelectData):
        items = ws.captions(root, name)
        if evt.index is None or evt.index >= len(items):
            return "", ""
        file, _, caption = items[evt.index]
        return file, caption

    @_user_errors
    def save_caption(name, file, caption):
        ws.set_caption(root, name, file, caption)
        items, note = gallery_of(name)
        return items, note + f"\n\nSaved the caption of `{file}`."

    @_user_errors
    def remove_picture(name, file):
        ws.remove_image(root, name, file)
        items, note = gallery_of(name)
        return items, note + f"\n\nRemoved `{file}`.", "", ""

    @_user_errors
    def change_all(name, trigger, prefix, suffix, find, replace):
        if not name:
            raise UserError("no dataset picked", "pick a dataset first")
        count = ws.edit_captions(root, name, trigger=trigger, prefix=prefix, suffix=suffix, find=find, replace=replace)
        items, note = gallery_of(name)
        new_trigger = trigger.strip() or gr.skip()
        return items, note + f"\n\nChanged {count} captions.", new_trigger

    def follow_dataset(name):
        names = ws.dataset_names(root)
        return gr.update(choices=names, value=name) if name in names else gr.update(choices=names)

    # ---- train ------------------------------------------------------------------------------------------------
    def form_config(values: dict) -> TrainConfig:
        """The TrainConfig the form describes: form fields map onto TrainConfig fields by name."""
        fields = {name: values[c] for c, name in form.items()}
        if not values[train_dataset]:
            raise UserError("no dataset picked", "add pictures on the Pictures tab, then pick the dataset here")
        fields["dataset"] = str(ws.dataset_dir(root, values[train_dataset]))
        fields["base"] = ws.resolve_base(models, values[base_box])
        fields["sample_prompts"] = [p.strip() for p in (fields["sample_prompts"] or "").splitlines() if p.strip()]
        for name in fields:
            if fields[name] is None:
                raise UserError(f"{name.replace('_', ' ')} is empty", "fill in a number")
        config = build_config(**fields)
        config.validate()
        return config

    def gpu_count(values: dict) -> int:
        """The GPUs a run is to use: 1 unless several are visible and the form asks for more."""
        try:
            n = int(values[gpu_box] or 1)
        except (TypeError, ValueError):
            n = 0
        if not 1 <= n <= max(gpus, 1):
            raise UserError(f"{values[gpu_box]} GPUs asked for, and {gpus} are visible",
                            f"pick 1 to {max(gpus, 1)}")
        return n

    def plan_text(values: dict) -> str:
        name = values[train_dataset]
        if not name:
            return "Pick a dataset to see what the run will do."
        try:
            images, _, per_epoch = ws.dataset_counts(root, name)
            steps, batch = int(values[form_inv["steps"]] or 0), int(values[form_inv["batch_size"]] or 0)
            accum = int(values[form_inv["grad_accum"]] or 1)
            base = ws.resolve_base(models, values[base_box])
            n_gpus = gpu_count(values)
        except (UserError, ValueError, TypeError):
            return "Fill in the form to see what the run will do."
        if not images or steps < 1 or batch < 1:
            return "Fill in the form to see what the run will do."
        per_step = batch * accum * n_gpus
        shown = steps * per_step
        epochs = shown / per_epoch
        measured = ws.measured_speed(root, base, n_gpus)
        speed, source = (measured[:2], "measured on your last run") if measured else (None, "")
        if measured and measured[2] != n_gpus:  # a guess: GPUs rarely add up to quite that much
            speed = (measured[0] * n_gpus / measured[2], measured[1])
            source = f"your last run on {measured[2]} GPU{'s' if measured[2] > 1 else ''}, scaled to {n_gpus}"
        if speed is None and base == "tiny" and n_gpus == 1:
            speed, source = TINY_CPU_SPEED, "a rough guess for a laptop CPU"
        eta = f"about {_duration(speed[1] + shown / speed[0])} ({source}: {speed[0]:.1f} pictures/s)" \
            if speed else "shown once the run has started (no earlier run on this base to measure)"
        repeats = f" ({per_epoch} with repeats)" if per_epoch != images else ""
        split = f" ({batch * accum} on each of {n_gpus} GPUs)" if n_gpus > 1 else ""
        plan = (f"**What this run will do:** {steps} steps × {per_step} pictures{split} = {shown:,} pictures shown "
                f"to the model. Your dataset has {images} pictures{repeats}, so each one is seen about "
                f"**{epochs:.0f} times** ({epochs:.1f} epochs). Time: {eta}.")
        if not (values[form_inv["trigger"]] or "").strip() and \
                ds.common_first_word([caption for _, _, caption in ws.captions(root, name)]) is None:
            plan += f"\n\n**Note:** {ds.NO_TRIGGER[0].upper()}{ds.NO_TRIGGER[1:]}."
        return plan

    @_user_errors
    def start(values: dict):
        config = form_config(values)
        n_gpus = gpu_count(values)
        with start_lock:  # check and start together, so two tabs can't both start a run
            live = ws.running(root)
            if live:
                raise UserError(f"run {live} is still training; only one run trains at a time",
                                "wait for it to finish or press Stop, then start again")
            name = values[run_name] or f"{values[train_dataset]}-{time.strftime('%m%d-%H%M')}"
            run_dir = ws.new_run_dir(root, name)
            write_atomic(run_dir / "config.json", config.to_json())
            process = children.add(launch.start(run_dir, gpus=n_gpus, spare=spares["next"]))  # spares: one GPU only
            if n_gpus == 1:
                spares["next"] = None  # taken, or found dead and replaced by a fresh process
            threading.Thread(target=after, args=(process,), daemon=True).start()
        return gr.update(choices=ws.run_names(root), value=run_dir.name), run_dir.name

    @_user_errors
    def control(run, what):
        if not run or rundir.status(ws.run_dir(root, run)) != "running":
            raise UserError("no run is training", "start one first")
        rundir.request(ws.run_dir(root, run), what)
        # one GPU acts at its next step; several agree every 10 steps and act at the exchange after
        gr.Info({"STOP": "Stopping soon; the LoRA so far is saved.", "SAMPLE": "Making samples soon.",
                 "SAVE": "Saving the LoRA soon."}[what])

    def view(run: str):
        """Progress, status, loss and samples of a run, from its directory."""
        run_dir = ws.run_dir(root, run)
        events = rundir.read_events(run_dir)
        state = rundir.status(run_dir)
        progress = [e for e in events if e["type"] == "progress"]
        last = progress[-1] if progress else None
        if last:
            bar = (f"<div class='sdl-progress'><progress value='{last['step']}' max='{last['total']}'></progress>"
                   f"<p>Step {last['step']} / {last['total']} · {last['images_per_s']:.1f} pictures/s")
            bar += f" · about {_duration(last['eta_s'])} left</p></div>" if state == "running" else "</p></div>"
        else:
            bar = "<div class='sdl-progress'><p>Getting ready: loading the model and the pictures…</p></div>" \
                if state == "running" else "<div class='sdl-progress'><p></p></div>"
        loss = _loss_frame([(e["step"], e[k], label) for e in progress
                            for k, label in (("loss", "loss"), ("loss_ema", "smoothed"))])
        samples = sorted((e for e in events if e["type"] == "sample"), key=lambda e: (e["step"], e["path"]))
        gallery = [(e["path"], f"step {e['step']}: {e['prompt']}") for e in samples if Path(e["path"]).is_file()]
        return bar, _status_text(run, run_dir, state, events), loss, gallery

    def tick(run, followed, seen):
        live = ws.running(root)
        update_choices = gr.skip()
        if live and live != followed:  # a run started here or in another tab: follow it once
            run, followed = live, live
            update_choices = gr.update(choices=ws.run_names(root), value=live)
        try:
            events_file = ws.run_dir(root, run) / "events.jsonl" if run else None
        except UserError:  # a name typed into the list, or a run folder deleted meanwhile
            events_file = None
        if events_file is None or not events_file.parent.is_dir():
            return update_choices, gr.skip(), gr.skip(), gr.skip(), gr.skip(), followed, seen
        size = events_file.stat().st_size if events_file.exists() else 0
        signature = f"{run}:{size}:{rundir.status(events_file.parent)}"
        if signature == seen:
            return update_choices, gr.skip(), gr.skip(), gr.skip(), gr.skip(), followed, seen
        return (update_choices, *view(run), followed, signature)

    @_user_errors
    def show_run(run):
        if not run or not ws.run_dir(root, run).is_dir():
            return "", "No run yet.", _loss_frame([]), [], ""
        return (*view(run), f"{run}:shown")

    def on_load():
        """A new page (or a reload) shows what is on disk: the datasets, the running or newest run, and the form
        filled with that run's settings."""
        names = ws.run_names(root)
        live = ws.running(root)
        datasets = ws.dataset_names(root)
        current = live or (names[0] if names else None)
        try:
            config = ws.run_config(root, current) if current else {}
        except UserError:  # shown as such when the run is viewed; the page still loads
            config = {}
        used = Path(config.get("dataset", "")).name
        used = used if used in datasets and Path(config["dataset"]) == ws.dataset_dir(root, used) else None
        base = config.get("base", "tiny")
        if models in Path(base).parents:
            base = Path(base).relative_to(models).as_posix()
        settings = [gr.update(value=_form_text(name, config[name])) if name in config else gr.skip()
                    for name in form.values()]
        return (gr.update(choices=datasets, value=used or (datasets[0] if datasets else None)),
                gr.update(choices=datasets, value=used or (datasets[0] if datasets else None)),
                gr.update(choices=examples(), value=(examples() or [None])[0]),
                gr.update(choices=ws.base_models(models), value=base),
                gr.update(choices=names, value=current), live,
                gr.update(value=_preset_of(config)) if config else gr.skip(), *settings)

    # ---- preview ----------------------------------------------------------------------------------------------
    def previewer(base: str):
        """The loaded base model (kept per base; LoRAs are swapped on it) and the seconds it took to load now (None
        when it was loaded already)."""
        from sdlora.generate import Previewer

        loaded_now = None
        if base not in previewers:
            from diffusers.utils import logging as diffusers_logging

            diffusers_logging.disable_progress_bar()
            while len(previewers) >= 2:  # a base model is large; keep the two used last
                previewers.pop(next(iter(previewers)))
            began = time.perf_counter()
            previewers[base] = Previewer(base)
            loaded_now = time.perf_counter() - began
            load_seconds[base] = loaded_now
        previewers[base] = previewers.pop(base)  # most recently used last
        return previewers[base], loaded_now

    def lora_and_base(run, file, upload, base):
        """(path, label, base) of the LoRA in the first slot."""
        if upload:
            if not str(upload).endswith(".safetensors"):
                raise UserError("the uploaded file is not a .safetensors LoRA", "upload a .safetensors file")
            return str(upload), Path(upload).name, ws.resolve_base(models, base)
        if not run or not file:
            raise UserError("no LoRA picked", "pick a run and one of its files, or upload a .safetensors")
        return str(ws.lora_file(root, run, file)), f"{run} · {file}", runs_base(run)

    def stacked(first: str | None, extras: tuple) -> list[tuple[str, str, float]]:
        """(path, label, strength) of the LoRAs picked under "Add another LoRA" (slot value, strength pairs); an
        empty slot is skipped, a file picked twice is refused."""
        out, seen = [], {first} if first else set()
        for value, strength in zip(extras[::2], extras[1::2]):
            if not value:
                continue
            value = str(value)
            path = str(ws.stack_file(root, value))
            label = " · ".join(value.split("/")[1:]) if value.startswith("runs/") else f"uploaded · {value[6:]}"
            if path in seen:
                raise UserError(f"{label} is picked twice", "pick each LoRA once and set its strength instead")
            seen.add(path)
            out.append((path, label, float(1.0 if strength is None else strength)))
        return out

    def runs_base(run):
        return ws.run_config(root, run)["base"]

    def gen_kw(negative, steps, guidance):
        return dict(negative_prompt=negative or "", steps=int(steps), guidance_scale=float(guidance))

    def timing_note(base: str, loaded_now, swap_s: float | None, total_s: float, what: str) -> str:
        """How long it took, and whether the base model was loaded for it or stayed loaded."""
        short = "tiny" if base == "tiny" else Path(base).name
        if loaded_now is not None:
            return (f"{what} in {total_s:.1f} s, of which {loaded_now:.1f} s loading the base model *{short}* (once: "
                    f"it stays loaded while you change LoRAs and strengths).")
        swap = f"; setting the LoRAs took {swap_s:.2f} s" if swap_s is not None else ""
        return (f"{what} in {total_s:.1f} s. The base model *{short}* stayed loaded (loading it took "
                f"{load_seconds.get(base, 0):.1f} s){swap}.")

    @_user_errors
    def preview(run, file, upload, base, prompt, negative, seed, steps, guidance, strength,
                lora2=None, strength2=1.0, lora3=None, strength3=1.0, lora4=None, strength4=1.0):
        began = time.perf_counter()
        lora, label, base = lora_and_base(run, file, upload, base)
        loras = [(lora, label, float(strength))] + stacked(lora, (lora2, strength2, lora3, strength3, lora4, strength4))
        with preview_lock:
            p, loaded_now = previewer(base)
            swap = time.perf_counter()
            p.set_loras([(path, s) for path, _, s in loras])
            swap = time.perf_counter() - swap
            image = p.image(prompt, seed=int(seed), **gen_kw(negative, steps, guidance))
        used = " + ".join(f"{name} at {s:g}" for _, name, s in loras)
        return image, timing_note(base, loaded_now, swap, time.perf_counter() - began, f"Made with {used}")

    class _WithOthers:
        """A previewer whose every set_loras also sets the stacked LoRAs, so a grid varies the first one only."""

        def __init__(self, previewer, others):
            self.previewer, self.others = previewer, [(path, s) for path, _, s in others]

        def set_loras(self, loras):
            self.previewer.set_loras(list(loras) + self.others)

        def image(self, *args, **kw):
            return self.previewer.image(*args, **kw)

        def images(self, *args, **kw):
            return self.previewer.images(*args, **kw)

    def grid_note(base, loaded_now, began, others, what):
        note = timing_note(base, loaded_now, None, time.perf_counter() - began, what)
        if others:
            note += " Every picture also has " + " + ".join(f"{name} at {s:g}" for _, name, s in others) + "."
        return note

    @_user_errors
    def strength_grid(run, file, upload, base, prompt, negative, seed, steps, guidance, seeds,
                      lora2=None, strength2=1.0, lora3=None, strength3=1.0, lora4=None, strength4=1.0):
        from sdlora.compare import strength_seed_grid

        began = time.perf_counter()
        lora, _, base = lora_and_base(run, file, upload, base)
        others = stacked(lora, (lora2, strength2, lora3, strength3, lora4, strength4))
        with preview_lock:
            p, loaded_now = previewer(base)
            image = strength_seed_grid(_WithOthers(p, others), lora, prompt, GRID_STRENGTHS,
                                       range(int(seed), int(seed) + int(seeds)), **gen_kw(negative, steps, guidance))
        return image, grid_note(base, loaded_now, began, others, "Grid made")

    @_user_errors
    def saves_grid(run, prompt, negative, seed, steps, guidance,
                   lora2=None, strength2=1.0, lora3=None, strength3=1.0, lora4=None, strength4=1.0):
        from sdlora.compare import saves_grid as make

        began = time.perf_counter()
        if not run:
            raise UserError("no run picked", "pick a run with saved steps")
        files = ws.lora_files(root, run)
        if not files:
            raise UserError(f"run {run} has no saved LoRA yet", "wait for its first save, or press Save now")
        saves = [("final" if ws.step_of(f) is None else f"step {ws.step_of(f)}", str(ws.lora_file(root, run, f)))
                 for f in files]
        others = stacked(None, (lora2, strength2, lora3, strength3, lora4, strength4))
        if {path for path, _, _ in others} & {path for _, path in saves}:
            raise UserError(f"a file of run {run} is also stacked", "stack only LoRAs from other runs for this grid")
        base = runs_base(run)
        with preview_lock:
            p, loaded_now = previewer(base)
            image = make(_WithOthers(p, others), saves, prompt, SAVES_STRENGTHS, int(seed),
                         **gen_kw(negative, steps, guidance))
        return image, grid_note(base, loaded_now, began, others, "Grid made")

    @_user_errors
    def add_stack_lora(upload, lora2=None, lora3=None, lora4=None):
        """An uploaded LoRA is kept in the workspace and put into the first empty slot."""
        values = (lora2, lora3, lora4)
        if not upload:
            return (gr.skip(),) * (len(values) + 1)
        name = ws.add_lora(root, upload, Path(upload).name)
        value, placed = f"loras/{name}", False
        updates = []
        for current in values:
            if not placed and (not current or current == value):
                current, placed = value, True
            updates.append(gr.update(choices=ws.stack_choices(root), value=current))
        if not placed:
            gr.Info(f"Kept {name}; all slots are taken, pick it in one of them.")
        return None, *updates

    def refresh_stack(*values):
        choices = ws.stack_choices(root)
        known = {v for _, v in choices}
        return [gr.update(choices=choices, value=v if v in known else None) for v in values]

    @_user_errors
    def pick_run(run):
        """Fill the preview and export forms from a run: its files, trigger, first sample prompt."""
        if not run:
            return gr.update(choices=[], value=None), gr.skip(), gr.skip(), gr.update(choices=[], value=None), \
                gr.skip(), gr.skip(), gr.skip()
        files = ws.lora_files(root, run)
        config = ws.run_config(root, run)
        sample = next((e for e in rundir.read_events(ws.run_dir(root, run)) if e["type"] == "sample"), None)
        prompt = sample["prompt"] if sample else (config["trigger"] or "a picture")
        newest = files[-1] if files else None
        return (gr.update(choices=files, value=newest), prompt, config.get("sample_negative", ""),
                gr.update(choices=files, value=newest), config.get("title") or run, config.get("trigger", ""),
                config.get("description", ""))

    def refresh_tab(run, file):
        """On opening Try it or Download: the run lists and the run's files as they are now on disk."""
        names = ws.run_names(root)
        run = run if run in names else (names[0] if names else None)
        files = ws.lora_files(root, run) if run else []
        file = file if file in files else (files[-1] if files else None)
        return gr.update(choices=names, value=run), gr.update(choices=files, value=file)

    # ---- export -----------------------------------------------------------------------------------------------
    @_user_errors
    def export(run, file, title, trigger, description, with_diffusers, with_sample, with_card):
        if not run or not file:
            raise UserError("no LoRA picked", "pick a run and one of its files")
        source, lora = ws.run_dir(root, run), ws.lora_file(root, run, file)  # names checked before anything is deleted
        out = ws.export_dir(root, run)
        shutil.rmtree(out, ignore_errors=True)  # what the page lists is what is there
        made = card.share(source, lora.name, out, title=title.strip() or run,
                          trigger=trigger.strip(), description=description.strip(), diffusers=with_diffusers,
                          sample=with_sample, readme=with_card)
        for note in made.notes:
            gr.Warning(note)
        return [str(p) for p in made.files], made.card

    # ---- layout -----------------------------------------------------------------------------------------------
    first = _form_values(FIRST_PRESET)
    with gr.Blocks(title="sdlora") as demo:
        gr.Markdown("# sdlora\nTrain a LoRA from your pictures: **1** add pictures and captions, **2** train, "
                    "**3** try it, **4** download it.")
        followed = gr.State(None)
        seen = gr.State("")
        timer = gr.Timer(1.5)

        with gr.Tab("1 · Pictures", id="pictures"):
            with gr.Row():
                dataset = gr.Dropdown([], label="Dataset", allow_custom_value=True, scale=2,
                                      info="pick one, or type a new name and add pictures")
                example = gr.Dropdown([], label="Example datasets", scale=1, allow_custom_value=True,
                                      info="ready-made pictures to try")
                use_example_btn = gr.Button("Use this example", scale=0, min_width=140)
            with gr.Row():
                uploads = gr.File(label="Drop pictures, caption .txt files (same name as the picture) or a .zip",
                                  file_count="multiple", file_types=["image", ".txt", ".caption", ".zip"], scale=3,
                                  height=140)
                add_btn = gr.Button("Add to dataset", variant="primary", scale=1)
            dataset_note = gr.Markdown("Pick a dataset, or type a name and add pictures.")
            gallery = gr.Gallery(label="Pictures (click one to edit its caption)", columns=8, height=360,
                                 allow_preview=False, object_fit="contain")
            with gr.Row():
                picked = gr.Textbox(label="Picture", interactive=False, scale=1)
                caption = gr.Textbox(label="Caption", scale=4, placeholder="what is in the picture, e.g. "
                                     "'zkstyle, a red fox in the snow'")
                with gr.Column(scale=1, min_width=140):
                    save_caption_btn = gr.Button("Save caption", variant="primary")
                    remove_btn = gr.Button("Remove picture", variant="stop", size="sm")
            with gr.Accordion("Change all captions", open=False):
                with gr.Row():
                    bulk_trigger = gr.Textbox(label="Trigger word", info="put first in every caption that lacks it")
                    bulk_prefix = gr.Textbox(label="Add at the start")
                    bulk_suffix = gr.Textbox(label="Add at the end")
                    bulk_find = gr.Textbox(label="Find")
                    bulk_replace = gr.Textbox(label="Replace with")
                bulk_btn = gr.Button("Change all captions")

        with gr.Tab("2 · Train", id="train"):
            form: dict = {}
            with gr.Row():
                train_dataset = gr.Dropdown([], label="Dataset", info="from the Pictures tab", allow_custom_value=True,
                                            elem_id="train-dataset")
                base_box = gr.Dropdown([("tiny (built in, for trying things out)", "tiny")], value="tiny",
                                       label="Base model", allow_custom_value=True,
                                       info="tiny, a model from your models folder, or a hub id like org/name")
                preset = gr.Radio(PRESET_CHOICES, value=FIRST_PRESET, label="Preset",
                                  info="fills in sensible values below")
                run_name = gr.Textbox(label="Run name", placeholder="made from the dataset and time")
                gpu_box = gr.Radio(list(range(1, max(gpus, 1) + 1)), value=max(gpus, 1), label="GPUs",
                                   visible=gpus > 1, elem_id="gpus",
                                   info="train on this many at once; each takes 'Pictures per step'")
            fields = [f for f in dataclasses.fields(TrainConfig) if f.name not in HIDDEN]
            main_fields = sorted((f for f in fields if f.name in MAIN), key=lambda f: list(MAIN).index(f.name))
            with gr.Row():
                for f in main_fields[:5]:
                    form[_field_input(f, first[f.name])] = f.name
            with gr.Row():
                for f in main_fields[5:]:
                    form[_field_input(f, first[f.name])] = f.name
            with gr.Accordion("Advanced", open=False):
                rest = [f for f in fields if f.name not in MAIN]
                for i in range(0, len(rest), 4):
                    with gr.Row():
                        for f in rest[i:i + 4]:
                            form[_field_input(f, first[f.name])] = f.name
            form_inv = {name: c for c, name in form.items()}
            plan = gr.Markdown()
            with gr.Row():
                start_btn = gr.Button("Start training", variant="primary", scale=2)
                stop_btn = gr.Button("Stop", variant="stop")
                sample_btn = gr.Button("Sample now")
                save_btn = gr.Button("Save now")
            with gr.Row():
                run_pick = gr.Dropdown([], label="Showing run", scale=1, allow_custom_value=True)
                with gr.Column(scale=3):
                    progress = gr.HTML("<div class='sdl-progress'><p></p></div>")
                    run_status = gr.Markdown("No run yet.")
            with gr.Row():
                loss_plot = gr.LinePlot(None, x="step", y="loss", color="curve", height=260, scale=2,
                                        color_map={"loss": "#9ca3af", "smoothed": "#f97316"},
                                        label="Loss: grey each step, orange smoothed (lower is better)")
                samples = gr.Gallery(label="Samples as it trains (step 0 = before training)", columns=4, height=300,
                                     scale=3, object_fit="contain")

        with gr.Tab("3 · Try it", id="preview") as preview_tab:
            with gr.Row():
                prev_run = gr.Dropdown([], label="Run", scale=1, allow_custom_value=True)
                prev_file = gr.Dropdown([], label="LoRA file", info="final, or a save at some step", scale=1,
                                        allow_custom_value=True)
                with gr.Accordion("…or use another LoRA file", open=False):
                    prev_upload = gr.File(label=".safetensors LoRA", file_types=[".safetensors"], height=100)
                    prev_base = gr.Dropdown([("tiny (built in, for trying things out)", "tiny")], value="tiny",
                                            label="Its base model", allow_custom_value=True)
            with gr.Accordion("Add another LoRA (stack up to 3 more)", open=False, elem_id="stack"):
                gr.Markdown("Each one adds its effect at its own strength, together with the LoRA above. Changing "
                            "them or their strengths keeps the base model loaded.")
                stack = []
                for i in range(STACK_SLOTS):
                    with gr.Row():
                        stack.append(gr.Dropdown([], label=f"LoRA {i + 2}", scale=3, allow_custom_value=True,
                                                 info="a file of a run, or one uploaded below" if i == 0 else None))
                        stack.append(gr.Slider(-1, 2, value=1.0, step=0.05, label=f"LoRA {i + 2} strength", scale=2))
                stack_upload = gr.File(label="Upload a .safetensors LoRA to stack (kept in the workspace)",
                                       file_types=[".safetensors"], height=100)
            with gr.Row():
                prompt = gr.Textbox(label="Prompt", scale=3)
                negative = gr.Textbox(label="Negative prompt", scale=2)
            with gr.Row():
                seed = gr.Number(0, label="Seed", precision=0, minimum=0)
                gen_steps = gr.Number(25, label="Steps", precision=0, minimum=1)
                guidance = gr.Number(7.0, label="Guidance", step=0.5, minimum=0)
                strength = gr.Slider(-1, 2, value=1.0, step=0.05, label="LoRA strength",
                                     info="0 = the base model alone, 1 = as trained")
            with gr.Row():
                with gr.Column(scale=1):
                    make_btn = gr.Button("Make picture", variant="primary")
                    picture = gr.Image(label="Picture", format="png", type="pil", height=320, interactive=False,
                                       elem_id="picture")
                    preview_note = gr.Markdown(elem_id="preview-note")
                with gr.Column(scale=2):
                    with gr.Row():
                        grid_seeds = gr.Slider(1, 4, value=2, step=1, label="Seeds in the grid")
                        grid_btn = gr.Button("Strength × seed grid")
                        saves_btn = gr.Button("Saves × strength grid")
                    grid_image = gr.Image(label="Grid", format="png", type="pil", height=420, interactive=False,
                                          elem_id="grid")

        with gr.Tab("4 · Download", id="export") as export_tab:
            with gr.Row():
                exp_run = gr.Dropdown([], label="Run", allow_custom_value=True)
                exp_file = gr.Dropdown([], label="LoRA file", info="final, or a save at some step",
                                       allow_custom_value=True)
            with gr.Row():
                title = gr.Textbox(label="Title")
                trigger_words = gr.Textbox(label="Trigger words")
            description = gr.Textbox(label="Description", lines=2)
            with gr.Row():
                with_diffusers = gr.Checkbox(False, label="Also the diffusers version")
                with_sample = gr.Checkbox(True, label="A sample picture")
                with_card = gr.Checkbox(True, label="A model card")
            export_btn = gr.Button("Make files", variant="primary")
            with gr.Row():
                downloads = gr.File(label="Download", file_count="multiple", interactive=False, scale=1,
                                    elem_id="downloads")
                card_text = gr.Textbox(label="Model card (paste it on a model-sharing site)", lines=14, scale=2,
                                       buttons=["copy"], elem_id="card")

        # ---- wiring -----------------------------------------------------------------------------------------
        dataset.change(show_dataset, dataset, [gallery, dataset_note, picked, caption], api_name="show_dataset")
        # a new dataset may keep the name typed before it existed (no change event): tell the Train tab too
        add_btn.click(add_pictures, [dataset, uploads], [dataset, gallery, dataset_note, uploads],
                      api_name="add_pictures").then(follow_dataset, dataset, train_dataset, api_name=False)
        use_example_btn.click(use_example, example, [dataset, gallery, dataset_note], api_name="use_example").then(
            follow_dataset, dataset, train_dataset, api_name=False)
        gallery.select(pick_picture, dataset, [picked, caption], api_name=False)
        save_caption_btn.click(save_caption, [dataset, picked, caption], [gallery, dataset_note],
                               api_name="save_caption")
        remove_btn.click(remove_picture, [dataset, picked], [gallery, dataset_note, picked, caption],
                         api_name="remove_picture")
        bulk_btn.click(change_all, [dataset, bulk_trigger, bulk_prefix, bulk_suffix, bulk_find, bulk_replace],
                       [gallery, dataset_note, form_inv["trigger"]], api_name="change_all")

        form_set = {train_dataset, base_box, run_name, gpu_box, *form}
        # .input: a click, never the page setting the radio to a run's preset on load
        preset.input(lambda p: [gr.update(value=_preset_values(p)[name]) if p and name in PRESET_FIELDS
                                else gr.skip() for name in form.values()], preset, list(form), api_name=False)
        for i, c in enumerate((train_dataset, base_box, form_inv["steps"], form_inv["batch_size"],
                               form_inv["grad_accum"], gpu_box, form_inv["trigger"])):
            c.change(plan_text, form_set, plan, show_progress="hidden", api_name="plan" if i == 0 else False)
        # the Pictures tab's dataset list changes: keep the Train tab's in step
        dataset.change(follow_dataset, dataset, train_dataset, api_name=False)
        start_btn.click(start, form_set, [run_pick, followed], api_name="start")
        stop_btn.click(lambda r: control(r, "STOP"), run_pick, None, api_name="stop")
        sample_btn.click(lambda r: control(r, "SAMPLE"), run_pick, None, api_name="sample_now")
        save_btn.click(lambda r: control(r, "SAVE"), run_pick, None, api_name="save_now")
        run_pick.change(show_run, run_pick, [progress, run_status, loss_plot, samples, seen], api_name="show_run",
                        show_progress="hidden")
        timer.tick(tick, [run_pick, followed, seen], [run_pick, progress, run_status, loss_plot, samples, followed,
                                                       seen], show_progress="hidden", api_name="poll")

        preview_tab.select(refresh_tab, [prev_run, prev_file], [prev_run, prev_file], api_name=False)
        export_tab.select(refresh_tab, [exp_run, exp_file], [exp_run, exp_file], api_name=False)
        run_pick.change(lambda r: (r, r), run_pick, [prev_run, exp_run], api_name=False)  # the run in view
        run_outputs = [prev_file, prompt, negative, exp_file, title, trigger_words, description]
        prev_run.change(pick_run, prev_run, run_outputs, api_name=False)
        exp_run.change(lambda r: pick_run(r)[3:], exp_run, run_outputs[3:], api_name=False)
        gen_inputs = [prompt, negative, seed, gen_steps, guidance]
        make_btn.click(preview, [prev_run, prev_file, prev_upload, prev_base, *gen_inputs, strength, *stack],
                       [picture, preview_note], api_name="preview")
        grid_btn.click(strength_grid, [prev_run, prev_file, prev_upload, prev_base, *gen_inputs, grid_seeds, *stack],
                       [grid_image, preview_note], api_name="strength_grid")
        saves_btn.click(saves_grid, [prev_run, *gen_inputs, *stack], [grid_image, preview_note],
                        api_name="saves_grid")
        stack_slots = stack[::2]
        stack_upload.upload(add_stack_lora, [stack_upload, *stack_slots], [stack_upload, *stack_slots],
                            api_name="stack_upload")
        preview_tab.select(refresh_stack, stack_slots, stack_slots, api_name=False)
        export_btn.click(export, [exp_run, exp_file, title, trigger_words, description, with_diffusers, with_sample,
                                  with_card], [downloads, card_text], api_name="export")

        demo.load(on_load, None, [dataset, train_dataset, example, base_box, run_pick, followed, preset, *form],
                  api_name=False)
        demo.load(lambda: gr.update(choices=ws.base_models(models)), None, prev_base, api_name=False)
        demo.load(refresh_stack, stack_slots, stack_slots, api_name=False)
    return demo


def _loss_frame(rows: list[tuple]) -> pd.DataFrame | None:
    """Loss points for the plot. None while there are none: a plot that once got an empty frame takes its axes
    for categories and draws no lines afterwards (Gradio 6.31)."""
    if not rows:
        return None
    frame = pd.DataFrame(rows, columns=["step", "loss", "curve"])
    return frame.astype({"step": "int64", "loss": "float64", "curve": "str"})


def _status_text(run: str, run_dir: Path, state: str, events: list[dict]) -> str:
    last = events[-1] if events else {}
    warnings = [e["message"] for e in events if e["type"] == "warning"]
    if state == "running":
        text = f"**{run}** is training."
    elif state == "done":
        check = next((e for e in events if e["type"] == "verify"), None)
        text = f"**{run}** is done: `lora.safetensors` is ready on the Try it and Download tabs."
        if check:
            text += f" (Checked: diffusers loaded {check['keys_consumed']}/{check['keys_written']} weights.)"
    elif state == "stopped":
        text = f"**{run}** was stopped at step {last.get('step')}; what it learned so far is saved."
    elif state == "error":
        error = next((e for e in reversed(events) if e["type"] == "error"), None)
        if error:
            text = f"**{run}** failed: {error['message']}"
            text += f". What to do: {error['hint']}" if error.get("hint") else ""
        else:
            text = f"**{run}** stopped unexpectedly. The end of its log:\n```\n{_log_tail(run_dir)}\n```"
    else:  # no start event: still loading, or the process died before it could say anything
        log = _log_tail(run_dir)
        text = f"**{run}** could not start. The end of its log:\n```\n{log}\n```" if log \
            else f"**{run}** has not started."
    if warnings:
        text += "\n\nNotes from the run:\n" + "\n".join(f"- {w}" for w in warnings[-5:])
    return text


def _log_tail(run_dir: Path, lines: int = 12) -> str:
    log = run_dir / "log.txt"
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:]) if log.is_file() else ""


def _duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    if seconds < 90:
        return f"{seconds} s"
    if seconds < 5400:
        return f"{round(seconds / 60)} min"
    return f"{seconds / 3600:.1f} h"


def serve(workspace: str | Path = "workspace", models: str | Path | None = None, *, host: str = "127.0.0.1",
          port: int = 7860, auth: tuple[str, str] | None = None, max_upload_mb: int = 1024,
          max_unpacked: int = ws.MAX_UNPACKED, gpus: int | None = None, block: bool = True,
          spare: bool = True) -> gr.Blocks:
    """Build the page and serve it; files are served only from the workspace and Gradio's own temp folder. `spare`:
    see build.

    Every process the page starts ends with it: when `demo.close()` is called, when a blocking serve is interrupted
    (Ctrl-C, SIGTERM), or at the latest when Python exits. A port already in use is a UserError."""
    root = Path(workspace).resolve()
    root.mkdir(parents=True, exist_ok=True)
    if not _port_free(host, port):
        raise UserError(f"port {port} is already in use", f"close what uses it, or pick another with --port {port + 1}")
    children = launch.Children()
    atexit.register(children.end_all)
    demo = build(root, models, max_unpacked=max_unpacked, gpus=gpus, spare=spare, children=children)
    close = demo.close

    def close_and_end_children(*args, **kwargs):
        try:
            return close(*args, **kwargs)
        finally:
            children.end_all()

    demo.close = close_and_end_children
    demo.queue(default_concurrency_limit=1)
    if block and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _interrupt)  # SIGTERM ends the app as Ctrl-C does, its children with it
    try:
        demo.launch(server_name=host, server_port=port, auth=password_check(*auth) if auth else None,
                    allowed_paths=[str(root)],
                    max_file_size=f"{max_upload_mb}mb", prevent_thread_lock=not block, css=CSS, quiet=not block,
                    footer_links=[])
    except OSError as e:  # taken between the check and the launch
        children.end_all()
        if "port" in str(e):
            raise UserError(f"port {port} is already in use", f"pick another with --port {port + 1}") from None
        raise
    except BaseException:
        children.end_all()
        raise
    if block:  # Gradio returns here once interrupted, after closing its server
        children.end_all()
    return demo


def password_check(user: str, password: str, sleep=asyncio.sleep):
    """The page's login check (Gradio awaits it): a wrong guess makes the next ones wait, 0.5 s doubling up to 8 s,
    one guess at a time, so guessing a password is slow; the right one resets the wait.

    A plain async function, not an object with an async __call__: Gradio tests `inspect.iscoroutinefunction`, and an
    object's un-awaited coroutine would count as a yes."""
    state = {"failures": 0, "lock": None}

    async def check(given_user: str, given_password: str) -> bool:
        state["lock"] = state["lock"] or asyncio.Lock()  # made inside the server's event loop
        async with state["lock"]:
            ok = hmac.compare_digest(given_user.encode(), user.encode()) & \
                hmac.compare_digest(given_password.encode(), password.encode())
            if ok:
                state["failures"] = 0
                return True
            state["failures"] += 1
            await sleep(min(0.5 * 2 ** (state["failures"] - 1), 8.0))
            return False

    return check


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def _port_free(host: str, port: int) -> bool:
    """Whether `host:port` can be bound now (as Gradio will bind it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server sets it: a closed port's TIME_WAIT is free
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True
