"""Dataset check: what in a dataset makes a LoRA disappoint (duplicates, small, enlarged, cropped or blurry pictures,
captions, how often each picture is seen), each finding naming the files and saying what to do."""

from __future__ import annotations

import hashlib
import json
import math
import random
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from sdlora import dataset as ds
from sdlora.errors import UserError

R = Image.Resampling
# Pictures are judged on a copy whose longest side is at most this, so 500 pictures at 512 px take about 3 s on two
# cores. The cost: a 512 px picture counts as enlarged from x4 on (x2 on the copy), a 256 px one from x2.
WORK_SIDE = 256
# Near duplicates: 64-bit perceptual hashes (imagehash.phash) at most this many bits apart. A JPEG at quality 60, a
# half-size copy or a 5% crop of the same picture moves 0-8 bits (measured on the bundled examples); unrelated
# pictures sit near 32 (half the bits). The hash sees only grey layout, so the same drawing in other colours is also
# close (2-6 bits in the character example): pairs must also agree in colour, cell by cell (COLOUR_LEVELS).
NEAR_BITS = 8
# The largest difference between two 8x8 colour thumbnails' cells, in 0-255 levels: recompression and resizing move
# it at most 7, a 5% crop up to 30; the character example's pictures that differ only in the creature's colour, 53+.
COLOUR_LEVELS = 32
# Enlarged pictures: a picture enlarged xF loses almost nothing when shrunk by F and enlarged back. The loss, as a
# share of the picture's variance, stays under these for pictures enlarged from 32 px drawings (bicubic, Lanczos,
# nearest), while pictures drawn at their size lose 0.01-0.15 at x2 and more beyond (measured; see tests/test_check.py).
ENLARGED_LOSS = {2: 0.005, 3: 0.005, 4: 0.005, 6: 0.008, 8: 0.008}
BLUR_SHARE = 0.2  # "much blurrier": a fifth of the dataset's median sharpness or less
CROP_SHARE = 0.10  # a crop cutting a tenth of a picture or more is worth a look
WIDE_RATIO = 2.5  # wider (or taller) than this trains at a narrow bucket: say which
SEEN_FEW, SEEN_MANY, SEEN_TYPICAL = 20, 500, 100  # times each picture is seen; recipes land near 100 (docs)
NATIVE = {"tiny": 64}  # family resolutions come from sdlora.families
_BITS = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)  # set bits of each byte value


@dataclass
class Finding:
    """One thing the check found: `kind` names the check, `severity` is "warning" (likely to hurt the LoRA) or
    "info", `files` the pictures it is about (paths in the dataset), `message` what was found, `hint` what to do."""
    kind: str
    severity: str
    files: list[str]
    message: str
    hint: str = ""

    def __str__(self) -> str:
        return self.message + (f" ({self.hint})" if self.hint else "")


@dataclass
class _Picture:
    name: str
    size: tuple[int, int]
    image: Image.Image  # the picture itself, for the exact comparison of pictures whose copies match
    phash: np.ndarray  # 64 bools
    thumb: np.ndarray  # 8x8x3 colour thumbnail, float
    sharpness: float  # variance of the Laplacian over the variance of the grey copy; nan when flat
    enlarged: int  # estimated factor the picture was enlarged by (1 = not)
    detail: tuple[int, int]  # the size its detail corresponds to


def check_dataset(data, *, trigger: str = "", resolution: int = 0, base: str = "tiny", steps: int = 0,
                  batch_size: int = 1, grad_accum: int = 1, tokenizer=None, buckets=None) -> list[Finding]:
    """Check a dataset: `data` is a folder or .zip (read with its captions as written) or what `dataset.ingest`
    returned. `resolution` 0 = `base`'s own; `tokenizer` None = `base`'s (or SD1's CLIP tokenizer); `buckets` None =
    `dataset.make_buckets(resolution)`. With `steps`, also how many rounds (epochs) of `batch_size` x `grad_accum`
    pictures a step the run makes.

    Raises UserError when the folder is missing or holds no usable picture; everything else is a Finding.
    """
    if not isinstance(data, ds.Ingested):
        data = ds.ingest(data)
    records = data.records
    resolution = resolution or base_resolution(base)
    pictures = [_look(r) for r in records]
    buckets = buckets or ds.make_buckets(resolution)
    found = _duplicates(pictures) + _sizes(pictures, buckets, resolution) + _blur(pictures)
    found += _captions(records, trigger, tokenizer if tokenizer is not None else base_tokenizer(base))
    if steps:
        found.append(_rounds(records, pictures, buckets, steps, batch_size, grad_accum))
    return found


