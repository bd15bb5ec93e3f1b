"""The Train tab: the settings form and its presets, the plan of a run, starting and steering a run, and following its
progress, loss and samples from its run folder."""

from __future__ import annotations

import dataclasses
import functools
import time
from pathlib import Path
from types import SimpleNamespace

import gradio as gr
import pandas as pd

from sdlora import dataset as ds
from sdlora import examples as bundled
from sdlora import rundir
from sdlora import workspace as ws
from sdlora.app.context import Context
from sdlora.app.wiring import Choices, on
from sdlora.atomic import write_atomic
from sdlora.config import FAMILY_PRESET, PRESET_FAMILIES, PRESETS, TrainConfig, build_config, optimizer_warnings
from sdlora.errors import UserError

PRESET_CHOICES = [("Style", "style"), ("Character", "character"), ("Quick test", "quick"),
                  ("SDXL anime, tags", "sdxl-anime-tags"), ("SDXL anime, v-pred", "sdxl-anime-vpred"),
                  ("SDXL Pony style", "sdxl-pony-style"), ("SD3.5 style", "sd3.5-style"),
                  ("FLUX.1 dev style", "flux-style"), ("FLUX.1 schnell style", "flux-schnell-style")]
FIRST_PRESET = "quick"
# A tiny-model step on a laptop CPU, measured: ~0.1 s at 4 pictures a step, plus ~15 s to start and sample.
TINY_CPU_SPEED = (40.0, 15.0)

# The main knobs, with the words an artist uses; every other TrainConfig field goes under "Advanced".
MAIN = {
    "trigger": ("Trigger word", "a made-up word that calls up your LoRA in prompts, e.g. zkstyle"),
    "steps": ("Training steps", "more steps learn more; too many copy the pictures"),
    "batch_size": ("Pictures per step", "lower it if you run out of memory"),
    "resolution": ("Resolution", "0 = the base model's own (tiny 64, SD1 512, SDXL, SD3.5 and FLUX.1 1024)"),
    "train_text_encoder": ("Also teach the text model", "helps characters; usually off for styles"),
    "rank": ("Rank", "size of the LoRA: 8-32 is plenty for most styles and characters"),
    "alpha": ("Alpha", "scales the LoRA's effect; half the rank is usual"),
    "unet_lr": ("Learning rate", "how fast the image model learns"),
    "text_encoder_lr": ("Text learning rate", "how fast the text model learns; 1/2 to 1/5 of the other"),
}
HIDDEN = {"dataset", "base", "preset"}  # the preset is the radio above the form
# Labels for the rest (the field's help is shown under each); unnamed fields get their name in words.
LABELS = {
    "caption_template": "Caption for pictures without one", "keep_tags": "Tags kept in front",
    "flip": "Mirror pictures", "lora_dropout": "LoRA dropout", "targets": "Layers to train",
    "adapter": "Adapter type",  # the field's help under it says when to use each
    "conv_rank": "Conv rank (LoCon, LoHa, LoKr)", "conv_alpha": "Conv alpha (LoCon, LoHa, LoKr)",
    "use_rslora": "rsLoRA scaling", "dora_conv": "DoRA on the convolutions too", "lokr_factor": "LoKr factor",
    "lokr_full_matrix": "LoKr full matrices",
    "grad_accum": "Gradient accumulation", "lr_scheduler": "Learning rate schedule", "lr_cycles": "Schedule restarts",
    "warmup_fraction": "Warmup", "min_snr_gamma": "Min-SNR gamma", "mixed_precision": "Precision",
    "gradient_checkpointing": "Save memory (slower)", "cache_latents": "Cache encoded pictures",
    "sample_negative": "Sample negative prompt", "sample_guidance": "Sample guidance", "sample_scheduler": "Sampler",
    "sample_guidance_rescale": "Sample guidance rescale", "clip_skip": "CLIP skip",
    "zero_terminal_snr": "Zero terminal SNR",
    "keep_checkpoints": "Checkpoints kept", "export_diffusers": "Also write the diffusers version",
    "masked_loss": "Masked loss", "alpha_mask": "Transparency as mask", "reg_data": "Regularisation pictures",
    "reg_ratio": "Share of regularisation pictures", "prior_loss_weight": "Regularisation loss weight",
    "evaluate": "Measure each save (and say which to use)", "eval_holdout": "Pictures kept out to measure on",
}
# The form's fields, in the order they are shown: the main knobs, then the rest as TrainConfig lists them.
_SHOWN = [f for f in dataclasses.fields(TrainConfig) if f.name not in HIDDEN]
FORM_FIELDS = sorted((f.name for f in _SHOWN if f.name in MAIN), key=list(MAIN).index) + \
    [f.name for f in _SHOWN if f.name not in MAIN]
