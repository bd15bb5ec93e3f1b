"""The Pictures tab: datasets, their pictures and captions, uploads, the bundled examples, changing every caption
at once, editing tags across captions, and captions drafted by a captioner (a job process), reviewed, then saved."""

from __future__ import annotations

from types import SimpleNamespace

import gradio as gr
import pandas as pd

from sdlora import examples as bundled
from sdlora import check
from sdlora import dataset as ds
from sdlora import rundir
from sdlora import tags as tag_edits
from sdlora import workspace as ws
from sdlora.app import tab_train
from sdlora.app.context import Context
from sdlora.app.wiring import Choices, call, components, on
from sdlora.errors import UserError


# ---- handlers -----------------------------------------------------------------------------------------------------

def gallery_of(ctx: Context, name: str) -> tuple[list, str]:
    """The dataset's pictures with their captions, and the note above them."""
    if not name:
        return [], "Pick a dataset, or type a name and add pictures."
    if name not in ws.dataset_names(ctx.root):
        return [], f"**{ws.slug(name)}** is a new dataset: add pictures to it."
    items = ws.captions(ctx.root, name)
    images, captioned, per_epoch = ws.dataset_counts(ctx.root, name)
    note = f"**{name}**: {images} pictures, {captioned} with captions"
    if per_epoch != images:
        note += f" ({per_epoch} per round, counting repeat folders)"
    if images and captioned < images:
        note += ". Pictures without a caption train with the caption template (Train, Advanced)."
    return [(str(path), f"{file}: {caption or '(no caption)'}") for file, path, caption in items], note


def show_dataset(ctx: Context, values: dict) -> dict:
    """The dataset `name` picked: its pictures, and no picture picked."""
    gallery, note = gallery_of(ctx, values["name"])
    return {"gallery": gallery, "note": note, "file": "", "caption": "", "mask": None}


def add_pictures(ctx: Context, values: dict) -> dict:
    """Add uploaded `files` (pictures, captions, .zip files) to the dataset `name`, made if new; say what was not
    used and why."""
    if not values["files"]:
        raise UserError("no files to add", "drop pictures, caption .txt files or a .zip into the box first")
    name = ws.slug(values["name"] or "my-pictures")
    added = ws.add_files(ctx.root, name, [str(f) for f in values["files"]], max_unpacked=ctx.max_unpacked)
    report = [f"Added {len(added.saved)} pictures to **{name}**."]
    if added.rejected:
        report.append("Not used:\n" + "\n".join(f"- `{n}`: {why}" for n, why in added.rejected))
    report += [f"Note: {w}" for w in added.warnings]
    gallery, note = gallery_of(ctx, name)
    return {"dataset": Choices(ws.dataset_names(ctx.root), name), "gallery": gallery,
            "note": note + "\n\n" + "\n\n".join(report), "files": None}


def use_example(ctx: Context, values: dict) -> dict:
    """Copy a bundled example dataset into the workspace and show it."""
    example = values["example"]
    if example not in bundled.names():
        raise UserError(f"no example named {example!r}", "pick one from the list")
    name = ws.copy_example(ctx.root, bundled.path(example))
    gallery, note = gallery_of(ctx, name)
    return {"dataset": Choices(ws.dataset_names(ctx.root), name), "gallery": gallery, "note": note}


def pick_picture(ctx: Context, values: dict) -> dict:
    """The picture clicked in the gallery of dataset `name` (`index`) and its caption, for editing, and its loss mask
    where it has one."""
    items = ws.captions(ctx.root, values["name"])
    index = values["index"]
    if index is None or index >= len(items):
        return {"file": "", "caption": "", "mask": None}
    file, path, caption = items[index]
    mask = ws.mask_file(path)
    return {"file": file, "caption": caption, "mask": str(mask) if mask else None}


def save_caption(ctx: Context, values: dict) -> dict:
    """Write `caption` as the caption of picture `file` of dataset `name`."""
    name, file = values["name"], values["file"]
    ws.set_caption(ctx.root, name, file, values["caption"])
    gallery, note = gallery_of(ctx, name)
    return {"gallery": gallery, "note": note + f"\n\nSaved the caption of `{file}`."}


