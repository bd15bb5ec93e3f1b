"""Drafting captions on small models built here, with no network: the tiny world's describer on world pictures, a
WD14-style ONNX tagger whose scores the test sets, random-weight BLIP and Florence-2 through transformers; the files
written, the captions kept, the trigger, dropped tags and thresholds."""

import random

import pytest
from PIL import Image

from conftest import need
from sdlora.caption import finish, job, open_captioner
from sdlora.caption.describer import describe
from sdlora.caption.tagger import prepare, tag_text
from sdlora.cli import main
from sdlora.errors import UserError
from sdlora.tiny import MODEL_DIR, world

RED, BLUE = (220, 30, 30), (30, 80, 220)
# The tagger's outputs, one per row of its selected_tags.csv: fixed scores, or the picture's mean red or blue.
TAGS = [("general", 9, 0.9), ("sensitive", 9, 0.1), ("red_pixels", 0, "R"), ("blue_pixels", 0, "B"),
        ("long_hair", 0, 0.5), ("^_^", 0, 0.4), ("weak_tag", 0, 0.3), ("some_character", 4, 0.8),
        ("hero_(series)", 4, 0.9)]


def world_dataset(folder, n=4, captioned=()):
    """`n` plain world pictures at 64 px; those in `captioned` get a caption of their own."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(3)
    scenes = [world.sample_scene(rng, max_objects=1) for _ in range(n)]
    for i, scene in enumerate(scenes):
        world.render(scene).save(folder / f"{i}.png")
        if i in captioned:
            (folder / f"{i}.txt").write_text("my own words\n")
    return scenes


def caption_of(folder, i):
    path = folder / f"{i}.txt"
    return path.read_text().strip() if path.exists() else None


def test_the_tiny_world_describer_reads_what_was_drawn():
    rng = random.Random(0)
    for _ in range(24):
        scene = world.sample_scene(rng)
        for size in (64, 128):
            objects, background = describe(world.render(scene, size)).rsplit(" on ", 1)
            expected_objects, expected_background = world.caption(scene).rsplit(" on ", 1)
            assert (set(objects.split(" and ")), background) == \
                (set(expected_objects.split(" and ")), expected_background)  # largest first, not drawing order
    scene = world.Scene([world.Obj("star", "red", "small", "top left")], background="blue")
    assert describe(world.render(scene), "tags") == "small red star, top left, blue background"


def test_drafts_become_captions_with_the_trigger_first_and_tags_dropped():
    assert finish("1girl, long hair, solo", trigger="zq", prefix="photo", suffix="best", drop_tags=["long_hair"]) == \
        "zq, photo, 1girl, solo, best"
    assert finish("zq, a cat", trigger="zq") == "zq, a cat"  # never twice
    assert finish("a red star on a blue background") == "a red star on a blue background"


def test_the_command_writes_a_caption_per_picture_and_keeps_those_there(tmp_path, capsys):
    data = tmp_path / "data"
    scenes = world_dataset(data, n=4, captioned=[1])
    places = ",".join(p.replace(" ", "_") for p in world.POSITIONS)  # top_left matches "top left"
    assert main(["caption", str(data), "--captioner", "tiny-world", "--mode", "tags", "--trigger", "zqchar",
                 "--drop-tags", places]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == \
        "3 captions written; pictures with a caption left alone (--overwrite redrafts them)"
    assert caption_of(data, 1) == "my own words"
    for i in (0, 2, 3):
        o = scenes[i].objects[0]
        assert caption_of(data, i) == f"zqchar, {o.size} {o.color} {o.shape}, {scenes[i].background} background"

    assert main(["caption", str(data), "--captioner", "tiny-world", "--overwrite", "--dry-run"]) == 0
    assert capsys.readouterr().out.splitlines()[1] == f"[2/4] 1.png: {world.caption(scenes[1])}"
    assert caption_of(data, 1) == "my own words"  # a dry run writes nothing
    assert main(["caption", str(data), "--captioner", "tiny-world", "--overwrite", "--prefix", "zqchar"]) == 0
    assert caption_of(data, 1) == f"zqchar, {world.caption(scenes[1])}"


def test_bad_captioners_and_datasets_are_one_line_with_a_hint(tmp_path, capsys):
    world_dataset(tmp_path / "data", n=1)
    data = str(tmp_path / "data")
    for dataset, captioner, message in [
            (data, "someone/captioner", "captioner someone/captioner is not downloaded"),  # HF_HUB_OFFLINE=1
            (data, "nothing", "no captioner 'nothing'"),
            (data, str(tmp_path), f"{tmp_path} holds no captioner"),
            ("example:style", "tiny-world", "the example datasets that ship with sdlora are not changed")]:
        assert main(["caption", dataset, "--captioner", captioner]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"sdlora: error: {message}") and "(hint: " in err and len(err.splitlines()) == 1


# ---- a WD14-style tagger --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tagger_dir(tmp_path_factory):
    """An ONNX tagger as SmilingWolf's are laid out (model.onnx taking N x 448 x 448 x 3 BGR 0-255, sigmoid scores,
    selected_tags.csv), whose scores are TAGS."""
    torch = need("torch", "pip install torch")
    need("onnxruntime", "pip install -e '.[test-extra]'")
    need("onnxscript", "pip install -e '.[test-extra]'")

    class Scores(torch.nn.Module):
        def forward(self, x):
            mean = x.mean(dim=(1, 2)) / 255  # B, G, R
            columns = [mean[:, 2] if s == "R" else mean[:, 0] if s == "B" else torch.full_like(mean[:, 0], s)
                       for _, _, s in TAGS]
            return torch.stack(columns, dim=1)

    folder = tmp_path_factory.mktemp("tagger")
    torch.onnx.export(Scores().eval(), (torch.zeros(2, 448, 448, 3),), str(folder / "model.onnx"),
                      input_names=["input"], output_names=["output"], dynamic_shapes=({0: torch.export.Dim("batch")},))
    rows = ["tag_id,name,category,count"] + [f"{i},{name},{category},100" for i, (name, category, _) in enumerate(TAGS)]
    (folder / "selected_tags.csv").write_text("\n".join(rows) + "\n")
    return folder


def test_a_tagger_reads_bgr_pictures_padded_white_and_obeys_its_thresholds(tagger_dir, tmp_path, capsys):
    tagger = open_captioner(str(tagger_dir))
    red, wide_red = Image.new("RGB", (64, 64), RED), Image.new("RGB", (64, 32), RED)
    # red read from the third channel (BGR); the wide picture's white bands bring blue over 0.35
    assert tagger.caption([red, wide_red, Image.new("RGB", (40, 40), BLUE)]) == [
        "hero (series), red pixels, long hair, ^_^",
        "hero (series), red pixels, blue pixels, long hair, ^_^",
        "hero (series), blue pixels, long hair, ^_^"]
    assert prepare(wide_red).shape == (448, 448, 3) and prepare(wide_red)[0, 0].tolist() == [255, 255, 255]
    assert tag_text("o_o") == "o_o" and tag_text("black_hair") == "black hair"

    data = tmp_path / "data"
    data.mkdir()
    red.save(data / "a.png")
    assert main(["caption", str(data), "--captioner", str(tagger_dir), "--trigger", "zq", "--drop-tags", "long_hair",
                 "--general-threshold", "0.45", "--character-threshold", "0.95"]) == 0
    assert caption_of(data, "a") == "zq, red pixels"
    with pytest.raises(UserError, match="writes tags, not sentence"):
        job.draft(data, tagger, mode="sentence")


# ---- transformers image-to-text models ------------------------------------------------------------------------------

def _tokenizer(**special):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_file=f"{MODEL_DIR}/tokenizer/tokenizer.json", bos_token="<|startoftext|>",
                                   eos_token="<|endoftext|>", pad_token="<|endoftext|>", unk_token="<|endoftext|>",
                                   **special)


def tiny_blip(folder):
    import torch
    from transformers import BlipConfig, BlipForConditionalGeneration, BlipImageProcessor, BlipProcessor

    tokenizer = _tokenizer()
    ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
               pad_token_id=tokenizer.pad_token_id, sep_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    config = BlipConfig(text_config=dict(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32,
                                         num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=96, **ids),
                        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                           num_attention_heads=2, image_size=32, patch_size=8), projection_dim=16)
    BlipForConditionalGeneration(config).save_pretrained(folder)
    BlipProcessor(BlipImageProcessor(size={"height": 32, "width": 32}), tokenizer).save_pretrained(folder)


def tiny_florence2(folder):
    import torch
    from transformers import CLIPImageProcessor, Florence2Config, Florence2ForConditionalGeneration, Florence2Processor

    tokenizer = _tokenizer(extra_special_tokens={"image_token": "<image>"})
    torch.manual_seed(0)
    config = Florence2Config(
        text_config=dict(model_type="bart", vocab_size=len(tokenizer), d_model=16, encoder_layers=1, decoder_layers=1,
                         encoder_ffn_dim=16, decoder_ffn_dim=16, encoder_attention_heads=1, decoder_attention_heads=1,
                         max_position_embeddings=128, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                         decoder_start_token_id=tokenizer.eos_token_id, forced_eos_token_id=tokenizer.eos_token_id),
        vision_config=dict(depths=[1], patch_size=[7], patch_stride=[4], patch_padding=[3], patch_prenorm=[False],
                           embed_dim=[16], num_heads=[1], num_groups=[1], projection_dim=16),
        image_token_id=tokenizer.image_token_id)
    Florence2ForConditionalGeneration(config).save_pretrained(folder)
    images = CLIPImageProcessor(size={"height": 32, "width": 32}, do_center_crop=False)
    images.image_seq_length = (32 // 4) ** 2 + 1  # a token per 4 px patch, and one for the whole picture
    Florence2Processor(images, tokenizer).save_pretrained(folder)


@pytest.mark.parametrize("build", [pytest.param(tiny_blip, marks=pytest.mark.slow), tiny_florence2],
                         ids=["blip", "florence2"])  # BLIP's random weights write all 75 tokens: about 10 s
def test_an_image_to_text_model_drafts_a_sentence_per_picture(build, tmp_path, capsys):
    build(tmp_path / "model")
    data = tmp_path / "data"
    world_dataset(data, n=3, captioned=[0])
    assert main(["caption", str(data), "--captioner", str(tmp_path / "model"), "--trigger", "zq",
                 "--batch-size", "2"]) == 0
    assert caption_of(data, 0) == "my own words"
    drafts = [caption_of(data, i) for i in (1, 2)]
    assert all(d.startswith("zq, ") and len(d) > len("zq, ") for d in drafts), drafts  # random weights: any words
    assert open_captioner(str(tmp_path / "model")).modes == ("sentence",)


# ---- the app ----------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_the_app_drafts_in_a_process_shows_the_drafts_and_saves_them(tmp_path):
    """Draft in the Pictures tab: the job runs as its own process (`sdlora caption`), the timer shows its drafts
    beside the pictures, nothing is saved until the drafts are, and a caption that was there stays."""
    import time

    from sdlora import workspace as ws
    from sdlora.app import tab_pictures
    from sdlora.app.context import Context

    ctx = Context.create(tmp_path / "workspace", gpus=0)
    try:
        scenes = world_dataset(ws.dataset_dir(ctx.root, "shapes"), n=3, captioned=[0])
        values = {"name": "shapes", "captioner": "tiny-world", "mode": "", "overwrite": False, "trigger": "zq",
                  "prefix": "", "suffix": "", "drop": ""}
        assert tab_pictures.draft_captions(ctx, values)["draft_note"].startswith("Drafting captions for **shapes**")
        with pytest.raises(UserError, match="captions for shapes are being drafted"):
            tab_pictures.draft_captions(ctx, values)
        deadline, shown = time.time() + 120, {"draft_seen": ""}
        while time.time() < deadline:
            shown = {**shown, **tab_pictures.poll_drafts(ctx, {"name": "shapes", "seen": shown["draft_seen"]})}
            if shown["draft_note"].startswith("**"):
                break
            time.sleep(0.5)
        assert shown["draft_note"].startswith("**2 drafts.**") and "Pictures with a caption left alone: 1" in \
            shown["draft_note"], shown["draft_note"]
        assert shown["table"] == [[f"{i}.png", "", f"zq, {world.caption(scenes[i])}"] for i in (1, 2)]
        assert [label for _, label in shown["drafts"]] == [f"{f}: {c}" for f, _, c in shown["table"]]
        assert tab_pictures.poll_drafts(ctx, {"name": "shapes", "seen": shown["draft_seen"]}) == \
            {"draft_seen": shown["draft_seen"]}  # nothing new: nothing sent
        assert not (ws.dataset_dir(ctx.root, "shapes") / "1.txt").exists()  # nothing saved before review

        picked = tab_pictures.pick_draft(ctx, {"name": "shapes", "table": shown["table"], "index": 1})
        assert picked == {"file": "2.png", "caption": shown["table"][1][2], "mask": None}
        table = [["0.png", "my own words", "zq, redrafted"], ["1.png", "", "zq, edited by hand"], shown["table"][1]]
        saved = tab_pictures.save_drafts(ctx, {"name": "shapes", "table": table, "overwrite": False})
        assert saved["note"].endswith("Saved drafts: 2. Captions kept as they were: 1 (tick overwrite to replace "
                                      "them).")
        assert [c for _, _, c in ws.captions(ctx.root, "shapes")] == \
            ["my own words", "zq, edited by hand", shown["table"][1][2]]
    finally:
        ctx.children.end_all(grace=10, say=lambda _: None)


def test_the_app_offers_the_captioners_at_hand_and_takes_no_other_path(tmp_path):
    from sdlora import workspace as ws
    from sdlora.app import tab_pictures
    from sdlora.app.context import Context

    models = tmp_path / "models"
    (models / "my-tagger").mkdir(parents=True)
    (models / "my-tagger" / "selected_tags.csv").write_text("tag_id,name,category,count\n")
    (models / "a-base").mkdir()
    (models / "a-base" / "model_index.json").write_text("{}")
    assert [value for _, value in ws.captioners(models)][:2] == ["tiny-world", "my-tagger"]  # no base models
    assert ws.resolve_captioner(models, "my-tagger") == str(models / "my-tagger")
    assert ws.resolve_captioner(models, "org/captioner") == "org/captioner"  # a hub id: the job looks in the cache
    for value in (str(models / "my-tagger"), "../models/my-tagger", "/etc"):
        with pytest.raises(UserError, match="not found"):
            ws.resolve_captioner(models, value)
    ctx = Context.create(tmp_path / "workspace", models, gpus=0)
    with pytest.raises(UserError, match="no dataset picked"):
        tab_pictures.draft_captions(ctx, {"name": "missing", "captioner": "tiny-world"})
