"""Resumable checkpoints of a run: written whole or not at all, the newest usable one found, older ones pruned."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import torch

from sdlora.diskspace import writing
from sdlora.errors import UserError
from sdlora.atomic import write_atomic


def save(accelerator, checkpoints: Path, step: int, trained, keep: int, run_dir: Path, ema=None) -> None:
    """Write the state at `step` (accelerate's: optimizer, schedule, random states; and the adapters) into a temporary
    folder and rename it to `step-NNNNNN` once complete, so that a kill or a full disk mid-save never leaves a folder
    that looks resumable and is not (its sdlora.json lists its files). Then keep the newest `keep`."""
    done, tmp = checkpoints / f"step-{step:06d}", checkpoints / f".step-{step:06d}.tmp"
    if accelerator.is_main_process:
        checkpoints.mkdir(parents=True, exist_ok=True)
        for stale in checkpoints.glob(".step-*"):  # left by a process killed while saving: no save runs now
            shutil.rmtree(stale, ignore_errors=True)
    accelerator.wait_for_everyone()  # no process writes into, or measures, a folder that is still being removed
    need = _size(checkpoints, trained)
    with writing(checkpoints, need, run_dir, leftovers=[tmp]):
        accelerator.save_state(str(tmp))
        if accelerator.is_main_process:
            _save_adapters(trained, tmp / "adapters.safetensors")
            if ema is not None:  # the average is state too: a resumed run goes on averaging
                from safetensors.torch import save_file

                save_file(ema.tensors(), str(tmp / "ema.safetensors"))
        accelerator.wait_for_everyone()  # every process's random states are in before the folder is listed
        if accelerator.is_main_process:
            files = {f.name: f.stat().st_size for f in sorted(tmp.iterdir())}
            write_atomic(tmp / "sdlora.json",
                         json.dumps({"step": step, "processes": accelerator.num_processes, "files": files}))
            if done.exists():  # the same step saved again (the step a run resumed at, or a broken one)
                shutil.rmtree(done)
            os.replace(tmp, done)
    if accelerator.is_main_process:
        # only now, with the new one in place: older ones beyond `keep`, and newer ones, which a resume passed over as
        # unreadable (it continues from the newest that loads)
        found = sorted(_folders(checkpoints), key=step_of)
        for old in [c for c in found if step_of(c) > step] + [c for c in found if step_of(c) <= step][:-keep]:
            shutil.rmtree(old, ignore_errors=True)


def resume(accelerator, checkpoints: Path, trained, events, batch_per_process: int, ema=None) -> int:
    """Load the newest usable checkpoint into the optimizer, schedule, random states and adapters; return its step,
    or 0 when there is none (the run starts over). A warning says what it resumed from, and what changed when the
    number of processes did."""
    last = usable(checkpoints, events)
    if last is None:
        return 0
    accelerator.load_state(str(last))
    _load_adapters(trained, last / "adapters.safetensors")
    if ema is not None:
        if not (last / "ema.safetensors").is_file():
            raise UserError(f"{last.name} was saved without an EMA (ema_decay was 0)",
                            "resume with the settings the run was started with, or start a new run")
        from safetensors.torch import load_file

        ema.load(load_file(str(last / "ema.safetensors")))
    saved_with = json.loads((last / "sdlora.json").read_text()).get("processes", 1)
    changed = "" if saved_with == accelerator.num_processes else \
        f"; it was saved with {saved_with} process(es), now {accelerator.num_processes}: the global batch is " \
        f"{batch_per_process * accelerator.num_processes} images instead of {batch_per_process * saved_with}"
    events.emit("warning", message=f"resumed from {last.name}{changed}")
    return step_of(last)


def step_of(folder: Path) -> int:
    return int(re.fullmatch(r"\.?step-(\d+)(\.tmp)?", folder.name)[1])


def usable(checkpoints: Path, events) -> Path | None:
    """The newest checkpoint that reads whole, or None; a warning names each newer one passed over: a save that did
    not finish (its temporary folder), or a folder that is incomplete or will not load."""
    unfinished = [p for p in checkpoints.glob(".step-*.tmp") if re.fullmatch(r"\.step-\d+\.tmp", p.name)] \
        if checkpoints.is_dir() else []
    passed, found = [], None
    for folder in sorted(_folders(checkpoints) + unfinished, key=lambda p: (step_of(p), p.name), reverse=True):
        why = "a save that did not finish" if folder.name.startswith(".") else unreadable(folder)
        if why is None:
            found = folder
            break
        passed.append((folder, why))
    then = f"resuming from {found.name}" if found else "no usable checkpoint, starting from step 0"
    for folder, why in passed:
        events.emit("warning", message=f"{checkpoints.name}/{folder.name} is incomplete or unreadable ({why}); {then}")
    return found


def unreadable(folder: Path) -> str | None:
    """Why the checkpoint `folder` cannot be resumed from, or None. Every file is read whole before anything loads:
    accelerate's load_state would otherwise put part of a broken checkpoint into the optimizer before failing."""
    from accelerate.utils import load
    from safetensors.torch import load_file

    if not (folder / "sdlora.json").is_file():
        return "no sdlora.json"
    name = "sdlora.json"
    try:
        listed = json.loads((folder / name).read_text()).get("files")
        if listed is None:  # saved before checkpoints listed their files: what is there
            listed = {f.name: None for f in folder.iterdir() if f.name != "sdlora.json"}
        for name, size in {"adapters.safetensors": None, **listed}.items():
            file = folder / name
            if not file.is_file():
                return f"{name} is missing"
            if size is not None and file.stat().st_size != size:
                return f"{name} has {file.stat().st_size} of its {size} bytes"
            if name.endswith(".safetensors"):
                load_file(file)
            elif name.endswith(".bin"):  # as load_state reads it; it passes over random states that do not load
                load(file, map_location="cpu")
    except Exception as e:
        return f"{name}: {type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}".rstrip(": ")
    return None


def _folders(checkpoints: Path) -> list[Path]:
    """The checkpoints saved whole (named `step-NNNNNN`; a save still under way is `.step-NNNNNN.tmp`)."""
    return [p for p in checkpoints.glob("step-*") if p.is_dir() and re.fullmatch(r"step-\d+", p.name)] \
        if checkpoints.is_dir() else []


def _size(checkpoints: Path, models) -> int:
    """Bytes a checkpoint takes: as much as the newest one, or the adapters about four times (themselves, AdamW's two
    moments, the optimizer's copy of the schedule and step)."""
    found = sorted(_folders(checkpoints), key=step_of)
    if found:
        return sum(f.stat().st_size for f in found[-1].iterdir() if f.is_file())
    return 4 * sum(p.numel() * p.element_size() for p in _adapter_tensors(models).values())


def _adapter_tensors(models) -> dict:
    """The trainable (adapter) parameters of the trained models by a stable name: what a checkpoint keeps of them."""
    return {f"{i}.{name}": p for i, m in enumerate(models) for name, p in m.named_parameters() if p.requires_grad}


def _save_adapters(models, path: Path) -> None:
    from safetensors.torch import save_file

    save_file({k: p.detach().cpu().contiguous() for k, p in _adapter_tensors(models).items()}, str(path))


@torch.no_grad()
def _load_adapters(models, path: Path) -> None:
    from safetensors.torch import load_file

    saved, params = load_file(str(path)), _adapter_tensors(models)
    if saved.keys() != params.keys():
        raise UserError(f"{path.parent.name} holds another adapter (rank, targets or text encoder differ)",
                        "resume with the settings the run was started with, or start a new run")
    for name, p in params.items():
        p.copy_(saved[name])
