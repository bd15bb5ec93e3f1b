"""What the app's handlers share: the workspace, the base models on offer, the GPUs, the processes the page started,
and the base models loaded for previews."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from sdlora import launch
from sdlora.spare import Spare
from sdlora import workspace as ws


def visible_gpus() -> int:
    """How many CUDA GPUs this process sees (`CUDA_VISIBLE_DEVICES` applies)."""
    import torch

    return torch.cuda.device_count()


@dataclass
class Context:
    """One page's shared state. Everything lives on disk in the workspace except what a process holds: the
    training processes and caption jobs started (in `children`), the spare waiting for the next run, and the loaded
    previewers."""

    root: Path  # the workspace: datasets/, runs/, exports/, loras/ (sdlora.workspace)
    models: Path  # the folder of base models on offer
    gpus: int = 0  # GPUs visible; with more than one the Train tab asks how many a run uses
    max_unpacked: int = ws.MAX_UNPACKED  # the most an uploaded .zip may unpack to
    keep_spare: bool = False  # keep a training process started ahead for the next one-GPU run
    children: launch.Children = field(default_factory=launch.Children)
    spare: Spare | None = None  # the process the next one-GPU run goes to
    start_lock: threading.Lock = field(default_factory=threading.Lock)  # one run starts at a time, from any tab
    previewers: dict = field(default_factory=dict)  # base -> Previewer, the one used last at the end
    load_seconds: dict = field(default_factory=dict)  # base -> seconds its last load took
    preview_lock: threading.Lock = field(default_factory=threading.Lock)  # one picture at a time on a base model

    @classmethod
    def create(cls, workspace: str | Path = "workspace", models: str | Path | None = None, *,
               max_unpacked: int = ws.MAX_UNPACKED, gpus: int | None = None, spare: bool = False,
               children: launch.Children | None = None) -> Context:
        """The context of a page on `workspace` (models default to WORKSPACE/models, GPUs to those visible); with
        `spare`, the first spare process starts now, while the artist sets up the run."""
        root = Path(workspace).resolve()
        ctx = cls(root=root, models=Path(models).resolve() if models else root / "models",
                  gpus=visible_gpus() if gpus is None else int(gpus), max_unpacked=max_unpacked, keep_spare=spare,
                  children=launch.Children() if children is None else children)
        if spare:
            ctx.spare = ctx._new_spare()
        return ctx

    def _new_spare(self) -> Spare:
        made = Spare()
        self.children.add(made.proc, "spare")
        return made

    def start_run(self, run_dir: Path, gpus: int) -> None:
        """Start training `run_dir` (its config.json written) on `gpus` GPUs: handed to the spare when it is one GPU.
        The caller holds `start_lock`."""
        process = self.children.add(launch.start(run_dir, gpus=gpus, spare=self.spare))  # spares: one GPU only
        if gpus == 1:
            self.spare = None  # taken, or found dead and replaced by a fresh process
        threading.Thread(target=self._after, args=(process,), daemon=True).start()

    def start_caption(self, dataset: Path, job_dir: Path, options: list[str]) -> None:
        """Start drafting the captions of `dataset` (`sdlora caption` with `options`), reporting to `job_dir`."""
        process = self.children.add(launch.start_caption(dataset, job_dir, options), "caption")
        threading.Thread(target=process.wait, daemon=True).start()  # reaped, so its pid dies with it

    def _after(self, process) -> None:
        """Reap a run's process, so its pid dies with it; then start the next spare."""
        process.wait()
        with self.start_lock:
            if self.keep_spare and self.spare is None and self.children.accepting:
                self.spare = self._new_spare()

    def previewer(self, base: str):
        """The loaded base model (kept per base; LoRAs are swapped on it) and the seconds it took to load now (None
        when it was loaded already). The caller holds `preview_lock`."""
        from sdlora.generate import Previewer

        loaded_now = None
        if base not in self.previewers:
            from diffusers.utils import logging as diffusers_logging

            diffusers_logging.disable_progress_bar()
            while len(self.previewers) >= 2:  # a base model is large; keep the two used last
                self.previewers.pop(next(iter(self.previewers)))
            began = time.perf_counter()
            self.previewers[base] = Previewer(base)
            loaded_now = time.perf_counter() - began
            self.load_seconds[base] = loaded_now
        self.previewers[base] = self.previewers.pop(base)  # most recently used last
        return self.previewers[base], loaded_now
