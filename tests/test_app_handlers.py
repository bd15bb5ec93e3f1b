"""The app's handlers called as plain functions on a workspace of their own, no server: what each tab shows after
an artist's action, what lands on disk, and the one-line errors; a short run on the tiny model, previewed and
exported."""

import time

import gradio as gr
import numpy as np
import pytest

from conftest import draw_dataset
from sdlora import examples, rundir
from sdlora import workspace as ws
from sdlora.app import run_files, tab_export, tab_pictures, tab_train, tab_try
from sdlora.app.context import Context
from sdlora.app.wiring import KEEP, Choices, call
from sdlora.errors import UserError

PROMPT = "zxq, a red circle on a blue background"


@pytest.fixture()
def ctx(tmp_path):
    made = Context.create(tmp_path / "workspace", gpus=0)
    yield made
    made.children.end_all(grace=60, say=lambda _: None)


def form(**changed) -> dict:
    """The Train tab's values as a new page shows them (the Quick test preset), with `changed` typed in."""
    values = {name: tab_train.form_values(tab_train.FIRST_PRESET)[name] for name in tab_train.FORM_FIELDS}
    return {**values, "dataset": None, "base": "tiny", "run_name": "", "gpus": 1, **changed}


def example(ctx) -> str:
    return tab_pictures.use_example(ctx, {"example": "character"})["dataset"].value


def test_an_example_becomes_a_dataset_with_its_captions(ctx):
    shown = tab_pictures.use_example(ctx, {"example": "character"})
    count = len(list(examples.path("character").glob("*.png")))
    assert shown["dataset"] == Choices(["character-example"], "character-example")
    assert shown["note"] == f"**character-example**: {count} pictures, {count} with captions"
    assert len(shown["gallery"]) == count and all(": " in caption for _, caption in shown["gallery"])
    with pytest.raises(UserError, match="no example named"):
        tab_pictures.use_example(ctx, {"example": "../../sdlora"})


def test_a_caption_edited_is_on_disk_and_in_the_gallery(ctx):
    name = example(ctx)
    picked = tab_pictures.pick_picture(ctx, {"name": name, "index": 0})
    file, old = picked["file"], picked["caption"]
    assert file.endswith(".png") and old
    shown = tab_pictures.save_caption(ctx, {"name": name, "file": file, "caption": "zxq, a knight in red"})
    assert (ws.dataset_dir(ctx.root, name) / file).with_suffix(".txt").read_text().strip() == "zxq, a knight in red"
    assert f"{file}: zxq, a knight in red" in [caption for _, caption in shown["gallery"]]
    assert shown["note"].endswith(f"Saved the caption of `{file}`.")
    assert tab_pictures.pick_picture(ctx, {"name": name, "index": 999}) == {"file": "", "caption": "", "mask": None}

    changed = tab_pictures.change_all(ctx, {"name": name, "trigger": " zkchar ", "prefix": "", "suffix": "",
                                            "find": "", "replace": ""})
    assert changed["trigger"] == "zkchar"  # the Train tab's trigger word follows
    assert all(caption.startswith("zkchar") for _, _, caption in ws.captions(ctx.root, name))
    assert "trigger" not in tab_pictures.change_all(ctx, {"name": name, "trigger": "", "prefix": "", "suffix": "",
                                                          "find": "knight", "replace": "squire"})
    assert "zkchar, zxq, a squire in red" in [c for _, _, c in ws.captions(ctx.root, name)]

    removed = tab_pictures.remove_picture(ctx, {"name": name, "file": file})
    assert not (ws.dataset_dir(ctx.root, name) / file).exists() and removed["note"].endswith(f"Removed `{file}`.")
    assert (removed["file"], removed["caption"]) == ("", "")


def test_uploads_say_what_was_not_used(ctx, tmp_path):
    folder = draw_dataset(tmp_path / "upload", n=3, size=32)
    (folder / "broken.png").write_bytes(b"not an image")
    shown = tab_pictures.add_pictures(ctx, {"name": "My Shapes", "files": sorted(folder.iterdir())})
    assert shown["dataset"].value == "My-Shapes" and shown["files"] is None  # the drop box is emptied
    assert "Added 3 pictures to **My-Shapes**." in shown["note"] and "`broken.png`: not an image" in shown["note"]
    assert tab_train.follow_dataset(ctx, {"dataset": "My-Shapes"}) == {"dataset": Choices(["My-Shapes"], "My-Shapes")}
    assert tab_train.follow_dataset(ctx, {"dataset": "typed"}) == {"dataset": Choices(["My-Shapes"])}
    with pytest.raises(UserError, match="no files to add"):
        tab_pictures.add_pictures(ctx, {"name": "x", "files": []})