# The fields a preset sets: choosing a preset changes these and nothing else (a trigger word typed before stays).
PRESET_FIELDS = sorted({name for values in PRESETS.values() for name in values})


def form_values(preset: str | None) -> dict:
    """Every form field's value under a preset (defaults first, then the preset)."""
    config = dataclasses.asdict(build_config(preset or None))
    return {name: _form_text(name, value) for name, value in config.items()}


def preset_values(preset: str) -> dict:
    """The preset's value of every field presets set (the default where this one sets none), as the form holds it."""
    values = form_values(preset)
    return {name: values[name] for name in PRESET_FIELDS}


def preset_of(config: dict) -> str | None:
    """The preset a run's settings match in every field presets set, or None (the form then shows no preset)."""
    return next((p for _, p in PRESET_CHOICES if all(_form_text(name, config.get(name)) == value
                                                       for name, value in preset_values(p).items())), None)


def presets_for(family) -> list[tuple[str, str]]:
    """The presets (label, value) that suit a base of `family`: those for every family and its own (all where the
    family is not known)."""
    return [(label, p) for label, p in PRESET_CHOICES
            if family is None or p not in PRESET_FAMILIES or family.label in PRESET_FAMILIES[p]]


def _form_text(name: str, value):
    """A TrainConfig value as its form field holds it (the list of sample prompts is one prompt a line)."""
    return "\n".join(value) if name == "sample_prompts" else value


# ---- handlers -----------------------------------------------------------------------------------------------------
# The form's values: `dataset`, `base`, `run_name`, `gpus` and every name of FORM_FIELDS.

def follow_dataset(ctx: Context, values: dict) -> dict:
    """The Pictures tab's dataset list changed: keep this tab's in step (showing the same dataset once it exists)."""
    names = ws.dataset_names(ctx.root)
    return {"dataset": Choices(names, values["dataset"]) if values["dataset"] in names else Choices(names)}


def choose_preset(ctx: Context, values: dict) -> dict:
    """The values a preset clicked sets; the fields no preset sets stay as they are."""
    return preset_values(values["preset"]) if values["preset"] else {}


def choose_base(ctx: Context, values: dict) -> dict:
    """A base picked: the presets offered become those that suit its family. Where the preset shown does not suit it,
    or the family wants its own (SD3.5, FLUX.1), the family's preset is picked and fills in its values; values set by
    hand (no preset shown) stay."""
    family = _family(ctx, values["base"])
    offered = presets_for(family)
    current = values["preset"] or None
    wanted = FAMILY_PRESET.get(family.label) if family else None
    fits = current in {p for _, p in offered}
    general = current not in PRESET_FAMILIES  # made for every family
    picked = current if current is None or (fits and not (wanted and general)) else wanted or FIRST_PRESET
    if picked == current:
        return {"preset": Choices(offered, current)}
    label = dict((p, label) for label, p in PRESET_CHOICES)[picked]
    return {"preset": Choices(offered, picked), **preset_values(picked),
            "info": f"{family.label} base: preset {label} picked"}


def _family(ctx: Context, value: str):
    """The family of the base the form holds, where its files tell it (workspace.base_family)."""
    try:
        return ws.base_family(ws.resolve_base(ctx.models, value))
    except UserError:
        return None


