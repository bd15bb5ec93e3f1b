"""Memory: the settings a run picks for the GPU memory it has, and the memory it has used."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from sdlora.config import TrainConfig
from sdlora.atomic import write_atomic


def memory_defaults(config: TrainConfig, family, accelerator, events, run_dir: Path) -> TrainConfig:
    """On a GPU, batch_size, gradient_checkpointing and base_precision left at their defaults follow the family and
    the free memory (the least any process has, so all pick alike). The resolved values replace config.json, so a
    resume repeats them."""
    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    free = torch.tensor([free_gib(accelerator.device)], device=accelerator.device)
    least = accelerator.gather(free).min().item()
    batch_size, checkpointing, base_precision = family.memory_defaults(least)
    picked = {}
    if config.batch_size == defaults["batch_size"]:
        picked["batch_size"] = batch_size
    if config.gradient_checkpointing == defaults["gradient_checkpointing"] and config.base_precision != "int8":
        picked["gradient_checkpointing"] = checkpointing
    # LoHa/LoKr read the base weights' shapes (TrainConfig.validate): their base stays unquantized
    if config.base_precision == defaults["base_precision"] and config.adapter not in ("loha", "lokr"):
        picked["base_precision"] = base_precision
    resolved = dataclasses.replace(config, auto_memory=False, **picked)
    events.emit("warning", message=f"memory defaults for {family.label} with {least:.0f} GiB free: "
                                   f"batch_size {resolved.batch_size}, gradient_checkpointing "
                                   f"{'on' if resolved.gradient_checkpointing else 'off'}, precision "
                                   f"{accelerator.mixed_precision}"
                                   + (f", base stored in {resolved.base_precision}" if resolved.base_precision != "auto" else "")
                                   + " (set them, or --no-auto-memory, to choose)")
    if accelerator.is_main_process:
        write_atomic(run_dir / "config.json", resolved.to_json())
    return resolved


def free_gib(device) -> float:
    """GPU memory this process may still use: what the card has free, or less where the process is capped
    (torch.cuda.set_per_process_memory_fraction, as a shared or a smaller card behaves)."""
    device = device.index if device.index is not None else torch.cuda.current_device()
    free, total = torch.cuda.mem_get_info(device)
    fraction = getattr(torch.cuda, "get_per_process_memory_fraction", lambda _: 1.0)(device)  # torch >= 2.9
    cap = fraction * total - torch.cuda.memory_reserved(device)
    return min(free, cap) / 2**30


def used_gb(device) -> float:
    """The most memory this run has held: on a GPU what torch allocated, on the CPU the process's peak."""
    if device.type == "cuda":
        return round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    import resource

    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)


def on_gpu(models: dict) -> str:
    """What each of `models` (name -> module) holds on a GPU, largest first: "transformer 2.3 GB, vae 0.3 GB"; with
    the process's allocated total, for an out-of-memory message."""
    held = {}
    for name, model in models.items():
        if isinstance(model, torch.nn.Module):
            size = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()) if t.is_cuda)
            if size:
                held[name] = size
    parts = [f"{name} {size / 1e9:.1f} GB" for name, size in sorted(held.items(), key=lambda kv: -kv[1])]
    if torch.cuda.is_available():
        parts.append(f"{torch.cuda.memory_allocated() / 2**30:.1f} GiB allocated in all, "
                     f"{torch.cuda.max_memory_allocated() / 2**30:.1f} at the peak")
    return "; ".join(parts)
