"""Draft the captions of a dataset folder: the pictures to caption, the captioner over them in batches, each draft
finished (trigger, prefix, suffix, dropped tags) and written as NAME.txt beside its picture, or only reported for
review; progress as events in a job folder, which the app follows (`sdlora caption --job-dir`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from sdlora import dataset as ds
from sdlora import examples
from sdlora.atomic import write_atomic
from sdlora.caption import CHARACTER_THRESHOLD, GENERAL_THRESHOLD, finish, open_captioner
from sdlora.errors import UserError
from sdlora.rundir import EventLog


@dataclass
class Draft:
    """One picture's draft: its file in the dataset, the caption drafted (finished), the caption it had ('' none),
    and whether the draft was written."""
    file: str
    caption: str
    old: str
    written: bool


def run(dataset, captioner: str, *, job_dir=None, general_threshold: float = GENERAL_THRESHOLD,
        character_threshold: float = CHARACTER_THRESHOLD, batch_size: int = 0, say=None, **options) -> list[Draft]:
    """Open `captioner` (a name, hub id or folder: sdlora.caption.open_captioner) and `draft` the captions of
    `dataset`. With `job_dir`, its events.jsonl says how it goes: `start`, `progress` (done of total pictures), a
    `caption` per picture, then `done`, or `error` with the one-line message (which is raised too)."""
    events = EventLog(job_dir) if job_dir else None
    if events:
        Path(job_dir).mkdir(parents=True, exist_ok=True)
        events.emit("start", dataset=str(dataset), captioner=captioner)
    try:
        _writable(dataset, options.get("write", True))  # said before a model loads for minutes
        opened = open_captioner(captioner, general_threshold=general_threshold,
                                character_threshold=character_threshold, batch_size=batch_size)
        return draft(dataset, opened, events=events, say=say, **options)
    except Exception as error:
        if events:
            events.emit("error", message=str(error))
        raise


def draft(dataset, captioner, *, mode: str | None = None, overwrite: bool = False, write: bool = True,
          trigger: str = "", prefix: str = "", suffix: str = "", drop_tags=(), events: EventLog | None = None,
          say=None) -> list[Draft]:
    """Caption the pictures of the folder `dataset` that have no caption (all of them with `overwrite`) with
    `captioner` (an opened one), in `mode` (sentence or tags; None: the captioner's own), each finished by
    sdlora.caption.finish. `write`: write NAME.txt beside each picture; otherwise only return the drafts. `say`
    gets a line per picture (`[3/20] NAME: caption`) and per note."""
    mode = mode or captioner.modes[0]
    if mode not in captioner.modes:
        raise UserError(f"{captioner.name} writes {' or '.join(captioner.modes)}, not {mode}",
                        f"use --mode {captioner.modes[0]}, or a " + ("tagger for tags" if mode == "tags" else
                                                                     "captioner that writes sentences"))
    folder = _writable(dataset, write)
    data = ds.ingest(folder)
    todo = [r for r in data.records if overwrite or not r.captioned]
    for warning in _warnings(folder, data, overwrite):
        if events:
            events.emit("warning", message=warning)
        if say:
            say(f"note: {warning}")
    if events:
        events.emit("progress", done=0, total=len(todo), skipped=len(data.records) - len(todo))
    drafts = []
    for start in range(0, len(todo), captioner.batch_size):
        batch = todo[start:start + captioner.batch_size]
        for record, text in zip(batch, captioner.caption([r.image for r in batch], mode)):
            caption = finish(text, trigger=trigger, prefix=prefix, suffix=suffix, drop_tags=drop_tags)
            old = record.caption if record.captioned else ""
            if write:
                write_atomic((folder / record.name).with_suffix(".txt"), caption + "\n")
            drafts.append(Draft(record.name, caption, old, write))
            if events:
                events.emit("caption", file=record.name, caption=caption, old=old)
            if say:
                say(f"[{len(drafts)}/{len(todo)}] {record.name}: {caption}")
        if events:
            events.emit("progress", done=len(drafts), total=len(todo), skipped=len(data.records) - len(todo))
    if events:
        events.emit("done", drafted=len(drafts), written=sum(d.written for d in drafts),
                    skipped=len(data.records) - len(todo))
    return drafts


def _writable(dataset, write: bool) -> Path:
    """The dataset's folder; a UserError where captions can't be written into it (a .zip, a shipped example)."""
    folder = examples.locate(dataset)
    if write and isinstance(dataset, str) and dataset.startswith(examples.PREFIX):
        raise UserError("the example datasets that ship with sdlora are not changed",
                        "add --dry-run to see the drafts, or copy the folder and caption the copy")
    if not folder.is_dir():
        raise UserError(f"captions are written beside the pictures: {folder} is not a folder",
                        "unpack the .zip and caption the folder")
    return folder


def _warnings(folder: Path, data, overwrite: bool) -> list[str]:
    out = [f"skipped {name}: {why}" for name, why in data.rejected]
    if overwrite and (folder / ds.METADATA_FILE).is_file():
        out.append(f"{ds.METADATA_FILE} captions are read before .txt files: a draft does not replace them there")
    return out
