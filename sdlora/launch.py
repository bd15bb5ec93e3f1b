"""Start a run as a process of its own: the command that trains a run folder, a spare process started ahead of the
run it will train, and the record of every process an owner (the app) started, so that it can end them."""

from __future__ import annotations

import importlib
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable

from sdlora.rundir import write_pid

# What a spare imports ahead: the libraries that take a fresh training process its seconds (sdlora's own modules add
# under 0.1 s after them, measured on 2 CPU cores, so they load after the hand-over, with the command line).
PRELOADED = ("torch", "transformers", "peft", "accelerate", "diffusers")


def launch_args(processes: int) -> list[str]:
    """`accelerate launch` arguments for one data-parallel run over `processes` GPUs of this host (on a machine
    without GPUs accelerate runs the processes on the CPU, over gloo)."""
    return ["--multi_gpu", "--num_processes", str(processes), "--num_machines", "1", "--dynamo_backend", "no"]


def train_command(run_dir: str | Path, gpus: int = 1) -> list[str]:
    """The command that trains the run in `run_dir` (config.json written): `python -m sdlora train --run-dir DIR
    --resume`, under `accelerate launch` with `launch_args` for several GPUs, as `sdlora train --gpus N` relaunches
    itself."""
    launcher = [sys.executable, "-m", "accelerate.commands.launch", *launch_args(gpus)] if gpus > 1 \
        else [sys.executable]
    return [*launcher, "-m", "sdlora", "train", "--run-dir", str(run_dir), "--resume"]


def start(run_dir: str | Path, gpus: int = 1, spare: "Spare | None" = None) -> subprocess.Popen:
    """Start `train_command(run_dir, gpus)` as its own process, or hand the run to `spare` (one GPU) if it is alive.

    Its stdout and stderr go to `log.txt`; the caller follows it through `events.jsonl`.
    """
    run_dir = Path(run_dir)
    if not (run_dir / "config.json").exists():
        raise FileNotFoundError(run_dir / "config.json")
    (run_dir / "STOP").unlink(missing_ok=True)
    proc = spare.take(run_dir) if spare is not None and gpus == 1 else None
    if proc is None:
        with open(run_dir / "log.txt", "ab") as log:  # the child keeps its own copy of the file
            proc = subprocess.Popen(train_command(run_dir, gpus), stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True)
    write_pid(run_dir, proc.pid)
    return proc


class Spare:
    """A training process started before it is needed.

    A fresh process spends seconds before a run's first step importing torch, transformers, diffusers and the rest
    (docs/benchmarks.md, "Choices measured"). A spare does that while the artist
    is still setting the run up, then waits, holding no GPU memory, until `start` hands it a run folder. It trains
    that one run exactly as `train_command` would (`sdlora train --run-dir DIR --resume`, its output in `log.txt`) and
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


class Children:
    """Every process an owner (the app) started: training runs and spares, so that it can end them all when it exits.

    Each leads a process group of its own (Ctrl-C in the app's terminal does not reach it), so `end_all` signals
    each one's whole group: a run under `accelerate launch` ends with its workers. Runs get SIGTERM, which
    makes them save and stop (what was learned stays in the run folder), and `grace` seconds to do it; whatever is
    still alive after that, and every spare at once, is killed."""

    def __init__(self):
        self._procs: list[tuple[subprocess.Popen, str]] = []
        self._lock = threading.Lock()
        self.accepting = True  # False once end_all has begun: a process added later is ended at once

    def add(self, proc: subprocess.Popen, kind: str = "run") -> subprocess.Popen:
        """Track `proc` ('run' or 'spare'); returns it."""
        with self._lock:
            self._procs = [(p, k) for p, k in self._procs if p.poll() is None and p is not proc] + [(proc, kind)]
            late = not self.accepting
        if late:
            self.end_all(grace=10.0, say=lambda _: None)
        return proc

    def alive(self) -> list[subprocess.Popen]:
        with self._lock:
            return [p for p, _ in self._procs if p.poll() is None]

    def end_all(self, grace: float = 60.0, say=print) -> None:
        """End every tracked process still alive: spares killed, runs asked to save and stop, then killed."""
        with self._lock:
            procs, self._procs = self._procs, []
            self.accepting = False
        live_runs = []
        for proc, kind in procs:
            if proc.poll() is not None:
                continue
            if kind == "run":
                say(f"stopping the training run (pid {proc.pid}): it saves first")
                _signal_group(proc, signal.SIGTERM)
                live_runs.append(proc)
            else:
                _signal_group(proc, signal.SIGKILL)
                proc.wait()
        deadline = time.monotonic() + grace
        for proc in live_runs:
            try:
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                _signal_group(proc, signal.SIGKILL)
                proc.wait()


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)  # the process leads its own group (start_new_session)
    except (ProcessLookupError, PermissionError):
        try:
            proc.send_signal(sig)
        except ProcessLookupError:
            pass


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
