"""A folder of links to only what `pip install sdlora` installs, taken from this machine's Python packages.

A GPU machine's image often holds hundreds of packages (scikit-learn, scipy, bitsandbytes, ...), and transformers and
peft import some of them whenever they are installed, which adds seconds to every process start. Run with
`python -S` and PYTHONPATH set to the folder, a process sees what an artist's fresh install holds instead:

    python bench/clean_env.py /tmp/clean        # prints what it linked and what this machine lacks
    PYTHONPATH=/tmp/clean:$PWD python -S -c "import sdlora.train"

The list is bench/sdlora-install.txt (pyproject's dependencies and theirs, resolved on the development machine with
`--write-list`); the requirements of each listed package as installed here are followed too (the CUDA build of
torch needs nvidia-* libraries and triton). Versions are this machine's, not the list's.
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import re
import sys
from pathlib import Path

from packaging.requirements import Requirement

LIST = Path(__file__).with_name("sdlora-install.txt")


def _key(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def closure(names: list[str]) -> tuple[dict[str, md.Distribution], list[str]]:
    """The installed distributions of `names` and everything they require here (markers evaluated, no extras);
    and the names this machine does not have."""
    found, missing, todo = {}, [], list(names)
    while todo:
        name = todo.pop()
        if _key(name) in found or name in missing:
            continue
        try:
            dist = md.distribution(name)
        except md.PackageNotFoundError:
            missing.append(name)
            continue
        found[_key(name)] = dist
        for text in dist.requires or []:
            req = Requirement(text)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(req.name)
    return found, sorted(missing)


def build(folder: Path, names: list[str]) -> dict:
    """Link each distribution's top-level modules and its metadata folder into `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    dists, missing = closure(names)
    linked = set()
    for dist in dists.values():
        root = Path(dist.locate_file(""))
        for file in dist.files or []:
            top = file.parts[0]
            if top in linked or top.endswith(".pth") or top == ".." or top == "__pycache__":
                continue
            source, target = root / top, folder / top
            if source.exists() and not target.exists():
                target.symlink_to(source)
                linked.add(top)
    return {"distributions": {k: d.version for k, d in sorted(dists.items())}, "missing": missing,
            "entries": len(linked)}


def write_list(path: Path) -> None:
    """Resolve pyproject.toml's dependencies against what is installed here and write them, with versions."""
    import tomllib

    pyproject = Path(__file__).resolve().parents[1] / "pyproject.toml"
    names = [Requirement(d).name for d in tomllib.loads(pyproject.read_text())["project"]["dependencies"]]
    dists, missing = closure(names)
    if missing:
        raise SystemExit(f"not installed here: {', '.join(missing)}; install sdlora first")
    header = ("# what `pip install sdlora` installs (pyproject.toml's dependencies and theirs), resolved by\n"
              "# `python bench/clean_env.py --write-list`; bench/clean_env.py adds what the CUDA build of torch needs\n")
    path.write_text(header + "".join(f"{k}=={d.version}\n" for k, d in sorted(dists.items())))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folder", nargs="?")
    ap.add_argument("--list", default=str(LIST))
    ap.add_argument("--write-list", action="store_true", help="write --list from pyproject.toml and this machine")
    args = ap.parse_args()
    if args.write_list:
        write_list(Path(args.list))
        return
    if not args.folder:
        ap.error("give a folder (or --write-list)")
    names = [line.split("==")[0].strip() for line in Path(args.list).read_text().splitlines()
             if line.strip() and not line.startswith("#")]
    out = build(Path(args.folder), names)
    print(f"{len(out['distributions'])} distributions, {out['entries']} entries linked into {args.folder}")
    print("not on this machine:", ", ".join(out["missing"]) or "none", file=sys.stderr)


if __name__ == "__main__":
    main()
