"""The run and LoRA file the Try it and Download tabs work on: the runs and files as they are on disk, and what a run
picked fills in on both tabs."""

from __future__ import annotations

from pathlib import Path

from sdlora import rundir
from sdlora import workspace as ws
from sdlora.app.context import Context
from sdlora.app.wiring import Choices


def refresh(ctx: Context, values: dict) -> dict:
    """On opening Try it or Download: the run lists and the run's files as they are now on disk (`run` and `file`
    stay picked while they are there)."""
    names = ws.run_names(ctx.root)
    run = values["run"] if values["run"] in names else (names[0] if names else None)
    files = ws.lora_files(ctx.root, run) if run else []
    file = values["file"] if values["file"] in files else (files[-1] if files else None)
    return {"run": Choices(names, run), "file": Choices(files, file)}


def follow(ctx: Context, values: dict) -> dict:
    """The run shown on the Train tab is the one the Try it and Download tabs show."""
    return {"run": values["run"]}


def recommended(events: list[dict], files: list[str]) -> dict | None:
    """The run's last `recommend` event (sdlora.evaluate), when the file it names is still there."""
    best = next((e for e in reversed(events) if e["type"] == "recommend"), None)
    return best if best and Path(best["path"]).name in files else None


def pick_run(ctx: Context, values: dict) -> dict:
    """Fill the preview and export forms from a run: its files (the recommended save at its strength, else the newest
    at 1), the first sample's prompt and the sample negative prompt, its title, trigger and description."""
    run = values["run"]
    if not run:
        return {"file": Choices([], None)}
    files = ws.lora_files(ctx.root, run)
    config = ws.run_config(ctx.root, run)
    events = rundir.read_events(ws.run_dir(ctx.root, run))
    sample = next((e for e in events if e["type"] == "sample"), None)
    best = recommended(events, files)
    file = Path(best["path"]).name if best else (files[-1] if files else None)
    prompt = sample["prompt"] if sample else (config["trigger"] or "a picture")
    return {"file": Choices(files, file), "strength": best["strength"] if best else 1.0, "prompt": prompt,
            "negative": config.get("sample_negative", ""), "title": config.get("title") or run,
            "trigger": config.get("trigger", ""), "description": config.get("description", "")}
