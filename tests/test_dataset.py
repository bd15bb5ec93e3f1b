"""Dataset ingest, captions and buckets, checked on files built here with Pillow."""

import json
import os
import random
import resource
import struct
import threading
import tracemalloc
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sdlora import dataset
from sdlora import workspace as ws
from sdlora.dataset import (build_caption, epoch_batches, expand_repeats, ingest, make_buckets, nearest_bucket,
                            prepare_image, tag_frequency)
from sdlora.errors import UserError


def save(path, image, **kwargs):
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, **kwargs)
    return path


def write(path, content):
    path.parent.mkdir(parents=True, exist_ok=True)
    (path.write_bytes if isinstance(content, bytes) else path.write_text)(content)
    return path


def solid(color=(200, 30, 30), size=(16, 16), mode="RGB"):
    return Image.new(mode, size, color)


def by_name(result):
    return {record.name: record for record in result.records}


def reasons(result):
    return dict(result.rejected)


# ---------------------------------------------------------------- images: decoding and normalisation

def test_png_with_caption(tmp_path):
    save(tmp_path / "a.png", solid())
    write(tmp_path / "a.txt", "  a red square,\nflat colour \n")
    result = ingest(tmp_path)
    (record,) = result.records
    assert (record.name, record.caption, record.repeats, record.captioned) == (
        "a.png", "a red square, flat colour", 1, True)
    assert record.image.mode == "RGB" and record.image.getpixel((3, 3)) == (200, 30, 30)
    assert result.rejected == [] and result.warnings == [] and result.root == str(tmp_path)


def test_exif_orientation_is_applied(tmp_path):
    stored = Image.new("RGB", (40, 20), (0, 0, 255))
    stored.paste((255, 0, 0), (0, 0, 10, 10))  # red block at the stored top-left
    exif = Image.Exif()
    exif[0x0112] = 6  # display rotated 90 degrees clockwise
    save(tmp_path / "rot.jpg", stored, exif=exif, quality=95)
    image = ingest(tmp_path).records[0].image
    assert image.size == (20, 40)
    red, blue = image.getpixel((15, 4)), image.getpixel((4, 4))  # stored top-left is now the top-right
    assert red[0] > 200 and red[2] < 60 and blue[2] > 200 and blue[0] < 60


def test_transparency_becomes_white(tmp_path):
    rgba = Image.new("RGBA", (16, 16), (0, 0, 0, 0))
    rgba.paste((255, 0, 0, 255), (0, 0, 8, 16))
    rgba.paste((0, 0, 0, 128), (8, 0, 16, 8))
    save(tmp_path / "rgba.png", rgba)
    la = Image.new("LA", (16, 16), (0, 0))
    la.paste((0, 255), (0, 0, 8, 16))
    save(tmp_path / "la.png", la)
    palette = Image.new("P", (16, 16), 0)
    palette.putpalette([0, 0, 0, 0, 255, 0] + [0] * 762)
    palette.paste(1, (0, 0, 8, 16))
    save(tmp_path / "p.png", palette, transparency=0)
    save(tmp_path / "p.gif", palette, transparency=0)
    records = by_name(ingest(tmp_path))
    rgb = records["rgba.png"].image
    assert rgb.getpixel((2, 2)) == (255, 0, 0) and rgb.getpixel((12, 12)) == (255, 255, 255)
    assert all(abs(c - 127) <= 2 for c in rgb.getpixel((12, 2)))  # half-transparent black on white: grey
    assert records["la.png"].image.getpixel((2, 2)) == (0, 0, 0)
    assert records["la.png"].image.getpixel((12, 2)) == (255, 255, 255)
    for name in ("p.png", "p.gif"):
        image = records[name].image
        assert image.mode == "RGB"
        assert image.getpixel((2, 2)) == (0, 255, 0) and image.getpixel((12, 2)) == (255, 255, 255), name


