"""Ingest + validate images, captions (trigger, shuffle, dropout) and loss masks, aspect-ratio buckets."""

from __future__ import annotations

import io
import json
import math
import os
import random
import re
import stat
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Callable

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from sdlora import examples
from sdlora.errors import UserError

IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
CAPTION_EXTS = (".txt", ".caption")  # in order of preference when both exist
METADATA_FILE = "metadata.jsonl"
MIN_SIDE = 8
_ZIP_MAX_BYTES = 4 * 1024**3  # total uncompressed size; zipfile never inflates past a member's declared size
_ZIP_MAX_MEMBERS = 20_000
# Caps checked before a file is read (its size on disk or in the archive's header) and again while reading, so no
# file costs more memory than its cap: a picture this large is not a training image, a caption this long is not text.
MAX_IMAGE_BYTES = 200 * 2**20
MAX_CAPTION_BYTES = 64 * 2**10
MAX_METADATA_BYTES = 64 * 2**20
_REPEATS_FOLDER = re.compile(r"^(\d+)_(.+)$")  # kohya's "10_name" folder: 10 repeats per epoch
MASK_SUFFIX = "_mask"  # a.png's loss mask is a_mask.png (any image type): grey levels are weights, white = 1
_HINT_LAYOUT = (f"use a folder or .zip of {', '.join(sorted(IMAGE_EXTS))} images, each with an optional "
                f"same-name .txt caption (a.png + a.txt) or a {METADATA_FILE} with file_name and text")


@dataclass
class Record:
    """One usable training image."""
    name: str               # path relative to the dataset root, posix style, e.g. "10_cat/a.png"
    image: Image.Image      # mode RGB, EXIF orientation applied, first frame, loaded
    caption: str            # base caption, trigger included
    repeats: int            # N from a kohya-style "N_name" folder, else 1
    captioned: bool         # False when the caption came from the template
    mask: Image.Image | None = None  # mode L, the image's size: the loss weight per pixel (255 = 1), or None


@dataclass
class Ingested:
    """What ingest found: usable records, skipped files with reasons, and warnings for the user."""
    records: list[Record]
    rejected: list[tuple[str, str]]
    warnings: list[str]
    root: str


def ingest(source, *, trigger: str = "", caption_template: str = "a picture", alpha_mask: bool = False,
           max_pixels: int = 64_000_000) -> Ingested:
    """Read a dataset folder or .zip: validate and normalise every image, pair captions and masks, add the trigger.

    `NAME_mask.png` beside `NAME.png` is the picture's loss mask, never a picture itself; with `alpha_mask` a picture
    without a mask file takes its transparency as its mask (a fully opaque one has none).

    Files that can't be used are listed in `rejected` with the reason; the rest goes on. Raises UserError
    when the source is missing, the archive is unsafe, metadata.jsonl is malformed, or no image is usable.

    >>> data = ingest("photos/", trigger="zxq")
    >>> data.records[0].name, data.records[0].caption
    ('10_cat/a.png', 'zxq, a cat on a sofa')
    """
    path = examples.locate(source)  # `example:NAME` is a dataset that ships with sdlora
    if path.is_dir():
        return _ingest_files(str(source), _folder_files(path), [], trigger, caption_template, alpha_mask, max_pixels)
    if not zipfile.is_zipfile(path):
        raise UserError(f"not a folder or a .zip archive: {path}", _HINT_LAYOUT)
    rejected: list[tuple[str, str]] = []
    with zipfile.ZipFile(path) as archive:
        files = _zip_files(path, archive, rejected)
        return _ingest_files(str(source), files, rejected, trigger, caption_template, alpha_mask, max_pixels)


def _ignored(part: str) -> bool:
    """Files that operating systems leave behind: skipped without a word."""
    return part.startswith(".") or part == "__MACOSX" or part.lower() in ("thumbs.db", "desktop.ini")


class _Unreadable(Exception):
    """A file ingest does not read; the message is the reason the user sees."""


class _TooLarge(_Unreadable):
    def __init__(self, size: int):
        super().__init__(_amount(size))


# A reader gives at most `limit` bytes of one file, or raises _TooLarge (the file holds more) or _Unreadable.
# `own` asks for a file of the dataset itself: a link that leads out of the dataset folder is not followed.
_Reader = Callable[..., bytes]