def summary(findings: list[Finding], pictures: int) -> str:
    """One line: how many pictures and findings."""
    warnings = sum(f.severity == "warning" for f in findings)
    return (f"{pictures} pictures checked: {warnings} warning{'s' * (warnings != 1)}, "
            f"{len(findings) - warnings} note{'s' * (len(findings) - warnings != 1)}")


# ---- the base: resolution and tokenizer without loading weights ---------------------------------------------------

def base_resolution(base: str) -> int:
    """The native training resolution of `base`: 'tiny', a family name (sd1, sd2, sd2-v, sdxl), a diffusers folder
    (its UNet's sample size times the VAE's scale) or a single-file checkpoint (its family's)."""
    from sdlora import families

    if base in NATIVE:
        return NATIVE[base]
    path = _base_path(base)
    if (path / "unet" / "config.json").is_file() and (path / "vae" / "config.json").is_file():
        from sdlora.models import unet_resolution

        return unet_resolution(json.loads((path / "unet" / "config.json").read_text()),
                               json.loads((path / "vae" / "config.json").read_text()))
    family = base_family(base)
    if family is None:
        raise UserError(f"cannot tell the resolution of base {base!r} without loading it",
                        f"give --resolution, or --base as tiny, {', '.join(families.FAMILIES)}, a diffusers folder or "
                        f"a .safetensors file")
    return family.resolution


def base_family(base: str):
    """The family of `base` from its configs or a single file's header and a tensor or two, no model loaded: 'tiny'
    (SD1 for every loader), a family name, a diffusers folder, a single file, or a hub id already downloaded. None
    where that cannot tell (a hub id not downloaded, a path that is no model); a file that is no base sdlora trains
    raises its UserError (an inpainting model, an SDXL refiner, ...)."""
    from sdlora import families

    if base == "tiny":
        return families.get(families.TINY)
    if base in families.FAMILIES:
        return families.get(base)
    path = _base_path(base)
    if (path / "model_index.json").is_file():
        return _folder_family(path)
    if path.is_file():
        from sdlora.models import inspect_checkpoint

        info = inspect_checkpoint(path)
        # the family of this layout that predicts what the file says (SD2 v-prediction)
        return next((f for f in families.FAMILIES.values()
                     if f.arch == info.arch and f.prediction_type == info.prediction_type), families.of_arch(info.arch))
    return None


def _base_path(base: str) -> Path:
    """Where `base` is on disk: its path, or a hub id's downloaded folder where there is one."""
    path = Path(base).expanduser()
    if not path.exists() and base.count("/") == 1:
        try:
            from huggingface_hub import try_to_load_from_cache

            index = try_to_load_from_cache(base, "model_index.json")
        except Exception:  # not a valid repo id: a path that is not there
            return path
        return Path(index).parent if isinstance(index, str) else path
    return path


def _folder_family(path: Path):
    """A diffusers folder's family: its denoiser's config tells the family (SD3.5 Medium or Large, FLUX.1 dev or
    schnell, SD1 or SD2), its scheduler's whether SD2 predicts v."""
    from sdlora import families

    try:
        group = families.detect_folder(json.loads((path / "model_index.json").read_text()))
        config = next((json.loads((path / part / "config.json").read_text()) for part in ("transformer", "unet")
                       if (path / part / "config.json").is_file()), None)
        family = families.detect_denoiser(config) if config is not None else group
        scheduler = path / "scheduler" / "scheduler_config.json"
        prediction = json.loads(scheduler.read_text()).get("prediction_type") if scheduler.is_file() else None
    except (OSError, ValueError, AttributeError):
        return None
    if family.group != group.group:  # a denoiser another group's folder would not hold
        return group
    return next((f for f in families.FAMILIES.values() if f.arch == family.arch and f.prediction_type == prediction),
                family)


