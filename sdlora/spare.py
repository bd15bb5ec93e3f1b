"""The spare training process: started ahead of the run it will train, it imports the libraries meanwhile, so that a
run handed to it skips their seconds."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

# What a spare imports ahead: the libraries that take a fresh training process its seconds (sdlora's own modules add
# under 0.1 s after them, measured on 2 CPU cores, so they load after the hand-over, with the command line).
PRELOADED = ("torch", "transformers", "peft", "accelerate", "diffusers")


class Spare:
    """A training process started before it is needed.

    A fresh process spends seconds before a run's first step importing torch, transformers, diffusers and the rest
    (docs/benchmarks.md, "Choices measured"). A spare does that while the artist
    is still setting the run up, then waits, holding no GPU memory, until sdlora.launch.start hands it a run folder.
    It trains that one run exactly as launch.train_command would (`sdlora train --run-dir DIR --resume`, its output
    in `log.txt`) and
    exits; it exits too when its owner goes away (its stdin closes)."""

    def __init__(self):
        self.proc = subprocess.Popen([sys.executable, "-m", "sdlora", "spare"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, start_new_session=True)

    def ready(self, timeout: float | None = None) -> bool:
        """Wait until the spare has imported what training needs (at most `timeout` s); False if it died."""
        import select

        if self.proc is None or self.proc.poll() is not None:
            return False
        if not select.select([self.proc.stdout], [], [], timeout)[0]:
            return False
        return self.proc.stdout.readline().strip() == b"ready"

    def take(self, run_dir: str | Path) -> subprocess.Popen | None:
        """Hand `run_dir` to the spare and return its process; None if it is gone (then start a fresh one)."""
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return None
        try:
            proc.stdin.write(f"{Path(run_dir).resolve()}\n".encode())
            proc.stdin.close()
        except OSError:  # it died meanwhile
            return None
        return proc  # from now on it writes to the run's log.txt

    def close(self) -> None:
        """End an untaken spare (it holds no run)."""
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()


def serve_spare(main: Callable[[list[str]], int]) -> int:
    """The spare's side (`python -m sdlora spare`, see Spare): import, say `ready`, then train the run folder read
    from stdin through `main`, the command line's own (`train --run-dir DIR --resume`), with its output in that
    folder's log.txt; nothing read (the owner went away): exit.

    The command line passes its `main` in, so that this module never imports the command line that imports it."""
    # the pipe to the owner carries "ready" and nothing else: whatever the imports print goes nowhere (a full pipe
    # that nobody reads would block the spare before it ever reads its run)
    ready_pipe = os.dup(sys.stdout.fileno())
    with open(os.devnull, "wb") as devnull:
        os.dup2(devnull.fileno(), sys.stdout.fileno())
    for name in PRELOADED:
        importlib.import_module(name)
    diffusers = sys.modules["diffusers"]
    diffusers.StableDiffusionPipeline, diffusers.StableDiffusionXLPipeline  # diffusers imports its pipelines lazily
    try:
        os.write(ready_pipe, b"ready\n")
        os.close(ready_pipe)
    except OSError:  # the owner went away
        return 0
    run_dir = sys.stdin.readline().strip()
    if not run_dir:
        return 0
    # the run's start event times its setup from here, not from this process's start: the imports were done ahead
    os.environ["SDLORA_HANDED_OVER_AT"] = str(time.time())
    with open(Path(run_dir) / "log.txt", "ab") as log:
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
            os.dup2(log.fileno(), stream.fileno())
    return main(["train", "--run-dir", run_dir, "--resume"])