def _folder_files(root: Path) -> dict[str, _Reader]:
    files = {}
    for folder, subfolders, names in os.walk(root):
        subfolders[:] = sorted(d for d in subfolders if not _ignored(d))
        for name in sorted(names):
            if not _ignored(name):
                path = Path(folder) / name
                files[path.relative_to(root).as_posix()] = (
                    lambda limit, own=False, path=path: _read_path(path, root, limit, own))
    return files


def _read_path(path: Path, root: Path, limit: int, own: bool) -> bytes:
    """Read a regular file (a link is followed to one) of at most `limit` bytes. Anything else would hang (a FIFO),
    never end (/dev/zero) or has no bytes to give (a socket), so it is refused before it is opened."""
    try:
        found = os.stat(path)
    except OSError as error:
        raise _Unreadable(f"could not read file: {error.strerror or error}") from None
    if not stat.S_ISREG(found.st_mode):
        raise _Unreadable("not a regular file")
    if own and path.is_symlink() and Path(os.path.realpath(root)) not in Path(os.path.realpath(path)).parents:
        raise _Unreadable("a link to a file outside the dataset, not followed")
    if found.st_size > limit:
        raise _TooLarge(found.st_size)
    # O_NONBLOCK: should the file be swapped for a FIFO since the stat, opening it still returns at once.
    with open(os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0)), "rb") as file:
        found = os.fstat(file.fileno())
        if not stat.S_ISREG(found.st_mode):
            raise _Unreadable("not a regular file")
        data = file.read(min(found.st_size, limit) + 1)  # +1: a file that grew past the cap is caught
    if len(data) > limit:
        raise _TooLarge(len(data))
    return data


def _read_member(archive: zipfile.ZipFile, info: zipfile.ZipInfo, limit: int) -> bytes:
    """Read one archive member of at most `limit` bytes, streaming: a header that understates the size cannot make
    this read more (zipfile stops at the declared size), one that states it honestly is refused unread."""
    if info.file_size > limit:
        raise _TooLarge(info.file_size)
    with archive.open(info) as member:
        data = member.read(min(info.file_size, limit) + 1)
    if len(data) > limit:
        raise _TooLarge(len(data))
    return data


def _amount(size: int) -> str:
    """1.5 MB, 64 KB, 120 bytes."""
    for unit, scale in (("GB", 2**30), ("MB", 2**20), ("KB", 2**10)):
        if size >= scale:
            text = f"{size / scale:.1f}"
            return f"{text.removesuffix('.0') if size % scale == 0 else text} {unit}"
    return f"{size} bytes"


def check_zip(name: str, infos: list[zipfile.ZipInfo], max_bytes: int | None = None,
              too_big_hint: str = "unpack it yourself and give the folder") -> None:
    """Refuse an archive that holds too many files, links, or more than `max_bytes` once unpacked (a zip bomb).
    Members with absolute or '..' paths are not refused here: reading skips them and says so."""
    max_bytes = _ZIP_MAX_BYTES if max_bytes is None else max_bytes
    if len(infos) > _ZIP_MAX_MEMBERS:
        raise UserError(f"{name} has {len(infos)} files, more than the {_ZIP_MAX_MEMBERS} allowed",
                        "split the dataset or use a folder instead of a .zip")
    links = [i.filename for i in infos if stat.S_ISLNK(i.external_attr >> 16)]
    if links:
        raise UserError(f"{name} contains links ({', '.join(links[:3])}), which are not allowed",
                        "zip the files themselves, not links to them")
    total = sum(info.file_size for info in infos)
    if total > max_bytes:
        raise UserError(f"{name} unpacks to {_size(total)}, more than the {_size(max_bytes)} allowed", too_big_hint)