def form_config(ctx: Context, values: dict) -> TrainConfig:
    """The TrainConfig the form describes: form fields map onto TrainConfig fields by name."""
    fields = {name: values[name] for name in FORM_FIELDS}
    if not values["dataset"]:
        raise UserError("no dataset picked", "add pictures on the Pictures tab, then pick the dataset here")
    fields["dataset"] = str(ws.dataset_dir(ctx.root, values["dataset"]))
    fields["base"] = ws.resolve_base(ctx.models, values["base"])
    if fields["reg_data"] in ws.dataset_names(ctx.root):  # a dataset of the Pictures tab, by its name
        fields["reg_data"] = str(ws.dataset_dir(ctx.root, fields["reg_data"]))
    fields["sample_prompts"] = [p.strip() for p in (fields["sample_prompts"] or "").splitlines() if p.strip()]
    for name in fields:
        if fields[name] is None:
            raise UserError(f"{name.replace('_', ' ')} is empty", "fill in a number")
    fields["preset"] = preset_of(fields) or ""  # recorded, so a run warns about a preset made for another family
    config = build_config(**fields)
    config.validate()
    return config


def gpu_count(ctx: Context, values: dict) -> int:
    """The GPUs a run is to use: 1 unless several are visible and the form asks for more."""
    try:
        n = int(values["gpus"] or 1)
    except (TypeError, ValueError):
        n = 0
    if not 1 <= n <= max(ctx.gpus, 1):
        raise UserError(f"{values['gpus']} GPUs asked for, and {ctx.gpus} are visible", f"pick 1 to {max(ctx.gpus, 1)}")
    return n


def plan(ctx: Context, values: dict) -> dict:
    """What the run the form describes will do: pictures shown, epochs, and how long it will take."""
    name = values["dataset"]
    if not name:
        return {"plan": "Pick a dataset to see what the run will do."}
    try:
        images, _, per_epoch = ws.dataset_counts(ctx.root, name)
        steps, batch = int(values["steps"] or 0), int(values["batch_size"] or 0)
        accum = int(values["grad_accum"] or 1)
        base = ws.resolve_base(ctx.models, values["base"])
        n_gpus = gpu_count(ctx, values)
    except (UserError, ValueError, TypeError):
        return {"plan": "Fill in the form to see what the run will do."}
    if not images or steps < 1 or batch < 1:
        return {"plan": "Fill in the form to see what the run will do."}
    per_step = batch * accum * n_gpus
    shown = steps * per_step
    epochs = shown / per_epoch
    measured = ws.measured_speed(ctx.root, base, n_gpus)
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
    text = (f"**What this run will do:** {steps} steps × {per_step} pictures{split} = {shown:,} pictures shown "
            f"to the model. Your dataset has {images} pictures{repeats}, so each one is seen about "
            f"**{epochs:.0f} times** ({epochs:.1f} epochs). Time: {eta}.")
    if not values.get("resolution"):
        text += _native_size(base)
    if lacks := single_file_note(base, values.get("base_config")):
        text += f"\n\n**Note:** {lacks}"
    if not (values["trigger"] or "").strip() and \
            ds.common_first_word([caption for _, _, caption in ws.captions(ctx.root, name)]) is None:
        text += f"\n\n**Note:** {ds.NO_TRIGGER[0].upper()}{ds.NO_TRIGGER[1:]}."
    try:  # settings that fight the optimizer (the form may not describe a whole run yet)
        notes = optimizer_warnings(form_config(ctx, values))
    except (UserError, ValueError, TypeError):
        notes = []
    for note in notes:
        text += f"\n\n**Note:** {note[0].upper()}{note[1:]}."
    return {"plan": text}


def _native_size(base: str) -> str:
    """' Pictures train at 1024 px, ...' where the base's files tell its family, else nothing."""
    family = ws.base_family(base)
    size = ws.base_resolution(base) if family else None
    return f" Pictures train at {size} px, the {'tiny' if base == 'tiny' else family.label} base's own." if size else ""


def single_file_note(base: str, base_config: str | None) -> str:
    """What a single-file base (as resolve_base gives it) lacks while Base config is empty (SD3.5's T5 tokenizer,
    FLUX.1's VAE and text encoders), and where to give it; else ""."""
    from sdlora.models import single_file_lacks

    family = ws.base_family(base) if not (base_config or "").strip() and Path(base).is_file() else None
    lacks = single_file_lacks(family) if family else ""
    return f"This {family.label} file lacks {lacks}: under Advanced, set Base config to a diffusers {family.label} " \
        "folder or a downloaded hub id." if lacks else ""