def test_other_colour_modes_become_8bit_rgb(tmp_path):
    save(tmp_path / "cmyk.jpg", solid((0, 255, 255, 0), mode="CMYK"), quality=95)  # red in CMYK
    sixteen = np.zeros((16, 16), np.uint16)
    sixteen[:, :8], sixteen[:, 8:] = 65535, 32768
    save(tmp_path / "gray16.png", Image.fromarray(sixteen))
    save(tmp_path / "gray.png", solid(100, mode="L"))
    save(tmp_path / "bits.png", solid(1, mode="1"))
    save(tmp_path / "float.tif", Image.fromarray(np.full((16, 16), 0.5, np.float32)))
    save(tmp_path / "int32.tif", Image.fromarray(np.full((16, 16), 65535, np.int32)))  # mode "I", 16-bit values
    save(tmp_path / "ycbcr.jpg", solid((0, 0, 255)).convert("YCbCr"), quality=95)
    records = by_name(ingest(tmp_path))
    assert {r.image.mode for r in records.values()} == {"RGB"} and len(records) == 7
    red = records["cmyk.jpg"].image.getpixel((8, 8))
    assert red[0] > 230 and red[1] < 30 and red[2] < 30
    assert Image.open(tmp_path / "gray16.png").mode.startswith("I")  # the case really is 16-bit
    assert records["gray16.png"].image.getpixel((2, 2)) == (255, 255, 255)
    assert records["gray16.png"].image.getpixel((12, 2)) in {(127, 127, 127), (128, 128, 128)}
    assert records["gray.png"].image.getpixel((2, 2)) == (100, 100, 100)
    assert records["bits.png"].image.getpixel((2, 2)) == (255, 255, 255)
    assert Image.open(tmp_path / "int32.tif").mode == "I"
    assert records["int32.tif"].image.getpixel((2, 2)) == (255, 255, 255)
    assert records["float.tif"].image.getpixel((2, 2)) in {(127, 127, 127), (128, 128, 128)}
    blue = records["ycbcr.jpg"].image.getpixel((8, 8))
    assert blue[2] > 230 and blue[0] < 30


def test_animation_gives_first_frame(tmp_path):
    frames = [solid((255, 0, 0)), solid((0, 0, 255))]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:], duration=100, loop=0)
    frames[0].save(tmp_path / "anim.webp", save_all=True, append_images=frames[1:], duration=100, lossless=True)
    records = by_name(ingest(tmp_path))
    assert Image.open(tmp_path / "anim.gif").n_frames == 2
    for name in ("anim.gif", "anim.webp"):
        assert records[name].image.getpixel((8, 8)) == (255, 0, 0), name