def _size(n: int) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def _zip_files(path: Path, archive: zipfile.ZipFile, rejected) -> dict[str, _Reader]:
    infos = archive.infolist()
    check_zip(str(path), infos)
    members = {}
    for info in infos:
        name = info.filename.replace("\\", "/")
        parts = name.split("/")
        # Never read a member that would land outside the folder if unpacked ("zip slip").
        if name.startswith("/") or re.match(r"^[A-Za-z]:", name) or ".." in parts:
            rejected.append((name, "unsafe path in archive (absolute or '..'); not read"))
            continue
        parts = [p for p in parts if p not in ("", ".")]
        if info.is_dir() or not parts or any(_ignored(p) for p in parts):
            continue
        members["/".join(parts)] = info
    # A zip of a folder holds one top-level folder: treat it as the root, as if the folder were given.
    tops = {name.split("/")[0] for name in members}
    if len(tops) == 1 and all("/" in name for name in members):
        cut = len(tops.pop()) + 1
        members = {name[cut:]: info for name, info in members.items()}
    return {name: (lambda limit, own=False, info=info: _read_member(archive, info, limit))
            for name, info in sorted(members.items())}


def is_mask(name: str) -> bool:
    """Whether a file name is a loss mask's (`a_mask.png`) rather than a picture's."""
    path = PurePosixPath(name)
    return path.suffix.lower() in IMAGE_EXTS and path.stem.lower().endswith(MASK_SUFFIX)


def mask_stem(name: str) -> str:
    """The stem of the picture a mask file belongs to: "10_cat/a_mask.png" -> "10_cat/a"."""
    return name[: -len(PurePosixPath(name).suffix) - len(MASK_SUFFIX)]


def _ingest_files(source: str, files: dict, rejected: list, trigger: str, template: str, alpha_mask: bool,
                  max_pixels: int) -> Ingested:
    warnings: list[str] = []
    metadata = _read_metadata(source, files.pop(METADATA_FILE, None))
    images, captions, masks = [], {}, {}
    for name in sorted(files):
        ext = PurePosixPath(name).suffix.lower()
        if is_mask(name):
            masks.setdefault(mask_stem(name), name)
        elif ext in IMAGE_EXTS:
            images.append(name)
        elif ext in CAPTION_EXTS:
            captions.setdefault(name[: -len(ext)], {})[ext] = name
        else:
            rejected.append((name, f"not an image ({ext or 'no extension'})"))
    if not images:
        raise UserError(f"no images found in {source}", _HINT_LAYOUT)

    records, uncaptioned = [], []
    for name in images:
        try:
            data = files[name](MAX_IMAGE_BYTES)
        except _TooLarge as error:
            rejected.append((name, f"file too large: {error}, at most {_amount(MAX_IMAGE_BYTES)}"))
            continue
        except _Unreadable as error:
            rejected.append((name, str(error)))
            continue
        except Exception as error:  # permissions, encrypted or damaged zip member
            rejected.append((name, f"could not read file: {error}"))
            continue
        image = _load_image(data, max_pixels, keep_alpha=alpha_mask)
        if isinstance(image, str):
            rejected.append((name, image))
            continue
        image, alpha = image
        stem = name[: -len(PurePosixPath(name).suffix)]
        mask = _read_mask(masks[stem], files[masks[stem]], image.size, max_pixels, rejected, warnings) \
            if stem in masks else alpha
        caption_file = next((captions[stem][e] for e in CAPTION_EXTS if e in captions.get(stem, {})), None)
        caption = metadata.get(name, "")
        if not caption and caption_file:
            caption = _read_caption(caption_file, files[caption_file], rejected)
        if not caption:
            uncaptioned.append(name)
        records.append(Record(name, image, _with_trigger(caption or template, trigger), _repeats(name),
                              captioned=bool(caption), mask=mask))

    if not records:
        first = [f"{name}: {reason}" for name, reason in rejected if name in images][:3]
        raise UserError(f"all {len(images)} images in {source} were rejected", "; ".join(first))
    if uncaptioned:
        warnings.append(f"{_count(uncaptioned, 'image')} no caption; used '{_with_trigger(template, trigger)}': "
                        f"{_some(uncaptioned)}")
    missing = sorted(set(metadata) - set(images))
    if missing:
        warnings.append(f"{METADATA_FILE} names {len(missing)} file(s) not in the dataset: {_some(missing)}")
    image_stems = {name[: -len(PurePosixPath(name).suffix)] for name in images}
    orphans = sorted(n for stem, by_ext in captions.items() if stem not in image_stems for n in by_ext.values())
    if orphans:
        warnings.append(f"{_count(orphans, 'caption file')} no matching image (ignored): {_some(orphans)}")
    lone_masks = sorted(name for stem, name in masks.items() if stem not in image_stems)
    if lone_masks:  # a mask whose picture was renamed, or a picture named like a mask: never trained on
        warnings.append(f"{_count(lone_masks, 'mask file')} no picture of the same name (ignored; a picture's "
                        f"name must not end in {MASK_SUFFIX}): {_some(lone_masks)}")
    return Ingested(records, rejected, warnings, source)


