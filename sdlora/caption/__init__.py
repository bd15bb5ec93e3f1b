"""Draft captions with a captioner: which captioner a name means (the tiny world's describer, a WD14-style ONNX
tagger, a transformers image-to-text model such as Florence-2 or BLIP) and the caption a draft becomes (trigger
first, prefix, suffix, tags dropped).

    >>> captioner = open_captioner("tiny-world")
    >>> finish(captioner.caption([image], "sentence")[0], trigger="zqchar")
    'zqchar, a small red star at the top left on a blue background'

Models load from a folder or from the Hugging Face cache, never from the network (`sdlora.caption.job` runs one over
a dataset).
"""

from __future__ import annotations

import re
from pathlib import Path

from sdlora.errors import UserError

TINY_WORLD = "tiny-world"
MODES = ("sentence", "tags")
# Short names for well-known captioners, as hub ids (downloaded once, then read from the cache).
KNOWN = {
    "florence2": "florence-community/Florence-2-base",
    "blip": "Salesforce/blip-image-captioning-base",
    "wd14": "SmilingWolf/wd-vit-tagger-v3",
}
GENERAL_THRESHOLD, CHARACTER_THRESHOLD = 0.35, 0.85  # what users of SmilingWolf's taggers settle on
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_HINT = f"give {TINY_WORLD}, {', '.join(KNOWN)}, a hub id such as {KNOWN['florence2']} or a folder holding a model"


def open_captioner(spec: str, *, general_threshold: float = GENERAL_THRESHOLD,
                   character_threshold: float = CHARACTER_THRESHOLD, batch_size: int = 0):
    """The captioner `spec` names: `tiny-world`, a short name of KNOWN, a hub id in the local cache or a folder
    (a WD14-style tagger: an .onnx file and selected_tags.csv; a transformers model: config.json and its processor).

    It has `name`, `modes` (what it writes; the first is its own), `batch_size` and `caption(images, mode)`, which
    returns one draft per PIL image. `batch_size` 0: the backend's default for the device. Thresholds apply to
    taggers. Raises UserError for an unknown name, a model not in the cache, or a folder holding no captioner.
    """
    spec = (spec or "").strip()
    if spec == TINY_WORLD:
        from sdlora.caption.describer import Describer

        return Describer()
    folder = locate(spec)
    if (folder / "selected_tags.csv").is_file():
        from sdlora.caption.tagger import Tagger

        return Tagger(folder, spec, general_threshold=general_threshold, character_threshold=character_threshold,
                      batch_size=batch_size)
    if (folder / "config.json").is_file():
        from sdlora.caption.image_to_text import ImageToText

        return ImageToText(folder, spec, batch_size=batch_size)
    raise UserError(f"{spec} holds no captioner", "a tagger folder holds model.onnx and selected_tags.csv; a "
                    "transformers model config.json, its weights and its processor")


def locate(spec: str) -> Path:
    """The folder of captioner `spec` (a folder, a hub id or a short name): a folder as is, a hub id's snapshot in
    the local Hugging Face cache. Nothing is downloaded."""
    repo = KNOWN.get(spec, spec)
    path = Path(repo).expanduser()
    if path.is_dir():
        return path
    if not _HUB_ID.match(repo) or path.exists():
        raise UserError(f"no captioner {spec!r}", _HINT)
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo, local_files_only=True))
    except Exception:  # not in the cache (huggingface_hub says so in several ways)
        raise UserError(f"captioner {repo} is not downloaded",
                        f"download it once where there is a network (hf download {repo}), or give its folder") \
            from None


def finish(draft: str, *, trigger: str = "", prefix: str = "", suffix: str = "", drop_tags=()) -> str:
    """The caption a draft becomes: the `trigger` first, then `prefix`, the draft without the comma-separated parts
    named in `drop_tags` (compared ignoring case, underscores and the trigger itself), then `suffix`."""
    from sdlora import tags  # sdlora.dataset's imports stay out of the command line's start-up

    dropped = {tags.same(t) for t in drop_tags} | {tags.same(trigger)}
    kept = ", ".join(part for part in tags.parse(draft) if tags.same(part) not in dropped)
    return ", ".join(p for p in (trigger.strip(), prefix.strip(), kept, suffix.strip()) if p)
