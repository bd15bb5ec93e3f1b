"""The Try it tab: a picture from a LoRA at any strength, with more LoRAs stacked on it, and the strength × seed and
saves × strength grids, on a base model that stays loaded between them."""

from __future__ import annotations

import time
from pathlib import Path
from types import SimpleNamespace

import gradio as gr

from sdlora import workspace as ws
from sdlora.app import run_files
from sdlora.app.context import Context
from sdlora.app.wiring import Choices, on
from sdlora.config import SAMPLE_GUIDANCE, SAMPLE_STEPS
from sdlora.errors import UserError

GRID_STRENGTHS = (0.0, 0.25, 0.5, 0.75, 1.0)
SAVES_STRENGTHS = (0.0, 0.5, 0.75, 1.0)
STACK_SLOTS = 3  # LoRAs that can be added to the first one (inputs lora2, strength2, lora3, ...)
SLOTS = [f"lora{n}" for n in range(2, STACK_SLOTS + 2)]


# ---- handlers -----------------------------------------------------------------------------------------------------
# Their values: the first LoRA as `run` and `file`, or an `upload` on its `base`; `prompt`, `negative`, `seed`,
# `steps`, `guidance`; and the stacked LoRAs as `lora2`/`strength2` and on (a slot's value is its place in the
# workspace, runs/RUN/FILE or loras/FILE).

def _lora_and_base(ctx: Context, values: dict) -> tuple[str, str, str]:
    """(path, label, base) of the LoRA in the first slot."""
    upload, run, file = values["upload"], values["run"], values["file"]
    if upload:
        if not str(upload).endswith(".safetensors"):
            raise UserError("the uploaded file is not a .safetensors LoRA", "upload a .safetensors file")
        return str(upload), Path(upload).name, ws.resolve_base(ctx.models, values["base"])
    if not run or not file:
        raise UserError("no LoRA picked", "pick a run and one of its files, or upload a .safetensors")
    return str(ws.lora_file(ctx.root, run, file)), f"{run} · {file}", ws.run_config(ctx.root, run)["base"]


def _stacked(ctx: Context, first: str | None, values: dict) -> list[tuple[str, str, float]]:
    """(path, label, strength) of the LoRAs picked under "Add another LoRA"; an empty slot is skipped, a file picked
    twice is refused."""
    out, seen = [], {first} if first else set()
    for slot in SLOTS:
        value, strength = values.get(slot), values.get(slot.replace("lora", "strength"))
        if not value:
            continue
        value = str(value)
        path = str(ws.stack_file(ctx.root, value))
        label = " · ".join(value.split("/")[1:]) if value.startswith("runs/") else f"uploaded · {value[6:]}"
        if path in seen:
            raise UserError(f"{label} is picked twice", "pick each LoRA once and set its strength instead")
        seen.add(path)
        out.append((path, label, float(1.0 if strength is None else strength)))
    return out


def _generation(values: dict) -> dict:
    return dict(negative_prompt=values["negative"] or "", steps=int(values["steps"]),
                guidance_scale=float(values["guidance"]))


def _timing_note(ctx: Context, base: str, loaded_now, swap_s: float | None, total_s: float, what: str) -> str:
    """How long it took, and whether the base model was loaded for it or stayed loaded."""
    short = "tiny" if base == "tiny" else Path(base).name
    if loaded_now is not None:
        return (f"{what} in {total_s:.1f} s, of which {loaded_now:.1f} s loading the base model *{short}* (once: "
                f"it stays loaded while you change LoRAs and strengths).")
    swap = f"; setting the LoRAs took {swap_s:.2f} s" if swap_s is not None else ""
    return (f"{what} in {total_s:.1f} s. The base model *{short}* stayed loaded (loading it took "
            f"{ctx.load_seconds.get(base, 0):.1f} s){swap}.")


def _grid_note(ctx: Context, base: str, loaded_now, began: float, others: list) -> str:
    note = _timing_note(ctx, base, loaded_now, None, time.perf_counter() - began, "Grid made")
    if others:
        note += " Every picture also has " + " + ".join(f"{name} at {s:g}" for _, name, s in others) + "."
    return note


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


