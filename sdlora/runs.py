"""Run directories: write and read events, start a run as its own process (or a spare one started ahead), send it
STOP/SAMPLE/SAVE, list runs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

CONTROL_FILES = ("STOP", "SAMPLE", "SAVE")
FINAL_EVENTS = ("done", "stopped", "error")


class EventLog:
    """Append-only `events.jsonl`: one JSON object a line, flushed per line so a reader never waits."""

    def __init__(self, run_dir: str | Path, enabled: bool = True, echo: bool = False):
        self.path = Path(run_dir) / "events.jsonl"
        self.enabled = enabled  # only the main process writes when a run spans several
        self.echo = echo and enabled  # the CLI also shows what a user must read

    def _show(self, event: dict) -> None:
        from tqdm.auto import tqdm

        kind = event["type"]
        if kind == "start":  # what the pictures become: sizes, crops, how often each is seen
            config, sizes = event["config"], event.get("bucket_sizes", {})
            shown = ", ".join(f"{n} at {size}" for size, n in sorted(sizes.items(), key=lambda kv: -kv[1])[:6])
            more = f" and {len(sizes) - 6} more sizes" if len(sizes) > 6 else ""
            tqdm.write(f"{event['images']} pictures in {len(sizes)} size bucket(s): {shown}{more}; each scaled to cover "
                       f"its bucket and {'randomly' if config.get('random_crop') else 'centre'} cropped"
                       f"{', flipped at random' if config.get('flip') else ''}; {event['total_steps']} steps of "
                       f"{event['global_batch']} = {event['epochs']:g} epochs")
        elif kind == "warning":
            tqdm.write(f"warning: {event['message']}")
        elif kind == "sample":
            tqdm.write(f"sample (step {event['step']}): {event['path']}")
        elif kind == "verify":
            ok = "ok" if event["ok"] else "FAILED"
            tqdm.write(f"compatibility check {ok}: diffusers' loader took {event['keys_consumed']}/{event['keys_written']} "
                       f"keys; strength 0 = base (max diff {event['strength0_max_diff']:g})")
        elif kind in ("done", "stopped"):
            tqdm.write(f"{kind} at step {event['step']}: {event['path']}")

    def emit(self, type: str, **fields) -> dict:
        event = {"type": type, "time": round(time.time(), 3), **fields}
        if self.enabled:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(event, default=str) + "\n")
                f.flush()
            if self.echo:
                self._show(event)
        return event


def read_events(run_dir: str | Path) -> list[dict]:
    """Every complete event of a run so far (a line still being written is skipped)."""
    path = Path(run_dir) / "events.jsonl"
    if not path.exists():
        return []
    events = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            events.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return events


def write_atomic(path: str | Path, text: str) -> None:
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def request(run_dir: str | Path, what: str) -> None:
    """Ask a running run to STOP, SAMPLE or SAVE at its next step (it removes the file when done)."""
    assert what in CONTROL_FILES, what
    (Path(run_dir) / what).touch()


def take_request(run_dir: str | Path, what: str) -> bool:
    """True (and the file removed) when `what` was requested. STOP stays, so a restarted process sees it too."""
    path = Path(run_dir) / what
    if not path.exists():
        return False
    if what != "STOP":
        path.unlink(missing_ok=True)
    return True


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
    write_atomic(run_dir / "pid", str(proc.pid))
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


def serve_spare() -> int:
    """The spare's side (`python -m sdlora spare`, see Spare): import, say `ready`, train the run folder read from
    stdin with its output in that folder's log.txt; nothing read (the owner went away): exit."""
    # the pipe to the owner carries "ready" and nothing else: whatever the imports print goes nowhere (a full pipe
    # that nobody reads would block the spare before it ever reads its run)
    ready_pipe = os.dup(sys.stdout.fileno())
    with open(os.devnull, "wb") as devnull:
        os.dup2(devnull.fileno(), sys.stdout.fileno())
    import diffusers

    from sdlora import train  # torch, transformers, peft and accelerate come with it
    from sdlora.cli import main

    diffusers.StableDiffusionPipeline, diffusers.StableDiffusionXLPipeline  # diffusers imports its pipelines lazily
    try:
        os.write(ready_pipe, b"ready\n")
        os.close(ready_pipe)
    except OSError:  # the owner went away
        return 0
    run_dir = sys.stdin.readline().strip()
    if not run_dir:
        return 0
    train.HANDED_OVER_AT = time.time()  # its start event times setup from here
    with open(Path(run_dir) / "log.txt", "ab") as log:
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
            os.dup2(log.fileno(), stream.fileno())
    return main(["train", "--run-dir", run_dir, "--resume"])


def status(run_dir: str | Path) -> str:
    """'running', 'done', 'stopped', 'error' or 'new' for a run directory."""
    events = read_events(run_dir)
    last = next((e["type"] for e in reversed(events) if e["type"] in FINAL_EVENTS + ("start",)), None)
    if last in FINAL_EVENTS:
        return last
    pid_file = Path(run_dir) / "pid"
    if pid_file.exists():
        try:
            pid = int(pid_file.read_text())
            os.kill(pid, 0)
            if _zombie(pid):  # exited, not yet collected by its parent
                raise OSError
            return "running"
        except (OSError, ValueError):
            return "error" if last == "start" else "new"
    return "running" if last == "start" else "new"


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return False


def list_runs(root: str | Path) -> list[Path]:
    """Run directories under `root`, newest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    runs = [p for p in root.iterdir() if (p / "config.json").exists()]
    return sorted(runs, key=lambda p: p.stat().st_mtime, reverse=True)
