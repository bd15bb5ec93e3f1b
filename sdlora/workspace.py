"""The app's workspace on disk: datasets and their captions, safe uploads, runs, and the base models on offer.

```
WORKSPACE/
  datasets/<name>/   images (PNG, as ingest normalised them) with same-name .txt captions and NAME_mask.png loss
                     masks (from uploaded mask files or the pictures' transparency); "N_name" folders repeat
  runs/<name>/       run directories (config.json, events.jsonl, samples/, checkpoints/, the LoRA files)
  exports/<run>/     files made for download
  captions/<name>/   the last caption-drafting job of dataset <name> (events.jsonl with its drafts, pid, log.txt)
  loras/<name>.safetensors   LoRA files uploaded to stack with others in previews
```
Every name that arrives from a form is reduced to a slug and every path is resolved under the workspace, so no
field can make the app read or write somewhere else.
"""

from __future__ import annotations

import functools
import glob
import json
import os
import re
import shutil
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from PIL import Image

from sdlora import dataset as ds
from sdlora import rundir
from sdlora.atomic import atomic_path, write_atomic
from sdlora.errors import UserError

MAX_UNPACKED = 2 * 1024**3  # what an uploaded .zip may hold once unpacked
_BATCH = 16  # uploaded pictures checked at a time
_REPEATS_FOLDER = re.compile(r"^(\d+)_(.+)$")  # kohya's "10_name": as sdlora.dataset reads it
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_MODEL_FILES = (".safetensors", ".ckpt")


def slug(text: str, fallback: str = "untitled") -> str:
    """A safe file or folder name: letters, digits, `-`, `_` and inner dots; never empty, `.` or `..`."""
    text = re.sub(r"[^A-Za-z0-9._-]+", "-", str(text).strip()).strip(".-")[:64].strip(".-")
    return text or fallback


def inside(root: str | Path, *parts: str) -> Path:
    """`root/parts...` resolved, refusing anything that would not land exactly that deep below `root`: `..`, `.`,
    absolute parts, links that lead out or up. So a name from a form can never mean `root` itself or a folder above
    the one it names (an export named `..` must not be the whole workspace)."""
    root = Path(root).resolve()
    names = [name for part in parts for name in str(part).replace("\\", "/").split("/")]
    path = root.joinpath(*names).resolve()
    if not names or any(n in ("", ".", "..") for n in names) or root not in path.parents \
            or len(path.relative_to(root).parts) < len(names):
        raise UserError(f"{'/'.join(map(str, parts))!r} is outside the workspace", "pick a name from the list")
    return path


def _named(root: str | Path, kind: str, name: str) -> Path:
    if not name or slug(name) != name:
        raise UserError(f"{name!r} is not a valid {kind[:-1]} name", "use letters, digits, '-' and '_' only")
    return inside(Path(root) / kind, name)


# ---- datasets ------------------------------------------------------------------------------------------------

def dataset_names(root: str | Path) -> list[str]:
    """Datasets saved in the workspace, by name."""
    folder = Path(root) / "datasets"
    return sorted(p.name for p in folder.iterdir() if p.is_dir() and slug(p.name) == p.name) if folder.is_dir() else []


def dataset_dir(root: str | Path, name: str) -> Path:
    """The folder of dataset `name` (it may not exist yet); UserError for a name that is not a plain slug."""
    return _named(root, "datasets", name)