def preview(ctx: Context, values: dict) -> dict:
    """One picture: the first LoRA at `strength`, each stacked one at its own."""
    began = time.perf_counter()
    lora, label, base = _lora_and_base(ctx, values)
    loras = [(lora, label, float(values["strength"]))] + _stacked(ctx, lora, values)
    with ctx.preview_lock:
        p, loaded_now = ctx.previewer(base)
        swap = time.perf_counter()
        p.set_loras([(path, s) for path, _, s in loras])
        swap = time.perf_counter() - swap
        image = p.image(values["prompt"], seed=int(values["seed"]), **_generation(values))
    used = " + ".join(f"{name} at {s:g}" for _, name, s in loras)
    return {"picture": image,
            "note": _timing_note(ctx, base, loaded_now, swap, time.perf_counter() - began, f"Made with {used}")}


def strength_grid(ctx: Context, values: dict) -> dict:
    """The first LoRA at each of GRID_STRENGTHS (columns) for `seeds` seeds from `seed` (rows)."""
    from sdlora.compare import strength_seed_grid

    began = time.perf_counter()
    lora, _, base = _lora_and_base(ctx, values)
    others = _stacked(ctx, lora, values)
    seed = int(values["seed"])
    with ctx.preview_lock:
        p, loaded_now = ctx.previewer(base)
        image = strength_seed_grid(_WithOthers(p, others), lora, values["prompt"], GRID_STRENGTHS,
                                   range(seed, seed + int(values["seeds"])), **_generation(values))
    return {"grid": image, "note": _grid_note(ctx, base, loaded_now, began, others)}


def saves_grid(ctx: Context, values: dict) -> dict:
    """Every saved file of a run (rows) at each of SAVES_STRENGTHS (columns)."""
    from sdlora.compare import saves_grid as make

    began = time.perf_counter()
    run = values["run"]
    if not run:
        raise UserError("no run picked", "pick a run with saved steps")
    files = ws.lora_files(ctx.root, run)
    if not files:
        raise UserError(f"run {run} has no saved LoRA yet", "wait for its first save, or press Save now")
    saves = [("final" if ws.step_of(f) is None else f"step {ws.step_of(f)}", str(ws.lora_file(ctx.root, run, f)))
             for f in files]
    others = _stacked(ctx, None, values)
    if {path for path, _, _ in others} & {path for _, path in saves}:
        raise UserError(f"a file of run {run} is also stacked", "stack only LoRAs from other runs for this grid")
    base = ws.run_config(ctx.root, run)["base"]
    with ctx.preview_lock:
        p, loaded_now = ctx.previewer(base)
        image = make(_WithOthers(p, others), saves, values["prompt"], SAVES_STRENGTHS, int(values["seed"]),
                     **_generation(values))
    return {"grid": image, "note": _grid_note(ctx, base, loaded_now, began, others)}


def add_stack_lora(ctx: Context, values: dict) -> dict:
    """An uploaded LoRA is kept in the workspace and put into the first empty slot."""
    upload = values["upload"]
    if not upload:
        return {}
    name = ws.add_lora(ctx.root, upload, Path(upload).name)
    value, placed = f"loras/{name}", False
    result = {"upload": None}
    for slot in SLOTS:
        current = values[slot]
        if not placed and (not current or current == value):
            current, placed = value, True
        result[slot] = Choices(ws.stack_choices(ctx.root), current)
    if not placed:
        result["info"] = f"Kept {name}; all slots are taken, pick it in one of them."
    return result


def refresh_stack(ctx: Context, values: dict) -> dict:
    """The LoRAs on offer for stacking as they are now; a slot whose file is gone is emptied."""
    choices = ws.stack_choices(ctx.root)
    known = {v for _, v in choices}
    return {slot: Choices(choices, values[slot] if values[slot] in known else None) for slot in SLOTS}


def base_choices(ctx: Context, values: dict) -> dict:
    """The base models on offer for an uploaded LoRA."""
    return {"base": Choices(ws.base_models(ctx.models))}


# ---- layout and wiring --------------------------------------------------------------------------------------------

