"""The dataset check (sdlora.check) on pictures drawn here: one test per finding, the command line, the run's warning
events and the app's handler."""

import io
import random

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFilter

from sdlora import check
from sdlora import dataset as ds
from sdlora.check import check_dataset
from sdlora.cli import main
from sdlora.rundir import EventLog, read_events

R = Image.Resampling


def scene(size, seed, shapes=12):
    """A picture with detail at every scale: coloured ellipses on a coloured ground, drawn at its own size."""
    rng = random.Random(seed)
    image = Image.new("RGB", (size, size), tuple(rng.randrange(256) for _ in range(3)))
    draw = ImageDraw.Draw(image)
    for _ in range(shapes):
        x, y, s = rng.randrange(size), rng.randrange(size), rng.randrange(2, size // 3 + 3)
        draw.ellipse([x - s, y - s, x + s, y + s], fill=tuple(rng.randrange(256) for _ in range(3)))
    return image


def noise(size, seed):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8))


def folder(path, pictures: dict, captions: dict | None = None):
    """Write `pictures` ({name: image}) and their `captions` ({name: text}, default 'zxq, picture N') to `path`."""
    path.mkdir(parents=True, exist_ok=True)
    for i, (name, image) in enumerate(pictures.items()):
        image.save(path / name)
        text = (captions or {}).get(name, f"zxq, picture {i}")
        if text is not None:
            (path / name).with_suffix(".txt").write_text(text)
    return path


def kinds(findings, kind):
    return [f for f in findings if f.kind == kind]


def only(findings, kind):
    (found,) = kinds(findings, kind)
    return found


def sharp_set(n=5, size=96):
    return {f"s{i}.png": scene(size, i) for i in range(n)}


def test_exact_and_near_duplicates_are_found_and_distinct_pictures_are_not(tmp_path):
    pictures = sharp_set()
    buffer = io.BytesIO()
    pictures["s0.png"].save(buffer, "JPEG", quality=70)
    pictures["s0_jpeg.png"] = Image.open(buffer).convert("RGB")  # recompressed
    pictures["s1_small.png"] = pictures["s1.png"].resize((80, 80), R.BICUBIC)  # resized
    pictures["s2_copy.png"] = pictures["s2.png"].copy()
    found = check_dataset(folder(tmp_path, pictures), trigger="zxq")
    assert [f.files for f in kinds(found, "duplicate")] == [["s2.png", "s2_copy.png"]]
    assert sorted(sorted(f.files) for f in kinds(found, "near-duplicate")) == [["s0.png", "s0_jpeg.png"],
                                                                               ["s1.png", "s1_small.png"]]
    # the same drawing in other colours is another picture
    recoloured = {"a.png": pictures["s3.png"], "b.png": Image.eval(pictures["s3.png"], lambda v: 255 - v)}
    assert not kinds(check_dataset(folder(tmp_path / "colours", {**sharp_set(3), **recoloured})), "near-duplicate")


def test_pictures_smaller_than_the_training_size_are_named(tmp_path):
    data = folder(tmp_path, {"big.png": scene(128, 0), "tiny.png": scene(40, 1)})
    small = only(check_dataset(data, resolution=64), "small")
    assert small.files == ["tiny.png"] and "x1.6" in small.message and small.severity == "warning"
    assert not kinds(check_dataset(data, base="tiny"), "small") == []  # tiny: 64 px, the 40 px one again
    assert "512 px" in only(check_dataset(data, base="sd1"), "small").message  # SD1's own: both are small
    assert len(only(check_dataset(data, base="sdxl"), "small").files) == 2


@pytest.mark.parametrize("how", [R.NEAREST, R.BICUBIC])
def test_a_picture_enlarged_from_32_px_is_found_with_its_factor(tmp_path, how):
    pictures = {"enlarged.png": scene(32, 7).resize((256, 256), how), "drawn.png": scene(256, 8),
                "noise.png": noise(256, 9)}
    found = only(check_dataset(folder(tmp_path, pictures), resolution=256), "enlarged")
    assert found.files == ["enlarged.png"]
    assert "about x8, detail of 32x32" in found.message


def test_crops_and_very_wide_pictures_say_their_bucket(tmp_path):
    pictures = {"square.png": scene(64, 0), "wide.png": scene(64, 1).resize((512, 64)),
                "pano.png": scene(64, 2).resize((290, 100))}
    found = check_dataset(folder(tmp_path, pictures), resolution=64, buckets=ds.make_buckets(64, step=16))
    crop = only(found, "crop")
    # 8:1 into the widest bucket, 128x32 (4:1): half of the width goes
    assert crop.files == ["wide.png"] and "wide.png (512x64 -> 128x32, 50% of its width cut)" in crop.message
    assert only(found, "aspect").files == ["pano.png"] and "-> 96x32" in only(found, "aspect").message


def test_a_blurred_copy_among_sharp_pictures_is_found(tmp_path):
    pictures = {f"n{i}.png": noise(96, i).filter(ImageFilter.GaussianBlur(0.6)) for i in range(5)}
    pictures["blurred.png"] = noise(96, 9).filter(ImageFilter.GaussianBlur(3))
    found = only(check_dataset(folder(tmp_path, pictures), resolution=64), "blur")
    assert found.files == ["blurred.png"] and "of the median sharpness" in found.message


