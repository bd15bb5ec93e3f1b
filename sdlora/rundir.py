"""A run folder on disk: its events, the STOP/SAMPLE/SAVE requests a running run takes, its state, and the run
folders under a folder.

A run folder holds config.json, events.jsonl, pid (the process training it), log.txt and what the run writes.
Starting a process on one is sdlora.launch."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from sdlora.atomic import write_atomic

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
            tqdm.write(f"compatibility check {ok} ({Path(event['path']).name}): diffusers' loader took {event['keys_consumed']}/{event['keys_written']} "
                       f"keys; strength 0 = base (max diff {event['strength0_max_diff']:g})")
        elif kind == "eval":
            tqdm.write(f"eval (step {event['step']}, {event['on']}): learned {event['learned']:.0%} of the base's "
                       f"loss at strength {event['suggested_strength']:g}, bleed {event['bleed']:.0%}")
        elif kind == "recommend":
            tqdm.write(f"use: {event['reason']}")
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


def write_pid(run_dir: str | Path, pid: int) -> None:
    """Record the process training the run (`status` asks whether it is alive)."""
    write_atomic(Path(run_dir) / "pid", str(pid))


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