def base_tokenizer(base: str):
    """The first tokenizer of `base` where it is on disk (tiny, a family's shipped one, a diffusers folder), else
    the CLIP tokenizer shipped for SD1: a `tokenizers.Tokenizer` with `model_max_length` set."""
    from tokenizers import Tokenizer

    from sdlora import families
    from sdlora.models import CONFIGS_DIR
    from sdlora.tiny import MODEL_DIR

    folder = CONFIGS_DIR / families.get(families.TINY).arch / "tokenizer"  # SD1's CLIP tokenizer
    if base == "tiny":
        folder = Path(MODEL_DIR) / "tokenizer"
    elif base in families.FAMILIES and (CONFIGS_DIR / families.get(base).arch / "tokenizer").is_dir():
        folder = CONFIGS_DIR / families.get(base).arch / "tokenizer"  # (SD3.5 ships none: SD1's CLIP counts alike)
    elif (Path(base).expanduser() / "tokenizer" / "tokenizer.json").is_file():
        folder = Path(base).expanduser() / "tokenizer"
    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    config = folder / "tokenizer_config.json"
    tokenizer.model_max_length = json.loads(config.read_text()).get("model_max_length", 77) if config.is_file() else 77
    return tokenizer


def _token_counts(tokenizer, captions: list[str]) -> list[int]:
    """Tokens of each caption, start and end tokens included, as the text encoder sees them."""
    if hasattr(tokenizer, "encode_batch"):  # a tokenizers.Tokenizer
        return [len(e.ids) for e in tokenizer.encode_batch(captions)]
    return [len(ids) for ids in tokenizer(captions).input_ids]  # a transformers tokenizer


# ---- looking at one picture ----------------------------------------------------------------------------------------

def _look(record: ds.Record) -> _Picture:
    import imagehash

    image = record.image
    width, height = image.size
    scale = min(1.0, WORK_SIDE / max(width, height))
    work = image if scale == 1 else image.resize((max(1, round(width * scale)), max(1, round(height * scale))),
                                                 R.BOX)
    grey = work.convert("L")
    a = np.asarray(grey, dtype=np.float32)
    variance = float(a.var())
    factor = _enlarged(grey, a, variance)
    total = factor / scale
    return _Picture(record.name, (width, height), image, imagehash.phash(grey).hash.flatten(),
                    np.asarray(work.resize((8, 8), R.BOX), dtype=np.float32),
                    _sharpness(a, variance), round(total) if factor > 1 else 1,
                    (round(width / total), round(height / total)))


def _enlarged(grey: Image.Image, a: np.ndarray, variance: float) -> int:
    """The largest factor F the picture survives being shrunk by and enlarged back: it holds no more detail than a
    picture F times smaller. Smooth enlargements (bicubic, Lanczos) are undone by Lanczos both ways; blocky ones
    (nearest) by box shrinking and nearest enlarging, which works only at whole factors that share the grid."""
    if variance < 1.0:  # flat: nothing to tell by
        return 1
    width, height = grey.size

    def loss(f: int, down, up) -> float:
        small = grey.resize((max(1, round(width / f)), max(1, round(height / f))), down)
        return float(((a - np.asarray(small.resize((width, height), up), dtype=np.float32)) ** 2).mean()) / variance

    found = 1
    for f, limit in ENLARGED_LOSS.items():  # a smooth enlargement passes every factor up to its own
        if min(width, height) / f < 8 or loss(f, R.LANCZOS, R.LANCZOS) > limit:
            break
        found = f
    for f in (2, 4, 8):  # a blocky one passes 2, 4, 8 up to its own (x8 is also x4 and x2)
        if f <= found or width % f or height % f:
            continue
        if loss(f, R.BOX, R.NEAREST) > ENLARGED_LOSS[f]:
            break
        found = f
    return found