def start(ctx: Context, values: dict) -> dict:
    """Start the run the form describes, in a process of its own; only one run trains at a time."""
    config = form_config(ctx, values)
    n_gpus = gpu_count(ctx, values)
    with ctx.start_lock:  # check and start together, so two tabs can't both start a run
        live = ws.running(ctx.root)
        if live:
            raise UserError(f"run {live} is still training; only one run trains at a time",
                            "wait for it to finish or press Stop, then start again")
        name = values["run_name"] or f"{values['dataset']}-{time.strftime('%m%d-%H%M')}"
        run_dir = ws.new_run_dir(ctx.root, name)
        write_atomic(run_dir / "config.json", config.to_json())
        ctx.start_run(run_dir, n_gpus)
    return {"run": Choices(ws.run_names(ctx.root), run_dir.name), "followed": run_dir.name}


def _control(ctx: Context, run: str | None, what: str) -> dict:
    if not run or rundir.status(ws.run_dir(ctx.root, run)) != "running":
        raise UserError("no run is training", "start one first")
    rundir.request(ws.run_dir(ctx.root, run), what)
    # one GPU acts at its next step; several agree every 10 steps and act at the exchange after
    return {"info": {"STOP": "Stopping soon; the LoRA so far is saved.", "SAMPLE": "Making samples soon.",
                     "SAVE": "Saving the LoRA soon."}[what]}


def stop(ctx: Context, values: dict) -> dict:
    return _control(ctx, values["run"], "STOP")


def sample_now(ctx: Context, values: dict) -> dict:
    return _control(ctx, values["run"], "SAMPLE")


def save_now(ctx: Context, values: dict) -> dict:
    return _control(ctx, values["run"], "SAVE")


def view(ctx: Context, run: str) -> dict:
    """Progress, status, loss and samples of a run, from its directory."""
    run_dir = ws.run_dir(ctx.root, run)
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
    return {"progress": bar, "status": _status_text(run, run_dir, state, events), "loss": loss, "samples": gallery,
            "evals": _eval_frame(events)}


def _eval_frame(events: list[dict]) -> pd.DataFrame | None:
    """Each save's measures (its last `eval` event): learned at its suggested strength and bleed, in percent."""
    last = {e["step"]: e for e in events if e["type"] == "eval"}
    rows = [(step, 100 * e[k], label) for step, e in sorted(last.items())
            for k, label in (("learned", "learned"), ("bleed", "bleed"))]
    if not rows:
        return None
    return pd.DataFrame(rows, columns=["step", "percent", "measure"]).astype(
        {"step": "int64", "percent": "float64", "measure": "str"})


def show_run(ctx: Context, values: dict) -> dict:
    run = values["run"]
    if not run or not ws.run_dir(ctx.root, run).is_dir():
        return {"progress": "", "status": "No run yet.", "loss": _loss_frame([]), "samples": [], "evals": None,
                "seen": ""}
    return {**view(ctx, run), "seen": f"{run}:shown"}


def poll(ctx: Context, values: dict) -> dict:
    """The page's timer: follow a run started here or in another tab once, and show what changed in the run shown
    (`seen`: what the page shows already, so an unchanged run sends nothing)."""
    run, followed, seen = values["run"], values["followed"], values["seen"]
    result = {}
    live = ws.running(ctx.root)
    if live and live != followed:  # a run started here or in another tab: follow it once
        run, followed = live, live
        result["run"] = Choices(ws.run_names(ctx.root), live)
    result.update(followed=followed, seen=seen)
    try:
        events_file = ws.run_dir(ctx.root, run) / "events.jsonl" if run else None
    except UserError:  # a name typed into the list, or a run folder deleted meanwhile
        events_file = None
    if events_file is None or not events_file.parent.is_dir():
        return result
    size = events_file.stat().st_size if events_file.exists() else 0
    signature = f"{run}:{size}:{rundir.status(events_file.parent)}"
    if signature == seen:
        return result
    return {**result, **view(ctx, run), "seen": signature}


