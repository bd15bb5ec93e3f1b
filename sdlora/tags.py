"""Tag edits across captions: count the tags, and remove, replace or add tags in every caption.

A caption's tags are its comma-separated parts (as caption shuffling splits them). Tags compare without regard to
case, repeated spaces or `_` against ` ` ("Blue_Hair" is "blue hair"); a tag is written as the user typed it.
Functions here only compute; the callers show the changes as a preview and write them when asked.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from sdlora.dataset import split_tags
from sdlora.errors import UserError


def same(tag: str) -> str:
    """The form two tags are compared in."""
    return " ".join(tag.replace("_", " ").lower().split())


def parse(text: str) -> tuple[str, ...]:
    """Comma-separated tags typed by a user, stripped, empty ones left out."""
    return tuple(split_tags(text or ""))


@dataclass(frozen=True)
class TagEdit:
    """One edit of every caption: `remove` these tags, `replace` each (old, new) (a tag already present is not
    repeated), then `add` these tags where missing, at the `end` or the `start` (after the `trigger` word when the
    caption begins with it, so the trigger stays first)."""

    remove: tuple[str, ...] = ()
    replace: tuple[tuple[str, str], ...] = ()
    add: tuple[str, ...] = ()
    at: str = "end"
    trigger: str = ""

    def __post_init__(self):
        if self.at not in ("start", "end"):
            raise UserError(f"tags can be added at the start or the end, not {self.at!r}", "use start or end")
        for old, new in self.replace:
            if not same(old):
                raise UserError("a tag to replace is empty", "type the tag to replace, then what replaces it")
            if "," in new:
                raise UserError(f"{new!r} holds a comma: a tag cannot", "replace one tag with one tag")

    def is_empty(self) -> bool:
        return not (self.remove or self.replace or self.add)

    def apply(self, caption: str) -> str:
        """`caption` with the edit made."""
        tags = split_tags(caption)
        drop = {same(t) for t in self.remove}
        swap = {same(old): new.strip() for old, new in self.replace}
        out, seen = [], set()
        for tag in tags:
            key = same(tag)
            if key in drop:
                continue
            if key in swap:
                tag = swap[key]
                key = same(tag)
                if not key:  # replaced by nothing: removed
                    continue
            if key in seen:
                continue
            seen.add(key)
            out.append(tag)
        missing = []
        for tag in self.add:
            if same(tag) and same(tag) not in seen:
                seen.add(same(tag))
                missing.append(tag.strip())
        if self.at == "end":
            out += missing
        else:
            first = 1 if out and self.trigger and same(out[0]) == same(self.trigger) else 0
            out[first:first] = missing
        return ", ".join(out)


def frequencies(captions: list[str]) -> list[tuple[str, int]]:
    """Each tag with the number of captions holding it, most common first (a tag as first written)."""
    counts, shown = Counter(), {}
    for caption in captions:
        keys = {}
        for tag in split_tags(caption):
            keys.setdefault(same(tag), tag)
        counts.update(keys.keys())
        for key, tag in keys.items():
            shown.setdefault(key, tag)
    return [(shown[k], n) for k, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))]


@dataclass(frozen=True)
class Change:
    file: str
    before: str
    after: str


def preview(items: list[tuple[str, str]], edit: TagEdit) -> list[Change]:
    """The captions the edit changes, from (file, caption) pairs, in their order (a caption whose tags stay the same
    is left as written, spacing and all)."""
    if edit.is_empty():
        raise UserError("nothing to change", "type tags to remove, a tag to replace, or tags to add")
    changes = []
    for file, caption in items:
        after = edit.apply(caption)
        if split_tags(after) != split_tags(caption):
            changes.append(Change(file, caption, after))
    return changes