def _sharpness(a: np.ndarray, variance: float) -> float:
    """Variance of the Laplacian over the picture's variance: high for crisp edges and texture, independent of
    contrast (a pale picture is not a blurry one)."""
    if variance < 1.0 or min(a.shape) < 3:
        return math.nan
    laplacian = 4 * a[1:-1, 1:-1] - a[:-2, 1:-1] - a[2:, 1:-1] - a[1:-1, :-2] - a[1:-1, 2:]
    return float(laplacian.var()) / variance


# ---- the checks ----------------------------------------------------------------------------------------------------

def _some(names: list[str], limit: int = 5) -> str:
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _duplicates(pictures: list[_Picture]) -> list[Finding]:
    """Same pixels (one digest), then nearly the same (close hashes and colours), each group one finding. Hashes are
    compared all pairs at once: 500 pictures are 125,000 pairs, a few milliseconds. Only pictures whose hash and
    thumbnail match another's are read whole for the digest."""
    out = []
    by_digest: dict[str, list[str]] = {}
    by_look: dict[bytes, list[_Picture]] = {}
    for p in pictures:
        by_look.setdefault(p.phash.tobytes() + p.thumb.tobytes() + bytes(str(p.size), "ascii"), []).append(p)
    digest_of = {}
    for same in by_look.values():
        for p in same:
            digest_of[p.name] = p.name if len(same) == 1 else \
                hashlib.blake2b(p.image.tobytes(), digest_size=16).hexdigest()
            by_digest.setdefault(digest_of[p.name], []).append(p.name)
    for names in by_digest.values():
        if len(names) > 1:
            out.append(Finding("duplicate", "warning", names, f"same picture: {' = '.join(names)}",
                               "remove the copies: each one trains the picture again"))
    firsts = [p for p in pictures if by_digest[digest_of[p.name]][0] == p.name]
    if len(firsts) < 2:
        return out
    hashes = np.packbits(np.stack([p.phash for p in firsts]), axis=1)  # 8 bytes each
    bits = _BITS[hashes[:, None, :] ^ hashes[None, :, :]].sum(-1, dtype=np.int32)
    close = np.zeros_like(bits, dtype=bool)
    for i, j in zip(*np.nonzero(np.triu(bits <= NEAR_BITS, 1))):  # colours only for the few pairs close in layout
        close[i, j] = np.abs(firsts[i].thumb - firsts[j].thumb).mean(-1).max() <= COLOUR_LEVELS  # worst cell
    group = list(range(len(firsts)))  # union-find over close pairs

    def root(i):
        while group[i] != i:
            group[i] = group[group[i]]
            i = group[i]
        return i
    for i, j in zip(*np.nonzero(close)):
        group[root(i)] = root(j)
    groups: dict[int, list[str]] = {}
    for i, p in enumerate(firsts):
        groups.setdefault(root(i), []).append(p.name)
    for names in groups.values():
        if len(names) > 1:
            out.append(Finding("near-duplicate", "warning", names, f"nearly the same picture: {', '.join(names)}",
                               "keep the best one, unless they differ on purpose (pose, expression)"))
    return out