def test_bad_files_are_rejected_with_reasons(tmp_path):
    save(tmp_path / "good.png", solid())
    write(tmp_path / "empty.png", b"")
    write(tmp_path / "text.png", "this is not a picture\n")
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    for name, fmt in (("cut.png", "PNG"), ("cut.jpg", "JPEG")):
        whole = save(tmp_path / "full" / name, noise, format=fmt).read_bytes()
        write(tmp_path / name, whole[: len(whole) // 2])
    (tmp_path / "full").joinpath("cut.png").unlink()
    (tmp_path / "full").joinpath("cut.jpg").unlink()
    save(tmp_path / "tiny.png", solid(size=(4, 50)))
    write(tmp_path / "notes.pdf", b"%PDF-1.4")
    result = ingest(tmp_path)
    found = reasons(result)
    assert [r.name for r in result.records] == ["good.png"]
    assert found["empty.png"] == "empty file (0 bytes)"
    assert found["text.png"] == "not an image or unsupported format"
    assert found["cut.png"].startswith("truncated or corrupt image")
    assert found["cut.jpg"].startswith("truncated or corrupt image")
    assert found["tiny.png"].startswith("too small (4 x 50 pixels")
    assert found["notes.pdf"] == "not an image (.pdf)"


def test_decompression_bomb_is_rejected_before_decoding(tmp_path):
    # 14000 x 14000 is past twice PIL's own limit, where Image.open itself raises; on disk it is ~30 kB.
    save(tmp_path / "bomb.png", Image.new("1", (14000, 14000)))
    save(tmp_path / "big.png", solid(size=(200, 100)))
    save(tmp_path / "ok.png", solid())
    limit = Image.MAX_IMAGE_PIXELS
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        result = ingest(tmp_path, max_pixels=10_000)
    assert Image.MAX_IMAGE_PIXELS == limit
    assert reasons(result)["bomb.png"] == "too large (14000 x 14000 pixels, limit 10,000)"
    assert reasons(result)["big.png"] == "too large (200 x 100 pixels, limit 10,000)"
    assert [r.name for r in ingest(tmp_path).records] == ["big.png", "ok.png"]  # default limit: 64 MP


def test_hidden_and_system_files_are_ignored_silently(tmp_path):
    save(tmp_path / "a.png", solid())
    write(tmp_path / ".DS_Store", b"\0\0")
    write(tmp_path / "Thumbs.db", b"\0\0")
    write(tmp_path / "__MACOSX" / "._a.png", b"\0\0")
    save(tmp_path / ".cache" / "b.png", solid())
    result = ingest(tmp_path)
    assert [r.name for r in result.records] == ["a.png"] and result.rejected == []
    assert result.warnings == ["1 image has no caption; used 'a picture': a.png"]


# ---------------------------------------------------------------- captions, trigger, metadata, repeats

def test_missing_caption_uses_template_and_warns_once(tmp_path):
    for name in ("a", "b", "c"):
        save(tmp_path / f"{name}.png", solid())
    write(tmp_path / "a.txt", "a cat")
    write(tmp_path / "b.txt", "\n  \n")  # empty counts as missing
    write(tmp_path / "orphan.txt", "nobody's caption")
    result = ingest(tmp_path, trigger="zxq")
    records = by_name(result)
    assert records["a.png"].caption == "zxq, a cat" and records["a.png"].captioned
    assert records["b.png"].caption == "zxq, a picture" and not records["b.png"].captioned
    assert records["c.png"].caption == "zxq, a picture" and not records["c.png"].captioned
    no_caption = [w for w in result.warnings if "no caption" in w]
    assert no_caption == ["2 images have no caption; used 'zxq, a picture': b.png, c.png"]
    assert any("orphan.txt" in w for w in result.warnings)
    assert ingest(tmp_path, caption_template="a photo").records[2].caption == "a photo"


@pytest.mark.parametrize("caption, expected", [
    ("a cat", "zxq, a cat"),
    ("zxq, a cat", "zxq, a cat"),
    ("a photo of zxq on a sofa", "a photo of zxq on a sofa"),
    ("zxqfoo style", "zxq, zxqfoo style"),  # only a whole word counts
    ("ZXQ cat", "zxq, ZXQ cat"),  # case-sensitive
])
def test_trigger_prepended_only_when_absent(tmp_path, caption, expected):
    save(tmp_path / "a.png", solid())
    write(tmp_path / "a.txt", caption)
    assert ingest(tmp_path, trigger="zxq").records[0].caption == expected


def test_caption_file_and_metadata_jsonl(tmp_path):
    for name in ("a.png", "b.png", "sub/c.png", "d.png"):
        save(tmp_path / name, solid())
    write(tmp_path / "a.txt", "from txt")
    write(tmp_path / "b.txt", "ignored, metadata wins")
    write(tmp_path / "d.caption", "from caption file")
    rows = [{"file_name": "b.png", "text": "from metadata"}, {"file_name": "sub/c.png", "text": "nested\nline"},
            {"file_name": "gone.png", "text": "no such file"}]
    write(tmp_path / "metadata.jsonl", "\n".join(json.dumps(row) for row in rows) + "\n")
    result = ingest(tmp_path)
    captions = {r.name: r.caption for r in result.records}
    assert captions == {"a.png": "from txt", "b.png": "from metadata", "sub/c.png": "nested line",
                        "d.png": "from caption file"}
    assert any("gone.png" in w for w in result.warnings)


def test_malformed_metadata_line_names_the_line(tmp_path):
    save(tmp_path / "a.png", solid())
    write(tmp_path / "metadata.jsonl", '{"file_name": "a.png", "text": "ok"}\n{"file_name": "a.png", text}\n')
    with pytest.raises(UserError, match="metadata.jsonl .*line 2") as error:
        ingest(tmp_path)
    assert "file_name" in error.value.hint


def test_kohya_repeat_folders(tmp_path):
    for name in ("10_cat/a.png", "10_cat/b.png", "plain/c.png", "3_dog/sub/d.png", "0_none/e.png", "f.png"):
        save(tmp_path / name, solid())
    records = ingest(tmp_path).records
    assert {r.name: r.repeats for r in records} == {
        "10_cat/a.png": 10, "10_cat/b.png": 10, "plain/c.png": 1, "3_dog/sub/d.png": 3, "0_none/e.png": 1,
        "f.png": 1}
    order = expand_repeats(records)
    assert len(order) == 10 + 10 + 1 + 3 + 1 + 1
    assert [order.count(i) for i in range(len(records))] == [r.repeats for r in records]
    assert order == sorted(order)


def test_tag_frequency_per_top_folder(tmp_path):
    for name, caption in (("10_cat/a", "cat, sofa"), ("10_cat/b", "cat, grass"), ("c", "dog")):
        save(tmp_path / f"{name}.png", solid())
        write(tmp_path / f"{name}.txt", caption)
    frequency = tag_frequency(ingest(tmp_path, trigger="zxq").records)
    assert frequency == {"10_cat": {"zxq": 2, "cat": 2, "sofa": 1, "grass": 1}, "dataset": {"zxq": 1, "dog": 1}}


# ---------------------------------------------------------------- zip archives and whole-dataset errors

def make_folder(root):
    save(root / "10_cat" / "a.png", solid((255, 0, 0)))
    write(root / "10_cat" / "a.txt", "a red cat")
    save(root / "b.jpg", solid((0, 0, 255), size=(32, 16)), quality=95)
    write(root / "b.txt", "a blue thing")
    save(root / "c.png", solid((0, 255, 0)))
    return root


def zip_folder(folder, archive, prefix=""):
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zf:
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                zf.write(path, prefix + path.relative_to(folder).as_posix())
    return archive


@pytest.mark.parametrize("prefix", ["", "mydata/"])
def test_zip_gives_same_records_as_folder(tmp_path, prefix):
    folder = make_folder(tmp_path / "mydata")
    archive = zip_folder(folder, tmp_path / "data.zip", prefix)
    from_folder, from_zip = ingest(folder, trigger="zxq"), ingest(str(archive), trigger="zxq")
    assert from_zip.root == str(archive)
    summary = [[(r.name, r.caption, r.repeats, r.captioned, r.image.tobytes()) for r in result.records]
               for result in (from_folder, from_zip)]
    assert summary[0] == summary[1] and len(summary[0]) == 3
    assert from_zip.warnings == from_folder.warnings and from_zip.rejected == from_folder.rejected == []


def test_zip_unsafe_members_are_rejected_not_read(tmp_path):
    png = save(tmp_path / "src" / "a.png", solid()).read_bytes()
    archive = tmp_path / "data.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("a.png", png)
        zf.writestr("../evil.png", png)
        zf.writestr("/abs.png", png)
        zf.writestr("__MACOSX/._a.png", b"junk")
    result = ingest(archive)
    assert [r.name for r in result.records] == ["a.png"]
    assert {name for name, _ in result.rejected} == {"../evil.png", "/abs.png"}
    assert all("unsafe path" in reason for _, reason in result.rejected)


def test_zip_limits_refuse_the_archive(tmp_path, monkeypatch):
    archive = zip_folder(make_folder(tmp_path / "d"), tmp_path / "d.zip")
    monkeypatch.setattr(dataset, "_ZIP_MAX_MEMBERS", 3)
    with pytest.raises(UserError, match="d.zip has 5 files"):
        ingest(archive)
    monkeypatch.setattr(dataset, "_ZIP_MAX_MEMBERS", 20_000)
    monkeypatch.setattr(dataset, "_ZIP_MAX_BYTES", 100)
    with pytest.raises(UserError, match="d.zip unpacks to"):
        ingest(archive)


def test_dataset_level_errors(tmp_path):
    with pytest.raises(UserError, match="dataset not found: .*nowhere"):
        ingest(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    write(tmp_path / "empty" / "readme.md", "hello")
    with pytest.raises(UserError, match="no images found in") as error:
        ingest(tmp_path / "empty")
    assert ".png" in error.value.hint and ".txt" in error.value.hint
    write(tmp_path / "bad" / "one.png", b"")
    write(tmp_path / "bad" / "two.jpg", "text")
    with pytest.raises(UserError, match="all 2 images in .* were rejected") as error:
        ingest(tmp_path / "bad")
    assert "one.png: empty file (0 bytes)" in error.value.hint and "two.jpg" in error.value.hint
    write(tmp_path / "fake.zip", "not a zip")
    with pytest.raises(UserError, match="not a folder or a .zip"):
        ingest(tmp_path / "fake.zip")


# ---------------------------------------------------------------- files that would hang, never end, or fill memory

def promptly(call, seconds=20, memory=2**30):
    """call() in a thread; the test fails, rather than hangs or fills the machine's memory, when it blocks for
    `seconds` or asks for more than `memory` bytes beyond what the process holds."""
    held = int(Path("/proc/self/statm").read_text().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    cap = held + memory if hard == resource.RLIM_INFINITY else min(held + memory, hard)
    outcome = {}

    def run():
        try:
            outcome["value"] = call()
        except BaseException as error:
            outcome["error"] = error

    resource.setrlimit(resource.RLIMIT_AS, (cap, hard))
    try:
        worker = threading.Thread(target=run, daemon=True)
        worker.start()
        worker.join(seconds)
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
    assert not worker.is_alive(), f"still running after {seconds} s"
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


def peak_allocation(call):
    """(call(), the most bytes Python held at once for it beyond what it held before)."""
    tracemalloc.start()
    try:
        return call(), tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_fifo_is_rejected_not_waited_for(tmp_path):
    save(tmp_path / "a.png", solid())
    save(tmp_path / "b.png", solid())
    fifos = [tmp_path / "x.png", tmp_path / "b.txt"]
    for fifo in fifos:
        os.mkfifo(fifo)
    try:
        result = promptly(lambda: ingest(tmp_path))
    finally:
        for fifo in fifos:  # a reader stuck in open() gets end-of-file and ends
            try:
                os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
            except OSError:
                pass
    assert [(r.name, r.captioned) for r in result.records] == [("a.png", False), ("b.png", False)]
    assert reasons(result) == {"x.png": "not a regular file", "b.txt": "not a regular file; image used without it"}


def test_links_are_followed_only_to_regular_files(tmp_path):
    outside = save(tmp_path / "elsewhere" / "kept.png", solid((0, 0, 255)))
    data = tmp_path / "data"
    save(data / "a.png", solid())
    os.symlink("/dev/zero", data / "z.png")
    os.symlink("/dev/zero", data / "a.txt")
    os.symlink(outside, data / "linked.png")  # a folder of links to pictures kept elsewhere is a dataset
    result = promptly(lambda: ingest(data))
    records = by_name(result)
    assert sorted(records) == ["a.png", "linked.png"] and not records["a.png"].captioned
    assert records["linked.png"].image.getpixel((2, 2)) == (0, 0, 255)
    assert reasons(result) == {"z.png": "not a regular file", "a.txt": "not a regular file; image used without it"}


def test_caption_links_out_of_the_dataset_are_not_followed(tmp_path):
    secret = write(tmp_path / "secret.txt", "the secret")
    data = tmp_path / "data"
    save(data / "a.png", solid())
    save(data / "b.png", solid())
    os.symlink(secret, data / "a.txt")
    write(data / ".kept" / "b.txt", "a caption kept aside")
    os.symlink(Path(".kept") / "b.txt", data / "b.txt")  # a link inside the dataset is followed
    result = ingest(data)
    assert {r.name: r.caption for r in result.records} == {"a.png": "a picture", "b.png": "a caption kept aside"}
    assert reasons(result) == {"a.txt": "a link to a file outside the dataset, not followed; image used without it"}


def test_oversized_files_are_named_and_not_read(tmp_path):
    save(tmp_path / "a.png", solid())
    save(tmp_path / "b.png", solid())
    write(tmp_path / "b.txt", "a cat")
    with open(tmp_path / "a.txt", "wb") as f:
        f.truncate(50 * 2**20)  # sparse: 50 MB to read, nothing on disk
    with open(tmp_path / "huge.png", "wb") as f:
        f.truncate(201 * 2**20)
    result, peak = peak_allocation(lambda: promptly(lambda: ingest(tmp_path)))
    assert peak < 10 * 2**20
    assert {r.name: r.caption for r in result.records} == {"a.png": "a picture", "b.png": "a cat"}
    assert reasons(result) == {"a.txt": "caption too long: 50 MB, at most 64 KB; image used without it",
                               "huge.png": "file too large: 201 MB, at most 200 MB"}


def claim_size(archive, member, size):
    """Make the archive's headers say `member` unpacks to `size` bytes, whatever it holds."""
    data = bytearray(archive.read_bytes())
    with zipfile.ZipFile(archive) as zf:
        info = zf.getinfo(member)
    struct.pack_into("<I", data, info.header_offset + 22, size)  # local header: uncompressed size
    central = data.index(b"PK\x01\x02", info.header_offset + info.compress_size)
    while data[central + 46:central + 46 + len(member)] != member.encode():
        central = data.index(b"PK\x01\x02", central + 4)
    struct.pack_into("<I", data, central + 24, size)  # central directory: uncompressed size
    archive.write_bytes(bytes(data))
    return archive


def test_zip_members_past_the_cap_are_not_read(tmp_path):
    png = save(tmp_path / "src" / "a.png", solid()).read_bytes()
    honest = tmp_path / "honest.zip"
    with zipfile.ZipFile(honest, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as zf:
        zf.writestr("a.png", png)
        zf.writestr("b.png", png)
        zf.writestr("b.txt", "cat, " * 20_000)  # 98 KB
        with zf.open("big.png", "w") as member:  # 256 MB of zeros, 1 MB packed
            for _ in range(64):
                member.write(bytes(4 * 2**20))
    liar = tmp_path / "liar.zip"
    liar.write_bytes(honest.read_bytes())
    claim_size(liar, "big.png", 1000)
    result, peak = peak_allocation(lambda: promptly(lambda: ingest(honest)))
    assert peak < 100 * 2**20
    assert sorted(by_name(result)) == ["a.png", "b.png"] and not by_name(result)["b.png"].captioned
    assert reasons(result) == {"big.png": "file too large: 256 MB, at most 200 MB",
                               "b.txt": "caption too long: 97.7 KB, at most 64 KB; image used without it"}
    result, peak = peak_allocation(lambda: promptly(lambda: ingest(liar)))  # zipfile stops at the claimed size
    assert peak < 100 * 2**20
    assert sorted(by_name(result)) == ["a.png", "b.png"]
    assert reasons(result)["big.png"] == "could not read file: Bad CRC-32 for file 'big.png'"


# ---------------------------------------------------------------- build_caption

def test_caption_without_shuffle_or_dropout_is_unchanged():
    caption = "zxq,  a cat ,sitting"
    assert build_caption(caption, shuffle=False, keep_tags=1, dropout=0.0, rng=random.Random(0)) == caption
    sentence = "a photo of a cat sitting on a red sofa"
    for seed in range(20):
        assert build_caption(sentence, shuffle=True, keep_tags=0, dropout=0.0, rng=random.Random(seed)) == sentence


def test_shuffle_keeps_first_tags_and_permutes_the_rest():
    tags = ["zxq", "cat", "sofa", "red", "window", "night", "lamp"]
    outputs = set()
    for seed in range(50):
        out = build_caption(", ".join(tags), shuffle=True, keep_tags=2, dropout=0.0, rng=random.Random(seed))
        parts = out.split(", ")
        assert parts[:2] == ["zxq", "cat"] and sorted(parts) == sorted(tags)
        outputs.add(out)
    assert len(outputs) > 10
    first = build_caption(", ".join(tags), shuffle=True, keep_tags=2, dropout=0.3, rng=random.Random(7))
    assert first == build_caption(", ".join(tags), shuffle=True, keep_tags=2, dropout=0.3, rng=random.Random(7))


def test_dropout_rate():
    def dropped(p):
        rng = random.Random(1)
        return sum(build_caption("zxq, cat", shuffle=True, keep_tags=1, dropout=p, rng=rng) == ""
                   for _ in range(2000))
    assert dropped(0.0) == 0 and dropped(1.0) == 2000
    assert 0.2 * 2000 < dropped(0.3) < 0.4 * 2000


def test_dropout_draws_exactly_one_number():
    rng, reference = random.Random(3), random.Random(3)
    build_caption("a sentence", shuffle=False, keep_tags=0, dropout=0.0, rng=rng)
    reference.random()
    assert rng.random() == reference.random()


# ---------------------------------------------------------------- buckets, images, batches

@pytest.mark.parametrize("resolution, step", [(512, 64), (1024, 64), (768, 32), (520, 64)])
def test_buckets_fit_the_area_and_include_the_square(resolution, step):
    buckets = make_buckets(resolution, step)
    size = resolution // step * step
    assert (size, size) in buckets and buckets == sorted(set(buckets))
    assert all(w % step == 0 and h % step == 0 and w * h <= size * size for w, h in buckets)
    assert all((h, w) in buckets for w, h in buckets)
    assert max(w / h for w, h in buckets) >= 3.5  # wide enough for panoramas


def test_bucket_edge_cases():
    assert make_buckets(64, 64) == [(64, 64)]
    with pytest.raises(UserError, match="resolution 32 is smaller than the bucket step 64"):
        make_buckets(32, 64)


def test_nearest_bucket_follows_the_aspect_ratio():
    buckets = make_buckets(512)
    wide, tall, square = nearest_bucket(1600, 900, buckets), nearest_bucket(900, 1600, buckets), \
        nearest_bucket(700, 700, buckets)
    assert wide[0] > wide[1] and tall == (wide[1], wide[0]) and square == (512, 512)
    assert abs(wide[0] / wide[1] - 16 / 9) < 0.15


def test_prepare_image_center_crop_and_output():
    columns = np.tile(np.arange(128, dtype=np.uint8) * 2, (64, 1))  # pixel value = 2 * x
    image = Image.fromarray(np.stack([columns] * 3, axis=-1))
    tensor, crop, original = prepare_image(image, (64, 64), random_crop=False, flip=False, rng=random.Random(0))
    assert tensor.shape == (3, 64, 64) and tensor.dtype == torch.float32
    assert crop == (0, 32) and original == (64, 128)
    expected = torch.from_numpy(columns[:, 32:96].astype(np.float32)) / 127.5 - 1
    assert torch.allclose(tensor[0], expected)
    assert tensor.min() >= -1 and tensor.max() <= 1


def test_prepare_image_resizes_to_cover_and_random_crop_matches():
    pixels = np.random.default_rng(0).integers(0, 256, (100, 300, 3), dtype=np.uint8)
    image = Image.fromarray(pixels)
    crops = set()
    for seed in range(10):
        tensor, (top, left), original = prepare_image(image, (128, 64), random_crop=True, flip=False,
                                                      rng=random.Random(seed))
        assert tensor.shape == (3, 64, 128) and original == (100, 300)
        resized = np.asarray(image.resize((192, 64), Image.Resampling.LANCZOS), dtype=np.float32)
        assert top == 0 and 0 <= left <= 192 - 128
        expected = torch.from_numpy(resized[top:top + 64, left:left + 128].transpose(2, 0, 1)) / 127.5 - 1
        assert torch.allclose(tensor, expected)
        crops.add(left)
    assert len(crops) > 3


def test_flip_mirrors_the_image():
    image = Image.fromarray(np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    plain, _, _ = prepare_image(image, (64, 64), random_crop=False, flip=False, rng=random.Random(0))
    flipped = [prepare_image(image, (64, 64), random_crop=False, flip=True, rng=random.Random(seed))[0]
               for seed in range(20)]
    mirrored = [t for t in flipped if torch.equal(t, plain.flip(-1))]
    unchanged = [t for t in flipped if torch.equal(t, plain)]
    assert mirrored and unchanged and len(mirrored) + len(unchanged) == 20


def test_epoch_batches_group_by_bucket():
    rng = random.Random(0)
    buckets = [rng.choice([(512, 512), (640, 384), (384, 640)]) for _ in range(103)]
    batches = epoch_batches(buckets, 4, random.Random(5))
    assert sorted(i for batch in batches for i in batch) == list(range(103))
    assert all(1 <= len(batch) <= 4 and len({buckets[i] for i in batch}) == 1 for batch in batches)
    assert sum(len(batch) < 4 for batch in batches) <= 3  # only each bucket's last batch may be short
    runs = sum(buckets[a[0]] != buckets[b[0]] for a, b in zip(batches, batches[1:]))
    assert runs > 5  # batch order is shuffled across buckets, not bucket by bucket
    assert batches == epoch_batches(buckets, 4, random.Random(5))
    assert batches != epoch_batches(buckets, 4, random.Random(6))


# ---------------------------------------------------------------- uploads into a workspace dataset

RED, GREEN, BLUE, YELLOW = (220, 30, 30), (30, 170, 30), (30, 30, 220), (230, 220, 40)


def dataset_items(workspace, name):
    """{file: (colour at the centre, caption)} of a saved dataset, as the app's gallery lists it."""
    return {file: (Image.open(path).convert("RGB").getpixel((8, 8)), caption)
            for file, path, caption in ws.captions(workspace, name)}


def near(color, expected, tolerance=12):
    return all(abs(a - b) <= tolerance for a, b in zip(color, expected))


def test_upload_never_overwrites_a_picture(tmp_path):
    up = tmp_path / "upload"
    files = [save(up / "a.png", solid(RED)), save(up / "a.jpg", solid(BLUE), quality=95),
             write(up / "a.txt", "a square"),
             save(up / "x y.png", solid(GREEN)), write(up / "x y.txt", "green"),
             save(up / "x-y.png", solid(YELLOW)), write(up / "x-y.txt", "yellow")]
    added = ws.add_files(tmp_path / "workspace", "set", [str(f) for f in files])
    items = dataset_items(tmp_path / "workspace", "set")
    assert sorted(added.saved) == sorted(items) == ["a-2.png", "a.png", "x-y-2.png", "x-y.png"]
    assert items["a.png"] == (RED, "a square") and items["a-2.png"][1] == "a square"  # a.txt names both
    assert near(items["a-2.png"][0], BLUE)
    assert items["x-y.png"] == (YELLOW, "yellow") and items["x-y-2.png"] == (GREEN, "green")
    assert added.warnings == ["a.jpg saved as a-2.png: the name was taken",
                              "x y.png saved as x-y-2.png: the name was taken"]
    assert added.rejected == []


def test_upload_again_replaces_the_same_picture_and_keeps_a_different_one(tmp_path):
    workspace = tmp_path / "workspace"

    def upload(folder, color, caption):
        return [str(save(tmp_path / folder / "cat.png", solid(color))),
                str(write(tmp_path / folder / "cat.txt", caption))]

    assert ws.add_files(workspace, "set", upload("1", RED, "a cat")).saved == ["cat.png"]
    again = ws.add_files(workspace, "set", upload("2", RED, "a red cat"))  # the same picture, its caption fixed
    assert again.saved == ["cat.png"] and again.warnings == []
    other = ws.add_files(workspace, "set", upload("3", BLUE, "a blue cat"))
    assert other.saved == ["cat-2.png"] and other.warnings == ["cat.png saved as cat-2.png: the name was taken"]
    with zipfile.ZipFile(tmp_path / "more.zip", "w") as zf:
        zf.write(save(tmp_path / "4" / "cat.png", solid(GREEN)), "cat.png")
        zf.writestr("cat.txt", "a green cat")
    zipped = ws.add_files(workspace, "set", [str(tmp_path / "more.zip")])
    assert zipped.saved == ["cat-3.png"] and zipped.warnings == ["cat.png saved as cat-3.png: the name was taken"]
    assert dataset_items(workspace, "set") == {"cat.png": (RED, "a red cat"), "cat-2.png": (BLUE, "a blue cat"),
                                               "cat-3.png": (GREEN, "a green cat")}


def test_dataset_captions_are_shown_as_training_reads_them(tmp_path):
    folder = ws.dataset_dir(tmp_path / "workspace", "set")
    for name in ("a", "b", "c"):
        save(folder / f"{name}.png", solid())
    os.symlink(write(tmp_path / "secret.txt", "the secret"), folder / "a.txt")
    with open(folder / "b.txt", "wb") as f:
        f.truncate(50 * 2**20)
    write(folder / "c.txt", "a cat")
    assert [(file, caption) for file, _, caption in ws.captions(tmp_path / "workspace", "set")] == [
        ("a.png", ""), ("b.png", ""), ("c.png", "a cat")]