def remove_picture(ctx: Context, values: dict) -> dict:
    """Delete picture `file` of dataset `name`, and its caption."""
    name, file = values["name"], values["file"]
    ws.remove_image(ctx.root, name, file)
    gallery, note = gallery_of(ctx, name)
    return {"gallery": gallery, "note": note + f"\n\nRemoved `{file}`.", "file": "", "caption": "", "mask": None}


def change_all(ctx: Context, values: dict) -> dict:
    """Edit every caption of dataset `name`: the `trigger` word first, text added at the start (`prefix`) or end
    (`suffix`), `find` and `replace`. A trigger word given here becomes the Train tab's too."""
    name = values["name"]
    if not name:
        raise UserError("no dataset picked", "pick a dataset first")
    count = ws.edit_captions(ctx.root, name, trigger=values["trigger"], prefix=values["prefix"],
                             suffix=values["suffix"], find=values["find"], replace=values["replace"])
    gallery, note = gallery_of(ctx, name)
    result = {"gallery": gallery, "note": note + f"\n\nChanged {count} captions."}
    if values["trigger"].strip():
        result["trigger"] = values["trigger"].strip()
    return result


def count_tags(ctx: Context, values: dict) -> dict:
    """The tags of dataset `name`'s captions, most common first, as Markdown."""
    name = values["name"]
    if not name or name not in ws.dataset_names(ctx.root):
        raise UserError("no dataset picked", "pick a dataset with pictures first")
    items = ws.captions(ctx.root, name)
    counts = tag_edits.frequencies([caption for _, _, caption in items])
    if not counts:
        return {"tags": f"**{name}** has no captions yet."}
    shown = ", ".join(f"{tag} ({n})" for tag, n in counts[:60])
    more = f", and {len(counts) - 60} more" if len(counts) > 60 else ""
    return {"tags": f"**{len(counts)} tags** in {len(items)} captions (pictures holding each): {shown}{more}"}


def _tag_edit(values: dict) -> tag_edits.TagEdit:
    old, new = (values.get("replace") or "").strip(), (values.get("with_") or "").strip()
    if new and not old:
        raise UserError("nothing to replace", "type the tag to replace next to what replaces it")
    return tag_edits.TagEdit(remove=tag_edits.parse(values.get("remove")), replace=((old, new),) if old else (),
                             add=tag_edits.parse(values.get("add")), at=values.get("at") or "end",
                             trigger=values.get("trigger") or "")


def _tag_changes(ctx: Context, values: dict) -> tuple[str, list]:
    name = values["name"]
    if not name or name not in ws.dataset_names(ctx.root):
        raise UserError("no dataset picked", "pick a dataset with pictures first")
    items = [(file, caption) for file, _, caption in ws.captions(ctx.root, name)]
    return name, tag_edits.preview(items, _tag_edit(values))


def preview_tags(ctx: Context, values: dict) -> dict:
    """What the tag edit (`remove`, `replace` ... `with_`, `add` at `at`, after the `trigger`) would do to dataset
    `name`'s captions: the captions that change, before and after. Nothing is written."""
    name, changes = _tag_changes(ctx, values)
    table = pd.DataFrame([(c.file, c.before, c.after) for c in changes], columns=["Picture", "Before", "After"])
    said = f"{len(changes)} captions would change. Press **Apply** to write them." if changes else \
        "No caption would change."
    return {"changes": table, "tags_note": said}


def apply_tags(ctx: Context, values: dict) -> dict:
    """Make the tag edit (as `preview_tags` shows it) in every caption of dataset `name`."""
    name, changes = _tag_changes(ctx, values)
    for change in changes:
        ws.set_caption(ctx.root, name, change.file, change.after)
    gallery, note = gallery_of(ctx, name)
    return {"gallery": gallery, "note": note + f"\n\nChanged the tags of {len(changes)} captions.",
            "changes": pd.DataFrame(columns=["Picture", "Before", "After"]),
            "tags_note": f"Changed {len(changes)} captions.", **count_tags(ctx, {"name": name})}