def _sizes(pictures: list[_Picture], buckets, resolution: int) -> list[Finding]:
    """Pictures enlarged to fill their bucket, pictures enlarged before they came (less detail than the training
    resolution), and pictures the bucket's crop cuts much of or that are very wide or tall."""
    small, enlarged, cropped, wide = [], [], [], []
    for p in pictures:
        width, height = p.size
        bucket = ds.nearest_bucket(width, height, buckets)
        scale = max(bucket[0] / width, bucket[1] / height)
        if scale > 1.05:
            small.append(f"{p.name} ({width}x{height}, x{scale:.1f})")
        if p.enlarged > 1 and min(p.detail) < resolution:
            enlarged.append(f"{p.name} (about x{p.enlarged}, detail of {p.detail[0]}x{p.detail[1]})")
        cut = 1 - bucket[0] * bucket[1] / (width * scale * height * scale)
        ratio = max(width / height, height / width)
        where = f"{p.name} ({width}x{height} -> {bucket[0]}x{bucket[1]}"
        if cut >= CROP_SHARE:
            side = "width" if width / height > bucket[0] / bucket[1] else "height"
            cropped.append(f"{where}, {cut:.0%} of its {side} cut)")
        elif ratio >= WIDE_RATIO:
            wide.append(f"{where})")
    out = []
    name = lambda text: text.split(" (")[0]  # noqa: E731 - the file name of an entry above
    if small:
        out.append(Finding("small", "warning", [name(s) for s in small],
                           f"{len(small)} picture(s) smaller than the {resolution} px training size, enlarged: "
                           f"{_some(small)}", "use larger originals, or train at a lower resolution"))
    if enlarged:
        out.append(Finding("enlarged", "warning", [name(s) for s in enlarged],
                           f"{len(enlarged)} picture(s) look enlarged from a smaller one: {_some(enlarged)}",
                           "the LoRA learns their softness; use the originals, or leave these out"))
    if cropped:
        out.append(Finding("crop", "warning", [name(s) for s in cropped],
                           f"{len(cropped)} picture(s) lose much to the crop: {_some(cropped)}",
                           "crop them yourself so that what matters stays in"))
    if wide:
        out.append(Finding("aspect", "info", [name(s) for s in wide],
                           f"{len(wide)} very wide or tall picture(s), trained at a narrow size: {_some(wide)}",
                           "fine for scenes; a subject in them is small"))
    return out


def _blur(pictures: list[_Picture]) -> list[Finding]:
    """Pictures much blurrier than the dataset's median. Enlarged pictures are said as such, not again here."""
    sharp = [(p.name, p.sharpness) for p in pictures if not math.isnan(p.sharpness)]
    if len(sharp) < 4:  # a median of fewer says little about "the rest"
        return []
    median = float(np.median([s for _, s in sharp]))
    enlarged = {p.name for p in pictures if p.enlarged > 1}
    blurry = [f"{n} ({s / median:.0%} of the median sharpness)" for n, s in sharp
              if s <= BLUR_SHARE * median and n not in enlarged]
    if not blurry:
        return []
    return [Finding("blur", "warning", [b.split(" (")[0] for b in blurry],
                    f"{len(blurry)} picture(s) much blurrier than the rest: {_some(blurry)}",
                    "the LoRA learns blur as part of the look; replace or leave them out")]


def _has_word(caption: str, word: str) -> bool:
    return re.search(rf"(?<!\w){re.escape(word)}(?!\w)", caption, re.IGNORECASE) is not None


def _captions(records, trigger: str, tokenizer) -> list[Finding]:
    """The trigger word (missing from some captions, or from all), tags on every picture, captions cut at the text
    encoder's length."""
    out = []
    captions = [r.caption for r in records]
    names = [r.name for r in records]
    first = ds.common_first_word(captions)
    trigger = trigger.strip()
    if trigger:
        missing = [n for n, c in zip(names, captions) if not _has_word(c, trigger)]
        if len(missing) == len(records) and first and first != trigger.lower():
            out.append(Finding("trigger", "warning", missing,
                               f"no caption has the trigger '{trigger}'; most start with '{first}'",
                               f"use '{first}' as the trigger, or training puts '{trigger}' first in every caption"))
        elif len(missing) == len(records):
            out.append(Finding("trigger", "info", missing, f"no caption has the trigger '{trigger}'",
                               "training puts it first in every caption"))
        elif missing:
            out.append(Finding("trigger", "info", missing,
                               f"{len(missing)} caption(s) lack the trigger '{trigger}': {_some(missing)}",
                               "training puts it first in these"))
    elif first is None:
        out.append(Finding("trigger", "warning", [], ds.NO_TRIGGER))  # it says what to do
    else:
        missing = [n for n, c in zip(names, captions) if (ds.split_tags(c) or [""])[0].lower() != first]
        if missing:
            out.append(Finding("trigger", "warning", missing,
                               f"{len(missing)} caption(s) do not start with '{first}' as the others do: "
                               f"{_some(missing)}", f"add it, or set the trigger word to '{first}'"))
    out += _tags(records, {trigger.lower(), first or ""})
    counts = _token_counts(tokenizer, captions)
    limit = tokenizer.model_max_length
    long = [f"{n} ({c - 2})" for n, c in zip(names, counts) if c > limit]
    if long:
        out.append(Finding("long-caption", "warning", [s.split(" (")[0] for s in long],
                           f"{len(long)} caption(s) longer than {limit - 2} tokens, cut there: {_some(long)}",
                           f"shorten them: words past the {limit - 2}th token are never read"))
    return out


