"""The example datasets that ship with sdlora: where they are, their names, and `example:NAME` dataset arguments."""

from __future__ import annotations

from pathlib import Path

from sdlora.errors import UserError

PREFIX = "example:"


def examples_dir() -> Path:
    """The folder holding one subfolder per example dataset.

    An installed package carries them as `sdlora/datasets/` (pyproject.toml maps the repository's `datasets/` there);
    a clone or an editable install reads the repository's `datasets/` itself.
    """
    here = Path(__file__).resolve().parent
    installed = here / "datasets"
    return installed if installed.is_dir() else here.parent / "datasets"


def names() -> list[str]:
    """The example datasets on offer, by name (folders holding pictures)."""
    root = examples_dir()
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if p.is_dir() and any(p.glob("*.png")))


def path(name: str) -> Path:
    """The folder of the example dataset `name`; a UserError naming the examples when there is none."""
    if name not in names():
        raise UserError(f"no example dataset named {name!r}",
                        "examples: " + (", ".join(PREFIX + n for n in names()) or "none are installed"))
    return examples_dir() / name


def resolve(dataset: str | Path) -> str | Path:
    """`example:character` -> the folder of that example; anything else is returned unchanged."""
    if isinstance(dataset, str) and dataset.startswith(PREFIX):
        return path(dataset[len(PREFIX):])
    return dataset


def locate(dataset: str | Path) -> Path:
    """The dataset a setting names (a folder, a .zip or `example:NAME`), which must exist; a UserError otherwise.
    Cheap, so the command line says so before it loads any model."""
    found = Path(resolve(dataset))
    if not found.exists():
        raise UserError(f"dataset not found: {found}",
                        "check the path; give a folder of images, a .zip, or an example such as example:character")
    return found