def check_pictures(ctx: Context, values: dict) -> dict:
    """Check the pictures and captions of dataset `name` for what makes a LoRA disappoint, with the Train tab's
    `trigger`, `base`, `resolution`, `steps`, `batch_size` and `grad_accum`: the findings as Markdown."""
    name = values["name"]
    if not name or name not in ws.dataset_names(ctx.root):
        raise UserError("no dataset picked", "pick a dataset with pictures first")
    number = lambda key, default: int(float(values.get(key) or default))  # noqa: E731 - form fields may be text
    base = values.get("base") or "tiny"
    on_disk = ctx.models / base
    base = str(on_disk) if base != "tiny" and on_disk.exists() else base
    resolution, said = number("resolution", 0), ""
    if not resolution:
        try:
            resolution = check.base_resolution(base)
        except UserError:  # a hub id: its size is known only once loaded
            resolution, said = 512, " (512 px assumed; set the resolution on the Train tab to check at another)"
    data = ds.ingest(ws.dataset_dir(ctx.root, name))  # captions as written: the trigger is not added yet
    findings = check.check_dataset(data, trigger=values.get("trigger") or "", resolution=resolution, base=base,
                                   steps=number("steps", 0), batch_size=number("batch_size", 1),
                                   grad_accum=number("grad_accum", 1))
    lines = [f"**Check of {name}** at {resolution} px{said}: {check.summary(findings, len(data.records))}."]
    lines += [f"- **{f.severity}**: {f.message}" + (f" — {f.hint}" if f.hint else "") for f in findings]
    lines += [f"- skipped `{n}`: {why}" for n, why in data.rejected]
    return {"findings": "\n".join(lines) if findings or data.rejected else lines[0] + " Nothing to fix."}


def draft_captions(ctx: Context, values: dict) -> dict:
    """Start drafting captions for dataset `name` with `captioner`, in a process of its own: `mode` (sentence, tags
    or '' for the captioner's own), `trigger`, `prefix`, `suffix`, `drop` (tags, comma-separated); pictures that
    have a caption only with `overwrite`. Nothing is saved until the drafts are."""
    name = values["name"]
    if not name or name not in ws.dataset_names(ctx.root):
        raise UserError("no dataset picked", "pick a dataset with pictures first")
    captioner = ws.resolve_captioner(ctx.models, values["captioner"])
    job_dir = ws.caption_job_dir(ctx.root, name)
    with ctx.start_lock:
        if job_dir.is_dir() and rundir.status(job_dir) == "running":
            raise UserError(f"captions for {name} are being drafted", "wait for the drafts")
        flags = {"mode": values["mode"], "trigger": values["trigger"], "prefix": values["prefix"],
                 "suffix": values["suffix"], "drop-tags": values["drop"]}
        options = [f"--captioner={captioner}", "--dry-run", *(["--overwrite"] if values["overwrite"] else []),
                   *(f"--{flag}={value.strip()}" for flag, value in flags.items() if (value or "").strip())]
        ctx.start_caption(ws.dataset_dir(ctx.root, name), job_dir, options)
    return {"draft_note": f"Drafting captions for **{name}**: loading the captioner…", "drafts": [],
            "table": [], "draft_seen": ""}


def poll_drafts(ctx: Context, values: dict) -> dict:
    """The page's timer: the drafting job of dataset `name`, its progress and the drafts so far, when it changed since
    `seen`."""
    name, seen = values["name"], values["seen"]
    try:
        job_dir = ws.caption_job_dir(ctx.root, name) if name else None
    except UserError:  # a name being typed
        job_dir = None
    if job_dir is None or not job_dir.is_dir():
        return {"draft_note": "", "drafts": [], "table": [], "draft_seen": ""} if seen else {"draft_seen": seen}
    events_file = job_dir / "events.jsonl"
    size = events_file.stat().st_size if events_file.exists() else 0
    signature = f"{name}:{size}:{rundir.status(job_dir)}"
    if signature == seen:
        return {"draft_seen": seen}
    return {**show_drafts(ctx, name), "draft_seen": signature}