@dataclass
class Added:
    """What an upload put into a dataset."""
    saved: list[str] = field(default_factory=list)
    rejected: list[tuple[str, str]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    written: set[str] = field(default_factory=set, repr=False)  # `saved` as a set, to look names up in


def add_files(root: str | Path, name: str, files: list[str], *, max_unpacked: int = MAX_UNPACKED) -> Added:
    """Check uploaded images, captions and .zip archives with `sdlora.dataset.ingest` and save what it accepted
    (images as PNG, captions as .txt) into dataset `name`. Nothing is unpacked: only accepted records are written.
    Every archive is checked before anything is written, so a refused upload leaves the dataset as it was.

    No picture overwrites another: one whose name is taken, by another picture of this upload or by a different
    picture in the dataset, is saved as NAME-2.png (NAME-3.png...) with its caption beside it, and a warning says
    so. The same picture uploaded again replaces itself, so re-uploading it with a fixed caption updates the caption.
    A caption goes with every picture of exactly its stem, as ingest pairs them: a.txt captions a.png and a.jpg; so
    does a mask file (a_mask.png). A picture's transparency is saved as its mask (pictures are saved without it)."""
    dest = dataset_dir(root, name)
    paths = [Path(f) for f in files]
    archives = [f for f in paths if f.suffix.lower() == ".zip"]
    for archive in archives:
        check_zip(archive, max_unpacked)
    added = Added()
    groups: dict[str, list[Path]] = {}  # stem as uploaded -> its files
    for f in paths:
        if f.suffix.lower() == ".zip":
            continue
        if f.is_symlink() or not f.is_file():
            added.rejected.append((f.name, "not a regular file"))
        else:  # a mask joins its picture's stem
            groups.setdefault(ds.mask_stem(f.name) if ds.is_mask(f.name) else f.stem, []).append(f)
    units = []  # (stem, [one picture, the captions of its stem, other files of its stem (with the first only)])
    for stem, group in groups.items():
        pictures = [f for f in group if f.suffix.lower() in ds.IMAGE_EXTS and not ds.is_mask(f.name)]
        if not pictures:
            added.rejected += [(f.name, "no picture with the same name in this upload") for f in group]
        texts = [f for f in group if f.suffix.lower() in ds.CAPTION_EXTS or ds.is_mask(f.name)]
        others = [f for f in group if f not in pictures and f not in texts]
        units += [(stem, [picture, *texts, *(others if i == 0 else [])]) for i, picture in enumerate(pictures)]
    for batch in _batches(units):  # a few at a time: ingest holds every decoded picture in memory
        _add_loose(dest, batch, added)
    for archive in archives:
        data = _ingest(archive, added)
        for record in _in_write_order(data.records):
            _write_record(dest, record, added)
    return added


def _staged(f: Path) -> str:
    """The name a loose file is checked under: its own, less leading dots (ingest skips hidden files)."""
    return f.name.lstrip(".") or "file"


def _batches(units: list) -> list[list]:
    """Units in order, at most _BATCH to a batch, never two in one batch whose staged files would clash: the same
    picture name twice, or one stem for two stems as uploaded (".a.png" and "a.png" are both checked as a.png)."""
    batches: list[list] = []
    for stem, files in units:
        picture = _staged(files[0])
        key = PurePosixPath(picture).stem
        batch = batches[-1] if batches else []
        names = {_staged(f[0]) for _, f in batch}
        stems = {PurePosixPath(_staged(f[0])).stem: s for s, f in batch}
        if not batch or len(batch) >= _BATCH or picture in names or stems.get(key, stem) != stem:
            batch = []
            batches.append(batch)
        batch.append((stem, files))
    return batches


def _add_loose(dest: Path, units: list, added: Added) -> None:
    """Check and save some pictures, each with its caption; when all of them fail, go one by one for the reasons."""
    shown = {}  # staged name -> the name it was uploaded as
    with tempfile.TemporaryDirectory() as staging:
        for _, files in units:
            for f in files:
                shutil.copyfile(f, Path(staging) / _staged(f))
                shown[_staged(f)] = f.name
        try:
            data = ds.ingest(staging, alpha_mask=True)
        except UserError as e:
            if len(units) > 1:
                for unit in units:
                    _add_loose(dest, [unit], added)
            else:  # ingest names the one picture and the reason in the hint: "a.png: not an image"
                picture = units[0][1][0]
                prefix = f"{_staged(picture)}: "
                added.rejected.append((picture.name, e.hint[len(prefix):] if e.hint.startswith(prefix) else e.message))
            return
        for file, why in data.rejected:
            if (shown.get(file, file), why) not in added.rejected:  # a caption shared by a.png and a.jpg: once
                added.rejected.append((shown.get(file, file), why))
        added.warnings += data.warnings
        for record in _in_write_order(data.records):
            _write_record(dest, record, added, shown.get(record.name, record.name))


def _ingest(source, added: Added) -> ds.Ingested:
    data = ds.ingest(source, alpha_mask=True)
    added.rejected += data.rejected
    added.warnings += data.warnings
    return data


def _saved_name(name: str) -> str:
    """Where a record is saved in the dataset (before any -2): "10 cats/My cat.jpg" -> "10-cats/My-cat.png"."""
    path = PurePosixPath(name)
    return "/".join([slug(p, "folder") for p in path.parent.parts] + [slug(path.stem, "image") + ".png"])


def _in_write_order(records: list[ds.Record]) -> list[ds.Record]:
    """Pictures already named as they will be saved first, so x-y.png keeps its name and "x y.png" becomes x-y-2.png."""
    return sorted(records, key=lambda record: _saved_name(record.name) != record.name)


def _write_record(dest: Path, record: ds.Record, added: Added, shown: str | None = None) -> None:
    """Save one picture as PNG with its caption as .txt, under a name no other picture has (see `add_files`)."""
    target = PurePosixPath(_saved_name(record.name))
    for n in range(1, 100_000):
        image_path = inside(dest, *target.parent.parts, (target.stem if n == 1 else f"{target.stem}-{n}") + ".png")
        rel = image_path.relative_to(dest).as_posix()
        # NAME.*: any picture of that stem would share the caption NAME.txt; a free NAME-n has no file at all.
        same_stem = [p for p in image_path.parent.glob(glob.escape(image_path.stem) + ".*")
                     if p.stem == image_path.stem and (n > 1 or p.suffix.lower() in ds.IMAGE_EXTS)]
        if not same_stem or (n == 1 and same_stem == [image_path] and rel not in added.written
                             and _same_picture(image_path, record.image)):
            break
    else:
        raise UserError(f"too many pictures named {target}", "rename the pictures before uploading them")
    image_path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(image_path) as tmp:  # NAME.png.tmp: never read as a picture
        record.image.save(tmp, format="PNG")
    if record.captioned:
        write_atomic(image_path.with_suffix(".txt"), record.caption + "\n")
    if record.mask is not None:
        with atomic_path(image_path.with_name(image_path.stem + ds.MASK_SUFFIX + ".png")) as tmp:
            record.mask.save(tmp, format="PNG")
    added.saved.append(rel)
    added.written.add(rel)
    if n > 1:
        added.warnings.append(f"{shown or record.name} saved as {rel}: the name was taken")


def _same_picture(path: Path, image: Image.Image) -> bool:
    """Whether the PNG at `path` holds exactly these pixels (a picture saved from the same upload before)."""
    try:
        with Image.open(path) as old:
            return old.size == image.size and old.convert("RGB").tobytes() == image.tobytes()
    except Exception:  # unreadable: not the same picture
        return False


def check_zip(path: str | Path, max_unpacked: int = MAX_UNPACKED) -> None:
    """Refuse an upload that is not a readable archive, or one `sdlora.dataset.check_zip` refuses (links, too many
    files, more than `max_unpacked` bytes once unpacked)."""
    name = Path(path).name
    try:
        with zipfile.ZipFile(path) as archive:
            infos = archive.infolist()
    except (zipfile.BadZipFile, OSError):
        raise UserError(f"{name} is not a readable .zip archive",
                        "make the archive again, or upload the images themselves") from None
    ds.check_zip(name, infos, max_unpacked, too_big_hint="upload fewer or smaller images at a time")


def copy_example(root: str | Path, example: str | Path) -> str:
    """Copy a bundled example dataset (a folder of images and captions) into the workspace; returns its name."""
    example = Path(example)
    name = slug(example.name + "-example")
    dest = dataset_dir(root, name)
    if not dest.exists():
        shutil.copytree(example, dest, ignore=shutil.ignore_patterns(".*"), symlinks=False)
    return name


def _images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in ds.IMAGE_EXTS and not ds.is_mask(p.name)
                  and p.is_file()
                  and not p.is_symlink() and not any(part.startswith(".") for part in p.relative_to(folder).parts))


