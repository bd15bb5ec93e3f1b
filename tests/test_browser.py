"""The app in a real browser (Playwright driving Debian's chromium): pictures, a caption edit, a tag edit, drafted
captions, a short tiny run,
a preview (then with a second LoRA stacked) and a download, clicked through as an artist would; a screenshot of
each tab goes to docs/screenshots/."""

import json
import re
import socket
from pathlib import Path

import pytest

from conftest import draw_dataset, need, need_chromium

playwright = need("playwright.sync_api", "pip install playwright (no browser download needed)")
CHROMIUM = need_chromium()

from sdlora import app, examples  # noqa: E402

pytestmark = pytest.mark.slow  # a real browser clicks through a short tiny run

SHOTS = Path(__file__).resolve().parent.parent / "docs" / "screenshots"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run"]
TRAINING = 420_000  # ms; the tiny run takes ~30 s on two free cores, much longer on a busy machine


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture()
def page(tmp_path):
    from playwright.sync_api import sync_playwright

    port = free_port()
    demo = app.serve(tmp_path / "workspace", port=port, block=False)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.set_default_timeout(60_000)
        page.goto(f"http://127.0.0.1:{port}/")
        try:
            yield page
        finally:
            page.screenshot(path=str(tmp_path / "last.png"), full_page=True)  # look here when the test fails
            browser.close()
    for run in (tmp_path / "workspace" / "runs").glob("*"):
        (run / "STOP").touch()  # never leave a run behind if the test failed midway
    demo.close()