def load(ctx: Context, values: dict) -> dict:
    """A new page (or a reload) shows what is on disk: the datasets (on both tabs), the examples, the running or
    newest run, and the form filled with that run's settings."""
    names = ws.run_names(ctx.root)
    live = ws.running(ctx.root)
    datasets = ws.dataset_names(ctx.root)
    current = live or (names[0] if names else None)
    try:
        config = ws.run_config(ctx.root, current) if current else {}
    except UserError:  # shown as such when the run is viewed; the page still loads
        config = {}
    used = Path(config.get("dataset", "")).name
    used = used if used in datasets and Path(config["dataset"]) == ws.dataset_dir(ctx.root, used) else None
    base = config.get("base", "tiny")
    if ctx.models in Path(base).parents:
        base = Path(base).relative_to(ctx.models).as_posix()
    examples = bundled.names()
    offered = presets_for(_family(ctx, base))
    result = {"dataset": Choices(datasets, used or (datasets[0] if datasets else None)),
              "example": Choices(examples, (examples or [None])[0]),
              "base": Choices(ws.base_models(ctx.models), base), "run": Choices(names, current), "followed": live,
              "preset": Choices(offered)}
    if config:
        shown = preset_of(config)
        if shown and shown not in {p for _, p in offered}:  # a run started with a preset made for another family
            offered = [*offered, next(choice for choice in PRESET_CHOICES if choice[1] == shown)]
        result["preset"] = Choices(offered, shown)
    result.update({name: _form_text(name, config[name]) for name in FORM_FIELDS if name in config})
    return result


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
    if state in ("done", "stopped"):
        best = next((e for e in reversed(events) if e["type"] == "recommend"), None)
        if best:
            text += (f"\n\n**Use {best['reason'].split(':')[0]}** ({best['reason'].split(': ', 1)[1]}; measured on "
                     f"{best['on']}). Try it and Download start with it.")
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


# ---- layout and wiring --------------------------------------------------------------------------------------------

def _field_input(f: dataclasses.Field, value):
    label, info = MAIN.get(f.name, (LABELS.get(f.name, f.name.replace("_", " ").capitalize()), f.metadata["help"]))
    default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
    if isinstance(default, bool):
        return gr.Checkbox(value=value, label=label, info=info)
    if f.metadata.get("choices"):
        return gr.Dropdown(list(f.metadata["choices"]), value=value, label=label, info=info)
    if isinstance(default, int):  # a default of -1 means automatic (eval_holdout): the box must take it
        return gr.Number(value=value, label=label, info=info, precision=0, minimum=-1 if default < 0 else 0)
    if isinstance(default, float):
        step = 1e-5 if f.name.endswith("_lr") else 0.5 if f.name == "alpha" else 0.01
        # a default of -1 means auto (sample_guidance_rescale): the box must take it
        return gr.Number(value=value, label=label, info=info, step=step, minimum=-1 if default < 0 else 0)
    if isinstance(default, list):
        return gr.Textbox(value=value, label=label, info=f"{info}; one prompt a line", lines=2)
    return gr.Textbox(value=value, label=label, info=info)


def layout(ctx: Context) -> SimpleNamespace:
    """The tab and its components; `form` maps each TrainConfig field shown to its input."""
    ui = SimpleNamespace(form={})
    first = form_values(FIRST_PRESET)
    fields = {f.name: f for f in _SHOWN}
    main = [name for name in FORM_FIELDS if name in MAIN]
    rest = [name for name in FORM_FIELDS if name not in MAIN]
    with gr.Tab("2 · Train", id="train") as ui.tab:
        with gr.Row():
            ui.dataset = gr.Dropdown([], label="Dataset", info="from the Pictures tab", allow_custom_value=True,
                                     elem_id="train-dataset")
            ui.base = gr.Dropdown([("tiny (built in, for trying things out)", "tiny")], value="tiny",
                                  label="Base model", allow_custom_value=True,
                                  info="tiny, a model from your models folder, or a hub id like org/name")
            ui.preset = gr.Radio(PRESET_CHOICES, value=FIRST_PRESET, label="Preset",
                                 info="fills in sensible values below")
            ui.run_name = gr.Textbox(label="Run name", placeholder="made from the dataset and time")
            ui.gpus = gr.Radio(list(range(1, max(ctx.gpus, 1) + 1)), value=max(ctx.gpus, 1), label="GPUs",
                               visible=ctx.gpus > 1, elem_id="gpus",
                               info="train on this many at once; each takes 'Pictures per step'")
        for row in (main[:5], main[5:]):
            with gr.Row():
                for name in row:
                    ui.form[name] = _field_input(fields[name], first[name])
        with gr.Accordion("Advanced", open=False):
            for i in range(0, len(rest), 4):
                with gr.Row():
                    for name in rest[i:i + 4]:
                        ui.form[name] = _field_input(fields[name], first[name])
        ui.plan = gr.Markdown()
        with gr.Row():
            ui.start = gr.Button("Start training", variant="primary", scale=2)
            ui.stop = gr.Button("Stop", variant="stop")
            ui.sample = gr.Button("Sample now")
            ui.save = gr.Button("Save now")
        with gr.Row():
            ui.run = gr.Dropdown([], label="Showing run", scale=1, allow_custom_value=True)
            with gr.Column(scale=3):
                ui.progress = gr.HTML("<div class='sdl-progress'><p></p></div>")
                ui.status = gr.Markdown("No run yet.")
        with gr.Row():
            with gr.Column(scale=2):
                ui.loss = gr.LinePlot(None, x="step", y="loss", color="curve", height=260,
                                      color_map={"loss": "#9ca3af", "smoothed": "#f97316"},
                                      label="Loss: grey each step, orange smoothed (lower is better)")
                ui.evals = gr.LinePlot(None, x="step", y="percent", color="measure", height=200,
                                       color_map={"learned": "#16a34a", "bleed": "#dc2626"},
                                       label="Each save, in %: learned (green: the base's error it removes on "
                                             "your pictures, higher is better) and bleed (red: how much it changes "
                                             "prompts without the trigger, against with it; lower is better)")
            ui.samples = gr.Gallery(label="Samples as it trains (step 0 = before training)", columns=4, height=300,
                                    scale=3, object_fit="contain")
    return ui