def captions(root: str | Path, name: str) -> list[tuple[str, Path, str]]:
    """(file name in the dataset, image path, caption) for every image of dataset `name`."""
    return folder_captions(dataset_dir(root, name))


def folder_captions(folder: Path) -> list[tuple[str, Path, str]]:
    """(file name in the folder, image path, caption) for every image in a dataset folder."""
    if not folder.is_dir():
        return []
    out = []
    for image in _images(folder):
        caption = ds.read_caption_file(image.with_suffix(".txt"), folder)  # as training will read it, or ''
        out.append((image.relative_to(folder).as_posix(), image, caption))
    return out


def mask_file(image: Path) -> Path | None:
    """The loss mask training pairs with picture `image` (NAME_mask.png beside NAME.png), or None."""
    found = sorted(p for p in image.parent.glob(glob.escape(image.stem) + "_*")
                   if ds.is_mask(p.name) and ds.mask_stem(p.name) == image.stem and p.is_file())
    return found[0] if found else None


def set_caption(root: str | Path, name: str, file: str, caption: str) -> None:
    """Write one image's caption (an empty caption removes the .txt, so the run's caption template applies)."""
    write_caption(dataset_dir(root, name), file, caption, name)


def write_caption(folder: Path, file: str, caption: str, name: str = "") -> None:
    """Write the caption of picture `file` of a dataset folder (empty: remove its .txt)."""
    image = inside(folder, file)
    if image.suffix.lower() not in ds.IMAGE_EXTS or not image.is_file():
        raise UserError(f"no image {file!r} in dataset {name or folder}", "click an image in the gallery first")
    txt = image.with_suffix(".txt")
    caption = " ".join(caption.split())
    if caption:
        write_atomic(txt, caption + "\n")
    else:
        txt.unlink(missing_ok=True)