def _read_mask(name: str, read: _Reader, size: tuple[int, int], max_pixels: int, rejected: list,
               warnings: list) -> Image.Image | None:
    """The loss mask in file `name` as grey levels (mode L) of the picture's `size`; None, with the reason in
    `rejected`, when it can't be used (the picture then trains unmasked, as a picture without a caption file trains
    with the template). A mask of another size is stretched to the picture's, with a warning."""
    try:
        loaded = _load_image(read(MAX_IMAGE_BYTES), max_pixels)
    except _TooLarge as error:
        loaded = f"file too large: {error}, at most {_amount(MAX_IMAGE_BYTES)}"
    except _Unreadable as error:
        loaded = str(error)
    except Exception as error:
        loaded = f"could not read file: {error}"
    if isinstance(loaded, str):
        rejected.append((name, f"mask not used: {loaded}; picture used without it"))
        return None
    mask = loaded[0].convert("L")
    if mask.size != size:
        warnings.append(f"{name} is {mask.size[0]} x {mask.size[1]} pixels and its picture {size[0]} x {size[1]}: "
                        "the mask was resized to the picture")
        mask = mask.resize(size, Image.Resampling.BILINEAR)
    return mask


def has_masks(records) -> bool:
    """Whether any record carries a loss mask."""
    return any(record.mask is not None for record in records)


def _count(names: list, noun: str) -> str:
    return f"1 {noun} has" if len(names) == 1 else f"{len(names)} {noun}s have"


def _some(names: list, limit: int = 5) -> str:
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _clean_caption(text: str) -> str:
    return " ".join(text.split())  # strip, and newlines/tabs/runs of spaces become one space


def _read_caption(name: str, read: _Reader, rejected: list) -> str:
    try:
        return _clean_caption(read(MAX_CAPTION_BYTES, own=True).decode("utf-8-sig"))
    except UnicodeDecodeError:
        rejected.append((name, "caption is not UTF-8 text; image used without it"))
    except _TooLarge as error:
        rejected.append((name, f"caption too long: {error}, at most {_amount(MAX_CAPTION_BYTES)}; "
                               "image used without it"))
    except _Unreadable as error:
        rejected.append((name, f"{error}; image used without it"))
    except Exception as error:
        rejected.append((name, f"could not read caption: {error}"))
    return ""


def read_caption_file(path: Path, root: Path) -> str:
    """The caption in `path`, a file of the dataset folder `root`, as training reads it; '' where ingest would not
    use it (missing, not a regular file, a link out of the dataset, longer than MAX_CAPTION_BYTES, not UTF-8)."""
    try:
        return _clean_caption(_read_path(Path(path), Path(root), MAX_CAPTION_BYTES, own=True).decode("utf-8-sig"))
    except (OSError, _Unreadable, UnicodeDecodeError):
        return ""


def _read_metadata(source: str, read: _Reader | None) -> dict[str, str]:
    """metadata.jsonl at the root (the Hugging Face imagefolder layout): {relative file name: caption}."""
    if read is None:
        return {}
    where = f"{METADATA_FILE} in {source}"
    example = 'each line must be one JSON object like {"file_name": "a.png", "text": "a cat"}'
    try:
        lines = read(MAX_METADATA_BYTES, own=True).decode("utf-8-sig").splitlines()
    except UnicodeDecodeError:
        raise UserError(f"{where} is not UTF-8 text", example) from None
    except _TooLarge as error:
        raise UserError(f"{where} is too large: {error}, at most {_amount(MAX_METADATA_BYTES)}",
                        "split the dataset, or give captions as .txt files next to the images") from None
    except _Unreadable as error:
        raise UserError(f"{where}: {error}", "make it a plain text file in the dataset folder") from None
    captions = {}
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            row = None
        if not (isinstance(row, dict) and isinstance(row.get("file_name"), str)
                and isinstance(row.get("text"), str)):
            raise UserError(f"{where}: line {number} is not a JSON object with 'file_name' and 'text'", example)
        file_name = "/".join(p for p in row["file_name"].replace("\\", "/").split("/") if p not in ("", "."))
        captions[file_name] = _clean_caption(row["text"])
    return captions