def show_drafts(ctx: Context, name: str) -> dict:
    """The drafts of dataset `name`'s last job beside their pictures (a gallery and a table to edit), and how it
    stands."""
    job_dir = ws.caption_job_dir(ctx.root, name)
    events = rundir.read_events(job_dir)
    state = rundir.status(job_dir)
    if not events and state != "running" and not (job_dir / "log.txt").is_file():
        return {"draft_note": "", "drafts": [], "table": []}
    drafts = [e for e in events if e["type"] == "caption"]
    folder = ws.dataset_dir(ctx.root, name)
    gallery = [(str(folder / e["file"]), f"{e['file']}: {e['caption']}") for e in drafts
               if (folder / e["file"]).is_file()]
    table = [[e["file"], e["old"], e["caption"]] for e in drafts]
    progress = [e for e in events if e["type"] == "progress"]
    notes = "".join(f"\n\nNote: {e['message']}" for e in events if e["type"] == "warning")
    if state == "running":
        note = f"Drafting: {progress[-1]['done']} of {progress[-1]['total']} pictures…" if progress else \
            "Drafting: loading the captioner…"
    elif state == "done":
        skipped = progress[-1]["skipped"] if progress else 0
        note = f"**{len(drafts)} draft{'s' * (len(drafts) != 1)}.** Check them, edit any in the table, then save." \
            if drafts else "No picture needed a caption."
        note += f" Pictures with a caption left alone: {skipped} (tick overwrite to redraft them)." if skipped else ""
    else:
        error = next((e["message"] for e in reversed(events) if e["type"] == "error"), None)
        note = f"Drafting failed: {error or _log_tail(job_dir)}"
    return {"draft_note": note + notes, "drafts": gallery, "table": table}


def _log_tail(job_dir) -> str:
    log = job_dir / "log.txt"
    lines = log.read_text(errors="replace").strip().splitlines() if log.is_file() else []
    return lines[-1] if lines else "the process ended"


def save_drafts(ctx: Context, values: dict) -> dict:
    """Save the drafts in `table` (rows of picture, caption now, draft; as edited) as the captions of dataset `name`;
    a picture that has a caption keeps it unless `overwrite`."""
    name = values["name"]
    rows = [r for r in (values["table"] or []) if len(r) >= 3 and r[0] and str(r[2]).strip()]
    if not rows:
        raise UserError("no drafts to save", "draft captions first")
    now = {file: caption for file, _, caption in ws.captions(ctx.root, name)}
    saved = kept = 0
    for file, _, caption in rows:
        if now.get(file) and not values["overwrite"]:
            kept += 1
            continue
        ws.set_caption(ctx.root, name, file, str(caption))
        saved += 1
    gallery, note = gallery_of(ctx, name)
    said = f"Saved drafts: {saved}." + (f" Captions kept as they were: {kept} (tick overwrite to replace them)."
                                        if kept else "")
    return {"gallery": gallery, "note": note + "\n\n" + said}


def pick_draft(ctx: Context, values: dict) -> dict:
    """The draft clicked (`index` into the `table` of dataset `name`), put in the caption editor to save alone."""
    rows = values["table"] or []
    index = values["index"]
    if index is None or index >= len(rows):
        return {}
    file = rows[index][0]
    mask = ws.mask_file(ws.inside(ws.dataset_dir(ctx.root, values["name"]), file))
    return {"file": file, "caption": rows[index][2], "mask": str(mask) if mask else None}


# ---- layout and wiring --------------------------------------------------------------------------------------------