def edit_captions(root: str | Path, name: str, *, trigger: str = "", prefix: str = "", suffix: str = "",
                  find: str = "", replace: str = "") -> int:
    """Change every caption of a dataset at once: find/replace, then prefix and suffix, then put the trigger word
    first where a caption lacks it. Returns how many captions changed."""
    changed = 0
    for file, _, old in captions(root, name):
        new = old.replace(find, replace) if find else old
        if prefix:
            new = f"{prefix.strip()} {new}".strip() if new else prefix.strip()
        if suffix:
            new = f"{new} {suffix.strip()}".strip()
        word = trigger.strip()
        if word and not re.search(rf"(?<!\w){re.escape(word)}(?!\w)", new):  # as ingest adds a trigger
            new = f"{word}, {new}" if new else word
        if " ".join(new.split()) != old:
            set_caption(root, name, file, new)
            changed += 1
    return changed


def remove_image(root: str | Path, name: str, file: str) -> None:
    """Delete one image, its caption and its mask from a dataset."""
    image = inside(dataset_dir(root, name), file)
    if image.suffix.lower() not in ds.IMAGE_EXTS or not image.is_file():
        raise UserError(f"no image {file!r} in dataset {name}", "click an image in the gallery first")
    mask = mask_file(image)
    image.unlink()
    image.with_suffix(".txt").unlink(missing_ok=True)
    if mask is not None:
        mask.unlink()


def dataset_counts(root: str | Path, name: str) -> tuple[int, int, int]:
    """(images, captioned images, images per epoch counting "N_name" folder repeats) of a saved dataset."""
    items = captions(root, name)
    per_epoch = 0
    for file, _, _ in items:
        repeats = 1
        for folder in reversed(PurePosixPath(file).parts[:-1]):
            match = _REPEATS_FOLDER.match(folder)
            if match and int(match.group(1)) > 0:
                repeats = int(match.group(1))
                break
        per_epoch += repeats
    return len(items), sum(1 for _, _, c in items if c), per_epoch


def caption_job_dir(root: str | Path, name: str) -> Path:
    """The folder of dataset `name`'s caption-drafting job (it may not exist yet)."""
    return _named(root, "captions", name)


def captioners(models_dir: str | Path | None) -> list[tuple[str, str]]:
    """(label, value) of the captioners on offer: the tiny world's describer, captioner folders under `models_dir`
    and captioners already in the Hugging Face cache (a WD14-style tagger, or a model sdlora.caption runs)."""
    from sdlora.caption import TINY_WORLD

    found = [("tiny-world (built in, for the example pictures)", TINY_WORLD)]
    if models_dir and Path(models_dir).is_dir():
        for folder in sorted(p for p in Path(models_dir).iterdir() if p.is_dir() and not p.name.startswith(".")):
            if _captioner_files({f.name: f for f in folder.iterdir()}):
                found.append((f"{folder.name} (folder)", folder.name))
    try:
        from huggingface_hub import scan_cache_dir

        repos = [r for r in scan_cache_dir().repos if r.repo_type == "model"]
    except Exception:
        repos = []
    for repo in sorted(repos, key=lambda r: r.repo_id):
        if _captioner_files({f.file_name: f.file_path for rev in repo.revisions for f in rev.files}):
            found.append((f"{repo.repo_id} (downloaded)", repo.repo_id))
    return found


