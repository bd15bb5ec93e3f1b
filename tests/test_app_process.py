"""`sdlora app` as a process: it ends every process it started when it exits, and a busy port is one line."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import draw_dataset


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def alive(pid: int) -> bool:
    """Running, not a zombie (an exited child nobody collected yet counts as gone)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def descendants(pid: int) -> set[int]:
    """Every live process below `pid`, from /proc's parent links."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        parents[int(stat.parent.name)] = int(fields[1])
    found, frontier = set(), {pid}
    while frontier:
        frontier = {child for child, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return {p for p in found if alive(p)}


def app_process(workspace: Path, port: int) -> subprocess.Popen:
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False"}
    return subprocess.Popen([sys.executable, "-m", "sdlora", "app", "--workspace", str(workspace), "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True)


def wait_until(condition, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def served(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


@pytest.mark.slow
def test_the_app_ends_its_spare_process_on_sigterm(tmp_path):
    port = free_port()
    proc = app_process(tmp_path / "workspace", port)
    try:
        wait_until(lambda: served(port), 180, "the app to serve")
        children = wait_until(lambda: descendants(proc.pid), 60, "the spare training process")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) in (0, 130), proc.stdout.read()  # 130: before Gradio's own loop began
    finally:
        if proc.poll() is None:
            proc.kill()
    wait_until(lambda: not any(alive(p) for p in children), 10, "the app's children to end")


def test_closing_the_server_ends_its_children(tmp_path):
    from sdlora import app

    before = descendants(os.getpid())
    demo = app.serve(tmp_path / "workspace", port=free_port(), block=False, spare=True)
    started = wait_until(lambda: descendants(os.getpid()) - before, 60, "the spare training process")
    demo.close()
    wait_until(lambda: not any(alive(p) for p in started), 10, "the app's children to end")


def test_a_port_in_use_is_one_line(tmp_path, capsys):
    from sdlora.cli import main

    before = descendants(os.getpid())
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code = main(["app", "--workspace", str(tmp_path / "w"), "--port", str(port)])
    assert code == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert lines == [f"sdlora app: error: port {port} is already in use "
                     f"(hint: close what uses it, or pick another with --port {port + 1})"]
    assert descendants(os.getpid()) <= before  # nothing was started


@pytest.mark.slow
def test_ctrl_c_stops_a_training_run_after_it_saves(tmp_path):
    """Ctrl-C in the app's terminal ends the run it started too: the run saves first, and nothing is left running."""
    from gradio_client import Client
    from test_app import start

    workspace = tmp_path / "workspace"
    draw_dataset(workspace / "datasets" / "shapes", n=4, size=32)
    port = free_port()
    proc = app_process(workspace, port)
    try:
        wait_until(lambda: served(port), 180, "the app to serve")
        client = Client(f"http://127.0.0.1:{port}/", verbose=False)
        run = start(client, **{"Dataset": "shapes", "Training steps": 100000, "Pictures per step": 1, "Rank": 4,
                               "Sample every": 100000, "Save every": 100000, "Sample steps": 1, "Run name": "long"})
        events = workspace / "runs" / run / "events.jsonl"
        wait_until(lambda: events.exists() and '"progress"' in events.read_text(), 300, "the run's first steps")
        children = descendants(proc.pid)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=120) in (0, 130), proc.stdout.read()
    finally:
        if proc.poll() is None:
            proc.kill()
    wait_until(lambda: not any(alive(p) for p in children), 30, "the app's children to end")
    kinds = [json.loads(line)["type"] for line in events.read_text().splitlines()]
    assert kinds[-1] == "stopped" and (workspace / "runs" / run / "lora.safetensors").is_file()