def layout(ctx: Context) -> SimpleNamespace:
    """The tab and its components."""
    ui = SimpleNamespace()
    with gr.Tab("1 · Pictures", id="pictures") as ui.tab:
        with gr.Row():
            ui.dataset = gr.Dropdown([], label="Dataset", allow_custom_value=True, scale=2,
                                     info="pick one, or type a new name and add pictures")
            ui.example = gr.Dropdown([], label="Example datasets", scale=1, allow_custom_value=True,
                                     info="ready-made pictures to try")
            ui.use_example = gr.Button("Use this example", scale=0, min_width=140)
        with gr.Row():
            ui.uploads = gr.File(label="Drop pictures, caption .txt files (same name as the picture), masks "
                                       "(NAME_mask.png) or a .zip",
                                 file_count="multiple", file_types=["image", ".txt", ".caption", ".zip"], scale=3,
                                 height=140)
            ui.add = gr.Button("Add to dataset", variant="primary", scale=1)
        ui.note = gr.Markdown("Pick a dataset, or type a name and add pictures.")
        ui.gallery = gr.Gallery(label="Pictures (click one to edit its caption)", columns=8, height=360,
                                allow_preview=False, object_fit="contain")
        with gr.Row():
            ui.picked = gr.Textbox(label="Picture", interactive=False, scale=1)
            ui.caption = gr.Textbox(label="Caption", scale=4, placeholder="what is in the picture, e.g. "
                                    "'zkstyle, a red fox in the snow'")
            # NAME_mask.png beside the picture: what masked_loss learns from it (white) and ignores (black)
            ui.mask = gr.Image(label="Mask (white = learned)", type="filepath", interactive=False, height=120,
                               scale=1, min_width=120)
            with gr.Column(scale=1, min_width=140):
                ui.save_caption = gr.Button("Save caption", variant="primary")
                ui.remove = gr.Button("Remove picture", variant="stop", size="sm")
        with gr.Accordion("Change all captions", open=False):
            with gr.Row():
                ui.bulk_trigger = gr.Textbox(label="Trigger word", info="put first in every caption that lacks it")
                ui.bulk_prefix = gr.Textbox(label="Add at the start")
                ui.bulk_suffix = gr.Textbox(label="Add at the end")
                ui.bulk_find = gr.Textbox(label="Find")
                ui.bulk_replace = gr.Textbox(label="Replace with")
            ui.bulk = gr.Button("Change all captions")
        with gr.Accordion("Edit tags", open=False):
            ui.tags = gr.Markdown("Tags are the comma-separated parts of captions.")
            ui.count_tags = gr.Button("Show tags", size="sm")
            with gr.Row():
                ui.tags_remove = gr.Textbox(label="Remove tags", info="comma-separated")
                ui.tags_replace = gr.Textbox(label="Replace tag")
                ui.tags_with = gr.Textbox(label="With", info="empty removes it")
                ui.tags_add = gr.Textbox(label="Add tags", info="comma-separated, where missing")
                ui.tags_at = gr.Radio(["start", "end"], value="end", label="Add at",
                                      info="start: after the trigger word")
            with gr.Row():
                ui.tags_preview = gr.Button("Preview")
                ui.tags_apply = gr.Button("Apply to all captions", variant="primary")
            ui.tags_note = gr.Markdown()
            ui.tags_changes = gr.Dataframe(headers=["Picture", "Before", "After"], interactive=False, wrap=True)
        with gr.Accordion("Draft captions", open=False):
            with gr.Row():
                ui.captioner = gr.Dropdown(ws.captioners(ctx.models), value="tiny-world", label="Captioner",
                                           allow_custom_value=True, scale=2,
                                           info="downloaded models, folders in the models folder, or a hub id")
                ui.draft_mode = gr.Dropdown([("what the captioner writes", ""), ("sentences", "sentence"),
                                             ("tags", "tags")], value="", label="Write", scale=1)
                ui.draft_overwrite = gr.Checkbox(label="Also redraft pictures that have a caption", scale=1)
            with gr.Row():
                ui.draft_trigger = gr.Textbox(label="Trigger word", info="put first", elem_id="draft-trigger")
                ui.draft_prefix = gr.Textbox(label="Add at the start")
                ui.draft_suffix = gr.Textbox(label="Add at the end")
                ui.draft_drop = gr.Textbox(label="Leave out tags", placeholder="e.g. simple background, solo")
            ui.draft = gr.Button("Draft captions")
            ui.draft_note = gr.Markdown("")
            ui.drafts = gr.Gallery(label="Drafts (click one to edit and save it alone)", columns=8, height=240,
                                   allow_preview=False, object_fit="contain")
            ui.draft_table = gr.Dataframe(headers=["Picture", "Caption now", "Draft"], type="array",
                                          interactive=True, wrap=True, label="Drafts (edit any before saving)")
            ui.save_drafts = gr.Button("Save drafts", variant="primary")
            ui.draft_seen = gr.State("")  # what the drafts show (see poll_drafts)
        with gr.Accordion("Check pictures", open=False):
            ui.check = gr.Button("Check pictures")
            ui.findings = gr.Markdown("Finds duplicates, small, enlarged, cropped or blurry pictures and caption "
                                      "problems, with the Train tab's trigger word, resolution and steps.")
    return ui