def _captioner_files(files: dict) -> bool:
    """Whether files (name -> path) are a tagger's or a captioning model's (config.json's model_type says)."""
    from sdlora.caption.image_to_text import PROMPTS

    if "selected_tags.csv" in files:
        return True
    try:
        return json.loads(Path(files["config.json"]).read_text()).get("model_type") in PROMPTS
    except (KeyError, OSError, ValueError, AttributeError):
        return False


def resolve_captioner(models_dir: str | Path | None, value: str) -> str:
    """The captioner a job gets for what the form holds: tiny-world or a short name, a folder under `models_dir`, or
    a hub id; never any other path."""
    from sdlora.caption import KNOWN, TINY_WORLD

    value = (value or "").strip()
    if value == TINY_WORLD or value in KNOWN:
        return value
    if models_dir and value and slug(value) == value and (Path(models_dir) / value).is_dir():
        return str(inside(models_dir, value))
    if _HUB_ID.match(value) and ".." not in value and not Path(value).exists():
        return value
    raise UserError(f"captioner {value!r} not found",
                    "pick one from the list, put a captioner folder into the models folder, or type a hub id")


# ---- runs ----------------------------------------------------------------------------------------------------

def export_dir(root: str | Path, run: str) -> Path:
    """The folder of run `run`'s downloads (it may not exist yet); UserError for a name that is not a plain slug."""
    return _named(root, "exports", run)


def run_dir(root: str | Path, name: str) -> Path:
    """The folder of run `name`; UserError for a name that is not a plain slug."""
    return _named(root, "runs", name)


def new_run_dir(root: str | Path, name: str) -> Path:
    """A fresh, empty run folder named after `name` (with -2, -3... when taken)."""
    base = slug(name, "run")
    for n in range(1, 10_000):
        path = run_dir(root, base if n == 1 else f"{base}-{n}")
        try:
            path.mkdir(parents=True)
            return path
        except FileExistsError:
            continue
    raise UserError(f"too many runs named {base}", "pick another run name")


def run_names(root: str | Path) -> list[str]:
    """Runs in the workspace, newest first (by when their config was written)."""
    found = rundir.list_runs(Path(root) / "runs")
    found.sort(key=lambda p: (p / "config.json").stat().st_mtime, reverse=True)
    return [p.name for p in found if slug(p.name) == p.name]


def running(root: str | Path) -> str | None:
    """The name of the run that is training now, if any."""
    for name in run_names(root):
        folder = Path(root) / "runs" / name
        if _alive(folder / "pid") and rundir.status(folder) == "running":
            return name
    return None


def _alive(pid_file: Path) -> bool:
    """Cheap first test: only a run whose process exists can be running."""
    try:
        os.kill(int(pid_file.read_text()), 0)
        return True
    except (OSError, ValueError):
        return False


def lora_files(root: str | Path, name: str) -> list[str]:
    """The run's adapter files, intermediate saves by step first, then the final `lora.safetensors`."""
    folder = run_dir(root, name)
    files = sorted(p.name for p in folder.glob("lora-step-*.safetensors"))
    return files + (["lora.safetensors"] if (folder / "lora.safetensors").is_file() else [])


def lora_file(root: str | Path, run: str, file: str) -> Path:
    """Path of one of the run's adapter files, refusing any other name."""
    if file not in lora_files(root, run):
        raise UserError(f"run {run} has no file {file!r}", "pick a file from the list")
    return run_dir(root, run) / file


def step_of(file: str) -> int | None:
    """12 for `lora-step-000012.safetensors`; None for the final file."""
    match = re.match(r"lora-step-(\d+)\.safetensors$", file)
    return int(match.group(1)) if match else None