def test_the_trigger_missing_from_captions_or_from_all(tmp_path):
    pictures = sharp_set(5)
    captions = {"s0.png": "zkchar, a cat", "s1.png": "zkchar, a dog", "s2.png": "zkchar, a fox", "s3.png": "a hen",
                "s4.png": "zkchar, an owl"}
    data = folder(tmp_path, pictures, captions)
    guessed = only(check_dataset(data), "trigger")  # no trigger set: the common first word is taken as one
    assert guessed.files == ["s3.png"] and "'zkchar'" in guessed.message and guessed.severity == "warning"
    given = only(check_dataset(data, trigger="zkchar"), "trigger")
    assert given.files == ["s3.png"] and given.severity == "info"
    typo = only(check_dataset(data, trigger="zkchr"), "trigger")  # in no caption, while most start with another
    assert len(typo.files) == 5 and "most start with 'zkchar'" in typo.message
    plain = folder(tmp_path / "plain", pictures, {n: f"a picture of thing {i}" for i, n in enumerate(pictures)})
    assert only(check_dataset(plain), "trigger").message == ds.NO_TRIGGER


def test_tags_on_every_picture_and_their_frequencies(tmp_path):
    pictures = sharp_set(4)
    captions = {"s0.png": "zxq, 1girl, blue eyes, smile", "s1.png": "zxq, 1girl, blue eyes, sitting",
                "s2.png": "zxq, blue eyes, 1girl, standing, smile", "s3.png": "zxq, 1girl, blue eyes, hat"}
    found = check_dataset(folder(tmp_path, pictures, captions), trigger="zxq")
    assert "tags on every picture: 1girl, blue eyes;" in only(found, "tag-everywhere").message
    assert only(found, "tags").message.startswith("most frequent tags: 1girl (4), blue eyes (4), smile (2)")
    sentences = folder(tmp_path / "s", pictures, {n: f"zxq, a photo of a cat number {i}" for i, n in
                                                   enumerate(pictures)})
    assert not kinds(check_dataset(sentences, trigger="zxq"), "tags")  # sentences are not tags


def test_captions_longer_than_the_text_encoder_reads(tmp_path):
    long = "zxq, " + ", ".join(f"word{i}" for i in range(60))
    found = only(check_dataset(folder(tmp_path, sharp_set(2), {"s1.png": long}), trigger="zxq"), "long-caption")
    assert found.files == ["s1.png"] and "longer than 75 tokens" in found.message


def test_rounds_and_times_each_picture_is_seen(tmp_path):
    folder(tmp_path / "data" / "10_a", {f"a{i}.png": scene(64, i) for i in range(3)})
    folder(tmp_path / "data" / "b", {f"b{i}.png": scene(64, 10 + i) for i in range(2)})
    found = only(check_dataset(tmp_path / "data", trigger="zxq", resolution=64, steps=64, batch_size=4), "rounds")
    # 3 x 10 + 2 = 32 pictures a round, all in the 64x64 bucket: 8 batches of 4; 64 steps = 8 rounds
    assert found.message == ("64 steps of 4 pictures: 8.0 rounds of 32 pictures (8 batches a round); each picture "
                             "is seen about 8 times (no repeat folder), 80 times (10 repeats)")
    assert found.severity == "warning" and "about 800 steps" in found.hint  # the once-repeated ones: too few
    assert only(check_dataset(tmp_path / "data", resolution=64, steps=32, batch_size=2, grad_accum=2),
                "rounds").message.startswith("32 steps of 4 pictures: 4.0 rounds")


def test_the_command_prints_findings_and_exits_0_and_bad_input_exits_2(tmp_path, capsys):
    data = folder(tmp_path / "d", {**sharp_set(2), "copy.png": scene(96, 0)})
    assert main(["check", str(data), "--trigger", "zxq", "--resolution", "64", "--steps", "100",
                 "--batch-size", "1"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "warning  same picture: copy.png = s0.png"
    assert out[1].startswith("         -> remove the copies")
    assert out[-1] == "3 pictures checked: 1 warning, 1 note"
    assert main(["check", str(tmp_path / "missing")]) == 2
    assert "dataset not found" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["check", str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("sdlora: error: no images found") and "(hint: " in err and len(err.splitlines()) == 1


def test_training_emits_each_finding_as_a_warning_event(tmp_path):
    """`_warn_about_data` as the run calls it, on data ingested with the trigger: findings, once each."""
    from sdlora.config import TrainConfig
    from sdlora.train import _warn_about_data

    data_dir = folder(tmp_path / "d", {**sharp_set(3), "copy.png": scene(96, 0), "small.png": scene(40, 5)})
    config = TrainConfig(dataset=str(data_dir), trigger="zxq", steps=20, batch_size=2)
    data = ds.ingest(data_dir, trigger="zxq")
    (tmp_path / "run").mkdir()
    events = EventLog(tmp_path / "run", echo=False)
    _warn_about_data(config, data, check.base_tokenizer("tiny"), events, 64, ds.make_buckets(64))
    warnings = [e for e in read_events(tmp_path / "run") if e["type"] == "warning"]
    assert {e["check"] for e in warnings} == {"duplicate", "small", "rounds"}  # the trigger is in every caption now
    assert next(e for e in warnings if e["check"] == "small")["files"] == ["small.png"]


def test_the_app_check_shows_the_findings(tmp_path):
    from sdlora import workspace as ws
    from sdlora.app import tab_pictures
    from sdlora.app.context import Context

    ctx = Context.create(tmp_path / "workspace", gpus=0)
    folder(ws.dataset_dir(ctx.root, "shots"), {**sharp_set(2), "copy.png": scene(96, 1)})
    shown = tab_pictures.check_pictures(ctx, {"name": "shots", "trigger": "zxq", "base": "tiny", "resolution": "0",
                                              "steps": 100, "batch_size": 2, "grad_accum": 1})["findings"]
    assert shown.startswith("**Check of shots** at 64 px: 3 pictures checked: 1 warning")
    assert "- **warning**: same picture: copy.png = s1.png — remove the copies" in shown
    with pytest.raises(check.UserError, match="no dataset picked"):
        tab_pictures.check_pictures(ctx, {"name": "nothing"})