def layout(ctx: Context) -> SimpleNamespace:
    """The tab and its components; `stack` maps lora2, strength2, lora3... to their inputs."""
    ui = SimpleNamespace(stack={})
    with gr.Tab("3 · Try it", id="preview") as ui.tab:
        with gr.Row():
            ui.run = gr.Dropdown([], label="Run", scale=1, allow_custom_value=True)
            ui.file = gr.Dropdown([], label="LoRA file", info="final, or a save at some step", scale=1,
                                  allow_custom_value=True)
            with gr.Accordion("…or use another LoRA file", open=False):
                ui.upload = gr.File(label=".safetensors LoRA", file_types=[".safetensors"], height=100)
                ui.base = gr.Dropdown([("tiny (built in, for trying things out)", "tiny")], value="tiny",
                                      label="Its base model", allow_custom_value=True)
        with gr.Accordion("Add another LoRA (stack up to 3 more)", open=False, elem_id="stack"):
            gr.Markdown("Each one adds its effect at its own strength, together with the LoRA above. Changing "
                        "them or their strengths keeps the base model loaded.")
            for i, slot in enumerate(SLOTS):
                with gr.Row():
                    ui.stack[slot] = gr.Dropdown([], label=f"LoRA {i + 2}", scale=3, allow_custom_value=True,
                                                 info="a file of a run, or one uploaded below" if i == 0 else None)
                    ui.stack[f"strength{i + 2}"] = gr.Slider(-1, 2, value=1.0, step=0.05,
                                                             label=f"LoRA {i + 2} strength", scale=2)
            ui.stack_upload = gr.File(label="Upload a .safetensors LoRA to stack (kept in the workspace)",
                                      file_types=[".safetensors"], height=100)
        with gr.Row():
            ui.prompt = gr.Textbox(label="Prompt", scale=3)
            ui.negative = gr.Textbox(label="Negative prompt", scale=2)
        with gr.Row():
            ui.seed = gr.Number(0, label="Seed", precision=0, minimum=0)
            ui.steps = gr.Number(SAMPLE_STEPS, label="Steps", precision=0, minimum=1)
            ui.guidance = gr.Number(SAMPLE_GUIDANCE, label="Guidance", step=0.5, minimum=0)
            ui.strength = gr.Slider(-1, 2, value=1.0, step=0.05, label="LoRA strength",
                                    info="0 = the base model alone, 1 = as trained")
        with gr.Row():
            with gr.Column(scale=1):
                ui.make = gr.Button("Make picture", variant="primary")
                ui.picture = gr.Image(label="Picture", format="png", type="pil", height=320, interactive=False,
                                      elem_id="picture")
                ui.note = gr.Markdown(elem_id="preview-note")
            with gr.Column(scale=2):
                with gr.Row():
                    ui.grid_seeds = gr.Slider(1, 4, value=2, step=1, label="Seeds in the grid")
                    ui.grid = gr.Button("Strength × seed grid")
                    ui.saves = gr.Button("Saves × strength grid")
                ui.grid_image = gr.Image(label="Grid", format="png", type="pil", height=420, interactive=False,
                                         elem_id="grid")
    return ui


def wire(ctx: Context, page: SimpleNamespace) -> None:
    """Connect the tab's components to its handlers (`page`: every tab's components)."""
    ui, export = page.try_it, page.export
    slots = {slot: ui.stack[slot] for slot in SLOTS}
    on(ui.tab.select, ctx, run_files.refresh, {"run": ui.run, "file": ui.file}, {"run": ui.run, "file": ui.file},
       api_name=False)
    on(page.train.run.change, ctx, run_files.follow, {"run": page.train.run}, {"run": (ui.run, export.run)},
       api_name=False)
    on(ui.run.change, ctx, run_files.pick_run, {"run": ui.run},
       {"file": (ui.file, export.file), "strength": ui.strength, "prompt": ui.prompt, "negative": ui.negative,
        "title": export.title,
        "trigger": export.trigger, "description": export.description}, api_name=False)
    generation = {"prompt": ui.prompt, "negative": ui.negative, "seed": ui.seed, "steps": ui.steps,
                  "guidance": ui.guidance}
    first = {"run": ui.run, "file": ui.file, "upload": ui.upload, "base": ui.base}
    on(ui.make.click, ctx, preview, {**first, **generation, "strength": ui.strength, **ui.stack},
       {"picture": ui.picture, "note": ui.note}, optional=tuple(ui.stack), api_name="preview")
    on(ui.grid.click, ctx, strength_grid, {**first, **generation, "seeds": ui.grid_seeds, **ui.stack},
       {"grid": ui.grid_image, "note": ui.note}, optional=tuple(ui.stack), api_name="strength_grid")
    on(ui.saves.click, ctx, saves_grid, {"run": ui.run, **generation, **ui.stack},
       {"grid": ui.grid_image, "note": ui.note}, optional=tuple(ui.stack), api_name="saves_grid")
    on(ui.stack_upload.upload, ctx, add_stack_lora, {"upload": ui.stack_upload, **slots},
       {"upload": ui.stack_upload, **slots}, optional=tuple(slots), api_name="stack_upload")
    on(ui.tab.select, ctx, refresh_stack, slots, slots, api_name=False)
    on(page.demo.load, ctx, base_choices, None, {"base": ui.base}, api_name=False)
    on(page.demo.load, ctx, refresh_stack, slots, slots, api_name=False)