def run_config(root: str | Path, name: str) -> dict:
    """The run's config.json as a dict; UserError when it is unreadable (the rest of the workspace still is)."""
    try:
        config = json.loads((run_dir(root, name) / "config.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        config = e
    if not isinstance(config, dict):
        raise UserError(f"run {name} has an unreadable config.json", "pick another run; its files are left as they are")
    return config


def measured_speed(root: str | Path, base: str, processes: int = 1) -> tuple[float, float, int] | None:
    """(images per second, seconds of setup, GPUs it ran on) of the newest run on `base` that got going, from its
    events; a run on `processes` GPUs is preferred to one on another number."""
    found = []
    for name in run_names(root):
        events = rundir.read_events(Path(root) / "runs" / name)
        start = next((e for e in events if e["type"] == "start"), None)
        progress = [e for e in events if e["type"] == "progress"]
        if not start or start["config"].get("base") != base or len(progress) < 2:
            continue
        seconds = progress[-1]["time"] - progress[0]["time"]
        images = (progress[-1]["step"] - progress[0]["step"]) * start["global_batch"]
        if seconds > 0 and images > 0:
            pid = Path(root) / "runs" / name / "pid"  # written when the process started: setup includes imports
            began = pid.stat().st_mtime if pid.exists() else start["time"]
            per_process = start.get("batch_per_gpu", 0) * start["config"].get("grad_accum", 1)
            ran_on = max(1, start["global_batch"] // per_process) if per_process else 1
            found.append((images / seconds, max(0.0, progress[0]["time"] - began), ran_on))
            if ran_on == processes:
                return found[-1]
    return found[0] if found else None


# ---- LoRAs to stack in previews -------------------------------------------------------------------------------

def add_lora(root: str | Path, path: str | Path, name: str | None = None) -> str:
    """Keep an uploaded LoRA file as `loras/<name>.safetensors` (a file of that name is replaced); its name."""
    path = Path(path)
    shown = name or path.name
    if path.suffix != ".safetensors":
        raise UserError(f"{shown} is not a .safetensors file", "upload a LoRA .safetensors file")
    try:
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            keys = list(f.keys())
    except Exception:
        raise UserError(f"{shown} is not a readable .safetensors file", "upload a LoRA .safetensors file") from None
    if not any("lora" in k for k in keys):
        raise UserError(f"{shown} holds no LoRA weights", "upload a LoRA file, not a base model")
    folder = inside(root, "loras")
    folder.mkdir(parents=True, exist_ok=True)
    stem = slug(Path(shown).stem, "lora")
    tmp = folder / f".{stem}.upload"
    shutil.copyfile(path, tmp)
    os.replace(tmp, folder / f"{stem}.safetensors")
    return f"{stem}.safetensors"


def uploaded_loras(root: str | Path) -> list[str]:
    """LoRA files kept under `loras/`, by name."""
    folder = Path(root) / "loras"
    return sorted(p.name for p in folder.glob("*.safetensors") if slug(p.name) == p.name) if folder.is_dir() else []


def stack_choices(root: str | Path) -> list[tuple[str, str]]:
    """(label, value) of every LoRA in the workspace that can be stacked: each run's files (newest run first, its
    final file first), then uploaded files. The value is the file's place in the workspace, `runs/RUN/FILE` or
    `loras/FILE`, which `stack_file` turns back into a path."""
    out = []
    for run in run_names(root):
        for file in reversed(lora_files(root, run)):
            out.append((f"{run} · {file}", f"runs/{run}/{file}"))
    out += [(f"uploaded · {name}", f"loras/{name}") for name in uploaded_loras(root)]
    return out


def stack_file(root: str | Path, value: str) -> Path:
    """The path of a `stack_choices` value, refusing anything else."""
    parts = str(value).split("/")
    if len(parts) == 3 and parts[0] == "runs":
        return lora_file(root, parts[1], parts[2])
    if len(parts) == 2 and parts[0] == "loras" and parts[1] in uploaded_loras(root):
        return inside(root, "loras", parts[1])
    raise UserError(f"{value!r} is not a LoRA in the workspace", "pick one from the list")


# ---- base models ---------------------------------------------------------------------------------------------

def base_models(models_dir: str | Path | None) -> list[tuple[str, str]]:
    """(label, value) of the bases on offer: the embedded tiny model, diffusers folders and checkpoint files under
    `models_dir` (links followed, so a folder of models kept elsewhere can be linked in), and diffusers models
    already in the Hugging Face cache. Each label names the model's family where its files tell it."""
    found = [("tiny (built in, for trying things out)", "tiny")]
    for value, where, kind in _bases_on_disk(models_dir):
        family = _remembered(_family, str(where))
        words = ", ".join(filter(None, [kind, family.label if family else ""]))
        found.append((f"{value} ({words})" if words else value, value))
    return found


def _bases_on_disk(models_dir: str | Path | None) -> list[tuple[str, Path | str, str]]:
    """(value, where it is, kind) of each base under `models_dir` and in the Hugging Face cache (base_models)."""
    found = []
    if models_dir and Path(models_dir).is_dir():
        root = Path(models_dir)
        for folder, subfolders, names in os.walk(root, followlinks=True):
            here = Path(folder)
            rel = here.relative_to(root)
            subfolders[:] = sorted(d for d in subfolders if not d.startswith(".")) if len(rel.parts) < 3 else []
            if "model_index.json" in names and rel.parts:
                found.append((rel.as_posix(), here, "folder"))
                subfolders[:] = []  # its unet/vae weights are parts, not checkpoints
                continue
            for name in sorted(names):
                path = here / name
                if path.suffix in _MODEL_FILES and not name.startswith(".") and not _is_lora(path):
                    found.append(((rel / name).as_posix(), path, ""))
    return found + [(repo, repo, "downloaded") for repo in _cached_hub_models()]


def base_family(base: str):
    """check.base_family of a base as a run gets it (resolve_base), or None where its files do not tell it without
    loading (a hub id not downloaded, a file that is no model)."""
    return _remembered(_family, base)


def base_resolution(base: str) -> int | None:
    """check.base_resolution of a base as a run gets it (resolve_base), or None where its files do not tell it."""
    return _remembered(_resolution, base)


def _remembered(ask, base: str):
    """ask(base), remembered for a file or folder until it changes (the list and the plan are made again and again)."""
    try:
        stat = Path(base).stat()
    except OSError:  # tiny or a hub id: cheap to ask again, and a download may have come since
        return ask(base)
    return _remembered_as_of(ask, base, stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=512)
def _remembered_as_of(ask, base: str, size: int, mtime: int):
    return ask(base)


def _family(base: str):
    from sdlora import check

    return _told(check.base_family, base)


def _resolution(base: str) -> int | None:
    from sdlora import check

    return _told(check.base_resolution, base)


def _told(ask, base: str):
    """ask(base) (a check.base_* function), or None where the files cannot tell it without loading the model: a .ckpt
    (read whole to be looked at: its family shows when a run loads it), a file that is no model."""
    if Path(base).suffix.lower() == ".ckpt":
        return None
    try:
        return ask(base)
    except UserError:
        return None


def _is_lora(path: Path) -> bool:
    if path.suffix != ".safetensors":
        return False
    try:
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            return any("lora" in k for k in list(f.keys())[:50])
    except Exception:
        return True  # not a readable checkpoint either: keep it off the list


def _cached_hub_models() -> list[str]:
    try:
        from huggingface_hub import scan_cache_dir

        info = scan_cache_dir()
    except Exception:
        return []
    out = []
    for repo in info.repos:
        files = {f.file_name for revision in repo.revisions for f in revision.files}
        if repo.repo_type == "model" and "model_index.json" in files:
            out.append(repo.repo_id)
    return sorted(out)


def resolve_base(models_dir: str | Path | None, value: str) -> str:
    """The `base` a run gets for what the form holds: 'tiny', one of the models listed under `models_dir`, or a hub
    id; never any other path."""
    value = (value or "").strip()
    if value == "tiny":
        return value
    if models_dir and (Path(models_dir) / value).exists() and value in {v for v, _, _ in _bases_on_disk(models_dir)}:
        return str(Path(models_dir) / value)
    if _HUB_ID.match(value) and ".." not in value and not Path(value).exists():
        return value
    raise UserError(f"base model {value!r} not found",
                    "pick one from the list, put a model into the models folder, or type a hub id like org/name")