def test_the_plan_of_a_preset(ctx):
    name = example(ctx)
    assert tab_train.plan(ctx, form()) == {"plan": "Pick a dataset to see what the run will do."}
    values = form(dataset=name, trigger="zkchar")
    images = ws.dataset_counts(ctx.root, name)[0]
    steps, batch = values["steps"], values["batch_size"]
    text = tab_train.plan(ctx, values)["plan"]
    assert f"{steps} steps × {batch} pictures = {steps * batch:,} pictures shown to the model" in text
    assert f"Your dataset has {images} pictures, so each one is seen about **{steps * batch / images:.0f} times**" \
        in text
    assert "Time: about" in text and "a rough guess for a laptop CPU" in text
    unfilled = tab_train.plan(ctx, form(dataset=name, steps=None))
    assert unfilled == {"plan": "Fill in the form to see what the run will do."}

    character = tab_train.choose_preset(ctx, {"preset": "character"})
    assert character["targets"] == "attn-mlp" and "trigger" not in character  # a preset leaves the trigger word
    assert tab_train.choose_preset(ctx, {"preset": None}) == {}
    # the run records the preset the form's values match, so training can warn when it was made for another family
    assert tab_train.form_config(ctx, {**values, **tab_train.choose_preset(ctx, {"preset": "flux-style"})}).preset \
        == "flux-style"
    assert tab_train.form_config(ctx, {**values, "rank": 3}).preset == ""  # changed by hand: no preset's values


def test_a_base_picked_offers_the_presets_that_suit_it(ctx):
    """Presets made for another family are not offered; one shown that does not suit the base gives way to the first
    preset, values set by hand stay, and a base whose files cannot be read offers every preset. (The SD3.5 and
    FLUX.1 bases, which pick presets of their own, are covered with their small models.)"""
    picked = tab_train.choose_base(ctx, {"base": "tiny", "preset": "flux-style"})
    assert [p for _, p in picked["preset"].choices] == ["style", "character", "quick"]
    assert picked["preset"].value == "quick" and picked["info"] == "SD1.x base: preset Quick test picked"
    assert picked["steps"] == 100 and picked["unet_lr"] == tab_train.form_values(None)["unet_lr"]
    assert tab_train.choose_base(ctx, {"base": "tiny", "preset": "character"}) == \
        {"preset": Choices(picked["preset"].choices, "character")}
    assert tab_train.choose_base(ctx, {"base": "tiny", "preset": None}) == \
        {"preset": Choices(picked["preset"].choices, None)}
    unknown = tab_train.choose_base(ctx, {"base": "someone/not-downloaded", "preset": "flux-style"})
    assert unknown == {"preset": Choices(tab_train.PRESET_CHOICES, "flux-style")}
    # the plan says the size pictures train at when the form leaves it to the base
    values = form(dataset=example(ctx), trigger="zkchar")
    assert "Pictures train at 64 px, the tiny base's own." in tab_train.plan(ctx, values)["plan"]
    assert "Pictures train at" not in tab_train.plan(ctx, {**values, "resolution": 96})["plan"]
    assert tab_train.single_file_note("tiny", "") == ""  # the tiny base lacks nothing


def test_a_bad_value_is_one_line(ctx):
    name = example(ctx)
    for values, words in [(form(dataset=name, rank=0), "rank = 0: must be at least 1"),
                          (form(dataset=name, steps=None), "steps is empty"),
                          (form(), "no dataset picked"),
                          (form(dataset=name, gpus=2), "2 GPUs asked for, and 0 are visible")]:
        with pytest.raises(UserError, match=words) as raised:
            tab_train.start(ctx, values)
        assert "\n" not in str(raised.value)
        with pytest.raises(gr.Error, match=words):  # as the page shows it
            call(ctx, tab_train.start, values, {"run": None})
    assert ws.run_names(ctx.root) == []  # nothing started
    with pytest.raises(UserError, match="no run is training"):
        tab_train.stop(ctx, {"run": None})
    with pytest.raises(UserError, match="no LoRA picked"):
        tab_try.preview(ctx, {"run": None, "file": None, "upload": None, "base": "tiny", "prompt": "a", "negative": "",
                              "seed": 0, "steps": 2, "guidance": 7.0, "strength": 1.0})
    with pytest.raises(UserError, match="no run picked"):
        tab_try.saves_grid(ctx, {"run": None, "prompt": "a", "negative": "", "seed": 0, "steps": 2, "guidance": 7.0})
    with pytest.raises(UserError, match="no LoRA picked"):
        tab_export.export(ctx, {"run": "", "file": "", "title": "", "trigger": "", "description": "",
                                "with_diffusers": False, "with_sample": False, "with_card": False})