def wire(ctx: Context, page: SimpleNamespace) -> None:
    """Connect the tab's components to its handlers (`page`: every tab's components)."""
    ui, train = page.pictures, page.train
    shown = {"gallery": ui.gallery, "note": ui.note}
    cleared = {"file": ui.picked, "caption": ui.caption, "mask": ui.mask}
    follow = dict(inputs={"dataset": ui.dataset}, outputs={"dataset": train.dataset}, api_name=False)
    on(ui.dataset.change, ctx, show_dataset, {"name": ui.dataset}, {**shown, **cleared}, api_name="show_dataset")
    # a new dataset may keep the name typed before it existed (no change event): tell the Train tab too
    added = on(ui.add.click, ctx, add_pictures, {"name": ui.dataset, "files": ui.uploads},
               {"dataset": ui.dataset, **shown, "files": ui.uploads}, api_name="add_pictures")
    on(added.then, ctx, tab_train.follow_dataset, **follow)
    copied = on(ui.use_example.click, ctx, use_example, {"example": ui.example}, {"dataset": ui.dataset, **shown},
                api_name="use_example")
    on(copied.then, ctx, tab_train.follow_dataset, **follow)

    def select(name, evt: gr.SelectData):  # the picture clicked comes with the event
        return call(ctx, pick_picture, {"name": name, "index": evt.index}, cleared)
    ui.gallery.select(select, ui.dataset, components(cleared), api_name=False)
    on(ui.save_caption.click, ctx, save_caption, {"name": ui.dataset, "file": ui.picked, "caption": ui.caption},
       shown, api_name="save_caption")
    on(ui.remove.click, ctx, remove_picture, {"name": ui.dataset, "file": ui.picked}, {**shown, **cleared},
       api_name="remove_picture")
    on(ui.bulk.click, ctx, change_all,
       {"name": ui.dataset, "trigger": ui.bulk_trigger, "prefix": ui.bulk_prefix, "suffix": ui.bulk_suffix,
        "find": ui.bulk_find, "replace": ui.bulk_replace},
       {**shown, "trigger": train.form["trigger"]}, api_name="change_all")
    on(ui.count_tags.click, ctx, count_tags, {"name": ui.dataset}, {"tags": ui.tags}, api_name="count_tags")
    edit = {"name": ui.dataset, "remove": ui.tags_remove, "replace": ui.tags_replace, "with_": ui.tags_with,
            "add": ui.tags_add, "at": ui.tags_at, "trigger": train.form["trigger"]}
    on(ui.tags_preview.click, ctx, preview_tags, edit, {"changes": ui.tags_changes, "tags_note": ui.tags_note},
       api_name="preview_tags")
    on(ui.tags_apply.click, ctx, apply_tags, edit,
       {**shown, "changes": ui.tags_changes, "tags_note": ui.tags_note, "tags": ui.tags}, api_name="apply_tags")
    drafted = {"draft_note": ui.draft_note, "drafts": ui.drafts, "table": ui.draft_table}
    on(ui.draft.click, ctx, draft_captions,
       {"name": ui.dataset, "captioner": ui.captioner, "mode": ui.draft_mode, "overwrite": ui.draft_overwrite,
        "trigger": ui.draft_trigger, "prefix": ui.draft_prefix, "suffix": ui.draft_suffix, "drop": ui.draft_drop},
       {**drafted, "draft_seen": ui.draft_seen}, api_name="draft_captions")
    on(page.timer.tick, ctx, poll_drafts, {"name": ui.dataset, "seen": ui.draft_seen},
       {**drafted, "draft_seen": ui.draft_seen}, show_progress="hidden", api_name=False)
    on(ui.save_drafts.click, ctx, save_drafts, {"name": ui.dataset, "table": ui.draft_table,
                                                "overwrite": ui.draft_overwrite}, shown, api_name="save_drafts")

    def select_draft(name, table, evt: gr.SelectData):  # the draft clicked comes with the event
        return call(ctx, pick_draft, {"name": name, "table": table, "index": evt.index}, cleared)
    ui.drafts.select(select_draft, [ui.dataset, ui.draft_table], components(cleared), api_name=False)
    on(ui.check.click, ctx, check_pictures,
       {"name": ui.dataset, "trigger": train.form["trigger"], "base": train.base,
        "resolution": train.form["resolution"], "steps": train.form["steps"], "batch_size": train.form["batch_size"],
        "grad_accum": train.form["grad_accum"]}, {"findings": ui.findings}, api_name="check_pictures")