def _with_trigger(caption: str, trigger: str) -> str:
    """Prepend the trigger unless the caption already has it as a whole word."""
    if not trigger or re.search(rf"(?<!\w){re.escape(trigger)}(?!\w)", caption):
        return caption
    return f"{trigger}, {caption}" if caption else trigger


def _repeats(name: str) -> int:
    """N from the innermost kohya-style "N_name" folder holding the file, else 1."""
    for folder in reversed(PurePosixPath(name).parts[:-1]):
        match = _REPEATS_FOLDER.match(folder)
        if match and int(match.group(1)) > 0:
            return int(match.group(1))
    return 1


def _load_image(data: bytes, max_pixels: int,
                keep_alpha: bool = False) -> tuple[Image.Image, Image.Image | None] | str:
    """Decode and normalise one image file; returns (the RGB image, its alpha channel as mode L when `keep_alpha` and
    some of it is transparent, else None), or the reason it can't be used."""
    if not data:
        return "empty file (0 bytes)"
    # PIL's own bomb guard warns or raises at a fixed size; ours checks the header against max_pixels instead.
    saved_limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
    try:
        try:
            image = Image.open(io.BytesIO(data))
        except UnidentifiedImageError:
            return "not an image or unsupported format"
        except Exception as error:
            return f"truncated or corrupt image: {error}"
        width, height = image.size
        if width * height > max_pixels:
            return f"too large ({width} x {height} pixels, limit {max_pixels:,})"
        if min(width, height) < MIN_SIDE:
            return f"too small ({width} x {height} pixels, each side must be at least {MIN_SIDE})"
        try:
            image.seek(0)  # first frame of an animation
            image.load()
        except Exception as error:
            return f"truncated or corrupt image: {error}"
    finally:
        Image.MAX_IMAGE_PIXELS = saved_limit
    try:
        image = ImageOps.exif_transpose(image)
    except Exception:  # unreadable EXIF: keep the pixels as stored
        pass
    try:
        rgb = _to_rgb(image)
    except Exception as error:
        return f"unsupported colour mode {image.mode}: {error}"
    rgb.info = {}  # drop EXIF/ICC bytes we no longer need
    alpha = None
    if keep_alpha and (image.mode in ("RGBA", "RGBa", "LA", "La", "PA", "P") or "transparency" in image.info):
        alpha = image.convert("RGBA").getchannel("A")
        if alpha.getextrema()[0] == 255:  # fully opaque: no mask, as if the file had no alpha channel
            alpha = None
    return rgb, alpha


def _to_rgb(image: Image.Image) -> Image.Image:
    mode = image.mode
    if mode == "RGB" and "transparency" not in image.info:
        return image
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        return Image.fromarray(_to_uint8(np.asarray(image), mode), "L").convert("RGB")
    if mode in ("RGBA", "RGBa", "LA", "La", "PA", "P") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        # Transparent areas become white, not whatever colour happens to be stored under alpha 0.
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")  # L, 1, CMYK, YCbCr, HSV, RGBX...


