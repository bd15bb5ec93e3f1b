"""The Download tab: a run's LoRA file under the artist's title, trigger words and description, with its diffusers
version, a sample picture and a model card, ready to download."""

from __future__ import annotations

import shutil
from types import SimpleNamespace

import gradio as gr

from sdlora import card
from sdlora import workspace as ws
from sdlora.app import run_files
from sdlora.app.context import Context
from sdlora.app.wiring import on
from sdlora.errors import UserError


def export(ctx: Context, values: dict) -> dict:
    """Write the files to share, for `file` of `run`, into the run's export folder (what was there before goes): the
    LoRA with `title`, `trigger` words and `description` in its metadata, and with_diffusers / with_sample /
    with_card, its diffusers version, a sample picture and the model card. Returns the `files` to download, the
    `card`, and `warnings` for what was asked for and could not be made."""
    run, file = values["run"], values["file"]
    if not run or not file:
        raise UserError("no LoRA picked", "pick a run and one of its files")
    source, lora = ws.run_dir(ctx.root, run), ws.lora_file(ctx.root, run, file)  # names checked before deleting
    out = ws.export_dir(ctx.root, run)
    shutil.rmtree(out, ignore_errors=True)  # what the page lists is what is there
    made = card.share(source, lora.name, out, title=values["title"].strip() or run,
                      trigger=values["trigger"].strip(), description=values["description"].strip(),
                      diffusers=values["with_diffusers"], sample=values["with_sample"],
                      readme=values["with_card"])
    return {"files": [str(p) for p in made.files], "card": made.card, "warnings": made.notes}


def layout(ctx: Context) -> SimpleNamespace:
    """The tab and its components."""
    ui = SimpleNamespace()
    with gr.Tab("4 · Download", id="export") as ui.tab:
        with gr.Row():
            ui.run = gr.Dropdown([], label="Run", allow_custom_value=True)
            ui.file = gr.Dropdown([], label="LoRA file", info="final, or a save at some step", allow_custom_value=True)
        with gr.Row():
            ui.title = gr.Textbox(label="Title")
            ui.trigger = gr.Textbox(label="Trigger words")
        ui.description = gr.Textbox(label="Description", lines=2)
        with gr.Row():
            ui.diffusers = gr.Checkbox(False, label="Also the diffusers version")
            ui.sample = gr.Checkbox(True, label="A sample picture")
            ui.readme = gr.Checkbox(True, label="A model card")
        ui.export = gr.Button("Make files", variant="primary")
        with gr.Row():
            ui.downloads = gr.File(label="Download", file_count="multiple", interactive=False, scale=1,
                                   elem_id="downloads")
            ui.card_text = gr.Textbox(label="Model card (paste it on a model-sharing site)", lines=14, scale=2,
                                      buttons=["copy"], elem_id="card")
    return ui


def wire(ctx: Context, page: SimpleNamespace) -> None:
    """Connect the tab's components to its handlers (`page`: every tab's components)."""
    ui = page.export
    on(ui.tab.select, ctx, run_files.refresh, {"run": ui.run, "file": ui.file}, {"run": ui.run, "file": ui.file},
       api_name=False)
    on(ui.run.change, ctx, run_files.pick_run, {"run": ui.run},
       {"file": ui.file, "title": ui.title, "trigger": ui.trigger, "description": ui.description}, api_name=False)
    on(ui.export.click, ctx, export,
       {"run": ui.run, "file": ui.file, "title": ui.title, "trigger": ui.trigger, "description": ui.description,
        "with_diffusers": ui.diffusers, "with_sample": ui.sample, "with_card": ui.readme},
       {"files": ui.downloads, "card": ui.card_text}, api_name="export")
