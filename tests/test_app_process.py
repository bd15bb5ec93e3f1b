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


def test_closing_the_server_ends_its_children(tmp_path):
    from sdlora import app

    before = descendants(os.getpid())
    demo = app.serve(tmp_path / "workspace", port=free_port(), block=False, spare=True)
    started = wait_until(lambda: descendants(os.getpid()) - before, 60, "the spare training process")
    assert all(alive(p) for p in started)  # the spare runs while the server does
    demo.close()
    deadline = time.monotonic() + 10
    while any(alive(p) for p in started) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(alive(p) for p in started), "a process the app started outlived demo.close()"


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
def test_the_app_ends_every_process_it_started_on_ctrl_c_and_on_sigterm(tmp_path):
    """Two apps at once (so that their start-ups overlap). Ctrl-C in the one training a run: the run saves, stops,
    and nothing the app started is left. SIGTERM in the other, which holds only its spare training process: the
    spare ends with it."""
    from gradio_client import Client
    from test_app import start

    workspace = tmp_path / "workspace"
    draw_dataset(workspace / "datasets" / "shapes", n=4, size=32)
    ports = free_port(), free_port()
    training, idle = app_process(workspace, ports[0]), app_process(tmp_path / "idle", ports[1])
    try:
        for port in ports:
            wait_until(lambda: served(port), 180, "the apps to serve")
        client = Client(f"http://127.0.0.1:{ports[0]}/", verbose=False)
        run = start(client, **{"Dataset": "shapes", "Training steps": 100000, "Pictures per step": 1, "Rank": 4,
                               "Sample every": 100000, "Save every": 100000, "Sample steps": 1, "Run name": "long"})
        events = workspace / "runs" / run / "events.jsonl"

        spare = wait_until(lambda: descendants(idle.pid), 60, "the idle app's spare training process")
        idle.send_signal(signal.SIGTERM)
        assert idle.wait(timeout=60) in (0, 130), idle.stdout.read()  # 130: before Gradio's own loop began
        wait_until(lambda: not any(alive(p) for p in spare), 10, "the idle app's spare to end")

        wait_until(lambda: events.exists() and '"progress"' in events.read_text(), 300, "the run's first steps")
        children = descendants(training.pid)
        training.send_signal(signal.SIGINT)
        assert training.wait(timeout=120) in (0, 130), training.stdout.read()
    finally:
        for proc in (training, idle):
            if proc.poll() is None:
                proc.kill()
    wait_until(lambda: not any(alive(p) for p in children), 30, "the training app's children to end")
    kinds = [json.loads(line)["type"] for line in events.read_text().splitlines()]
    assert kinds[-1] == "stopped" and (workspace / "runs" / run / "lora.safetensors").is_file()