def wire(ctx: Context, page: SimpleNamespace) -> None:
    """Connect the tab's components to its handlers (`page`: every tab's components, and the page's timer and the
    states `followed` (the run the page last followed) and `seen` (what the run view shows))."""
    ui = page.train
    form = {"dataset": ui.dataset, "base": ui.base, "run_name": ui.run_name, "gpus": ui.gpus, **ui.form}
    shown = {"progress": ui.progress, "status": ui.status, "loss": ui.loss, "samples": ui.samples, "evals": ui.evals}
    # .input: a click, never the page setting the radio to a run's preset on load
    on(ui.preset.input, ctx, choose_preset, {"preset": ui.preset}, ui.form, api_name=False)
    # .select: a base picked from the list (a Dropdown's .input fires twice for one pick, and notices would repeat)
    on(ui.base.select, ctx, choose_base, {"base": ui.base, "preset": ui.preset}, {"preset": ui.preset, **ui.form},
       api_name=False)
    # one listener for every field the plan reads: its calls queue one after another, so the plan always shows the
    # last values (a listener per field could finish an older call last)
    read = ("dataset", "base", "steps", "batch_size", "grad_accum", "gpus", "trigger", "resolution", "base_config")
    changes = [form[name].change for name in read]
    on(functools.partial(gr.on, changes), ctx, plan, form, {"plan": ui.plan}, as_set=True, show_progress="hidden",
       trigger_mode="always_last", api_name="plan")
    # the Pictures tab's dataset list changes: keep this tab's in step
    on(page.pictures.dataset.change, ctx, follow_dataset, {"dataset": page.pictures.dataset}, {"dataset": ui.dataset},
       api_name=False)
    on(ui.start.click, ctx, start, form, {"run": ui.run, "followed": page.followed}, as_set=True, api_name="start")
    on(ui.stop.click, ctx, stop, {"run": ui.run}, api_name="stop")
    on(ui.sample.click, ctx, sample_now, {"run": ui.run}, api_name="sample_now")
    on(ui.save.click, ctx, save_now, {"run": ui.run}, api_name="save_now")
    on(ui.run.change, ctx, show_run, {"run": ui.run}, {**shown, "seen": page.seen}, api_name="show_run",
       show_progress="hidden")
    on(page.timer.tick, ctx, poll, {"run": ui.run, "followed": page.followed, "seen": page.seen},
       {"run": ui.run, **shown, "followed": page.followed, "seen": page.seen}, show_progress="hidden", api_name="poll")
    on(page.demo.load, ctx, load, None,
       {"dataset": (page.pictures.dataset, ui.dataset), "example": page.pictures.example, "base": ui.base,
        "run": ui.run, "followed": page.followed, "preset": ui.preset, **ui.form}, api_name=False)