def test_a_new_page_on_an_empty_workspace(ctx):
    loaded = tab_train.load(ctx, {})
    assert loaded["dataset"] == Choices([], None) and loaded["run"] == Choices([], None)
    assert loaded["example"] == Choices(["character", "style"], "character")
    # no run: the form keeps its preset, and the tiny base is offered the presets that suit it
    assert loaded["followed"] is None and loaded["preset"].value is KEEP
    assert [p for _, p in loaded["preset"].choices] == ["style", "character", "quick"]
    assert tab_train.show_run(ctx, {"run": None})["status"] == "No run yet."
    assert tab_train.poll(ctx, {"run": None, "followed": None, "seen": ""}) == {"followed": None, "seen": ""}
    assert run_files.refresh(ctx, {"run": None, "file": None}) == {"run": Choices([], None), "file": Choices([], None)}
    assert tab_try.base_choices(ctx, {})["base"].value is KEEP
    assert tab_try.add_stack_lora(ctx, {"upload": None, "lora2": None, "lora3": None, "lora4": None}) == {}


@pytest.mark.slow
def test_a_short_run_previewed_and_exported(ctx):
    """Start a run from the form on the tiny model, follow it to the end, make a picture at strength 0 (the base
    model exactly) and 1, and make the files to share."""
    from sdlora.generate import Previewer

    name = example(ctx)
    started = tab_train.start(ctx, form(dataset=name, trigger="zkchar", steps=4, batch_size=2, rank=4, alpha=2.0,
                                        sample_every=2, save_every=2, sample_steps=2, run_name="short run"))
    assert started == {"run": Choices(["short-run"], "short-run"), "followed": "short-run"}
    with pytest.raises(UserError, match="run short-run is still training; only one run trains at a time"):
        tab_train.start(ctx, form(dataset=name))
    deadline, seen = time.time() + 300, ""
    while time.time() < deadline:
        shown = tab_train.poll(ctx, {"run": "short-run", "followed": "short-run", "seen": seen})
        seen = shown["seen"]
        if "status" in shown and "is training" not in shown["status"]:
            break
        time.sleep(1)
    assert shown["status"].startswith("**short-run** is done"), shown["status"]
    assert "Step 4 / 4" in shown["progress"] and set(shown["loss"]["curve"]) == {"loss", "smoothed"}
    assert {caption.split(":")[0] for _, caption in shown["samples"]} == {"step 0", "step 2", "step 4"}
    assert tab_train.poll(ctx, {"run": "short-run", "followed": "short-run", "seen": seen}) == \
        {"followed": "short-run", "seen": seen}  # nothing new: nothing sent

    # each save measured (learned, bleed); the one to use, at its strength, is said and picked on Try it and Download
    assert list(shown["evals"]["step"]) == [2, 2, 4, 4] and set(shown["evals"]["measure"]) == {"learned", "bleed"}
    (best,) = [e for e in rundir.read_events(ws.run_dir(ctx.root, "short-run")) if e["type"] == "recommend"]
    assert f"**Use {best['reason'].split(':')[0]}**" in shown["status"]
    picked = run_files.pick_run(ctx, {"run": "short-run"})
    assert picked["file"].choices[0] == "lora-step-000002.safetensors"
    assert (picked["file"].value, picked["strength"]) == (best["path"].rsplit("/", 1)[1], best["strength"])
    assert picked["trigger"] == "zkchar" and picked["title"] == "short-run"
    values = {"run": "short-run", "file": "lora.safetensors", "upload": None, "base": "tiny", "prompt": PROMPT,
              "negative": "", "seed": 0, "steps": 4, "guidance": 7.0}
    first = tab_try.preview(ctx, {**values, "strength": 0.0})
    assert first["note"].startswith("Made with short-run · lora.safetensors at 0 in ")
    assert "loading the base model *tiny*" in first["note"]
    again = tab_try.preview(ctx, {**values, "strength": 1.0})
    assert "stayed loaded" in again["note"]
    base = np.asarray(Previewer("tiny").image(PROMPT, seed=0, steps=4, guidance_scale=7.0)).astype(int)
    assert np.abs(np.asarray(first["picture"]).astype(int) - base).max() == 0
    assert np.abs(np.asarray(again["picture"]).astype(int) - base).max() > 0
    assert tab_try.saves_grid(ctx, values)["grid"].height > 2 * 64  # rows: step 2 and final

    made = tab_export.export(ctx, {"run": "short-run", "file": "lora.safetensors", "title": "Knight",
                                   "trigger": "zkchar", "description": "", "with_diffusers": True,
                                   "with_sample": True, "with_card": True})
    assert [p.rsplit("/", 1)[1] for p in made["files"]] == ["Knight.safetensors", "Knight-sample.png",
                                                             "Knight-README.md"]
    assert "# Knight" in made["card"] and made["warnings"]
    assert "- **Suggested strength:** " in made["card"]  # no diffusers version was asked for before training