def test_click_through_every_tab(page, tmp_path):
    from playwright.sync_api import expect

    expect.set_options(timeout=60_000)
    SHOTS.mkdir(parents=True, exist_ok=True)
    pictures = draw_dataset(tmp_path / "pictures", n=6, size=64)

    # 1. Pictures: name a dataset, drop pictures with captions, fix one caption.
    if examples.names():  # the page has filled its lists (typing before that is overwritten)
        expect(page.get_by_label("Example datasets")).not_to_have_value("")
    else:
        page.wait_for_timeout(3000)
    name = page.get_by_label("Dataset", exact=True).first
    name.fill("shapes")
    name.press("Enter")
    page.locator("input[type=file]").first.set_input_files([str(f) for f in sorted(pictures.iterdir())])
    expect(page.locator('a.download-link[download="img05.txt"]')).to_have_attribute(  # uploaded to the server
        "href", re.compile("gradio_api/file="))
    page.get_by_role("button", name="Add to dataset").click()
    expect(page.get_by_text("Added 6 pictures to shapes")).to_be_visible()
    page.locator("button.thumbnail-item").first.click()
    caption = page.get_by_label("Caption", exact=True)
    expect(caption).not_to_have_value("")
    caption.fill("zxq, a bright shape on a plain background")
    page.get_by_role("button", name="Save caption").click()
    expect(page.get_by_text("Saved the caption of img00.png")).to_be_visible()
    assert (tmp_path / "workspace/datasets/shapes/img00.txt").read_text().strip() == \
        "zxq, a bright shape on a plain background"
    page.screenshot(path=str(SHOTS / "1-pictures.png"), full_page=True)
    shapes = tmp_path / "workspace/datasets/shapes"
    # Edit tags: one added to every caption, previewed, then written.
    page.get_by_text("Edit tags", exact=True).click()
    page.get_by_role("button", name="Show tags").click()
    expect(page.get_by_text(re.compile(r"tags in 6 captions"))).to_be_visible()
    page.get_by_label("Add tags").fill("flat colours")
    page.get_by_role("button", name="Preview").click()
    expect(page.get_by_text("6 captions would change.")).to_be_visible()
    assert (shapes / "img00.txt").read_text().strip() == "zxq, a bright shape on a plain background"  # not yet
    page.get_by_role("button", name="Apply to all captions").click()
    expect(page.get_by_text("Changed 6 captions.")).to_be_visible()
    assert (shapes / "img00.txt").read_text().strip() == "zxq, a bright shape on a plain background, flat colours"
    # Draft captions: the tiny world's describer redrafts every caption, the trigger word first; then saved.
    page.get_by_text("Draft captions", exact=True).first.click()
    page.get_by_label("Also redraft pictures that have a caption").check()
    page.locator("#draft-trigger").get_by_label("Trigger word").fill("zxq")
    page.get_by_role("button", name="Draft captions").last.click()
    expect(page.get_by_text("6 drafts.")).to_be_visible(timeout=120_000)
    page.screenshot(path=str(SHOTS / "1-pictures-tags-and-drafts.png"), full_page=True)
    page.get_by_role("button", name="Save drafts").click()
    expect(page.get_by_text("Saved drafts: 6.")).to_be_visible()
    assert re.fullmatch(r"zxq, a \w+ yellow circle .*on a green background", (shapes / "img00.txt").read_text().strip())
    page.get_by_text("Edit tags", exact=True).click()  # both closed again
    page.get_by_text("Draft captions", exact=True).first.click()

    # 2. Train: a short run; the page shows the plan, then progress, loss and samples.
    page.get_by_role("tab", name="2 · Train").click()
    expect(page.locator("#train-dataset input")).to_have_value("shapes")
    page.get_by_text("Advanced").click()
    # the page fills the form from the preset when it loads; on a busy machine that can land late (the app's spare
    # training process imports torch meanwhile), so wait for it (the Quick test preset samples every 50 steps) before
    # typing over any field
    expect(page.get_by_label("Sample every")).to_have_value("50")
    expect(page.get_by_label("FLUX.1 dev style")).to_have_count(0)  # the tiny base is offered only presets that suit it
    page.get_by_role("textbox", name="Trigger word a made-up word").fill("zxq")
    page.get_by_label("Character").check()  # a preset fills only what it sets: the trigger word stays
    expect(page.get_by_label("Layers to train")).to_have_value("attn-mlp")
    page.get_by_label("Quick test").check()
    expect(page.get_by_label("Layers to train")).to_have_value("attn")
    expect(page.get_by_role("textbox", name="Trigger word a made-up word")).to_have_value("zxq")
    page.get_by_label("Training steps").fill("20")
    page.get_by_label("Pictures per step").fill("2")
    for label, number in (("Sample every", "10"), ("Save every", "10"), ("Sample steps", "8")):
        field = page.get_by_label(label)
        expect(field).to_be_editable()
        field.fill(number)
        field.press("Tab")
        expect(field).to_have_value(number)
    page.get_by_text("Advanced").click()
    page.get_by_label("Training steps").press("Tab")
    expect(page.get_by_text("20 steps × 2 pictures = 40 pictures")).to_be_visible()
    page.get_by_role("button", name="Start training").click()
    expect(page.get_by_text("is training")).to_be_visible()
    (config,) = (tmp_path / "workspace" / "runs").glob("*/config.json")  # the form, field by field
    settings = json.loads(config.read_text())
    assert (settings["trigger"], settings["steps"], settings["batch_size"], settings["sample_every"],
            settings["save_every"], settings["sample_steps"]) == ("zxq", 20, 2, 10, 10, 8)
    page.reload()  # the page finds the run again from the run folder
    page.get_by_role("tab", name="2 · Train").click()
    expect(page.get_by_label("Showing run")).to_have_value(re.compile("^shapes-"))
    expect(page.get_by_label("Training steps")).to_have_value("20")  # the form shows the run's settings again
    expect(page.get_by_role("textbox", name="Trigger word a made-up word")).to_have_value("zxq")
    expect(page.get_by_label("Quick test")).not_to_be_checked()  # 20 steps, sampling every 10: no preset's values
    expect(page.get_by_text("is done")).to_be_visible(timeout=TRAINING)
    expect(page.get_by_text("Step 20 / 20")).to_be_visible()
    expect(page.locator("button.thumbnail-item").filter(has=page.locator("img[alt^='step 20']")).first).to_be_visible()
    page.screenshot(path=str(SHOTS / "2-train.png"), full_page=True)

    # 3. Try it: the run's final file is picked; make a picture and a strength grid.
    page.get_by_role("tab", name="3 · Try it").click()
    expect(page.get_by_label("LoRA file", exact=True).first).to_have_value("lora.safetensors")
    page.get_by_label("Steps", exact=True).fill("8")
    page.get_by_role("button", name="Make picture").click()
    expect(page.locator("#picture img")).to_be_visible(timeout=120_000)
    page.get_by_role("button", name="Strength × seed grid").click()
    expect(page.locator("#grid img")).to_be_visible(timeout=180_000)
    page.screenshot(path=str(SHOTS / "3-try-it.png"), full_page=True)
    # Stack a second LoRA (the run's save at step 10) at its own strength; the base model stays loaded.
    page.get_by_text("Add another LoRA").click()
    page.get_by_label("LoRA 2", exact=True).click()
    page.get_by_role("option", name=re.compile(r"· lora-step-000010\.safetensors$")).click()
    strength = page.get_by_label("number input for LoRA 2 strength")
    strength.fill("0.5")
    strength.press("Enter")
    page.get_by_role("button", name="Make picture").click()
    expect(page.locator("#preview-note")).to_contain_text(
        re.compile(r"lora\.safetensors at 1 \+ shapes-.* · lora-step-000010\.safetensors at 0\.5 in .* stayed loaded"),
        timeout=120_000)
    page.screenshot(path=str(SHOTS / "3-try-it-stacked.png"), full_page=True)

    # 4. Download: title and trigger come from the run; the files appear for download.
    page.get_by_role("tab", name="4 · Download").click()
    expect(page.get_by_role("textbox", name="Trigger words", exact=True)).to_have_value("zxq")
    title = page.get_by_role("textbox", name="Title", exact=True)
    expect(title).to_have_value(re.compile("^shapes-"))  # filled from the run; now change it
    title.fill("Bright Shapes")
    page.get_by_role("button", name="Make files").click()
    expect(page.locator('#downloads td.filename[aria-label="Bright-Shapes.safetensors"]')).to_be_visible()
    expect(page.locator("#card textarea")).to_have_value(re.compile("# Bright Shapes"))
    page.screenshot(path=str(SHOTS / "4-download.png"), full_page=True)
