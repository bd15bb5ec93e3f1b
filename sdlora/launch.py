"""Start a run as a process of its own: the command that trains a run folder, starting it (or handing it to a spare
process, sdlora.spare), the same for a caption-drafting job, and the record of every process an owner (the app)
started, so that it can end them."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from sdlora.rundir import write_pid

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


def start(run_dir: str | Path, gpus: int = 1, spare=None) -> subprocess.Popen:
    """Start `train_command(run_dir, gpus)` as its own process, or hand the run to `spare` (a sdlora.spare.Spare; one
    GPU) if it is alive.

    Its stdout and stderr go to `log.txt`; the caller follows it through `events.jsonl`.
    """
    run_dir = Path(run_dir)
    if not (run_dir / "config.json").exists():
        raise FileNotFoundError(run_dir / "config.json")
    (run_dir / "STOP").unlink(missing_ok=True)
    proc = spare.take(run_dir) if spare is not None and gpus == 1 else None
    if proc is None:
        return _spawn(train_command(run_dir, gpus), run_dir)
    write_pid(run_dir, proc.pid)
    return proc


def caption_command(dataset: str | Path, job_dir: str | Path, options: list[str]) -> list[str]:
    """The command that drafts the captions of `dataset` and reports to `job_dir`: `python -m sdlora caption DATASET
    --job-dir DIR` and `options` (the flags of `sdlora caption`, such as --captioner and --dry-run)."""
    return [sys.executable, "-m", "sdlora", "caption", str(dataset), "--job-dir", str(job_dir), *options]


def start_caption(dataset: str | Path, job_dir: str | Path, options: list[str]) -> subprocess.Popen:
    """Start `caption_command` as its own process; `job_dir` gets its events.jsonl, pid and log.txt (whatever an
    earlier job left there goes first), and `rundir.status(job_dir)` says how it stands."""
    job_dir = Path(job_dir)
    job_dir.mkdir(parents=True, exist_ok=True)
    for name in ("events.jsonl", "log.txt", "pid"):
        (job_dir / name).unlink(missing_ok=True)
    return _spawn(caption_command(dataset, job_dir, options), job_dir)


def _spawn(command: list[str], folder: Path) -> subprocess.Popen:
    """`command` as the leader of a process group of its own, its stdout and stderr in `folder`/log.txt, its pid in
    `folder`/pid."""
    with open(folder / "log.txt", "ab") as log:  # the child keeps its own copy of the file
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    write_pid(folder, proc.pid)
    return proc


class Children:
    """Every process an owner (the app) started: training runs, spares and caption jobs, so that it can end them all
    when it exits.

    Each leads a process group of its own (Ctrl-C in the app's terminal does not reach it), so `end_all` signals
    each one's whole group: a run under `accelerate launch` ends with its workers. Runs get SIGTERM, which
    makes them save and stop (what was learned stays in the run folder), and `grace` seconds to do it; whatever is
    still alive after that, and every spare and caption job at once, is killed."""

    def __init__(self):
        self._procs: list[tuple[subprocess.Popen, str]] = []
        self._lock = threading.Lock()
        self.accepting = True  # False once end_all has begun: a process added later is ended at once

    def add(self, proc: subprocess.Popen, kind: str = "run") -> subprocess.Popen:
        """Track `proc` ('run', 'spare' or 'caption'); returns it."""
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
        """End every tracked process still alive: spares and caption jobs killed, runs asked to save and stop, then
        killed."""
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