def _to_uint8(values: np.ndarray, mode: str) -> np.ndarray:
    """Scale 16-bit, 32-bit and float pixels to 0..255 (clipping to 255 would turn most of them white)."""
    values = np.nan_to_num(values.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    low, high = float(values.min()), float(values.max())
    if mode == "F" and low >= 0 and high <= 1:
        values = values * 255.0
    elif mode == "F" and low >= 0 and high <= 255:
        pass
    elif mode != "F" and low >= 0 and high <= 65535:
        values = values / 257.0  # 16-bit content ("I" included): 65535 -> 255, 32768 -> 127.5
    elif high > low:
        values = (values - low) / (high - low) * 255.0  # any wider range: stretch what is there
    return np.clip(np.rint(values), 0, 255).astype(np.uint8)


def build_caption(caption: str, *, shuffle: bool, keep_tags: int, dropout: float, rng: random.Random) -> str:
    """The caption for one training step: optionally shuffle comma tags after the first `keep_tags`,
    then drop the whole caption with probability `dropout` (an empty prompt trains the unconditional case).

    Always draws exactly one `rng.random()` for dropout, so runs with the same seed see the same captions.
    """
    if shuffle:
        tags = split_tags(caption)
        rest = tags[keep_tags:]
        rng.shuffle(rest)
        if len(tags) > 1:
            caption = ", ".join(tags[:keep_tags] + rest)
    return "" if rng.random() < dropout else caption


def split_tags(caption: str) -> list[str]:
    """A caption's comma-separated tags, stripped, empty ones left out (as caption shuffling splits them)."""
    return [tag.strip() for tag in caption.split(",") if tag.strip()]


def make_buckets(resolution: int, step: int = 64, min_side: int | None = None,
                 max_side: int | None = None) -> list[tuple[int, int]]:
    """Aspect-ratio buckets (width, height) with sides that are multiples of `step` and an area of at most
    resolution**2 (resolution rounded down to `step`; the caller warns when that changed it).

    As kohya does: for each width, the tallest height that fits the area, in both orientations, plus the square.

    >>> make_buckets(64)
    [(64, 64)]
    """
    size = resolution // step * step
    if size < step:
        raise UserError(f"resolution {resolution} is smaller than the bucket step {step}",
                        f"use a resolution of at least {step}, e.g. 512 for SD1.x or 1024 for SDXL")
    low = max(step, size // 2 // step * step) if min_side is None else -(-min_side // step) * step
    high = size * 2 // step * step if max_side is None else max_side // step * step
    if low > high:
        raise UserError(f"bucket sides from {min_side} to {max_side} leave no size in steps of {step}",
                        "make the smallest bucket side smaller than the largest")
    buckets = {(size, size)}
    for width in range(low, high + 1, step):
        height = min(high, size * size // width // step * step)
        if height >= low:
            buckets.update({(width, height), (height, width)})
    return sorted(buckets)


def nearest_bucket(width: int, height: int, buckets) -> tuple[int, int]:
    """The bucket whose aspect ratio is closest to width/height (in log space); ties go to the larger area."""
    ratio = math.log(width / height)
    return min(buckets, key=lambda b: (abs(math.log(b[0] / b[1]) - ratio), -b[0] * b[1]))


def prepare_image(image: Image.Image, bucket, *, random_crop: bool, flip: bool,
                  rng: random.Random) -> tuple[torch.Tensor, tuple[int, int], tuple[int, int]]:
    """Resize `image` to cover `bucket` (width, height), crop to it, maybe flip it horizontally.

    Returns (pixels, crop_top_left, original_size): a float32 tensor (3, height, width) in [-1, 1], the
    (top, left) of the crop in the resized image, and the input's (height, width), as SDXL conditions on them.
    """
    pixels, _, crop_top_left, original_size = prepare_image_and_mask(image, None, bucket, random_crop=random_crop,
                                                                      flip=flip, rng=rng)
    return pixels, crop_top_left, original_size


def prepare_image_and_mask(image: Image.Image, mask: Image.Image | None, bucket, *, random_crop: bool, flip: bool,
                           rng: random.Random):
    """`prepare_image` of `image`, and the same resize, crop and flip of its loss `mask` (mode L, the image's size),
    so the two stay aligned: (pixels, mask or None, crop_top_left, original_size), the mask a float32 tensor
    (1, height, width) in [0, 1]. The random draws are those of `prepare_image`, mask or not."""
    bucket_w, bucket_h = bucket
    width, height = image.size
    scale = max(bucket_w / width, bucket_h / height)
    new_w, new_h = max(bucket_w, round(width * scale)), max(bucket_h, round(height * scale))
    if (new_w, new_h) != (width, height):
        image = image.resize((new_w, new_h), Image.Resampling.LANCZOS)
        # bilinear, not Lanczos: its overshoot would push weights at a mask's edges past 0 and 1
        mask = mask.resize((new_w, new_h), Image.Resampling.BILINEAR) if mask is not None else None
    if random_crop:
        top, left = rng.randint(0, new_h - bucket_h), rng.randint(0, new_w - bucket_w)
    else:
        top, left = (new_h - bucket_h) // 2, (new_w - bucket_w) // 2
    box = (left, top, left + bucket_w, top + bucket_h)
    pixels = np.asarray(image.crop(box).convert("RGB"))
    weights = np.array(mask.crop(box).convert("L"), dtype=np.float32)[None] / 255.0 if mask is not None else None
    if flip and rng.random() < 0.5:
        pixels = pixels[:, ::-1]
        weights = weights[:, :, ::-1] if weights is not None else None
    tensor = torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1))).float() / 127.5 - 1.0
    if weights is not None:
        weights = torch.from_numpy(np.ascontiguousarray(weights))
    return tensor, weights, (top, left), (height, width)