def _tags(records, leave_out: set[str]) -> list[Finding]:
    """For tag captions (most with three or more comma-separated tags): the most frequent tags, and those on every
    picture, which the LoRA ties to the trigger."""
    captioned = [r for r in records if r.captioned]
    tag_lists = [[t.lower() for t in ds.split_tags(r.caption)] for r in captioned]
    if len(captioned) < 3 or sum(len(t) >= 3 for t in tag_lists) * 2 < len(tag_lists):
        return []
    counts: dict[str, int] = {}
    for tags in tag_lists:
        for tag in set(tags):
            counts[tag] = counts.get(tag, 0) + 1
    everywhere = sorted(t for t, c in counts.items() if c == len(captioned) and t not in leave_out)
    common = sorted(((t, c) for t, c in counts.items() if t not in leave_out), key=lambda tc: (-tc[1], tc[0]))[:10]
    out = [Finding("tags", "info", [], "most frequent tags: " + ", ".join(f"{t} ({c})" for t, c in common),
                   "prune tags that name what the trigger should carry")]
    if everywhere:
        out.append(Finding("tag-everywhere", "warning", [], f"tags on every picture: {', '.join(everywhere)}; "
                           "the LoRA ties them to the trigger",
                           "remove those that describe the subject itself; keep those you want to prompt by name"))
    return out


def _rounds(records, pictures, buckets, steps: int, batch_size: int, grad_accum: int) -> Finding:
    """How many rounds (epochs) `steps` of `grad_accum` batches of `batch_size` make, and how often each picture is
    seen, counting repeat folders and the short batches a bucket's last pictures make (as training forms them)."""
    bucket_of = [ds.nearest_bucket(*p.size, buckets) for p in pictures]
    samples = ds.expand_repeats(records)
    batches = len(ds.epoch_batches([bucket_of[i] for i in samples], batch_size, random.Random(0)))
    rounds = steps * grad_accum / batches
    per_step = batch_size * grad_accum
    repeats = sorted({r.repeats for r in records})
    seen = {n: rounds * n for n in repeats}
    times = ", ".join(f"{seen[n]:.0f} times" + ((f" ({n} repeats)" if n > 1 else " (no repeat folder)")
                                                 if len(repeats) > 1 else "") for n in repeats)
    message = (f"{steps} steps of {per_step} pictures: {rounds:.1f} rounds of {len(samples)} pictures "
               f"({batches} batches a round); each picture is seen about {times}")
    low, high = min(seen.values()), max(seen.values())
    if low < SEEN_FEW:
        return Finding("rounds", "warning", [], message,
                       f"likely too few to learn much: about {math.ceil(steps * SEEN_TYPICAL / low)} steps would "
                       f"show each picture {SEEN_TYPICAL} times")
    if high > SEEN_MANY:
        return Finding("rounds", "warning", [], message,
                       f"likely to overtrain: about {max(1, steps * SEEN_TYPICAL // math.ceil(high))} steps would show "
                       f"each picture {SEEN_TYPICAL} times; or compare the saves")
    return Finding("rounds", "info", [], message, "")