def expand_repeats(records: list[Record]) -> list[int]:
    """Record indices for one epoch, each repeated `repeats` times, in record order."""
    return [index for index, record in enumerate(records) for _ in range(record.repeats)]


def reg_samples(reg_records: list[Record], train_samples: int, ratio: float, seed: int) -> list[int]:
    """Indices into `reg_records` for one epoch: as many as make them `ratio` of the epoch's samples beside
    `train_samples` training ones (0.5: as many as the training pictures, kohya's way). Each picture counts its
    repeats; they are taken in an order shuffled by `seed` and cycled when more are needed than there are, so the
    same pictures come every epoch (the epoch's buckets, and so its batches, stay the same) and a set larger than
    needed contributes a random part of itself, not its first folder."""
    assert 0 < ratio < 1, ratio
    pool = expand_repeats(reg_records)
    random.Random(seed).shuffle(pool)
    count = max(1, round(train_samples * ratio / (1 - ratio)))
    return [pool[j % len(pool)] for j in range(count)]


def dataset_dirs(records: list[Record], root_name: str) -> dict:
    """{folder: {"n_repeats": N, "img_count": pictures}} per folder holding pictures, kohya's `ss_dataset_dirs` /
    `ss_reg_dataset_dirs` shape; pictures at the dataset's root count under `root_name`."""
    dirs: dict[str, dict[str, int]] = {}
    for record in records:
        folder = str(PurePosixPath(record.name).parent)
        info = dirs.setdefault(root_name if folder == "." else folder, {"n_repeats": record.repeats, "img_count": 0})
        info["img_count"] += 1
    return dirs


def epoch_batches(buckets_per_sample: list[tuple[int, int]], batch_size: int,
                  rng: random.Random) -> list[list[int]]:
    """Batches of sample indices for one epoch; a batch never mixes buckets (its images must stack).

    Shuffles within each bucket, cuts it into batches (the last one may be short), then shuffles the batches.
    """
    assert batch_size >= 1, batch_size
    by_bucket: dict[tuple[int, int], list[int]] = {}
    for index, bucket in enumerate(buckets_per_sample):
        by_bucket.setdefault(tuple(bucket), []).append(index)
    batches = []
    for bucket in sorted(by_bucket):
        indices = by_bucket[bucket]
        rng.shuffle(indices)
        batches += [indices[i:i + batch_size] for i in range(0, len(indices), batch_size)]
    rng.shuffle(batches)
    return batches


NO_TRIGGER = ("no trigger word, and the captions do not start with one: what the LoRA learns goes into the words the "
              "captions use; set a trigger word to call it up by name")


def common_first_word(captions: list[str], share: float = 0.8) -> str | None:
    """The first tag (the text before the first comma) that at least `share` of the captions start with, as they
    start with a trigger word; else None."""
    firsts = [(split_tags(c) or [""])[0].lower() for c in captions]
    tag = max(set(firsts), key=firsts.count) if firsts else ""
    return tag if tag and firsts.count(tag) >= share * len(firsts) else None


def tag_frequency(records) -> dict:
    """Tag counts per top-level folder, kohya's `ss_tag_frequency` shape: {"10_cat": {"cat": 12, ...}}.

    Images at the dataset root count under "dataset".
    """
    frequency: dict[str, dict[str, int]] = {}
    for record in records:
        folder = record.name.split("/")[0] if "/" in record.name else "dataset"
        counts = frequency.setdefault(folder, {})
        for tag in split_tags(record.caption):
            counts[tag] = counts.get(tag, 0) + 1
    return frequency
